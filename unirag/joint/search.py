"""Trie-constrained beam search over the docid tree with the joint model's docid head."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

from unirag import streaming
from unirag.answer import TokenWeights
from unirag.errors import UniragError
from unirag.joint.modeling import JointModel
from unirag.joint.padding import left_pad, pad_token_id
from unirag.joint.prompts import retrieval_prompt, token_strings


class DocidTrie(Protocol):
    """What the beam search needs from a docid tree (unirag.docids.DocidTree has it)."""

    def allowed(self, prefix: tuple[int, ...]) -> list[int]: ...

    def doc_id_at(self, docid: tuple[int, ...]) -> str: ...


@dataclass
class DocidBeam:
    """One retrieved document: its docid path, scores and per-level choices.

    score = logprob + document_match: the path's log-probability (each level renormalised over the siblings)
    plus the semantic scorer's scaled cosine of the query vector with the document's own node (0 without a
    scorer, or when the search ran with rescore=False). Beams are ranked by score."""

    docid: tuple[int, ...]
    doc_id: str
    logprob: float
    levels: list[dict[str, Any]]  # per level: prefix, children, probs (sum to 1), chosen
    document_match: float = 0.0

    @property
    def score(self) -> float:
        return self.logprob + self.document_match

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["docid"] = list(self.docid)
        record["score"] = self.score
        return record


@dataclass
class DocidSearch:
    """Everything the beam search found: ranked distinct docs, all finished beams, and the attention trace."""

    beams: list[DocidBeam]  # distinct documents, best first, at most num_return
    finished: list[DocidBeam]  # every finished beam, best first
    attention: TokenWeights  # from <retrieve_token> over the question tokens
    prompt_tokens: int = 0



STREAMED_PATHS = 3  # paths a live view of the search gets at each level


@dataclass
class _Hyp:
    prefix: tuple[int, ...]
    score: float
    levels: list[dict[str, Any]]
    children: list[int]  # trie.allowed(prefix); [] = complete docid
    row: int = 0  # its row in the batch the last forward ran on
    parent_row: int = 0  # its parent's row: the cache row it continues
    next_token: int = 0  # the docid token it feeds


@dataclass
class _QuestionSearch:
    """One question's beams while several questions are searched together."""

    prompt_ids: list[int]
    question_positions: list[int]
    pad: int  # left padding of its prompt row
    query: torch.Tensor | None = None  # the semantic scorer's query vector (None without a scorer)
    attention: TokenWeights = field(default_factory=TokenWeights)
    active: list[_Hyp] = field(default_factory=list)
    finished: list[tuple[_Hyp, float]] = field(default_factory=list)  # (path, document match)
    best_per_doc: dict[str, float] = field(default_factory=dict)  # distinct documents found so far → best score


@torch.inference_mode()
def search_docids(
    model: JointModel,
    tokenizer,
    question: str,
    trie: DocidTrie,
    beam_width: int = 10,
    num_return: int = 3,
    pathway: bool = True,
    bridge: bool = True,
    rescore: bool = True,
) -> DocidSearch:
    """Beam search over the docid trie with the docid head; returns distinct documents and traces.

    The prompt runs once with the KV cache; beams are then expanded together in one batch, the cache being
    re-indexed to follow the surviving beams. At each level the docid head's logits are restricted to the
    allowed children and renormalised (log-softmax over that set). A complete docid (allowed == []) can
    only be followed by end-of-docid, whose renormalised log-probability is 0, so the beam finishes.

    rescore: a finished path's score also gets the semantic scorer's match of the query with the document
    itself. The per-level softmax only compares siblings, so a path can be confident all the way down to a
    document that fits the question poorly in absolute terms; the document-level match puts that back
    (see docs/RESULTS.md).

    A listener (`unirag.streaming`) gets the best paths after every level.
    """
    return search_docids_many(model, tokenizer, [question], trie, beam_width, num_return, pathway, bridge,
                              rescore)[0]


@torch.inference_mode()
def search_docids_many(
    model: JointModel,
    tokenizer,
    questions: Sequence[str],
    trie: DocidTrie,
    beam_width: int = 10,
    num_return: int = 3,
    pathway: bool = True,
    bridge: bool = True,
    rescore: bool = True,
) -> list[DocidSearch]:
    """`search_docids` for several questions in one set of forwards: the prompts left-padded into one prefill, then
    one row per live beam of every question (rows = questions × beams). Each question keeps its own beams, pruning
    and ranking, so its result is the one `search_docids` gives it alone, up to float rounding. Only a single
    question streams its levels."""
    if beam_width < 1 or num_return < 1:
        raise UniragError("beam_width and num_return must be >= 1.")
    if not questions:
        return []
    with model.retrieval_mode():
        return _search_many(model, tokenizer, list(questions), trie, beam_width, num_return, pathway, bridge,
                            rescore)


def _search_many(model: JointModel, tokenizer, questions: list[str], trie: DocidTrie, beam_width: int,
                 num_return: int, pathway: bool, bridge: bool, rescore: bool) -> list[DocidSearch]:
    device = model.device
    prompts = [retrieval_prompt(model, tokenizer, q) for q in questions]
    root_children = [int(c) for c in trie.allowed(())]
    if not root_children:  # empty tree: nothing to retrieve
        return [DocidSearch([], [], TokenWeights(), len(ids)) for ids, _ in prompts]
    batch = left_pad([ids for ids, _ in prompts], pad_token_id(tokenizer), device)
    out = model(batch.ids, attention_mask=batch.mask, position_ids=batch.positions, use_cache=True, pathway=pathway,
                bridge=bridge, output_attentions=pathway, return_lm_logits=False, attention_layers=())
    cache = out.past_key_values
    rows = out.docid_logits[:, -1].float()
    searches = []
    for q, (ids, positions) in enumerate(prompts):
        search = _QuestionSearch(ids, positions, batch.pads[q])
        search.attention = _retrieval_attention(tokenizer, search, out, q)
        # The semantic scorer reads the prompt pass only: its query vector pools the whole question.
        search.query = out.query_vectors[q, -1] if out.query_vectors is not None else None
        search.active = [_Hyp((), 0.0, [], root_children, row=q)]
        searches.append(search)
    rescore = rescore and out.query_vectors is not None
    # Cosines are at most 1, so no live beam can gain more than the scorer's scale (pruning bound in _advance).
    max_match = float(model.semantic.log_scale.exp()) if rescore else 0.0
    stream = len(questions) == 1 and streaming.listening()
    fed = 0  # docid tokens fed so far (every live row has fed as many)
    while True:
        for search in searches:
            if search.active:
                _advance(model, trie, search, rows, beam_width, num_return, rescore, max_match)
        if stream:  # the page draws the search as it goes: the best paths so far, this level decided
            _emit_level(searches[0])
        live = [(q, hyp) for q, search in enumerate(searches) for hyp in search.active]
        if not live:
            break
        parents = torch.tensor([hyp.parent_row for _, hyp in live], device=device)
        tokens = torch.tensor([[hyp.next_token] for _, hyp in live], device=device)
        for row, (_, hyp) in enumerate(live):
            hyp.row = row
        cache.batch_select_indices(parents)
        fed += 1
        mask, positions = batch.step([q for q, _ in live], fed)
        out = model(tokens, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                    pathway=pathway, bridge=bridge, return_lm_logits=False)
        cache = out.past_key_values
        rows = out.docid_logits[:, -1].float()
    return [_result(trie, search, num_return) for search in searches]


def _advance(model: JointModel, trie: DocidTrie, search: _QuestionSearch, rows: torch.Tensor, beam_width: int,
             num_return: int, rescore: bool, max_match: float) -> None:
    """One level of one question's beam search: its live beams (rows of `rows`) → its next live beams, finished
    paths recorded; each next beam knows its parent row and the docid token to feed."""
    L = model.config.docid_levels
    query = search.query
    candidates: list[tuple[float, int, int, dict[str, Any]]] = []
    for b, hyp in enumerate(search.active):
        level = len(hyp.prefix)
        if level >= L:
            raise UniragError(f"The docid tree is deeper than the model's {L} docid levels.")
        index = torch.tensor([model.docid_vocab_index(level, c) for c in hyp.children], device=rows.device)
        logits = rows[hyp.row, index]
        if query is not None:
            logits = logits + model.semantic_scores(trie, query, hyp.prefix, hyp.children).to(logits.device)
        logp = torch.log_softmax(logits, dim=-1)
        info = {"prefix": list(hyp.prefix), "children": list(hyp.children), "probs": logp.exp().tolist()}
        for c, lp in zip(hyp.children, logp.tolist(), strict=True):
            candidates.append((hyp.score + lp, b, c, info))
    candidates.sort(key=lambda item: -item[0])  # stable: ties keep trie order
    next_active = []
    for score, b, c, info in candidates[:beam_width]:
        parent = search.active[b]
        prefix = parent.prefix + (c,)
        hyp = _Hyp(prefix, score, parent.levels + [{**info, "chosen": c}], [int(x) for x in trie.allowed(prefix)])
        if hyp.children:
            hyp.parent_row, hyp.next_token = parent.row, model.docid_token_id(len(parent.prefix), c)
            next_active.append(hyp)
        else:
            match = float(model.semantic_scores(trie, query, parent.prefix, [c])[0]) if rescore else 0.0
            search.finished.append((hyp, match))
            doc = trie.doc_id_at(prefix)
            search.best_per_doc[doc] = max(score + match, search.best_per_doc.get(doc, -math.inf))
    # Log-probabilities only decrease: stop once no live beam can beat the num_return-th distinct document.
    if len(search.best_per_doc) >= num_return:
        bar = sorted(search.best_per_doc.values(), reverse=True)[num_return - 1]
        next_active = [h for h in next_active if h.score + max_match > bar]
    search.active = next_active


def _emit_level(search: _QuestionSearch) -> None:
    best = sorted([h for h, _ in search.finished] + search.active, key=lambda h: -h.score)[:STREAMED_PATHS]
    streaming.emit("level", {"level": max(len(h.prefix) for h in best) - 1 if best else 0,
                             "paths": [h.levels for h in best], "finished": len(search.finished)})


def _result(trie: DocidTrie, search: _QuestionSearch, num_return: int) -> DocidSearch:
    all_beams = [DocidBeam(h.prefix, trie.doc_id_at(h.prefix), h.score, h.levels, match)
                 for h, match in search.finished]
    all_beams.sort(key=lambda b: -b.score)
    distinct: list[DocidBeam] = []
    seen: set[str] = set()
    for beam in all_beams:
        if beam.doc_id not in seen:
            seen.add(beam.doc_id)
            distinct.append(beam)
    return DocidSearch(distinct[:num_return], all_beams, search.attention, len(search.prompt_ids))


def ranking_name(rescore: bool) -> str:
    """How the search ranks documents, as eval summaries and benchmarks label it."""
    return "path log-prob + document match" if rescore else "path log-prob"



def _retrieval_attention(tokenizer, search: _QuestionSearch, out, row: int) -> TokenWeights:
    """Retrieval-head attention from <retrieve_token> over the question tokens (mean over layers and heads) of one
    prompt row, whose left padding shifts its positions."""
    if not out.retrieval_attentions:
        return TokenWeights()
    weights = torch.stack([a[row, :, -1, :].float() for a in out.retrieval_attentions]).mean(dim=(0, 1))  # [S]
    positions = search.question_positions
    return TokenWeights(token_strings(tokenizer, [search.prompt_ids[i] for i in positions]),
                        [float(weights[search.pad + i]) for i in positions])



__all__ = ["DocidBeam", "DocidSearch", "DocidTrie", "ranking_name", "search_docids", "search_docids_many"]
