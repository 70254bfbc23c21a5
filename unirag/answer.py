"""`Answer`: the single currency between the library, the eval harness and the UI."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Shared vocabulary of the library, the eval files and the UI.
PRECISIONS = ("4bit", "fp32")  # bitsandbytes NF4, or float32
# Who reads the joint model's documents: its stage-2 reader (LoRA adapter, pathway, bridge), or the base LLM, the
# weights the RAG side reads with (then the two sides differ only in what they retrieved).
JOINT_READERS = ("trained", "base")
_PRECISION_ALIASES = {"nf4": "4bit", "4-bit": "4bit", "int4": "4bit", "float32": "fp32"}


def normalize_precision(value: str) -> str:
    """"4bit" or "fp32" from the spellings users write (nf4, 4-bit, int4, float32); other values unchanged."""
    value = str(value).strip().lower()
    return _PRECISION_ALIASES.get(value, value)


@dataclass
class RetrievedDoc:
    """One retrieved passage. `score`: cosine similarity (dense) or beam score (joint: path log-prob + doc match)."""

    doc_id: str
    title: str
    text: str
    score: float
    docid: tuple[int, ...] | None = None  # hierarchical semantic docid (joint only)


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
    traces: dict[str, Any] = field(default_factory=dict)  # attention maps, beam paths, per-level probs
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
        """JSON-safe summary (no traces) for eval output files."""
        record = asdict(self)
        record.pop("traces")
        for doc in record["docs"]:
            doc.pop("text")
        record["latency_ms"] = self.latency_ms
        return record
