"""`rag-selfcheck`: dense retrieval's top N re-ranked by the joint model's own self-check, then read as it reads.

The honest baseline for the self-check: the same likelihood (the base LLM, the passage cache when attached), the
same weight, the same N, the same reader rule (`joint_reader`) and the same k_docs as `JointSystem`; only the
candidates differ (the bi-encoder's top N, scored by cosine, instead of the docid search's beams). Both go
through `JointSystem.rank` and `JointSystem.read`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from unirag.answer import Answer
from unirag.data import prepare_question
from unirag.errors import UniragError
from unirag.settings import InferenceSettings


class DenseSelfCheckSystem:
    """Dense top-N (N = settings.self_check) → the joint self-check → the top settings.k_docs read by the joint
    system's reader (`joint_reader`: "base" is the base LLM)."""

    name = "rag-selfcheck"

    def __init__(self, retriever, joint) -> None:
        self.retriever = retriever  # rag.DenseRetriever (anything with search / similarity / corpus)
        self.joint = joint  # joint.JointSystem: its model re-ranks and reads

    def answer_many(self, questions: Sequence[str], settings: InferenceSettings,
                    with_attention: bool = False) -> list[Answer]:
        return [self.answer(question, settings, with_attention) for question in questions]

    def answer(self, question: str, settings: InferenceSettings, with_attention: bool = False) -> Answer:
        """with_attention: accepted for the RAG systems' interface; the joint system's `traces` decides."""
        check_settings(settings)
        text, notices = prepare_question(question)
        start = time.perf_counter()
        # As many candidates as the docid search returns for these settings: the self-check's N (or k_docs).
        candidates = self.retriever.search(text, settings.documents_searched)
        retrieve_ms = (time.perf_counter() - start) * 1000
        retrieval = self.joint.rank(text, candidates, settings, retrieve_ms, scored_by="cosine")
        answer = self.joint.read(text, retrieval.docs, settings, retrieval)
        answer.system = self.name
        answer.notices[:0] = notices
        return answer

    def read(self, question: str, hits: list[tuple[str, float | None]], settings: InferenceSettings,
             with_attention: bool = False) -> Answer:
        """Read given passages, no retrieval or self-check (a document removed or forced); a passage without a score
        gets its cosine similarity to the question."""
        text, notices = prepare_question(question)
        missing = [doc_id for doc_id, score in hits if score is None]
        cosine = dict(zip(missing, self.retriever.similarity(text, missing), strict=True))
        scores = [cosine[doc_id] if score is None else score for doc_id, score in hits]
        answer = self.joint.read(text, self.joint.documents([doc_id for doc_id, _ in hits], scores), settings)
        answer.system = self.name
        answer.notices[:0] = notices
        return answer


def check_settings(settings: InferenceSettings) -> None:
    """rag-selfcheck without a self-check would be dense top-k_docs under another name: refused."""
    if settings.self_check < 2:
        raise UniragError("rag-selfcheck re-ranks dense top N by the self-check, which is off here (self_check 0: "
                          "without the passage cache the checkpoint's setting turns it off). Give self_check N >= 2 "
                          "(the Self-check setting, --self-check N), or build the passage cache (`python -m unirag "
                          "index --self-check-cache --checkpoint DIR`).")


__all__ = ["DenseSelfCheckSystem", "check_settings"]
