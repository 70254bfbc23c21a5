"""`Answer`: the single currency between the library, the eval harness and the UI, with its typed `Trace`."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

_ECHO = re.compile(r"^\s*(?:Q|Question)\s*:", re.IGNORECASE)  # the prompt's "Q: question" echoed back
_PREFIX = re.compile(r"^\s*(?:A|Answer)\s*:\s*", re.IGNORECASE)  # the prompt's "A:" repeated before the answer
_INLINE_ANSWER = re.compile(r"\s(?:A|Answer)\s*:\s*", re.IGNORECASE)


def display_answer(text: str, question: str | None = None) -> str:
    """The answer span both cards show (and are marked on): the first line that is not an echo of the prompt,
    without a leading "A:". An echoed "Q: … A: span" (or "Q: <the question> span") line keeps the span after it;
    a line that only echoes the question gives "" (no answer). Eval metrics score the raw `Answer.text`."""
    asked = " ".join(str(question or "").split()).lower()
    for line in str(text or "").splitlines():
        line = " ".join(line.split())
        if not line:
            continue
        if _ECHO.match(line):
            parts = _INLINE_ANSWER.split(line, maxsplit=1)
            rest = _ECHO.sub("", line, count=1).strip()
            if len(parts) == 2:
                line = parts[1]
            elif asked and rest.lower().startswith(asked):
                line = rest[len(asked):].lstrip(" ?.:")
            else:
                continue  # only the question echoed: look at the next line
        line = _PREFIX.sub("", line).strip()
        if line:
            return line
    return ""


@dataclass
class RetrievedDoc:
    """One retrieved passage. `score`: cosine similarity (dense) or beam score (joint: path log-prob + doc match)."""

    doc_id: str
    title: str
    text: str
    score: float
    docid: tuple[int, ...] | None = None  # hierarchical semantic docid (joint only)


@dataclass
class TokenWeights:
    """Weights over tokens, e.g. the retrieval heads' attention from <retrieve_token> over the question."""

    tokens: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


@dataclass
class AnswerAttention:
    """For each answer token, the attention of the query that produced it over the context tokens."""

    answer_tokens: list[str] = field(default_factory=list)
    context_tokens: list[str] = field(default_factory=list)
    weights: list[list[float]] = field(default_factory=list)  # [answer tokens][context tokens]
    doc_spans: list[list[int]] = field(default_factory=list)  # [start, end) of each passage in context_tokens
    source: str | None = None  # which attention was read (e.g. "bridge"); None when not recorded


@dataclass
class SelfCheckRow:
    """One self-checked document: score = search_score + weight × question_logprob."""

    doc_id: str
    search_rank: int  # 1-based rank in the search's order
    search_score: float
    question_logprob: float  # mean log-probability of the question's tokens after the passage
    score: float


@dataclass
class EvidenceSpan:
    """The evidence system's evidence: tokens the base LLM wrote, constrained to a substring of a candidate
    document; `text` is that document's own characters [start, end) (what the reader reads, what the app marks)."""

    text: str
    doc_id: str  # the candidate document it was copied from (the best-ranked one holding it)
    start: int  # character span inside the document's text
    end: int
    tokens: int  # evidence tokens generated
    stop_reason: str  # "end" (the LLM preferred to stop), "document_end" (no continuation) or "evidence_tokens"


@dataclass
class AnswerSpan:
    """Where a span answer (`answer_mode="span"`) was copied from: the best-ranked document holding it, and its
    characters [start, end) in that document's text. The document is what the answer cites."""

    doc_id: str
    start: int
    end: int


@dataclass
class RoundTrace:
    """One round of a multi-round joint answer (`InferenceSettings.rounds` > 1): the query its docid search ran
    with, what the search found and chose, and the answer read from those documents."""

    round: int  # 1-based
    query: str  # the search's query: the question (round 1), then the question plus the previous round's answer
    docs: list[RetrievedDoc] = field(default_factory=list)  # the documents read, best first
    # The search's ranking, best first (the self-check's order when it ran), at least the documents read.
    ranked_doc_ids: list[str] = field(default_factory=list)
    beams: list[dict[str, Any]] = field(default_factory=list)  # every finished beam, as `Trace.beams`
    paths: list[list[dict[str, Any]]] = field(default_factory=list)  # per document read, as `Trace.paths`
    answer: str = ""  # the raw generated text, as `Answer.text` (eval scores it the same way)
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def doc_ids(self) -> list[str]:
        return [d.doc_id for d in self.docs]


@dataclass
class Trace:
    """What a system can show about how it answered; every field is empty when the system does not record it."""

    retrieval_attention: TokenWeights = field(default_factory=TokenWeights)
    # Every finished beam of the docid search, best first, as `DocidBeam.to_dict()` records.
    beams: list[dict[str, Any]] = field(default_factory=list)
    # Per chosen document, its per-level choices: {"prefix", "children", "probs", "chosen"}.
    paths: list[list[dict[str, Any]]] = field(default_factory=list)
    self_check: list[SelfCheckRow] = field(default_factory=list)  # best first; empty: no self-check ran
    answer_attention: AnswerAttention = field(default_factory=AnswerAttention)
    stop_reason: str = ""  # "eos", "newline" or "max_new_tokens" (joint reader)
    retrieval_prompt_tokens: int = 0
    evidence: EvidenceSpan | None = None  # the evidence system's evidence; None for every other system
    answer_span: AnswerSpan | None = None  # a span answer's source; None: decoded freely (or an empty answer)
    # Every round, first to last, when the joint system ran more than one; the fields above are then the last
    # round's (the answer's). Empty for a single round.
    rounds: list[RoundTrace] = field(default_factory=list)


@dataclass
class Answer:
    """What any system (norag, rag, joint) returns for one question."""

    system: str
    question: str
    text: str
    docs: list[RetrievedDoc] = field(default_factory=list)
    prompt_tokens: int = 0
    context_tokens: int = 0
    answer_tokens: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)  # per stage: retrieve, generate, ...
    notices: list[str] = field(default_factory=list)  # e.g. "question truncated to 2000 chars"
    trace: Trace = field(default_factory=Trace)  # attention maps, beam paths, per-level probs
    # The retriever's ranking, best first, when it ranked more documents than were read (R@3 of a system that
    # reads one); empty: the documents read are the whole ranking.
    ranked_doc_ids: list[str] = field(default_factory=list)

    @property
    def doc_ids(self) -> list[str]:
        return [d.doc_id for d in self.docs]

    @property
    def ranking(self) -> list[str]:
        return self.ranked_doc_ids or self.doc_ids

    @property
    def latency_ms(self) -> float:
        return float(sum(self.timings_ms.values()))

    def to_record(self) -> dict[str, Any]:
        """JSON-safe summary (no trace) for eval output files."""
        record = asdict(self)
        record.pop("trace")
        for doc in record["docs"]:
            doc.pop("text")
        record["latency_ms"] = self.latency_ms
        span = self.trace.answer_span
        record["answer_span"] = asdict(span) if span is not None else None  # the cited source of a span answer
        return record


__all__ = ["Answer", "AnswerAttention", "AnswerSpan", "EvidenceSpan", "RetrievedDoc", "RoundTrace", "SelfCheckRow",
           "TokenWeights", "Trace", "display_answer"]
