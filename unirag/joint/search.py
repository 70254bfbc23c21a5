"""Trie-constrained beam search over the docid tree with the joint model's docid head."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

from unirag.answer import TokenWeights
from unirag.errors import UniragError
from unirag.joint.modeling import JointModel
from unirag.joint.prompts import retrieval_prompt, token_strings


class DocidTrie(Protocol):
    """What the beam search needs from a docid tree (unirag.docids.DocidTree has it)."""

    def allowed(self, prefix: tuple[int, ...]) -> list[int]: ...

    def doc_id(self, docid: tuple[int, ...]) -> str: ...


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



@dataclass
class _Hyp:
    prefix: tuple[int, ...]
    score: float
    levels: list[dict[str, Any]]
    children: list[int]  # trie.allowed(prefix); [] = complete docid


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
    """
    if beam_width < 1 or num_return < 1:
        raise UniragError("beam_width and num_return must be >= 1.")
    with model.retrieval_mode():
        return _search_docids(model, tokenizer, question, trie, beam_width, num_return, pathway, bridge, rescore)


def _search_docids(model: JointModel, tokenizer, question: str, trie: DocidTrie, beam_width: int, num_return: int,
                   pathway: bool, bridge: bool, rescore: bool) -> DocidSearch:
    L = model.config.docid_levels
    device = model.device
    prompt_ids, question_positions = retrieval_prompt(model, tokenizer, question)
    root_children = [int(c) for c in trie.allowed(())]
    if not root_children:  # empty tree: nothing to retrieve
        return DocidSearch([], [], TokenWeights(), len(prompt_ids))
    out = model(
        torch.tensor([prompt_ids], device=device), use_cache=True, pathway=pathway, bridge=bridge,
        output_attentions=pathway, return_lm_logits=False, attention_layers=(),
    )
    attention = _retrieval_attention(model, tokenizer, prompt_ids, question_positions, out)
    cache = out.past_key_values
    rows = out.docid_logits[:, -1].float()
    # The semantic scorer reads the prompt pass only: its query vector pools the whole question.
    query = out.query_vectors[0, -1] if out.query_vectors is not None else None
    rescore = rescore and query is not None
    # Cosines are at most 1, so no live beam can gain more than the scorer's scale (pruning bound below).
    max_match = float(model.semantic.log_scale.exp()) if rescore else 0.0

    finished: list[tuple[_Hyp, float]] = []  # (path, document match)
    best_per_doc: dict[str, float] = {}  # distinct documents found so far → best score
    active = [_Hyp((), 0.0, [], root_children)]
    while active:
        candidates: list[tuple[float, int, int, dict[str, Any]]] = []
        for b, hyp in enumerate(active):
            level = len(hyp.prefix)
            if level >= L:
                raise UniragError(f"The docid tree is deeper than the model's {L} docid levels.")
            index = torch.tensor([model.docid_vocab_index(level, c) for c in hyp.children], device=rows.device)
            logits = rows[b, index]
            if query is not None:
                logits = logits + model.semantic_scores(trie, query, hyp.prefix, hyp.children).to(logits.device)
            logp = torch.log_softmax(logits, dim=-1)
            info = {"prefix": list(hyp.prefix), "children": list(hyp.children), "probs": logp.exp().tolist()}
            for c, lp in zip(hyp.children, logp.tolist(), strict=True):
                candidates.append((hyp.score + lp, b, c, info))
        candidates.sort(key=lambda item: -item[0])  # stable: ties keep trie order
        next_active, parents, next_tokens = [], [], []
        for score, b, c, info in candidates[:beam_width]:
            parent = active[b]
            prefix = parent.prefix + (c,)
            hyp = _Hyp(prefix, score, parent.levels + [{**info, "chosen": c}], [int(x) for x in trie.allowed(prefix)])
            if hyp.children:
                next_active.append(hyp)
                parents.append(b)
                next_tokens.append(model.docid_token_id(len(parent.prefix), c))
            else:
                match = float(model.semantic_scores(trie, query, parent.prefix, [c])[0]) if rescore else 0.0
                finished.append((hyp, match))
                doc = trie.doc_id(prefix)
                best_per_doc[doc] = max(score + match, best_per_doc.get(doc, -math.inf))
        # Log-probabilities only decrease: stop once no live beam can beat the num_return-th distinct document.
        if len(best_per_doc) >= num_return:
            bar = sorted(best_per_doc.values(), reverse=True)[num_return - 1]
            keep = [i for i, h in enumerate(next_active) if h.score + max_match > bar]
            next_active = [next_active[i] for i in keep]
            parents = [parents[i] for i in keep]
            next_tokens = [next_tokens[i] for i in keep]
        active = next_active
        if not active:
            break
        cache.batch_select_indices(torch.tensor(parents, device=device))
        out = model(
            torch.tensor([[t] for t in next_tokens], device=device), past_key_values=cache, use_cache=True,
            pathway=pathway, bridge=bridge, return_lm_logits=False,
        )
        cache = out.past_key_values
        rows = out.docid_logits[:, -1].float()

    all_beams = [DocidBeam(h.prefix, trie.doc_id(h.prefix), h.score, h.levels, match) for h, match in finished]
    all_beams.sort(key=lambda b: -b.score)
    distinct: list[DocidBeam] = []
    seen: set[str] = set()
    for beam in all_beams:
        if beam.doc_id not in seen:
            seen.add(beam.doc_id)
            distinct.append(beam)
    return DocidSearch(distinct[:num_return], all_beams, attention, len(prompt_ids))


def ranking_name(rescore: bool) -> str:
    """How the search ranks documents, as eval summaries and benchmarks label it."""
    return "path log-prob + document match" if rescore else "path log-prob"



def _retrieval_attention(model, tokenizer, prompt_ids, question_positions, out) -> TokenWeights:
    """Retrieval-head attention from <retrieve_token> over the question tokens (mean over layers and heads)."""
    if not out.retrieval_attentions:
        return TokenWeights()
    rows = torch.stack([a[0, :, -1, :].float() for a in out.retrieval_attentions])  # [layers, heads, S]
    weights = rows.mean(dim=(0, 1))
    return TokenWeights(token_strings(tokenizer, [prompt_ids[i] for i in question_positions]),
                        [float(weights[i]) for i in question_positions])



__all__ = ["DocidBeam", "DocidSearch", "DocidTrie", "ranking_name", "search_docids"]
