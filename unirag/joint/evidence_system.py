"""`evidence`: RetroLLM-style (Li et al. 2024) evidence generation on the joint model, then an answer from it alone.

1. Clues: the joint model's docid search (+ self-check when on) picks `evidence_docs` candidate documents
   (`JointSystem.retrieve`).
2. Evidence: the base LLM (adapter, pathway and bridge off: what `joint_reader="base"` reads with) continues
   EVIDENCE_PROMPT greedily, each token restricted to those that keep the evidence a substring of a candidate's
   token sequence (an FM-index, `unirag.substring_index`), starting at a word; up to `evidence_tokens` tokens or the
   document's end (optionally also where the LLM prefers to stop: `stop_at_end`). With `evidence_lookahead` W > 0
   the choice is forward-looking (RetroLLM's idea, simplified): each allowed token's log-probability gains W × the
   best cosine (MiniLM) between the question and the LOOKAHEAD_TOKENS tokens its occurrences lead to.
3. Answer: the base LLM reads `Q: {question}\\n{evidence}\\nA:` (`JointSystem.read`, as the base reader).

The trace keeps the search's (beams, paths, self-check) and the evidence with its document and character span.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from unirag.answer import Answer, AnswerAttention, EvidenceSpan, RetrievedDoc
from unirag.data import prepare_question
from unirag.joint.joint_system import Retrieval
from unirag.joint.prompts import evidence_prompt_ids
from unirag.joint.reader import eos_ids
from unirag.settings import InferenceSettings
from unirag.substring_index import (
    EvidenceTokens,
    Lookahead,
    TokenSubstringIndex,
    char_span,
    constrained_greedy,
    doc_tokens,
)

LOOKAHEAD_TOKENS = 32  # about a sentence: long enough to tell whether a start leads to the answer's sentence


class ForwardRelevance:
    """A `Lookahead` for `constrained_greedy`: token t's bonus is `weight` × the best cosine between the question and
    the next LOOKAHEAD_TOKENS tokens of a document after any occurrence of (written + t). Each window is embedded
    once per question (most are seen at the first token, where every word start of every candidate is allowed)."""

    def __init__(self, encoder, tokenizer, docs: Sequence[Sequence[int]], question: str, weight: float) -> None:
        self.encoder, self.tokenizer, self.docs, self.weight = encoder, tokenizer, docs, weight
        self.query = encoder.encode_queries([question])[0]
        self._relevance: dict[tuple[int, int], float] = {}

    def __call__(self, written: Sequence[int], futures: Mapping[int, Sequence[tuple[int, int]]]) -> dict[int, float]:
        new = sorted({place for places in futures.values() for place in places} - set(self._relevance))
        if new:
            texts = [self.tokenizer.decode(self.docs[d][p:p + LOOKAHEAD_TOKENS], skip_special_tokens=True)
                     for d, p in new]
            cosines = self.encoder.encode_passages(texts) @ self.query
            self._relevance.update(zip(new, (float(c) for c in np.asarray(cosines)), strict=True))
        return {t: self.weight * max(self._relevance[place] for place in places) for t, places in futures.items()}


class EvidenceSystem:
    """Docid search → corpus-constrained evidence by the base LLM → the base LLM answers from the evidence."""

    name = "evidence"

    def __init__(self, joint, stop_at_end: bool = False, encoder=None) -> None:
        self.joint = joint  # joint.JointSystem: its search picks the candidates, its base LLM writes and reads
        self._encoder = encoder  # a SentenceEncoder for evidence_lookahead; loaded (MiniLM) on first use if None
        # True also stops the evidence where the LLM prefers EOS or a newline to every allowed token. Off: on held-out
        # nq train questions SmolLM2 preferred to stop after a few tokens, too short to hold an answer
        # (benchmarks/evidence_settings.py); the evidence then runs to evidence_tokens or the document's end.
        self.stop_at_end = stop_at_end

    @property
    def encoder(self):
        if self._encoder is None:
            from unirag.backbones import SentenceEncoder

            self._encoder = SentenceEncoder()
        return self._encoder

    def answer_many(self, questions: Sequence[str], settings: InferenceSettings,
                    with_attention: bool = False) -> list[Answer]:
        return [self.answer(question, settings, with_attention) for question in questions]

    def answer(self, question: str, settings: InferenceSettings, with_attention: bool = False) -> Answer:
        """with_attention: accepted for the RAG systems' interface (the answer attention over the evidence is not
        kept: the app shows the evidence inside its document instead)."""
        text, notices = prepare_question(question)
        retrieval = self.joint.retrieve(text, settings.replace(k_docs=settings.evidence_docs))
        return self._from_documents(text, retrieval.docs, settings, notices, retrieval)

    def read(self, question: str, hits: Sequence[tuple[str, float | None]], settings: InferenceSettings,
             with_attention: bool = False) -> Answer:
        """Evidence from given documents (one removed or forced in the app), no docid search; a score left None
        is 0 (a document the search did not rank)."""
        text, notices = prepare_question(question)
        docs = self.joint.documents([d for d, _ in hits], [0.0 if score is None else score for _, score in hits])
        return self._from_documents(text, docs, settings, notices)

    def _from_documents(self, text: str, docs: Sequence[RetrievedDoc], settings: InferenceSettings,
                        notices: list[str], retrieval: Retrieval | None = None) -> Answer:
        start = time.perf_counter()
        evidence = self.evidence(text, docs, settings)
        evidence_ms = (time.perf_counter() - start) * 1000
        context = [] if evidence is None else [self.evidence_passage(evidence, docs)]
        answer = self.joint.read(text, context, settings.replace(joint_reader="base"), retrieval)
        answer.system = self.name
        answer.docs = list(docs)  # the candidates are what was retrieved (R@k); the evidence is what was read
        ranking = retrieval.ranking if retrieval is not None else []
        answer.ranked_doc_ids = ranking if len(ranking) > len(docs) else []
        answer.timings_ms["evidence"] = evidence_ms
        answer.trace.evidence = evidence
        answer.trace.answer_attention = AnswerAttention()  # it spans the evidence, not the candidate documents
        answer.notices[:0] = notices
        if evidence is None:
            answer.notices.append("No evidence: no candidate document had a token to copy; answered from the "
                                  "question alone.")
        else:
            answer.notices.append(
                f"Evidence: the base LLM wrote {evidence.tokens} token(s), each constrained (FM-index) to continue a "
                f"passage of the {len(docs)} candidate document(s); copied from {evidence.doc_id} "
                f"(stop: {evidence.stop_reason}). The answer reads only this evidence.")
        return answer

    def evidence(self, question: str, docs: Sequence[RetrievedDoc], settings: InferenceSettings) -> EvidenceSpan | None:
        """The evidence the base LLM writes from `docs` (best first), or None when they hold no token."""
        tokenizer = self.joint.tokenizer
        tokenized = [doc_tokens(tokenizer, doc.text) for doc in docs]
        index = TokenSubstringIndex([t.ids for t in tokenized], [t.starts for t in tokenized])
        lookahead = (ForwardRelevance(self.encoder, tokenizer, index.docs, question, settings.evidence_lookahead)
                     if settings.evidence_lookahead else None)
        written = self._write(question, index, settings.evidence_tokens, lookahead)
        if not written.tokens:
            return None
        doc_index, position = index.occurrences(written.tokens)[0]  # the best-ranked document holding it, first
        doc = docs[doc_index]
        decoded = tokenizer.decode(written.tokens, skip_special_tokens=True)
        start, end = char_span(tokenized[doc_index], doc.text, position, len(written.tokens), decoded)
        return EvidenceSpan(doc.text[start:end], doc.doc_id, start, end, len(written.tokens), written.stop_reason)

    @torch.inference_mode()
    def _write(self, question: str, index: TokenSubstringIndex, max_tokens: int,
               lookahead: Lookahead | None = None) -> EvidenceTokens:
        model, tokenizer = self.joint.model, self.joint.tokenizer
        # The base LLM alone (as joint_reader="base" reads): adapter off here, pathway and bridge off per call.
        kwargs = {"pathway": False, "bridge": False}
        newline = tokenizer.encode("\n", add_special_tokens=False)[-1:]
        ends = eos_ids(model, tokenizer) | set(newline) if self.stop_at_end else set()
        with model.reading_mode(adapter=False):
            prompt = torch.tensor([evidence_prompt_ids(tokenizer, question)], device=model.device)
            out = model(prompt, use_cache=True, logits_to_keep=1, **kwargs)
            cache = out.past_key_values

            def step(token: int) -> torch.Tensor:
                nonlocal cache
                nxt = model(torch.tensor([[token]], device=model.device), past_key_values=cache, use_cache=True,
                            **kwargs)
                cache = nxt.past_key_values
                return nxt.lm_logits[0, -1]

            return constrained_greedy(out.lm_logits[0, -1], step, index, max_tokens, ends, lookahead)

    @staticmethod
    def evidence_passage(evidence: EvidenceSpan, docs: Sequence[RetrievedDoc]) -> RetrievedDoc:
        """The evidence as the one passage the reader reads (no title: `Q: {question}\\n{evidence}\\nA:`)."""
        source = next(doc for doc in docs if doc.doc_id == evidence.doc_id)
        return RetrievedDoc(source.doc_id, "", evidence.text, source.score, source.docid)


__all__ = ["EvidenceSystem", "ForwardRelevance", "LOOKAHEAD_TOKENS"]
