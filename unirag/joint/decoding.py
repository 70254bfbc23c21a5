"""Decoding with the joint model: constrained docid beam search, then answering from the picked documents.

Retrieval prompt:  tokens of f"Q: {question}\\n" + <retrieve_token>; the docid head at the last position
                   predicts level 0; each chosen symbol is fed back as its docid token.
Answer prompt:     chat template around f"Q: {question}\\n{context}\\nA:" with <generates_token> right
                   before the assistant turn (plain text + <generates_token> without a template).

Training should build its examples with `retrieval_prompt` / `answer_prompt` so both sides agree.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from unirag.answer import JOINT_READERS, PRECISIONS, Answer, RetrievedDoc
from unirag.data import prepare_question
from unirag.errors import UniragError
from unirag.joint.modeling import TREE_FILE, JointModel

ANSWER_ATTENTION_LAYERS = 4  # base layers averaged for the answer heatmap when the bridge is off


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
    attention: dict[str, Any]  # {"tokens", "weights"} from <retrieve_token> over the question tokens
    prompt_tokens: int = 0


@dataclass
class Prompt:
    ids: list[int]
    context_positions: list[int] = field(default_factory=list)  # absolute positions of context tokens
    doc_spans: list[list[int]] = field(default_factory=list)  # [start, end) within context_positions
    text: str = ""


@dataclass
class AnswerGeneration:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    context_tokens: int
    answer_tokens: int
    stop_reason: str  # "eos", "newline" or "max_new_tokens"
    attention: dict[str, Any]


# --------------------------------------------------------------------------------------------- prompts


def _tokenize(tokenizer, text: str, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]] | None]:
    """Token ids and character offsets (None for tokenizers without offsets, i.e. slow ones)."""
    try:
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, ValueError, TypeError):
        return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]), None


def _overlapping(offsets: list[tuple[int, int]], start: int, end: int) -> list[int]:
    """Positions of tokens whose characters overlap [start, end) (special tokens have empty offsets)."""
    return [i for i, (s, e) in enumerate(offsets) if e > start and s < end and e > s]


def retrieval_prompt(model: JointModel, tokenizer, question: str) -> tuple[list[int], list[int]]:
    """(ids of f"Q: {question}\\n" + <retrieve_token>, positions of the question's own tokens)."""
    prefix = "Q: "
    ids, offsets = _tokenize(tokenizer, f"{prefix}{question}\n", add_special_tokens=True)
    if offsets is None:
        positions = list(range(len(ids)))
    else:
        positions = _overlapping(offsets, len(prefix), len(prefix) + len(question))
    return ids + [model.retrieve_token_id], positions


def answer_prompt(
    model: JointModel, tokenizer, question: str, passages: Sequence[tuple[str, str, str]]
) -> Prompt:
    """Ids of the answer prompt and where the context and each passage sit in it."""
    pieces = [f"{title}: {text}" if title else text for _, title, text in passages]
    head = f"Q: {question}\n"
    context = "\n".join(pieces)
    user_text = f"{head}{context}\nA:"
    # Character span of each passage inside user_text.
    spans, cursor = [], len(head)
    for piece in pieces:
        spans.append((cursor, cursor + len(piece)))
        cursor += len(piece) + 1

    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": user_text}]
        without = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        with_gen = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        header = with_gen[len(without):] if with_gen.startswith(without) else ""
        # Unusual templates whose generation prompt is not a suffix: put the token at the very end instead.
        body = without if header else with_gen
        ids, offsets = _tokenize(tokenizer, body, add_special_tokens=False)
        header_ids, _ = _tokenize(tokenizer, header, add_special_tokens=False) if header else ([], None)
        full_ids = ids + [model.generates_token_id] + header_ids
        base = body.find(user_text)
        text = body + "<generates_token>" + header
    else:
        ids, offsets = _tokenize(tokenizer, user_text, add_special_tokens=True)
        full_ids = ids + [model.generates_token_id]
        base = 0
        text = user_text + "<generates_token>"

    prompt = Prompt(ids=full_ids, text=text)
    if offsets is None or base < 0 or not pieces:
        return prompt
    prompt.context_positions = _overlapping(offsets, base + len(head), base + len(head) + len(context))
    if prompt.context_positions:
        first = prompt.context_positions[0]
        for start, end in spans:
            positions = _overlapping(offsets, base + start, base + end)
            prompt.doc_spans.append([positions[0] - first, positions[-1] + 1 - first] if positions else [0, 0])
    return prompt


def _token_strings(tokenizer, ids: Sequence[int], model: JointModel | None = None) -> list[str]:
    out = []
    for i in ids:
        if model is not None and i >= model.extra_vocab_offset:
            out.append(model.extra_token_name(i))
        else:
            out.append(tokenizer.decode([i]))
    return out


# --------------------------------------------------------------------------------------------- docids


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
    (measured: nq/dev R@1 0.455 → 0.564; docs/RESULTS.md).
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
        return DocidSearch([], [], {"tokens": [], "weights": []}, len(prompt_ids))
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


def generate_docids(
    model: JointModel,
    tokenizer,
    question: str,
    trie: DocidTrie,
    beam_width: int = 10,
    num_return: int = 3,
    pathway: bool = True,
    bridge: bool = True,
    rescore: bool = True,
) -> list[DocidBeam]:
    """Distinct documents ranked by score (see `search_docids` for the score and the traces)."""
    return search_docids(model, tokenizer, question, trie, beam_width, num_return, pathway, bridge, rescore).beams


def _retrieval_attention(model, tokenizer, prompt_ids, question_positions, out) -> dict[str, Any]:
    """Retrieval-head attention from <retrieve_token> over the question tokens (mean over layers and heads)."""
    if not out.retrieval_attentions:
        return {"tokens": [], "weights": []}
    rows = torch.stack([a[0, :, -1, :].float() for a in out.retrieval_attentions])  # [layers, heads, S]
    weights = rows.mean(dim=(0, 1))
    return {
        "tokens": _token_strings(tokenizer, [prompt_ids[i] for i in question_positions]),
        "weights": [float(weights[i]) for i in question_positions],
    }


# --------------------------------------------------------------------------------------------- answers


def _eos_ids(model: JointModel, tokenizer) -> set[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model.causal_lm, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    return ids


@torch.inference_mode()
def answer_with_docs(
    model: JointModel,
    tokenizer,
    question: str,
    passages: Sequence[tuple[str, str, str]],
    max_new_tokens: int = 32,
    output_attentions: bool = True,
    pathway: bool = True,
    bridge: bool = True,
    adapter: bool = True,
) -> AnswerGeneration:
    """Greedy answer from (doc_id, title, text) passages with the KV cache; stops at EOS or a newline.
    adapter=False reads without the stage-2 LoRA adapter (with pathway and bridge off: the base LLM).

    Leading newlines are skipped rather than ending the answer empty. The attention trace has, for each
    answer token, the weights of the query that produced it over the context tokens: bridge attention when
    the bridge is on, else the base's last layers, averaged over heads (and layers).
    """
    with model.reading_mode(adapter):
        return _answer_with_docs(model, tokenizer, question, passages, max_new_tokens, output_attentions, pathway,
                                 bridge)


def _answer_with_docs(model: JointModel, tokenizer, question: str, passages: Sequence[tuple[str, str, str]],
                      max_new_tokens: int, output_attentions: bool, pathway: bool, bridge: bool) -> AnswerGeneration:
    prompt = answer_prompt(model, tokenizer, question, passages)
    device = model.device
    num_layers = len(model.decoder.layers)
    last_layers = tuple(range(max(0, num_layers - ANSWER_ATTENTION_LAYERS), num_layers))
    use_bridge = bridge and pathway
    kwargs = {
        "pathway": pathway,
        "bridge": use_bridge,
        "output_attentions": output_attentions,
        "attention_layers": () if use_bridge else last_layers,
    }
    eos = _eos_ids(model, tokenizer)
    ctx = torch.tensor(prompt.context_positions, dtype=torch.long, device=device)

    def attention_row(out) -> list[float]:
        if not output_attentions or ctx.numel() == 0:
            return []
        if use_bridge:
            row = out.bridge_attentions[0, :, -1, :].float().mean(0)
        else:
            row = torch.stack([out.attentions[i][0, :, -1, :].float() for i in last_layers]).mean(dim=(0, 1))
        return row[ctx].tolist()

    out = model(torch.tensor([prompt.ids], device=device), use_cache=True, logits_to_keep=1, **kwargs)
    answer_ids: list[int] = []
    rows: list[list[float]] = []
    stop, started = "max_new_tokens", False
    for _ in range(max_new_tokens):
        token = int(out.lm_logits[0, -1].argmax())
        if token in eos:
            stop = "eos"
            break
        piece = tokenizer.decode([token])
        if "\n" in piece:
            before = piece.split("\n", 1)[0]
            if started or before.strip():
                if before.strip():
                    answer_ids.append(token)
                    rows.append(attention_row(out))
                stop = "newline"
                break
            # A leading newline is fed back to the model but is not part of the answer.
        else:
            answer_ids.append(token)
            rows.append(attention_row(out))
            started = started or bool(piece.strip())
        out = model(torch.tensor([[token]], device=device), past_key_values=out.past_key_values, use_cache=True,
                    **kwargs)

    text = tokenizer.decode(answer_ids, skip_special_tokens=True).split("\n", 1)[0].strip()
    attention = {
        "answer_tokens": _token_strings(tokenizer, answer_ids),
        "context_tokens": _token_strings(tokenizer, [prompt.ids[i] for i in prompt.context_positions]),
        "weights": rows if output_attentions else [],
        "doc_spans": prompt.doc_spans,
        "source": ("bridge" if use_bridge else f"base_last_{len(last_layers)}_layers") if output_attentions else None,
    }
    return AnswerGeneration(
        text=text,
        token_ids=answer_ids,
        prompt_tokens=len(prompt.ids),
        context_tokens=len(prompt.context_positions),
        answer_tokens=len(answer_ids),
        stop_reason=stop,
        attention=attention,
    )


# --------------------------------------------------------------------------------------------- self-check

SELF_CHECK_PROMPT = "Passage: {passage}\nPlease write a question based on this passage.\nQuestion:"
# Weight of the question log-likelihood against the search score, chosen on held-out *train* questions (never
# dev): R@1 0.61 without, 0.67 / 0.71 / 0.73 / 0.74 at weights 1 / 2 / 4 / 8 (docs/RESULTS.md, "Self-check").
SELF_CHECK_WEIGHT = 4.0


@torch.inference_mode()
def question_likelihood(
    model: JointModel, tokenizer, question: str, passages: Sequence[tuple[str, str, str]]
) -> list[float]:
    """Mean log-probability of the question's tokens written after each (doc_id, title, text) passage.

    The base LLM reads (adapter, pathway and bridge off): how well each document explains the question
    (query likelihood, as in UPR; Sachan et al., 2022). One right-padded batch: attention is causal, so the
    padding after a row never reaches its tokens and each row is exact.
    """
    if not passages:
        return []
    from unirag.joint.passage_cache import question_ids as tokenize_question
    from unirag.joint.passage_cache import self_check_prompt_ids

    question_ids = tokenize_question(tokenizer, question)
    rows = [self_check_prompt_ids(tokenizer, title, text) + question_ids for _, title, text in passages]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = model.device
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    with model.reading_mode(adapter=False):
        out = model(ids, attention_mask=mask, pathway=False, bridge=False, return_lm_logits=False)
    n = len(question_ids)
    # Position t predicts token t + 1: the question's tokens are predicted from the n positions before each.
    index = torch.stack([torch.arange(len(r) - n - 1, len(r) - 1) for r in rows]).to(device)
    hidden = out.hidden_states.gather(1, index[..., None].expand(-1, -1, out.hidden_states.shape[-1]))
    logp = model.causal_lm.lm_head(hidden).float().log_softmax(-1)
    target = torch.tensor(question_ids, device=device).expand(len(rows), -1)
    return logp.gather(-1, target[..., None])[..., 0].mean(-1).tolist()


# --------------------------------------------------------------------------------------------- system


def check_self_check(n: int) -> int:
    """0 (off) or the number of top documents to re-read, at least 2."""
    if n != 0 and not 2 <= n <= 32:
        raise UniragError(f"self_check must be 0 (off) or between 2 and 32 documents, got {n}.")
    return n


def check_self_check_weight(weight: float) -> float:
    """The weight of the question log-likelihood: in (0, 1e6]. 1e6 already ranks by the likelihood alone; larger
    weights could overflow the scores to -inf, which would silently keep the search's order."""
    if isinstance(weight, bool) or not (isinstance(weight, int | float) and 0 < weight <= 1e6):
        raise UniragError(f"self_check_weight must be a number in (0, 1e6], got {weight!r}.")
    return float(weight)


RECOMMENDED_FILE = "recommended_settings.json"


@dataclass(frozen=True)
class RecommendedSettings:
    """The inference setting a checkpoint's authors measured best, shipped next to it (`recommended_settings.json`).

    The app starts from it; `eval` and `ask` keep their own explicit defaults, so recorded commands still mean
    what they meant. The self-check part is only quick with the passage cache (`index --self-check-cache`), so
    `app_settings` applies it only when a cache is attached. The file holds one setting for every precision, or
    one per precision (`{"4bit": {...}, "fp32": {...}}`): which reader is best differs between NF4 and fp32."""

    k_docs: int = 1
    beam_width: int = 10
    self_check: int = 0
    self_check_weight: float = SELF_CHECK_WEIGHT
    joint_reader: str = "trained"
    chosen_on: str = ""  # where the setting was chosen (never the dev questions it is reported on)

    def __post_init__(self) -> None:
        for name, low, high in (("k_docs", 1, 3), ("beam_width", 1, 32)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise UniragError(f"{RECOMMENDED_FILE}: {name} must be a whole number in [{low}, {high}], "
                                  f"got {value!r}.")
        if isinstance(self.self_check, bool) or not isinstance(self.self_check, int):
            raise UniragError(f"{RECOMMENDED_FILE}: self_check must be a whole number, got {self.self_check!r}.")
        check_self_check(self.self_check)
        check_self_check_weight(self.self_check_weight)
        if self.self_check > self.beam_width:
            raise UniragError(f"{RECOMMENDED_FILE}: self_check ({self.self_check}) re-reads the search's top documents "
                              f"and cannot exceed beam_width ({self.beam_width}).")
        if self.joint_reader not in JOINT_READERS:
            raise UniragError(f"{RECOMMENDED_FILE}: joint_reader must be one of {', '.join(JOINT_READERS)}, "
                              f"got {self.joint_reader!r}.")

    @classmethod
    def load(cls, checkpoint_dir: str | Path, precision: str | None = None) -> RecommendedSettings | None:
        """The checkpoint's recommended setting for `precision` ("4bit" or "fp32"), or None when it ships none
        (for that precision). A malformed file is an error."""
        path = Path(checkpoint_dir) / RECOMMENDED_FILE
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UniragError(f"{path} is not readable JSON ({exc}).") from None
        if not isinstance(raw, dict):
            raise UniragError(f"{path} must hold a JSON object.")
        if any(key in PRECISIONS for key in raw):  # one setting per precision
            others = sorted(set(raw) - set(PRECISIONS))
            if others:
                raise UniragError(f"{path} holds settings per precision; unknown key(s) {', '.join(others)} "
                                  f"(known: {', '.join(PRECISIONS)}).")
            if precision is None:
                raise UniragError(f"{path} holds settings per precision; say which precision to load.")
            if precision not in PRECISIONS:
                raise UniragError(f"Unknown precision {precision!r}; known: {', '.join(PRECISIONS)}.")
            raw = raw.get(precision)
            if raw is None:
                return None
            if not isinstance(raw, dict):
                raise UniragError(f"{path}: the {precision} setting must be a JSON object.")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise UniragError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
        return cls(**raw)

    def save(self, checkpoint_dir: str | Path) -> Path:
        path = Path(checkpoint_dir) / RECOMMENDED_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        return path

    def app_settings(self, has_passage_cache: bool) -> dict[str, int | float | str]:
        """Control values for the app: the full setting with a passage cache; without one, no self-check
        (re-reading N passages in full is slow) and the default beam."""
        if has_passage_cache and self.self_check:
            return {"k_docs": self.k_docs, "beam_width": self.beam_width, "self_check": self.self_check,
                    "self_check_weight": self.self_check_weight, "joint_reader": self.joint_reader}
        return {"k_docs": self.k_docs, "beam_width": min(self.beam_width, 10), "self_check": 0,
                "self_check_weight": self.self_check_weight, "joint_reader": self.joint_reader}


class JointSystem:
    """Question → docids (beam search over the trie) → answer from those documents, as an `Answer`."""

    name = "joint"

    def __init__(self, model: JointModel, tokenizer, corpus, trie: DocidTrie, pathway: bool = True,
                 bridge: bool = True, reader_pathway: bool | None = None, traces: bool = True,
                 rescore: bool = True, base_reader: bool = False, self_check: int = 0,
                 self_check_weight: float = SELF_CHECK_WEIGHT, passage_cache=None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.corpus = corpus
        self.trie = trie
        self.pathway = pathway
        self.bridge = bridge
        # Until stage 2 (its LoRA) has adapted the LLM to the pathway's residual, read with the pathway off:
        # the reader is then exactly the base LLM.
        self.reader_pathway = model.reader_trained if reader_pathway is None else reader_pathway
        # base_reader: the base LLM reads the joint model's documents (stage-2 adapter, pathway and bridge off),
        # the weights the dense RAG baseline reads with (same prompt text plus the <generates_token> marker).
        self.base_reader = base_reader  # the default of `answer(base_reader=...)`
        self.traces = traces  # False skips the answer-attention trace (evaluation does not draw heatmaps)
        self.rescore = rescore  # False ranks documents by path log-probability alone (see search_docids)
        # self_check = N >= 2: re-rank the search's top N documents by search score + the question's likelihood
        # under each (`question_likelihood`); 0 = off. The default of `answer(self_check=...)`.
        self.self_check = check_self_check(self_check)
        self.self_check_weight = check_self_check_weight(self_check_weight)  # large: the likelihood alone ranks
        # A PassageCache (the passages' self-check prompts, precomputed): the self-check then runs only the
        # question's tokens. None reads the N passages in full, with the same result up to rounding.
        self.passage_cache = passage_cache

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint_dir: str | Path,
        corpus,
        load_in_4bit: bool = False,
        base_model: str | None = None,
        pathway: bool = True,
        bridge: bool = True,
        attn_implementation: str = "eager",
        traces: bool = True,
        rescore: bool = True,
        base_reader: bool = False,
        self_check: int = 0,
        self_check_weight: float = SELF_CHECK_WEIGHT,
        passage_cache: bool | str | Path = False,
    ) -> JointSystem:
        """Load model, tokenizer and the checkpoint's docid tree (checked against `corpus`).

        Evaluation passes attn_implementation="sdpa", traces=False: faster, and no heatmaps are drawn.
        passage_cache: True opens (building it first if missing) the self-check cache of this base and corpus
        at its default path; a path does the same there; False reads the passages in full."""
        from unirag.docids import DocidTree

        ckpt = Path(checkpoint_dir)
        tree_path = ckpt / TREE_FILE
        if not tree_path.is_file():
            raise UniragError(f"{tree_path} is missing: a joint checkpoint must ship its docid tree.")
        tree = DocidTree.load(tree_path, corpus)  # before the model: a corpus mismatch fails fast
        model = JointModel.from_pretrained(ckpt, load_in_4bit=load_in_4bit, base_model=base_model,
                                           attn_implementation=attn_implementation)
        cache = None
        if passage_cache:
            from unirag.joint.passage_cache import PassageCache

            cache_path = None if passage_cache is True else passage_cache
            cache = PassageCache.build(model, corpus, cache_path)  # opens a complete cache, resumes a partial one
        return cls(model, model.tokenizer, corpus, tree, pathway=pathway, bridge=bridge, traces=traces, rescore=rescore,
                   base_reader=base_reader, self_check=self_check, self_check_weight=self_check_weight,
                   passage_cache=cache)

    def retrieve(self, question: str, k_docs: int = 2, beam_width: int = 10, self_check: int | None = None,
                 timings: dict[str, float] | None = None, traces: dict[str, Any] | None = None,
                 notices: list[str] | None = None) -> tuple[list[tuple[DocidBeam, float]], DocidSearch]:
        """The top k_docs documents as (beam, score), best first, and the search itself. Fills `timings`
        (retrieve, self_check), `traces` (self_check; ranking: every ranked document id, best first) and
        `notices` when given. `question` is used as is."""
        self_check = self.self_check if self_check is None else check_self_check(self_check)
        timings = {} if timings is None else timings
        start = time.perf_counter()
        wanted = max(k_docs, self_check)
        search = search_docids(self.model, self.tokenizer, question, self.trie, max(beam_width, wanted), wanted,
                               self.pathway, self.bridge, self.rescore)
        timings["retrieve"] = (time.perf_counter() - start) * 1000
        chosen = [(beam, beam.score) for beam in search.beams]
        if self_check and chosen:
            start = time.perf_counter()
            chosen, trace = self._self_check(question, search.beams)
            timings["self_check"] = (time.perf_counter() - start) * 1000
            if traces is not None:
                traces["self_check"] = trace
            if notices is not None:
                how = ("read the question after its cached reading of" if self.passage_cache is not None
                       else "re-read")
                notices.append(f"Self-check: the base LLM {how} the top {len(search.beams)} documents; they are "
                               f"ranked by search score + {self.self_check_weight:g} × the question's mean "
                               "log-probability after each.")
        if traces is not None:
            traces["ranking"] = [beam.doc_id for beam, _ in chosen]
        return chosen[:k_docs], search

    def _self_check(self, question: str, candidates: Sequence[DocidBeam]
                    ) -> tuple[list[tuple[DocidBeam, float]], list[dict[str, Any]]]:
        """Candidates re-ranked by search score + self_check_weight * question log-likelihood, and the trace."""
        if self.passage_cache is not None:
            likelihoods = self.passage_cache.question_likelihood(self.model, question, [b.doc_id for b in candidates])
        else:
            passages = [(b.doc_id, self.corpus[b.doc_id].title, self.corpus[b.doc_id].text) for b in candidates]
            likelihoods = question_likelihood(self.model, self.tokenizer, question, passages)
        scored = [(beam.score + self.self_check_weight * ql, rank, beam, ql)
                  for rank, (beam, ql) in enumerate(zip(candidates, likelihoods, strict=True), start=1)]
        scored.sort(key=lambda item: (-item[0], item[1]))  # ties keep the search's order
        trace = [{"doc_id": beam.doc_id, "search_rank": rank, "search_score": beam.score, "question_logprob": ql,
                  "score": score} for score, rank, beam, ql in scored]
        return [(beam, score) for score, _, beam, _ in scored], trace

    def answer(
        self,
        question: str,
        k_docs: int = 2,
        beam_width: int = 10,
        max_new_tokens: int = 32,
        gold_doc_id: str | None = None,
        doc_ids: Sequence[str] | None = None,
        doc_scores: Sequence[float] | None = None,
        base_reader: bool | None = None,
        self_check: int | None = None,
    ) -> Answer:
        """`base_reader` and `self_check` override the system's settings for this call (None: its own)."""
        text, notices = prepare_question(question)
        base_reader = self.base_reader if base_reader is None else base_reader
        self_check = self.self_check if self_check is None else check_self_check(self_check)
        reader_pathway = False if base_reader else self.reader_pathway
        if k_docs < 1:
            raise UniragError("k_docs must be >= 1.")
        model = self.model
        traces: dict[str, Any] = {}
        timings: dict[str, float] = {}
        ranking: list[str] = []

        if gold_doc_id is not None or doc_ids is not None:
            # Forced context: the gold document (the reader's upper bound) or another retriever's documents
            # (dense top-k read by this model: separates the retrieval effect from the fine-tuning effect).
            forced = [gold_doc_id] if gold_doc_id is not None else list(doc_ids or [])
            scores = list(doc_scores) if doc_scores is not None else [0.0] * len(forced)
            docs = []
            for doc_id, score in zip(forced, scores, strict=True):
                passage = self.corpus[doc_id]
                docid = None
                if hasattr(self.trie, "docid"):
                    try:
                        docid = tuple(self.trie.docid(doc_id))
                    except (KeyError, UniragError):
                        docid = None
                docs.append(RetrievedDoc(passage.id, passage.title, passage.text, score, docid))
            if gold_doc_id is not None:
                notices.append(f"Gold document {gold_doc_id} forced as the only context (retrieval skipped).")
            timings["retrieve"] = 0.0
            traces.update(beams=[], paths=[], retrieval_attention={"tokens": [], "weights": []})
        else:
            chosen, search = self.retrieve(text, k_docs, beam_width, self_check, timings, traces, notices)
            ranking = traces.pop("ranking")
            docs = []
            for beam, score in chosen:
                passage = self.corpus[beam.doc_id]
                docs.append(RetrievedDoc(passage.id, passage.title, passage.text, score, beam.docid))
            traces.update(
                beams=[b.to_dict() for b in search.finished],
                paths=[beam.levels for beam, _ in chosen],
                retrieval_attention=search.attention,
                retrieval_prompt_tokens=search.prompt_tokens,
            )
            if not docs:
                notices.append("No document was retrieved (empty docid tree).")

        start = time.perf_counter()
        generation = answer_with_docs(
            model, self.tokenizer, text, [(d.doc_id, d.title, d.text) for d in docs],
            max_new_tokens=max_new_tokens, output_attentions=self.traces, pathway=reader_pathway,
            bridge=reader_pathway and self.bridge, adapter=not base_reader,
        )
        timings["generate"] = (time.perf_counter() - start) * 1000
        if base_reader:
            notices.append("Read by the base LLM (the stage-2 adapter, pathway and bridge are off while answering): "
                           "the weights the dense RAG baseline reads with.")
        traces["answer_attention"] = generation.attention
        traces["stop_reason"] = generation.stop_reason
        return Answer(
            system=self.name,
            question=text,
            text=generation.text,
            docs=docs,
            prompt_tokens=generation.prompt_tokens,
            context_tokens=generation.context_tokens,
            answer_tokens=generation.answer_tokens,
            timings_ms=timings,
            notices=notices,
            traces=traces,
            ranked_doc_ids=ranking if len(ranking) > len(docs) else [],
        )


__all__ = [
    "AnswerGeneration",
    "DocidBeam",
    "DocidSearch",
    "DocidTrie",
    "JointSystem",
    "Prompt",
    "answer_prompt",
    "answer_with_docs",
    "check_self_check",
    "check_self_check_weight",
    "generate_docids",
    "question_likelihood",
    "ranking_name",
    "retrieval_prompt",
    "search_docids",
]
