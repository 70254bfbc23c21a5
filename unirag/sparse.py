"""Sparse retrieval for the baselines: BM25 (the `bm25s` library), and its reciprocal-rank fusion with dense retrieval.

Both rank like `rag.DenseRetriever` (`search_many`, `search`, `similarity`, `corpus`), so `rag.RagSystem` reads
their top k exactly as it reads dense RAG's. The BM25 index is built in memory: under a second for the shipped
corpora, cheaper than checking a cache.
"""

from __future__ import annotations

import numpy as np

from unirag.data import Corpus
from unirag.docids import passage_text
from unirag.errors import UniragError

RRF_K = 60  # the usual reciprocal-rank fusion constant (Cormack, Clarke and Büttcher, 2009)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k best scores, best first; ties keep the corpus order (a stable sort)."""
    return np.argsort(-scores, kind="stable")[:k]


class _ScoringRetriever:
    """Ranks by `scores(question)`: one score per passage, in corpus order."""

    corpus: Corpus

    def scores(self, question: str) -> np.ndarray:
        raise NotImplementedError

    def search_many(self, questions: list[str], k: int) -> list[list[tuple[str, float]]]:
        if k < 1:
            raise UniragError(f"k must be at least 1 (got {k}).")
        out = []
        for question in questions:
            scores = self.scores(question)
            out.append([(self.corpus.ids[i], float(scores[i])) for i in _top(scores, k)])
        return out

    def search(self, question: str, k: int) -> list[tuple[str, float]]:
        return self.search_many([question], k)[0]

    def similarity(self, question: str, doc_ids: list[str]) -> list[float]:
        """The question's score with these passages (the score `search` would give them)."""
        scores = self.scores(question)
        return [float(scores[self.corpus.position(d)]) for d in doc_ids]


class BM25Retriever(_ScoringRetriever):
    """Okapi BM25 over each passage's title and text (the text the dense encoder embeds); bm25s's English
    tokenizer (lower case, words of 2+ characters, English stopwords removed, no stemming)."""

    def __init__(self, corpus: Corpus) -> None:
        import bm25s

        self.corpus = corpus
        self._bm25s = bm25s
        self.index = bm25s.BM25()
        self.index.index(self._tokens([passage_text(p.title, p.text) for p in corpus]), show_progress=False)

    @classmethod
    def from_corpus(cls, corpus: Corpus) -> BM25Retriever:
        return cls(corpus)

    def _tokens(self, texts: list[str]) -> list[list[str]]:
        return self._bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)

    def scores(self, question: str) -> np.ndarray:
        """BM25 of every passage, in corpus order; words the corpus never uses count for nothing."""
        ids = self.index.get_tokens_ids(self._tokens([question])[0])
        return np.asarray(self.index.get_scores_from_ids(ids), dtype=np.float64)


class HybridRetriever(_ScoringRetriever):
    """Reciprocal-rank fusion of dense and BM25: score = Σ 1 / (RRF_K + rank) over both full rankings."""

    def __init__(self, dense, sparse: BM25Retriever) -> None:
        if dense.corpus is not sparse.corpus and dense.corpus.ids != sparse.corpus.ids:
            raise UniragError("Hybrid retrieval needs the dense and BM25 retrievers over the same corpus.")
        self.dense, self.sparse, self.corpus = dense, sparse, sparse.corpus

    def scores(self, question: str) -> np.ndarray:
        n = len(self.corpus)
        fused = np.zeros(n)
        dense = [self.corpus.position(doc_id) for doc_id, _ in self.dense.search(question, n)]
        for ranking in (dense, _top(self.sparse.scores(question), n)):
            fused[np.asarray(ranking)] += 1.0 / (RRF_K + np.arange(1, len(ranking) + 1))
        return fused


__all__ = ["BM25Retriever", "HybridRetriever", "RRF_K"]
