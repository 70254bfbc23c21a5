"""`JointSystem`: question → docids (beam search over the trie) → optional self-check → answer, as an `Answer`.

Every knob comes from one `unirag.settings.InferenceSettings` per call; the system holds only what was loaded
(model, tokenizer, corpus, tree, passage cache) and two construction choices (traces, document match).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unirag.answer import Answer, AnswerSpan, RetrievedDoc, RoundTrace, SelfCheckRow, Trace, display_answer
from unirag.data import prepare_question
from unirag.docids import DocidTree
from unirag.errors import UniragError
from unirag.joint.checkpoint import check_checkpoint_dir, verify_tree_file
from unirag.joint.modeling import JointModel
from unirag.joint.passage_cache import PassageCache
from unirag.joint.reader import AnswerGeneration, answer_many_with_docs, answer_with_docs
from unirag.joint.search import DocidBeam, DocidSearch, DocidTrie, search_docids, search_docids_many
from unirag.joint.selfcheck import question_likelihood, rerank
from unirag.settings import InferenceSettings


@dataclass
class Retrieval:
    """What `JointSystem.retrieve` found for one question."""

    docs: list[RetrievedDoc]  # the documents to read, best first (score: search score, or self-check score)
    search: DocidSearch | None  # None: the candidates came from another retriever (rag-selfcheck)
    ranking: list[str]  # every ranked document id, best first (the self-check's order when it ran)
    self_check: list[SelfCheckRow] = field(default_factory=list)  # best first; empty: no self-check
    timings: dict[str, float] = field(default_factory=dict)  # ms: "retrieve", and "self_check" when it ran
    notices: list[str] = field(default_factory=list)

    @property
    def beams(self) -> list[DocidBeam]:
        """The search beam of each chosen document, in `docs`' order (none without a docid search)."""
        if self.search is None:
            return []
        by_id = {beam.doc_id: beam for beam in self.search.beams}
        return [by_id[doc.doc_id] for doc in self.docs]

    @property
    def paths(self) -> list[list[dict[str, Any]]]:
        """Per chosen document, its per-level choices."""
        return [beam.levels for beam in self.beams]


class JointSystem:
    """Question → docids (beam search over the trie) → answer from those documents, as an `Answer`."""

    name = "joint"

    def __init__(self, model: JointModel, tokenizer, corpus, tree: DocidTrie, *,
                 passage_cache: PassageCache | None = None, traces: bool = True, document_match: bool = True) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.corpus = corpus
        self.tree = tree  # the docid tree (a DocidTree): the trie the search is constrained to
        # A PassageCache (the passages' self-check prompts, precomputed): the self-check then runs only the
        # question's tokens. None reads the N passages in full, with the same result up to rounding. Settable:
        # the app attaches one after loading.
        self.passage_cache = passage_cache
        self.traces = traces  # False skips the answer-attention trace (evaluation draws no heatmaps)
        # False ranks documents by path log-probability alone (a named ablation; see search_docids).
        self.document_match = document_match

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, corpus, *, precision: str = "fp32",
                        base_model: str | None = None, attn_implementation: str = "eager", traces: bool = True,
                        document_match: bool = True, passage_cache: bool | str | Path = False,
                        device: str | None = None) -> JointSystem:
        """Load model, tokenizer and the checkpoint's docid tree (checked against `corpus`).

        Evaluation passes attn_implementation="sdpa", traces=False: faster, and no heatmaps are drawn.
        passage_cache: True opens (building it first if missing) the self-check cache of this base and corpus
        at its default path; a path does the same there; False: none (the self-check reads passages in full)."""
        ckpt = check_checkpoint_dir(checkpoint_dir)
        tree = DocidTree.load(verify_tree_file(ckpt), corpus)  # before the model: a corpus mismatch fails fast
        # The joint modules follow the base's device (JointModel puts its new modules beside the embeddings).
        model = JointModel.from_pretrained(ckpt, precision=precision, base_model=base_model, device=device,
                                           attn_implementation=attn_implementation)
        cache = None
        if passage_cache:
            cache_path = None if passage_cache is True else passage_cache
            cache = PassageCache.build(model, corpus, cache_path)  # opens a complete cache, resumes a partial one
        return cls(model, model.tokenizer, corpus, tree, passage_cache=cache, traces=traces,
                   document_match=document_match)

    def retrieve(self, question: str, settings: InferenceSettings, query: str | None = None) -> Retrieval:
        """The top `settings.k_docs` documents, best first, re-ranked by the self-check when it is on.
        `question` is used as is. `query`: what the docid search reads instead of the question (a later round's
        expanded query); the self-check still scores the question itself (how likely it is after a passage)."""
        start = time.perf_counter()
        # The one place the beam is sized: wide enough for every document read or self-checked.
        search = search_docids(self.model, self.tokenizer, question if query is None else query, self.tree,
                               settings.search_width, settings.documents_searched, rescore=self.document_match)
        return self._ranked(question, search, settings, (time.perf_counter() - start) * 1000)

    def retrieve_many(self, questions: Sequence[str], settings: InferenceSettings,
                      queries: Sequence[str] | None = None) -> list[Retrieval]:
        """`retrieve` for several questions: one batched docid search (`search_docids_many`), then each question's
        self-check and ranking. The search's time is split evenly between the questions."""
        start = time.perf_counter()
        searches = search_docids_many(self.model, self.tokenizer, list(queries or questions), self.tree,
                                      settings.search_width, settings.documents_searched, rescore=self.document_match)
        share = (time.perf_counter() - start) * 1000 / max(1, len(questions))
        return [self._ranked(q, search, settings, share) for q, search in zip(questions, searches, strict=True)]

    def _ranked(self, question: str, search: DocidSearch, settings: InferenceSettings,
                retrieve_ms: float) -> Retrieval:
        retrieval = self.rank(question, [(beam.doc_id, beam.score) for beam in search.beams], settings,
                              retrieve_ms, search=search)
        if not retrieval.docs:
            retrieval.notices.append("No document was retrieved (empty docid tree).")
        return retrieval

    def rank(self, question: str, candidates: Sequence[tuple[str, float]], settings: InferenceSettings,
             retrieve_ms: float, search: DocidSearch | None = None, scored_by: str = "search score") -> Retrieval:
        """The documents to read from ranked (doc_id, score) candidates, best first: the docid search's (`search`),
        or another retriever's top N (rag-selfcheck). With the self-check on, every candidate is re-ranked by
        score + weight × the question's mean log-probability after it (the base LLM, the passage cache when
        attached); then the top `settings.k_docs` are read. `scored_by` names the score in the notice."""
        timings = {"retrieve": retrieve_ms}
        notices: list[str] = []
        ranked = list(candidates)
        rows: list[SelfCheckRow] = []
        if settings.self_check and ranked:
            start = time.perf_counter()
            rows = rerank(ranked, self._question_likelihood(question, [d for d, _ in ranked]),
                          settings.self_check_weight)
            timings["self_check"] = (time.perf_counter() - start) * 1000
            ranked = [(row.doc_id, row.score) for row in rows]
            how = "read the question after its cached reading of" if self.passage_cache is not None else "re-read"
            notices.append(f"Self-check: the base LLM {how} the top {len(rows)} documents; they are ranked by "
                           f"{scored_by} + {settings.self_check_weight:g} × the question's mean log-probability "
                           "after each.")
        top = ranked[: settings.k_docs]
        docs = self.documents([doc_id for doc_id, _ in top], [score for _, score in top])
        if search is not None:  # the search's own docids (the tree's lookup gives the same, more slowly)
            docids = {beam.doc_id: beam.docid for beam in search.beams}
            for doc in docs:
                doc.docid = docids[doc.doc_id]
        return Retrieval(docs, search, [doc_id for doc_id, _ in ranked], rows, timings, notices)

    def _question_likelihood(self, question: str, doc_ids: Sequence[str]) -> list[float]:
        if self.passage_cache is not None:
            return self.passage_cache.question_likelihood(self.model, question, list(doc_ids))
        passages = [(d, self.corpus[d].title, self.corpus[d].text) for d in doc_ids]
        return question_likelihood(self.model, self.tokenizer, question, passages)

    def documents(self, doc_ids: Sequence[str], scores: Sequence[float] | None = None) -> list[RetrievedDoc]:
        """The corpus's documents as `RetrievedDoc`s with their docids in this tree, for `read` (e.g. the gold
        passage, or another retriever's top k with its scores; 0 without)."""
        scores = list(scores) if scores is not None else [0.0] * len(doc_ids)
        docs = []
        for doc_id, score in zip(doc_ids, scores, strict=True):
            passage = self.corpus[doc_id]
            docid = None
            if hasattr(self.tree, "docid_of"):
                try:
                    docid = tuple(self.tree.docid_of(doc_id))
                except (KeyError, UniragError):
                    docid = None
            docs.append(RetrievedDoc(passage.id, passage.title, passage.text, score, docid))
        return docs

    def read(self, question: str, docs: Sequence[RetrievedDoc], settings: InferenceSettings,
             retrieval: Retrieval | None = None) -> Answer:
        """Answer `question` (used as is) from `docs`: this system's retrieval, or any caller's documents (the
        gold passage, another retriever's top k). `retrieval` fills the search's part of the trace; without it
        the retrieval time is 0."""
        start = time.perf_counter()
        generation = answer_with_docs(self.model, self.tokenizer, question, _passages(docs),
                                      **self._reading(settings))
        return self._answer(question, docs, settings, retrieval, generation, (time.perf_counter() - start) * 1000)

    def read_many(self, questions: Sequence[str], docs: Sequence[Sequence[RetrievedDoc]], settings: InferenceSettings,
                  retrievals: Sequence[Retrieval | None] | None = None) -> list[Answer]:
        """`read` for several questions, each from its own documents, in one batched reading
        (`answer_many_with_docs`); the reading's time is split evenly between the questions."""
        retrievals = list(retrievals) if retrievals is not None else [None] * len(questions)
        start = time.perf_counter()
        generations = answer_many_with_docs(self.model, self.tokenizer, list(questions),
                                            [_passages(d) for d in docs], **self._reading(settings))
        share = (time.perf_counter() - start) * 1000 / max(1, len(questions))
        return [self._answer(q, d, settings, r, g, share)
                for q, d, r, g in zip(questions, docs, retrievals, generations, strict=True)]

    def _reading(self, settings: InferenceSettings) -> dict[str, Any]:
        """The reader's switches for these settings."""
        base = settings.joint_reader == "base"
        # Until stage 2 (its LoRA) has adapted the LLM to the pathway's residual, read with the pathway off: the
        # reader is then exactly the base LLM. "base": adapter, pathway and bridge off, the weights the dense RAG
        # baseline reads with (same prompt text plus the <generates_token> marker).
        pathway = False if base else self.model.reader_trained
        return {"max_new_tokens": settings.max_new_tokens, "output_attentions": self.traces, "pathway": pathway,
                "bridge": pathway, "adapter": not base, "answer_mode": settings.answer_mode,
                "reader_prompt": settings.reader_prompt if base else "plain"}  # stage 2 was trained on plain

    def _answer(self, question: str, docs: Sequence[RetrievedDoc], settings: InferenceSettings,
                retrieval: Retrieval | None, generation: AnswerGeneration, generate_ms: float) -> Answer:
        """One reading as an `Answer`, with the retrieval's trace when there was one."""
        base = settings.joint_reader == "base"
        timings = dict(retrieval.timings) if retrieval is not None else {"retrieve": 0.0}
        notices = list(retrieval.notices) if retrieval is not None else []
        timings["generate"] = generate_ms
        if base:
            notices.append("Read by the base LLM (the stage-2 adapter, pathway and bridge are off while answering): "
                           "the weights the dense RAG baseline reads with.")
        trace = Trace(answer_attention=generation.attention, stop_reason=generation.stop_reason)
        if generation.span is not None:
            source = docs[generation.span.doc_index]
            trace.answer_span = AnswerSpan(source.doc_id, generation.span.start, generation.span.end)
        ranking: list[str] = []
        if retrieval is not None:
            if retrieval.search is not None:
                trace.beams = [beam.to_dict() for beam in retrieval.search.finished]
                trace.paths = retrieval.paths
                trace.retrieval_attention = retrieval.search.attention
                trace.retrieval_prompt_tokens = retrieval.search.prompt_tokens
            trace.self_check = list(retrieval.self_check)
            ranking = retrieval.ranking
        return Answer(
            system=self.name,
            question=question,
            text=generation.text,
            docs=list(docs),
            prompt_tokens=generation.prompt_tokens,
            context_tokens=generation.context_tokens,
            answer_tokens=generation.answer_tokens,
            timings_ms=timings,
            notices=notices,
            trace=trace,
            ranked_doc_ids=ranking if len(ranking) > len(docs) else [],
        )

    def answer(self, question: str, settings: InferenceSettings | None = None) -> Answer:
        """Clean the question once, retrieve, read. settings None: the library defaults.

        With `settings.rounds` R > 1 (UniGen-style iterative enhancement), round r = 2..R searches the docids again
        with `round_query(question, round r-1's answer)`, i.e. "{question} {previous answer span}", and reads the
        question again from the documents that search chose, by the same reader rule and prompt. The answer is the
        last round's; `trace.rounds` keeps every round (query, beams, paths, documents, answer) and the timings are
        summed over the rounds. One round is exactly the single pass (no round trace)."""
        settings = InferenceSettings() if settings is None else settings
        text, notices = prepare_question(question)
        retrieval = self.retrieve(text, settings)
        answer = self.read(text, retrieval.docs, settings, retrieval)
        if settings.rounds > 1:
            answer = self._more_rounds(text, answer, retrieval, settings)
        answer.notices[:0] = notices
        return answer

    def answer_many(self, questions: Sequence[str], settings: InferenceSettings | None = None) -> list[Answer]:
        """`answer` for several questions at once: each round's docid searches in one batch (`retrieve_many`) and
        its readings in another (`read_many`); the self-check runs per question. Each answer is the one `answer`
        gives, up to float rounding; the batch's time is split evenly in the timings. Nothing is streamed."""
        settings = InferenceSettings() if settings is None else settings
        prepared = [prepare_question(q) for q in questions]
        texts = [text for text, _ in prepared]
        retrievals = self.retrieve_many(texts, settings)
        answers = self.read_many(texts, [r.docs for r in retrievals], settings, retrievals)
        if settings.rounds > 1:
            rounds = [[_round_trace(1, t, r, a)] for t, r, a in zip(texts, retrievals, answers, strict=True)]
            for number in range(2, settings.rounds + 1):
                queries = [round_query(t, a) for t, a in zip(texts, answers, strict=True)]
                retrievals = self.retrieve_many(texts, settings, queries=queries)
                answers = self.read_many(texts, [r.docs for r in retrievals], settings, retrievals)
                for steps, query, r, a in zip(rounds, queries, retrievals, answers, strict=True):
                    steps.append(_round_trace(number, query, r, a))
            for answer, steps in zip(answers, rounds, strict=True):
                _finish_rounds(answer, steps, settings)
        for answer, (_, notices) in zip(answers, prepared, strict=True):
            answer.notices[:0] = notices
        return answers

    def _more_rounds(self, question: str, first: Answer, retrieval: Retrieval,
                     settings: InferenceSettings) -> Answer:
        """Rounds 2..settings.rounds after `first` (round 1, from `retrieval`): see `answer`."""
        rounds = [_round_trace(1, question, retrieval, first)]
        answer = first
        for number in range(2, settings.rounds + 1):
            query = round_query(question, answer)
            retrieval = self.retrieve(question, settings, query=query)
            answer = self.read(question, retrieval.docs, settings, retrieval)
            rounds.append(_round_trace(number, query, retrieval, answer))
        return _finish_rounds(answer, rounds, settings)


def _finish_rounds(answer: Answer, rounds: list[RoundTrace], settings: InferenceSettings) -> Answer:
    """The last round's answer with every round's trace, its timings summed over the rounds."""
    answer.trace.rounds = rounds
    totals: dict[str, float] = {}
    for step in rounds:  # the answer cost every round: latency counts them all
        for stage, ms in step.timings_ms.items():
            totals[stage] = totals.get(stage, 0.0) + ms
    answer.timings_ms = totals
    answer.notices.append(f"{settings.rounds} rounds: each round after the first searched the docids with the "
                          "question plus the previous round's answer, then read the question again; this is "
                          f"round {settings.rounds}'s answer.")
    return answer


def _passages(docs: Sequence[RetrievedDoc]) -> list[tuple[str, str, str]]:
    return [(d.doc_id, d.title, d.text) for d in docs]


def round_query(question: str, previous: Answer) -> str:
    """The docid search's query in the round after `previous`: the question plus the previous answer's span.

    Why this form: appending a generated answer to the query is generation-augmented query expansion (GAR, and the
    feedback UniGen iterates): a right or nearly right answer usually names what the gold passage is about, which
    the question alone may not. The retrieval prompt stays the one the model was trained on (`Q: {query}`), only
    longer. The previous documents' titles are left out on purpose: they would pull the search back to the
    documents it already chose. The displayed span (`display_answer`), not the raw text, so an echoed prompt adds
    nothing; no span: the question alone (that round repeats the search)."""
    span = display_answer(previous.text, question)
    return f"{question} {span}" if span else question


def _round_trace(number: int, query: str, retrieval: Retrieval, answer: Answer) -> RoundTrace:
    search = retrieval.search
    return RoundTrace(number, query, list(answer.docs), list(retrieval.ranking),
                      [beam.to_dict() for beam in search.finished] if search is not None else [], retrieval.paths,
                      answer.text, dict(answer.timings_ms))


__all__ = ["JointSystem", "Retrieval", "round_query"]
