"""Answers that are spans of the documents read: the rule both sides decode with (`answer_mode="span"`).

Every answer token must continue a contiguous token sequence of one of the documents (an FM-index over their token
sequences, `unirag.evidence`), starting at a word; the answer may end (EOS, a newline) only where the span ends at
a word boundary, and a span cut by the token budget is trimmed back to its last word boundary, so an answer never
stops mid-word. The cited document is the best-ranked one the span occurs in.

    constraint = SpanConstraint(tokenizer, [doc.text for doc in docs], end_ids={eos, newline})
    constraint.allowed(written)        # the tokens that may come next (ends included at a word boundary)
    constraint.source(written)         # (document index, start char, end char) of the span in that document
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from unirag.evidence import DocTokens, TokenSubstringIndex, char_span, doc_tokens


def word_ends(tokenizer, doc: DocTokens, text: str) -> set[int]:
    """Exclusive end positions q where a span [.., q) ends at a word boundary: the document's end, or where the
    characters either side of the cut are not both letters or digits."""
    n = len(doc.ids)
    ends = {n}
    padded = " " + text
    for q in range(1, n):
        if doc.spans is not None:
            start = doc.spans[q][0] + 1  # back into the padded text
            before, after = padded[start - 1 : start], padded[start : start + 1]
        else:
            before = tokenizer.decode(doc.ids[q - 1 : q])[-1:]
            after = tokenizer.decode(doc.ids[q : q + 1])[:1]
        if not (before.isalnum() and after.isalnum()):
            ends.add(q)
    return ends


@dataclass
class SpanSource:
    doc_index: int  # into the documents the constraint was built from (best first)
    start: int  # character span inside that document's text
    end: int


class SpanConstraint:
    """What an answer may write next so that it stays a word-bounded span of one of `texts`."""

    def __init__(self, tokenizer, texts: Sequence[str], end_ids: Collection[int]) -> None:
        self.tokenizer = tokenizer
        self.texts = list(texts)
        self.docs = [doc_tokens(tokenizer, text) for text in self.texts]
        self.index = TokenSubstringIndex([d.ids for d in self.docs], [d.starts for d in self.docs])
        self.ends = [word_ends(tokenizer, d, t) for d, t in zip(self.docs, self.texts, strict=True)]
        self.end_ids = sorted({int(e) for e in end_ids})
        self._first = sorted(self.index.next_tokens([]))

    def at_word_end(self, written: Sequence[int]) -> bool:
        n = len(written)
        return n > 0 and any(p + n in self.ends[d] for d, p in self.index.occurrences(written))

    def allowed(self, written: Sequence[int]) -> list[int]:
        """Token ids that may follow `written`: its continuations in the documents, plus the end ids once it ends
        at a word boundary. Nothing to copy at all (empty documents): only the end ids."""
        if not written:
            return self._first or self.end_ids
        allowed = set(self.index.next_tokens(written))
        if self.at_word_end(written) or not allowed:
            allowed.update(self.end_ids)
        return sorted(allowed)

    def trim(self, written: Sequence[int]) -> list[int]:
        """The longest prefix of `written` that ends at a word boundary (for a span cut by the budget)."""
        for n in range(len(written), 0, -1):
            if self.at_word_end(written[:n]):
                return list(written[:n])
        return []

    def source(self, written: Sequence[int]) -> SpanSource | None:
        """Where the span comes from: its first occurrence in the best-ranked document holding it."""
        if not written:
            return None
        found = self.index.occurrences(written)
        if not found:
            return None
        d, p = found[0]
        decoded = self.tokenizer.decode(list(written), skip_special_tokens=True)
        start, end = char_span(self.docs[d], self.texts[d], p, len(written), decoded)
        return SpanSource(d, start, end)

    def mask(self, logits: torch.Tensor, written: Sequence[int]) -> torch.Tensor:
        """`logits` [V] with every token outside `allowed(written)` set to -inf."""
        keep = torch.tensor(self.allowed(written), device=logits.device)
        masked = torch.full_like(logits, float("-inf"))
        masked[keep] = logits[keep]
        return masked


class SpanLogitsProcessor:
    """transformers LogitsProcessor for batched greedy reading: row r's next token stays inside constraints[r]
    (the tokens after `prompt_width` are what the row has written; finished rows are left to generate())."""

    def __init__(self, constraints: Sequence[SpanConstraint], prompt_width: int) -> None:
        self.constraints = list(constraints)
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = scores.clone()
        for row, constraint in enumerate(self.constraints):
            written = input_ids[row, self.prompt_width :].tolist()
            if any(t in constraint.end_ids for t in written):
                continue  # finished: generate() pads it from here
            out[row] = constraint.mask(scores[row], written)
        return out


def finish_span(constraint: SpanConstraint, written: Sequence[int], stopped: bool
                ) -> tuple[list[int], SpanSource | None]:
    """The answer's tokens and source once decoding stopped: cut back to a word boundary when the budget ran out
    (`stopped` False) mid-word."""
    tokens = list(written) if stopped or constraint.at_word_end(written) else constraint.trim(written)
    return tokens, constraint.source(tokens)


__all__ = ["SpanConstraint", "SpanLogitsProcessor", "SpanSource", "finish_span", "word_ends"]
