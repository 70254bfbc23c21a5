"""The compared systems, each a name with one documented meaning (`eval --system NAME`, the app's columns).

Every system answers a batch of `Question`s with one `InferenceSettings` and returns `Answer`s:

    system = build_system("joint", corpus, settings, checkpoint="checkpoints/nq-smollm2")
    answers = system.answer_many(questions, settings)

`evidence` is RetroLLM-style: the docid search's documents constrain evidence the base LLM writes, and the answer
reads that evidence alone (unirag.joint.evidence_system).

Ablations are systems too (a name, not a combination of flags): the gold passage read by either reader, dense
documents read by the joint reader, the docid search without its document match. So are the other baselines:
BM25, dense + BM25 fused, and dense top N re-ranked by the joint model's own self-check (`rag-selfcheck`: the
joint system with the docid search swapped for dense retrieval, every other setting and rule the same).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from unirag.answer import Answer
from unirag.data import Corpus, Question, prepare_question
from unirag.errors import UniragError
from unirag.settings import InferenceSettings


@dataclass(frozen=True)
class SystemSpec:
    name: str
    meaning: str  # the full meaning (`eval --help`, the docs)
    reader: str  # "base" (the base LLM, as RAG reads) or "joint" (the joint checkpoint's reader, per settings)
    label: str = ""  # its name on the page ("Dense RAG")
    summary: str = ""  # one short line for the report's tables
    scores: str = ""  # what its documents' scores are ("cosine"), on the page's cards
    on_page: bool = False  # one of the page's right-hand baselines
    needs_checkpoint: bool = False
    needs_gold: bool = False  # reads each question's gold passage: every question needs a doc_id
    retrieves: bool = True  # False: no ranking, so no R@k
    settings_used: tuple[str, ...] = ("max_new_tokens",)  # the InferenceSettings fields this system reads
    needs_self_check: bool = False  # refuses settings with the self-check off (it would not be what it names)

    def check(self, settings: InferenceSettings) -> None:
        """Settings this system cannot honour are a UniragError (after the layering, before any question)."""
        if self.needs_self_check:
            from unirag.joint.dense_selfcheck import check_settings

            check_settings(settings)

    def documents_read(self, settings: InferenceSettings) -> int:
        """How many documents it reads (the k of R@k)."""
        if self.needs_gold:
            return 1
        if "evidence_docs" in self.settings_used:
            return settings.evidence_docs
        return settings.rag_k if "rag_k" in self.settings_used else settings.k_docs


_JOINT = ("k_docs", "beam_width", "self_check", "self_check_weight", "joint_reader", "max_new_tokens", "rounds",
          "answer_mode")
_READS = ("max_new_tokens", "answer_mode", "reader_prompt")
# In the order the report lists them.
SPECS: dict[str, SystemSpec] = {s.name: s for s in (
    SystemSpec("norag", "the base LLM answers from the question alone", "base", retrieves=False,
               label="No retrieval", summary="the LLM alone, no context", settings_used=_READS),
    SystemSpec("rag", "dense retrieval (bi-encoder, cosine top rag_k) read by the base LLM", "base",
               settings_used=("rag_k", *_READS), label="Dense RAG", scores="cosine", on_page=True,
               summary="dense MiniLM top-k read by the base LLM"),
    SystemSpec("bm25", "sparse retrieval (BM25 top rag_k, English stopwords) read by the base LLM like rag", "base",
               settings_used=("rag_k", *_READS), label="BM25", scores="BM25", on_page=True,
               summary="BM25 top-k read by the base LLM"),
    SystemSpec("hybrid", "dense and BM25 rankings fused (reciprocal rank), top rag_k read by the base LLM like rag",
               "base", settings_used=("rag_k", *_READS), label="Hybrid (dense + BM25, RRF)", scores="RRF",
               on_page=True, summary="dense MiniLM and BM25 fused by reciprocal rank, top-k read by the base LLM"),
    SystemSpec("rag-selfcheck", "dense top N (N = self_check) re-ranked by the joint model's self-check, its "
                                "k_docs documents read as joint reads them (`joint_reader`): joint without the "
                                "docid search", "joint", needs_checkpoint=True, needs_self_check=True,
               settings_used=("k_docs", "self_check", "self_check_weight", "joint_reader", *_READS),
               label="Dense + self-check", scores="score", on_page=True,
               summary="dense MiniLM top N re-ranked by the joint model's self-check, its top documents read"),
    SystemSpec("joint", "the joint model: trie-constrained docid search (+ self-check), its k_docs documents read "
                        "by the reader `joint_reader` names", "joint", needs_checkpoint=True, settings_used=_JOINT,
               label="Joint model", scores="search score",
               summary="the joint model's docid search (path log-prob + document match), its top documents read"),
    SystemSpec("joint-no-match", "ablation: the joint model with the search ranked by the docid path's "
                                 "log-probability alone, without the document-level match", "joint",
               needs_checkpoint=True, settings_used=_JOINT, label="Joint, path log-prob only",
               scores="path log-prob", summary="the docid search ranked by path log-prob alone (no document match)"),
    SystemSpec("evidence", "RetroLLM-style: the joint model's docid search (+ self-check) picks evidence_docs "
                           "documents, the base LLM writes evidence constrained (FM-index) to be a passage of one of "
                           "them, then answers from that evidence alone", "joint", needs_checkpoint=True,
               settings_used=("evidence_docs", "evidence_tokens", "evidence_lookahead", "beam_width", "self_check",
                              "self_check_weight", "max_new_tokens"),
               label="Evidence (RetroLLM-style)", scores="search score", on_page=True,
               summary="the docid search's documents constrain evidence the base LLM writes (FM-index); the answer "
                       "reads it"),
    SystemSpec("rag-joint-reader", "ablation: dense top rag_k documents read by the joint model's reader (the "
                                   "retrieval effect apart from the reader)", "joint", needs_checkpoint=True,
               settings_used=("rag_k", "joint_reader", *_READS), label="Dense, joint reader", scores="cosine",
               summary="dense MiniLM top-k read by the joint model's stage-2 reader"),
    SystemSpec("joint-gold", "ablation: the gold passage alone read by the joint model's reader", "joint",
               needs_checkpoint=True, needs_gold=True, settings_used=("joint_reader", *_READS),
               label="Gold passage, joint reader", summary="the gold passage read by the joint model's stage-2 reader"),
    SystemSpec("gold", "the gold passage alone read by the base LLM: the reader's upper bound", "base",
               needs_gold=True, settings_used=_READS, label="Gold passage, base reader",
               summary="the gold passage read by the base LLM"),
)}
SYSTEM_NAMES = tuple(SPECS)
PAGE_BASELINES = tuple(name for name, s in SPECS.items() if s.on_page)  # the page's right-hand choices


class System(Protocol):
    """Every named system answers one question (`answer`, the app) or a batch (`answer_many`, eval); those that
    retrieve also re-read given documents (`read`, the app's What if?)."""

    name: str

    def answer_many(self, questions: Sequence[Question], settings: InferenceSettings) -> list[Answer]: ...

    def answer(self, question: str, settings: InferenceSettings, with_attention: bool = False) -> Answer: ...


def spec(name: str) -> SystemSpec:
    if name not in SPECS:
        raise UniragError(f"Unknown system {name!r}; choose from {', '.join(SYSTEM_NAMES)}.")
    return SPECS[name]


def describe() -> str:
    """One line per system, for `--help` and the docs."""
    return "\n".join(f"  {s.name:<17} {s.meaning}" for s in SPECS.values())


def _check_gold(name: str, questions: Sequence[Question], corpus: Corpus) -> None:
    missing = [q.id for q in questions if not q.doc_id or q.doc_id not in corpus]
    if missing:
        raise UniragError(f"System {name!r} reads each question's gold passage, but {len(missing)} question(s) have "
                          f"none in the corpus (first: {missing[0]!r}).")


class _JointReading:
    """The joint checkpoint's reader on documents chosen elsewhere: the gold passage or dense top-k."""

    def __init__(self, name: str, joint: Any, retriever: Any = None) -> None:
        self.name, self.joint, self.retriever = name, joint, retriever

    def answer_many(self, questions: Sequence[Question], settings: InferenceSettings) -> list[Answer]:
        from unirag.rag import RANKED_AT_LEAST

        corpus = self.joint.corpus
        if self.retriever is None:
            _check_gold(self.name, questions, corpus)
        answers = []
        for q in questions:
            text, notices = prepare_question(q.question)
            ranked: list[str] = []
            if self.retriever is None:
                docs = self.joint.documents([q.doc_id])
                notices.append(f"Gold document {q.doc_id} forced as the only context (retrieval skipped).")
            else:
                hits = self.retriever.search(text, max(settings.rag_k, RANKED_AT_LEAST))
                ranked = [doc_id for doc_id, _ in hits] if len(hits) > settings.rag_k else []  # R@3, as dense RAG
                top = hits[: settings.rag_k]
                docs = self.joint.documents([doc_id for doc_id, _ in top], [score for _, score in top])
            answer = self.joint.read(text, docs, settings)
            answer.system, answer.ranked_doc_ids = self.name, ranked
            answer.notices[:0] = notices
            answers.append(answer)
        return answers

    def answer(self, question: str, settings: InferenceSettings, with_attention: bool = False) -> Answer:
        """One question (dense documents only: the gold ablation needs the question's gold passage)."""
        if self.retriever is None:
            raise UniragError(f"System {self.name!r} reads each question's gold passage: ask it with answer_many.")
        return self.answer_many([Question("question", question, ())], settings)[0]


class _JointSearch:
    def __init__(self, name: str, joint: Any) -> None:
        self.name, self.joint = name, joint

    def answer_many(self, questions: Sequence[Question], settings: InferenceSettings) -> list[Answer]:
        return [self.answer(q.question, settings) for q in questions]

    def answer(self, question: str, settings: InferenceSettings, with_attention: bool = False) -> Answer:
        """with_attention: accepted as every system takes it; the joint system's `traces` decides."""
        answer = self.joint.answer(question, settings)
        answer.system = self.name
        return answer

    def answer_batch(self, questions: Sequence[str], settings: InferenceSettings,
                     with_attention: bool = False) -> list[Answer]:
        """`answer` for questions asked at once (the app's concurrent users), batched through the model
        (`JointSystem.answer_many`)."""
        answers = self.joint.answer_many(list(questions), settings)
        for answer in answers:
            answer.system = self.name
        return answers

    def read(self, question: str, hits: Sequence[tuple[str, float | None]], settings: InferenceSettings,
             with_attention: bool = False) -> Answer:
        """Given documents, no docid search (a document removed or forced); a score left None is 0."""
        text, notices = prepare_question(question)
        docs = self.joint.documents([d for d, _ in hits], [0.0 if score is None else score for _, score in hits])
        answer = self.joint.read(text, docs, settings)
        answer.system = self.name
        answer.notices[:0] = notices
        return answer


class _BaseReading:
    """norag / rag / bm25 / hybrid / gold: the base LLM's `Reader` on no documents, a retriever's top k, or the
    gold passage."""

    def __init__(self, name: str, reader: Any, retriever: Any = None, corpus: Corpus | None = None) -> None:
        from unirag.rag import GoldPassageSystem, NoRagSystem, RagSystem

        self.name, self.corpus = name, corpus
        if name == "gold":
            self._inner = GoldPassageSystem(reader, corpus)
        else:
            self._inner = NoRagSystem(reader) if retriever is None else RagSystem(retriever, reader, name)

    def answer_many(self, questions: Sequence[Question], settings: InferenceSettings) -> list[Answer]:
        texts = [q.question for q in questions]
        if self.name == "gold":
            _check_gold(self.name, questions, self.corpus)
            answers = self._inner.answer_many(texts, [q.doc_id for q in questions], settings)
        else:
            answers = self._inner.answer_many(texts, settings)
        for answer in answers:
            answer.system = self.name
        return answers

    def answer(self, question: str, settings: InferenceSettings, with_attention: bool = False) -> Answer:
        """One question (not `gold`: it needs the question's gold passage, `answer_many` has it)."""
        if self.name == "gold":
            raise UniragError("System 'gold' reads each question's gold passage: ask it with answer_many.")
        return self._inner.answer(question, settings, with_attention)

    def answer_batch(self, questions: Sequence[str], settings: InferenceSettings,
                     with_attention: bool = False) -> list[Answer]:
        """`answer` for questions asked at once (the app's concurrent users): one batched retrieval and reading."""
        if self.name == "gold":
            raise UniragError("System 'gold' reads each question's gold passage: ask it with answer_many.")
        answers = self._inner.answer_many(list(questions), settings, with_attention)
        for answer in answers:
            answer.system = self.name
        return answers

    def read(self, question: str, hits: Sequence[tuple[str, float | None]], settings: InferenceSettings,
             with_attention: bool = False) -> Answer:
        """Given documents, no retrieval (a document removed or forced); see `rag.RagSystem.read`."""
        if not hasattr(self._inner, "read"):
            raise UniragError(f"System {self.name!r} retrieves nothing, so it has no documents to re-read.")
        return self._inner.read(question, list(hits), settings, with_attention)

    @property
    def retriever(self) -> Any:
        return getattr(self._inner, "retriever", None)

    @property
    def reader(self) -> Any:
        return self._inner.reader


class _Evidence:
    """evidence on `Question`s (unirag.joint.evidence_system)."""

    def __init__(self, name: str, joint: Any, encoder: Any = None) -> None:
        from unirag.joint.evidence_system import EvidenceSystem

        self.name, self.joint = name, joint
        self._inner = EvidenceSystem(joint, encoder=encoder)

    def answer_many(self, questions: Sequence[Question], settings: InferenceSettings) -> list[Answer]:
        return self._inner.answer_many([q.question for q in questions], settings)

    def answer(self, question: str, settings: InferenceSettings, with_attention: bool = False) -> Answer:
        return self._inner.answer(question, settings, with_attention)

    def read(self, question: str, hits: Sequence[tuple[str, float | None]], settings: InferenceSettings,
             with_attention: bool = False) -> Answer:
        return self._inner.read(question, hits, settings, with_attention)


class _DenseSelfCheck:
    """rag-selfcheck on `Question`s (unirag.joint.dense_selfcheck)."""

    def __init__(self, name: str, joint: Any, retriever: Any) -> None:
        from unirag.joint.dense_selfcheck import DenseSelfCheckSystem

        self.name, self.joint, self.retriever = name, joint, retriever
        self._inner = DenseSelfCheckSystem(retriever, joint)

    def answer_many(self, questions: Sequence[Question], settings: InferenceSettings) -> list[Answer]:
        return self._inner.answer_many([q.question for q in questions], settings)

    def answer(self, question: str, settings: InferenceSettings, with_attention: bool = False) -> Answer:
        return self._inner.answer(question, settings, with_attention)

    def read(self, question: str, hits: Sequence[tuple[str, float | None]], settings: InferenceSettings,
             with_attention: bool = False) -> Answer:
        return self._inner.read(question, list(hits), settings, with_attention)


RETRIEVER_OF = {"rag": "dense", "rag-joint-reader": "dense", "rag-selfcheck": "dense", "bm25": "bm25",
                "hybrid": "hybrid"}  # the ranker of each system that retrieves without the docid search


def build_system(name: str, corpus: Corpus, *, reader: Any = None, retriever: Any = None, joint: Any = None,
                 encoder: Any = None) -> System:
    """A named system from loaded parts: `reader` (rag.Reader on the base LLM), `retriever` (the ranker
    `RETRIEVER_OF[name]` names: rag.DenseRetriever or a unirag.sparse one), `joint` (joint.JointSystem),
    `encoder` (a loaded SentenceEncoder `evidence` may share). `load_system` loads them; the app builds its
    sides from the parts it already holds."""
    s = spec(name)
    if name in RETRIEVER_OF and retriever is None:
        raise UniragError(f"System {name!r} needs its {RETRIEVER_OF[name]} retriever.")
    if s.reader == "joint":
        if joint is None:
            raise UniragError(f"System {name!r} needs a joint checkpoint (--checkpoint DIR, e.g. "
                              "checkpoints/nq-smollm2).")
        if name in ("joint", "joint-no-match"):
            return _JointSearch(name, joint)
        if name == "rag-selfcheck":
            return _DenseSelfCheck(name, joint, retriever)
        if name == "evidence":
            return _Evidence(name, joint, encoder)
        return _JointReading(name, joint, retriever if name == "rag-joint-reader" else None)
    return _BaseReading(name, reader, retriever if name in RETRIEVER_OF else None, corpus)


def load_retriever(kind: str, corpus: Corpus, encoder: str | None = None) -> Any:
    """The ranker `kind` ("dense", "bm25", "hybrid") over `corpus`."""
    from unirag.rag import DenseRetriever
    from unirag.sparse import BM25Retriever, HybridRetriever

    if kind == "bm25":
        return BM25Retriever.from_corpus(corpus)
    dense = DenseRetriever.from_corpus(corpus, encoder)
    return HybridRetriever(dense, BM25Retriever.from_corpus(corpus)) if kind == "hybrid" else dense


def load_system(name: str, corpus: Corpus, *, checkpoint: str | Path | None = None, llm: str | None = None,
                encoder: str | None = None, precision: str = "fp32", passage_cache: bool = False,
                attn_implementation: str = "eager", traces: bool = True) -> tuple[System, Any]:
    """Load what system `name` needs and build it; returns (system, the JointSystem or None).

    passage_cache: open the self-check passage cache of this base and corpus, building it first when missing
    (a resumable pass over every passage); otherwise an existing complete cache is used when found, as the app does.
    """
    s = spec(name)
    if s.needs_checkpoint and not checkpoint:
        raise UniragError(f"--system {name} needs --checkpoint DIR (e.g. checkpoints/nq-smollm2).")
    if checkpoint and not s.needs_checkpoint:
        raise UniragError(f"--system {name} reads with the base LLM and takes no --checkpoint; the ablation "
                          "'rag-joint-reader' reads dense documents with the checkpoint's reader, and "
                          "'rag-selfcheck' re-ranks them by its self-check first.")
    retriever = load_retriever(RETRIEVER_OF[name], corpus, encoder) if name in RETRIEVER_OF else None
    if s.reader == "joint":
        from unirag.joint import JointSystem

        joint = JointSystem.from_checkpoint(checkpoint, corpus, precision=precision, base_model=llm,
                                            attn_implementation=attn_implementation, traces=traces,
                                            document_match=name != "joint-no-match", passage_cache=passage_cache)
        if joint.passage_cache is None and not passage_cache:
            from unirag.joint.passage_cache import PassageCache

            joint.passage_cache = PassageCache.find(joint.model, corpus)
        return build_system(name, corpus, retriever=retriever, joint=joint), joint
    from unirag.backbones import load_llm
    from unirag.rag import Reader

    model, tokenizer = load_llm(llm, precision=precision, attn_implementation=attn_implementation)
    return build_system(name, corpus, reader=Reader(model, tokenizer), retriever=retriever), None


__all__ = ["PAGE_BASELINES", "RETRIEVER_OF", "SPECS", "SYSTEM_NAMES", "System", "SystemSpec", "build_system",
           "describe",
           "load_retriever", "load_system", "spec"]
