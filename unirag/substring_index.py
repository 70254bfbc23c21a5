"""Corpus-constrained evidence (RetroLLM-style): the LLM writes evidence token by token, and every prefix it writes
is a substring of a candidate document's token sequence, enforced by an FM-index (the `fm-index` package).

    index = TokenSubstringIndex([doc_ids_a, doc_ids_b], starts=[word_starts_a, word_starts_b])
    index.next_tokens([t1, t2])      # the tokens t with t1 t2 t occurring in a document (from an allowed start)
    tokens, stop = constrained_greedy(first_logits, step, index, max_tokens=48, end_ids={eos, newline})
    index.futures([t1, t2])          # {t: [(document, position of t)]}: where each allowed next token leads

The index holds token ids, not text: a match is then a match of whole tokens, exactly what the LLM can write.
`fm-index` indexes strings, so each token id becomes one character (`token_char`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
from fm_index import MultiFMIndex

from unirag.errors import UniragError

# Token id t ↔ chr(_CODE_BASE + t), skipping the UTF-16 surrogates (not valid in a Python→Rust string). The base
# keeps clear of the control and ASCII characters a library may use as separators; a 150k vocabulary still fits.
_CODE_BASE = 0x100
_SURROGATES = (0xD800, 0xE000)
MAX_TOKEN_ID = 0x10FFFF - _CODE_BASE - (_SURROGATES[1] - _SURROGATES[0])


def token_char(token: int) -> str:
    """The one character that stands for `token` in the index."""
    if not 0 <= token <= MAX_TOKEN_ID:
        raise UniragError(f"Token id {token} cannot be indexed (0..{MAX_TOKEN_ID}).")
    code = _CODE_BASE + token
    if code >= _SURROGATES[0]:
        code += _SURROGATES[1] - _SURROGATES[0]
    return chr(code)


def encode_tokens(tokens: Sequence[int]) -> str:
    return "".join(token_char(int(t)) for t in tokens)


class TokenSubstringIndex:
    """An FM-index over documents' token sequences: which token sequences occur, where, and what may follow.

    `starts[i]`: the positions of document i an occurrence may begin at (e.g. word starts, so evidence does not
    begin inside a word); None: any position."""

    def __init__(self, docs: Sequence[Sequence[int]], starts: Sequence[Collection[int] | None] | None = None) -> None:
        self.docs = [[int(t) for t in doc] for doc in docs]
        if starts is not None and len(starts) != len(self.docs):
            raise UniragError(f"{len(starts)} start sets for {len(self.docs)} documents.")
        self.starts: list[frozenset[int] | None] = (
            [None] * len(self.docs) if starts is None else [None if s is None else frozenset(s) for s in starts])
        # MultiFMIndex keeps documents apart: no occurrence spans two of them.
        self._index = MultiFMIndex([encode_tokens(doc) for doc in self.docs]) if any(self.docs) else None

    def _allowed_start(self, doc: int, position: int) -> bool:
        allowed = self.starts[doc]
        return allowed is None or position in allowed

    def occurrences(self, tokens: Sequence[int]) -> list[tuple[int, int]]:
        """(document index, start position) of every occurrence of `tokens` from an allowed start, sorted.
        The empty sequence occurs at every allowed start of a non-empty document."""
        if not tokens:
            return [(d, p) for d, doc in enumerate(self.docs) for p in range(len(doc)) if self._allowed_start(d, p)]
        if self._index is None:
            return []
        found = self._index.locate(encode_tokens(tokens))
        return sorted((d, p) for d, positions in found.items() for p in positions if self._allowed_start(d, p))

    def count(self, tokens: Sequence[int]) -> int:
        return len(self.occurrences(tokens))

    def next_tokens(self, tokens: Sequence[int]) -> set[int]:
        """Tokens t such that `tokens` + [t] occurs (from an allowed start): read off the documents right after each
        occurrence of `tokens`. Empty: `tokens` occurs nowhere, or only at a document's end."""
        return set(self.futures(tokens))

    def futures(self, tokens: Sequence[int]) -> dict[int, list[tuple[int, int]]]:
        """For each token t that may follow `tokens`: the (document, position) of t right after each occurrence,
        i.e. where the text would continue if t were written (forward-looking decoding scores what follows)."""
        n = len(tokens)
        found: dict[int, list[tuple[int, int]]] = {}
        for d, p in self.occurrences(tokens):
            if p + n < len(self.docs[d]):
                found.setdefault(self.docs[d][p + n], []).append((d, p + n))
        return found


@dataclass
class EvidenceTokens:
    tokens: list[int]
    stop_reason: str  # "end", "document_end" or "evidence_tokens" (see `constrained_greedy`)


# (written so far, {allowed next token: its (document, position) continuations}) -> a bonus per allowed token,
# added to its log-probability (forward-looking decoding: favour tokens that lead to relevant text).
Lookahead = Callable[[Sequence[int], Mapping[int, Sequence[tuple[int, int]]]], Mapping[int, float]]


def constrained_greedy(first_logits: torch.Tensor, step: Callable[[int], torch.Tensor], index: TokenSubstringIndex,
                       max_tokens: int, end_ids: Collection[int] = (), lookahead: Lookahead | None = None
                       ) -> EvidenceTokens:
    """Greedy decoding where each token is the best of `index.next_tokens(written so far)`: the most likely, or with
    `lookahead` the highest log-probability + bonus.

    `first_logits`: the next-token logits after the prompt; `step(token)` feeds `token` and returns the next logits.
    Stops "end" when, after at least one token, an end token (EOS, newline) is likelier than every allowed token
    (the LLM would stop there unconstrained), "document_end" when nothing can follow, else at `max_tokens`."""
    ends = sorted(set(int(e) for e in end_ids))
    logits, tokens = first_logits, []
    while len(tokens) < max_tokens:
        futures = index.futures(tokens)
        allowed = sorted(futures)
        if not allowed:
            return EvidenceTokens(tokens, "document_end")
        log_probs = logits.float().log_softmax(-1)
        likely = log_probs[allowed]
        scores = likely
        if lookahead is not None:
            bonus = lookahead(tokens, futures)
            scores = likely + torch.tensor([float(bonus.get(t, 0.0)) for t in allowed])
        best = allowed[int(scores.argmax())]
        # The stop rule asks the LLM alone: would it rather end here than write any allowed token?
        if tokens and ends and best not in ends and float(log_probs[ends].max()) > float(likely.max()):
            return EvidenceTokens(tokens, "end")
        tokens.append(best)
        if len(tokens) < max_tokens:
            logits = step(best)
    return EvidenceTokens(tokens, "evidence_tokens")


@dataclass
class DocTokens:
    """A document's text as the LLM would write it mid-sentence, and where each token sits in the text."""

    ids: list[int]
    spans: list[tuple[int, int]] | None  # character [start, end) of each token in the text; None: no offsets
    starts: set[int] | None  # positions of word-initial tokens (evidence starts there); None: anywhere


def doc_tokens(tokenizer, text: str) -> DocTokens:
    """Tokens of " " + text: in running text every word, the first one too, carries its leading space (what the
    LLM writes after "Evidence:"). Word-initial tokens start at or right after whitespace."""
    padded = " " + text
    try:
        enc = tokenizer(padded, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, ValueError, TypeError):  # slow tokenizers have no offsets
        return DocTokens(list(tokenizer(padded, add_special_tokens=False)["input_ids"]), None, None)
    starts = {i for i, (a, b) in enumerate(offsets)
              if b > a and (padded[a].isspace() or (a > 0 and padded[a - 1].isspace()))}
    spans = [(max(a - 1, 0), max(b - 1, 0)) for a, b in offsets]
    return DocTokens(list(enc["input_ids"]), spans, starts)


def char_span(doc: DocTokens, text: str, position: int, length: int, decoded: str) -> tuple[int, int]:
    """The characters of `text` that tokens [position, position + length) cover, without surrounding whitespace
    (found by the decoded string when the tokenizer gives no offsets)."""
    if doc.spans is not None:
        start, end = doc.spans[position][0], doc.spans[position + length - 1][1]
    else:
        start = max(text.find(decoded.strip()), 0)
        end = start + len(decoded.strip())
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


__all__ = ["DocTokens", "EvidenceTokens", "Lookahead", "MAX_TOKEN_ID", "TokenSubstringIndex", "char_span",
           "constrained_greedy", "doc_tokens", "encode_tokens", "token_char"]
