"""Sentence localization: which sentence of a passage holds the answer, and how a method ranks the sentences.

GeAR-style localization asks a model to point at the part of a passage that answers the question. This module
holds the model-free parts, so a benchmark and the app score every method the same way:

- `split_sentences`: sentences with their character spans, by pySBD (rule-based, the "Golden Rules" set: it
  keeps "U.S.", "St. Louis", "3.5" inside a sentence, where a period regex splits them);
- `answer_sentence`: the sentence that holds the gold answer. Our SQuAD files keep only the answer strings, not
  SQuAD's `answer_start`, so the answer is *located*: the first occurrence, in the passage, of the first gold
  answer string that occurs (exact case first, then case-insensitive). When an answer occurs more than once
  this may not be the annotated occurrence; `occurrences` counts the sentences that contain it, so a run can
  say how often that happens;
- `token_sentences` + `sentence_scores`: attention over tokens → attention mass per sentence, tokens mapped to
  sentences by the tokenizer's character offsets;
- rankings to compare against: the first sentence, the longest sentence (mass summed over a sentence favours
  long sentences, so this is the baseline that bias alone reaches), the sentence sharing the most question
  words, and the expected hit rate of a uniformly random sentence.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

# Words too common to count as overlap between a question and a sentence (the lexical baseline).
STOPWORDS = frozenset(
    "a an the of in on at to for from by with and or but is are was were be been being do does did has have had "
    "what which who whom whose when where why how that this these those it its as into than then there their they "
    "he she his her him them we you your i not no can could would should will shall may might must also about "
    "after before during over under between s".split()
)
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class Sentence:
    start: int  # character offset in the passage text, inclusive
    end: int  # exclusive (trailing spaces included, so the sentences tile the text)
    text: str


@lru_cache(maxsize=1)
def _segmenter():
    import pysbd

    return pysbd.Segmenter(language="en", clean=False)


def split_sentences(text: str) -> list[Sentence]:
    """The sentences of `text` with their character spans; together they cover the text from its first sentence on.

    pySBD gives the sentence strings; their spans are found here by searching each one from the end of the last
    (pySBD's own char_span mode mis-places repeated sentences)."""
    if not text.strip():
        return []
    out: list[Sentence] = []
    cursor = 0
    for piece in _segmenter().segment(text):
        core = piece.strip()
        if not core:
            continue
        start = text.find(core, cursor)
        if start < 0:  # pySBD changed the text (it should not with clean=False): fall back to the cursor
            start = cursor
        end = start + len(core)
        out.append(Sentence(start, end, core))
        cursor = end
    # Tile the text: each sentence runs to the next one's start, so every character belongs to one sentence.
    tiled = [Sentence(s.start, out[i + 1].start if i + 1 < len(out) else len(text), s.text) for i, s in enumerate(out)]
    return tiled


def sentence_at(sentences: Sequence[Sentence], char: int) -> int | None:
    """Index of the sentence that holds character `char` (None outside every sentence)."""
    for i, s in enumerate(sentences):
        if s.start <= char < s.end:
            return i
    return None


def answer_span(text: str, answers: Sequence[str]) -> tuple[int, int] | None:
    """Character span of the first occurrence of the first gold answer found in `text` (exact case, else
    case-insensitive); None when no answer occurs."""
    for fold in (False, True):
        haystack = text.casefold() if fold else text
        for answer in answers:
            needle = answer.strip().casefold() if fold else answer.strip()
            if not needle:
                continue
            at = haystack.find(needle)
            # casefold keeps lengths for the characters SQuAD uses; guard anyway against a shifted span
            if at >= 0 and (not fold or len(haystack) == len(text)):
                return at, at + len(needle)
    return None


def answer_sentence(text: str, answers: Sequence[str], sentences: Sequence[Sentence]) -> int | None:
    """Index of the sentence holding the located answer (see `answer_span`); None when it cannot be located."""
    span = answer_span(text, answers)
    return None if span is None else sentence_at(sentences, span[0])


def occurrences(text: str, answers: Sequence[str], sentences: Sequence[Sentence]) -> int:
    """How many sentences contain the located answer string (> 1: the located sentence may not be the annotated
    one)."""
    span = answer_span(text, answers)
    if span is None:
        return 0
    needle = text[span[0]:span[1]].casefold()
    return sum(needle in s.text.casefold() for s in sentences)


def token_sentences(offsets: Sequence[tuple[int, int]], sentences: Sequence[Sentence], text: str) -> list[int]:
    """For each token (character offsets into the passage `text`), the index of its sentence, -1 for tokens outside
    the passage text (title, prompt, special tokens with empty offsets). A token that spans a boundary (" The"
    after a period) belongs to the sentence of its first non-space character."""
    out = []
    for start, end in offsets:
        if end <= start or start >= len(text) or end <= 0:
            out.append(-1)
            continue
        start = max(0, start)
        first = next((c for c in range(start, min(end, len(text))) if not text[c].isspace()), start)
        index = sentence_at(sentences, first)
        out.append(-1 if index is None else index)
    return out


def sentence_scores(weights: Sequence[float], token_sentence: Sequence[int], n_sentences: int) -> list[float]:
    """Attention mass per sentence: the sum of its tokens' weights (tokens outside every sentence ignored)."""
    if len(weights) != len(token_sentence):
        raise ValueError(f"{len(weights)} weights for {len(token_sentence)} tokens")
    scores = [0.0] * n_sentences
    for w, s in zip(weights, token_sentence, strict=True):
        if 0 <= s < n_sentences:
            scores[s] += float(w)
    return scores


def rank(scores: Sequence[float]) -> list[int]:
    """Sentence indices, highest score first; ties keep passage order (so a flat score ranks the first first)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def first_sentence_ranking(n: int) -> list[int]:
    return list(range(n))


def longest_sentence_ranking(sentences: Sequence[Sentence]) -> list[int]:
    return rank([float(len(s.text)) for s in sentences])


def content_words(text: str) -> set[str]:
    return {w for w in (m.group().casefold() for m in _WORD.finditer(text)) if w not in STOPWORDS}


def lexical_ranking(question: str, sentences: Sequence[Sentence]) -> list[int]:
    """Sentences by the number of distinct question content words they contain (ties: passage order)."""
    asked = content_words(question)
    return rank([float(len(asked & content_words(s.text))) for s in sentences])


def hit(ranking: Sequence[int], gold: int, k: int) -> bool:
    """Whether the gold sentence is among the first k of `ranking`."""
    return gold in ranking[:k]


def random_hit_rate(n_sentences: int, k: int) -> float:
    """Expected top-k hit of a uniformly random ranking of n sentences: min(k, n) / n (exact, no sampling)."""
    return min(k, n_sentences) / n_sentences if n_sentences else 0.0


BASELINES = ("first_sentence", "longest_sentence", "lexical_overlap")
RANDOM = "random_sentence"  # scored by its exact expectation, not by a ranking
# Every method and baseline in the order the report lists them (the attention methods: unirag.joint.passage_attention).
REPORT_ORDER = ("retrieval_heads", "trained_reader", "trained_reader_bridge", "base_reader", "lexical_overlap",
                "first_sentence", "longest_sentence", RANDOM)


@dataclass
class SentenceLocalization:
    """One question on one passage: its sentences, the answer sentence and every method's sentence ranking."""

    sentences: list[Sentence]
    answer: int | None  # index of the answer sentence; None when the answer is not found in the passage
    repeated: bool = False  # the located answer string occurs in more than one sentence
    scores: dict[str, list[float]] = field(default_factory=dict)  # attention method → mass per sentence
    rankings: dict[str, list[int]] = field(default_factory=dict)  # method or baseline → sentences, best first

    def hits(self, k: int) -> dict[str, bool]:
        """Per method and baseline, whether the answer sentence is in its top k (empty when it is unknown)."""
        if self.answer is None:
            return {}
        return {name: hit(ranking, self.answer, k) for name, ranking in self.rankings.items()}


def localize(text: str, question: str, answers: Sequence[str],
             attentions: Mapping[str, tuple[Sequence[tuple[int, int]], Sequence[float]]]) -> SentenceLocalization:
    """Split `text`, locate the answer sentence, and rank the sentences by each method's attention mass
    (`attentions`: method → (token offsets in `text`, weights)) and by the position and lexical baselines."""
    sentences = split_sentences(text)
    gold = answer_sentence(text, answers, sentences)
    result = SentenceLocalization(sentences, gold, repeated=gold is not None and occurrences(text, answers,
                                                                                             sentences) > 1)
    for method, (offsets, weights) in attentions.items():
        scores = sentence_scores(weights, token_sentences(offsets, sentences, text), len(sentences))
        result.scores[method] = scores
        result.rankings[method] = rank(scores)
    result.rankings["first_sentence"] = first_sentence_ranking(len(sentences))
    result.rankings["longest_sentence"] = longest_sentence_ranking(sentences)
    result.rankings["lexical_overlap"] = lexical_ranking(question, sentences)
    return result


__all__ = ["BASELINES", "RANDOM", "REPORT_ORDER", "STOPWORDS", "Sentence", "SentenceLocalization", "answer_sentence",
           "answer_span",
           "content_words", "first_sentence_ranking", "hit", "lexical_ranking", "localize", "longest_sentence_ranking",
           "occurrences", "random_hit_rate", "rank", "sentence_at", "sentence_scores", "split_sentences",
           "token_sentences"]
