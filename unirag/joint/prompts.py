"""The joint model's prompts: retrieval, answer and self-check, and token-string helpers.

Retrieval prompt:  tokens of f"Q: {question}\\n" + <retrieve_token>; the docid head at the last position
                   predicts level 0; each chosen symbol is fed back as its docid token.
Answer prompt:     chat template around f"Q: {question}\\n{context}\\nA:" with <generates_token> right
                   before the assistant turn (plain text + <generates_token> without a template).
Self-check prompt: SELF_CHECK_PROMPT around one passage, then the question's tokens (scored by the base LLM).
Evidence prompt:   tokens of EVIDENCE_PROMPT (plain text, like retrieval); the base LLM continues it with evidence
                   copied from a candidate document (the `evidence` system, unirag.joint.evidence_system).

Training builds its examples with `retrieval_prompt` / `answer_prompt` so both sides agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from unirag.errors import UniragError
from unirag.joint.modeling import JointModel

SELF_CHECK_PROMPT = "Passage: {passage}\nPlease write a question based on this passage.\nQuestion:"
EVIDENCE_PROMPT = "Q: {question}\nEvidence:"


@dataclass
class Prompt:
    ids: list[int]
    context_positions: list[int] = field(default_factory=list)  # absolute positions of context tokens
    doc_spans: list[list[int]] = field(default_factory=list)  # [start, end) within context_positions
    text: str = ""
    # Character offsets of each id in `text` ((0, 0) for ids not read from it: special tokens, <generates_token>,
    # or a tokenizer without offsets), and the [start, end) characters of each passage's piece in `text`.
    char_offsets: list[tuple[int, int]] = field(default_factory=list)
    passage_chars: list[tuple[int, int]] = field(default_factory=list)



def _tokenize(tokenizer, text: str, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]] | None]:
    """Token ids and character offsets (None for tokenizers without offsets, i.e. slow ones)."""
    try:
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, ValueError, TypeError):
        return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]), None


def _overlapping(offsets: list[tuple[int, int]], start: int, end: int) -> list[int]:
    """Positions of tokens whose characters overlap [start, end) (special tokens have empty offsets)."""
    return [i for i, (s, e) in enumerate(offsets) if e > start and s < end and e > s]


def retrieval_prompt(model: JointModel, tokenizer, question: str) -> tuple[list[int], list[int]]:
    """(ids of f"Q: {question}\\n" + <retrieve_token>, positions of the question's own tokens)."""
    prefix = "Q: "
    ids, offsets = _tokenize(tokenizer, f"{prefix}{question}\n", add_special_tokens=True)
    if offsets is None:
        positions = list(range(len(ids)))
    else:
        positions = _overlapping(offsets, len(prefix), len(prefix) + len(question))
    return ids + [model.retrieve_token_id], positions


def answer_prompt(
    model: JointModel, tokenizer, question: str, passages: Sequence[tuple[str, str, str]],
    reader_prompt: str = "plain",
) -> Prompt:
    """Ids of the answer prompt and where the context and each passage sit in it. `reader_prompt` "short" puts the
    prompt-only baseline's instruction and worked example before the question (`unirag.rag.reader_messages`)."""
    from unirag.rag import plain_reader_text, reader_messages

    pieces = [f"{title}: {text}" if title else text for _, title, text in passages]
    head = f"Q: {question}\n"
    context = "\n".join(pieces)
    user_text = f"{head}{context}\nA:"
    # Character span of each passage inside user_text.
    spans, cursor = [], len(head)
    for piece in pieces:
        spans.append((cursor, cursor + len(piece)))
        cursor += len(piece) + 1

    if getattr(tokenizer, "chat_template", None):
        messages = reader_messages(user_text, reader_prompt)
        without = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        with_gen = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        header = with_gen[len(without):] if with_gen.startswith(without) else ""
        # Unusual templates whose generation prompt is not a suffix: put the token at the very end instead.
        body = without if header else with_gen
        ids, offsets = _tokenize(tokenizer, body, add_special_tokens=False)
        header_ids, _ = _tokenize(tokenizer, header, add_special_tokens=False) if header else ([], None)
        full_ids = ids + [model.generates_token_id] + header_ids
        base = body.rfind(user_text)  # the last user turn: a worked example comes before it
        text = body + "<generates_token>" + header
    else:
        body = plain_reader_text(user_text, reader_prompt)
        ids, offsets = _tokenize(tokenizer, body, add_special_tokens=True)
        full_ids = ids + [model.generates_token_id]
        base = body.rfind(user_text)
        text = body + "<generates_token>"

    prompt = Prompt(ids=full_ids, text=text)
    if offsets is None or base < 0 or not pieces:
        return prompt
    prompt.char_offsets = list(offsets) + [(0, 0)] * (len(full_ids) - len(offsets))
    prompt.passage_chars = [(base + start, base + end) for start, end in spans]
    prompt.context_positions = _overlapping(offsets, base + len(head), base + len(head) + len(context))
    if prompt.context_positions:
        first = prompt.context_positions[0]
        for start, end in spans:
            positions = _overlapping(offsets, base + start, base + end)
            prompt.doc_spans.append([positions[0] - first, positions[-1] + 1 - first] if positions else [0, 0])
    return prompt


def token_strings(tokenizer, ids: Sequence[int], model: JointModel | None = None) -> list[str]:
    """One display string per token. When a token alone does not decode (a multi-byte character split over
    byte-level tokens gives U+FFFD), the raw token strings are returned instead, which `unirag.viz` merges back
    into whole characters."""
    def piece(i: int, decode: Callable[[int], str]) -> str:
        return model.extra_token_name(i) if model is not None and i >= model.extra_vocab_offset else decode(i)

    out = [piece(i, lambda t: tokenizer.decode([t])) for i in ids]
    if any("\ufffd" in s for s in out) and hasattr(tokenizer, "convert_ids_to_tokens"):
        out = [piece(i, lambda t: str(tokenizer.convert_ids_to_tokens(t))) for i in ids]
    return out



def self_check_prompt_ids(tokenizer, title: str, text: str) -> list[int]:
    """Token ids of the self-check prompt for one passage (the question's tokens follow them)."""
    passage = f"{title}. {text}" if title else text
    return list(tokenizer(SELF_CHECK_PROMPT.format(passage=passage), add_special_tokens=True)["input_ids"])


def evidence_prompt_ids(tokenizer, question: str) -> list[int]:
    """Token ids of the evidence prompt; the evidence's tokens follow them."""
    return list(tokenizer(EVIDENCE_PROMPT.format(question=question), add_special_tokens=True)["input_ids"])


def question_ids(tokenizer, question: str) -> list[int]:
    """The question's tokens as the self-check scores them (after the prompt's "Question:")."""
    ids = list(tokenizer(" " + question, add_special_tokens=False)["input_ids"])
    if not ids:
        raise UniragError("The question has no tokens to score.")
    return ids


__all__ = ["EVIDENCE_PROMPT", "Prompt", "SELF_CHECK_PROMPT", "answer_prompt", "evidence_prompt_ids", "question_ids",
           "retrieval_prompt", "self_check_prompt_ids", "token_strings"]
