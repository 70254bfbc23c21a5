"""Answers that are spans of the documents read: the rule both sides decode with (`answer_mode="span"`).

Every answer token must continue a contiguous token sequence of one of the documents (an FM-index over their
token sequences, `unirag.substring_index`), starting at a word; the answer may end (EOS, a newline) only where the
span ends at a word boundary, and a span cut by the token budget is trimmed back to its last word boundary, so an
answer never stops mid-word. The cited document is the best-ranked one the span occurs in.

    constraint = SpanConstraint(tokenizer, [doc.text for doc in docs], end_ids={eos, newline})
    constraint.allowed(written)        # the tokens that may come next (ends included at a word boundary)
    constraint.source(written)         # (document index, start char, end char) of the span in that document
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from unirag.substring_index import DocTokens, TokenSubstringIndex, char_span, doc_tokens


def word_ends(tokenizer, doc: DocTokens, text: str) -> set[int]:
    """Exclusive end positions q where a span [.., q) of `doc` (the tokens of " " + text) ends at a word boundary:
    the document's end, or where the characters either side of the cut are not both letters or digits."""
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


def _is_cut(text: str, at: int) -> bool:
    return at <= 0 or at >= len(text) or not (text[at - 1].isalnum() and text[at].isalnum())


@dataclass
class _Piece:
    """The tokens of a document's text from one word on, as an answer that starts with that word writes them (no
    leading space: after the assistant header the first word has none, and BPE tokenises it differently)."""

    doc: int
    ids: list[int]
    offsets: list[tuple[int, int]]  # characters of each token in the document's text
    ends: set[int]  # exclusive token positions where a span from this piece's start ends at a word boundary


def _pieces(tokenizer, texts: Sequence[str], max_tokens: int) -> list[_Piece] | None:
    """One piece per word start of every text, each long enough for `max_tokens`; None without offsets."""
    pieces = []
    window = 12 * max_tokens + 16  # characters: more than max_tokens tokens of running text
    for d, text in enumerate(texts):
        starts = [i for i, ch in enumerate(text) if not ch.isspace() and (i == 0 or text[i - 1].isspace())]
        chunks = []
        for c in starts:
            stop = min(len(text), c + window)
            if stop < len(text):  # end on whole words: a cut word would tokenise differently
                stop = max(text.rfind(" ", c, stop), c + 1)
            chunks.append((c, text[c:stop]))
        if not chunks:
            continue
        try:
            enc = tokenizer([chunk for _, chunk in chunks], add_special_tokens=False, return_offsets_mapping=True)
        except (NotImplementedError, ValueError, TypeError):
            return None
        for (c, _), ids, offsets in zip(chunks, enc["input_ids"], enc["offset_mapping"], strict=True):
            spans = [(c + a, c + b) for a, b in offsets]
            if not ids:
                continue
            ends = {q for q in range(1, len(ids) + 1) if _is_cut(text, spans[q][0] if q < len(ids) else spans[-1][1])}
            pieces.append(_Piece(d, list(ids), spans, ends))
    return pieces


@dataclass
class SpanSource:
    doc_index: int  # into the documents the constraint was built from (best first)
    start: int  # character span inside that document's text
    end: int


class SpanConstraint:
    """What an answer may write next so that it stays a word-bounded span of one of `texts`, starting at a word.

    With a fast tokenizer (offsets), each word start has its own token sequence, as the answer would write it as
    its first word; without offsets, the tokens of " " + text (every word with its leading space)."""

    def __init__(self, tokenizer, texts: Sequence[str], end_ids: Collection[int], max_tokens: int = 64) -> None:
        self.tokenizer = tokenizer
        self.texts = list(texts)
        self.end_ids = sorted({int(e) for e in end_ids})
        pieces = _pieces(tokenizer, self.texts, max_tokens)
        if pieces is None:  # no offsets: one sequence a document
            docs = [doc_tokens(tokenizer, text) for text in self.texts]
            self._fallback = docs
            pieces = [_Piece(d, doc.ids, [], word_ends(tokenizer, doc, text))
                      for d, (doc, text) in enumerate(zip(docs, self.texts, strict=True))]
            starts = [doc.starts for doc in docs]
        else:
            self._fallback = None
            starts = [{0} for _ in pieces]
        self.pieces = pieces
        self.index = TokenSubstringIndex([p.ids for p in pieces], starts)
        self._first = sorted(self.index.next_tokens([]))

    def at_word_end(self, written: Sequence[int]) -> bool:
        n = len(written)
        return n > 0 and any(p + n in self.pieces[d].ends for d, p in self.index.occurrences(written))

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
        found = sorted(self.index.occurrences(written), key=lambda dp: (self.pieces[dp[0]].doc, dp[0]))
        if not found:
            return None
        piece_index, p = found[0]
        piece = self.pieces[piece_index]
        if self._fallback is not None:
            decoded = self.tokenizer.decode(list(written), skip_special_tokens=True)
            start, end = char_span(self._fallback[piece.doc], self.texts[piece.doc], p, len(written), decoded)
        else:
            start, end = piece.offsets[p][0], piece.offsets[p + len(written) - 1][1]
            text = self.texts[piece.doc]
            while start < end and text[start].isspace():
                start += 1
            while end > start and text[end - 1].isspace():
                end -= 1
        return SpanSource(piece.doc, start, end)

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
