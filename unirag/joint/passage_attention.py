"""Where the joint model and its readers look in one passage: attention over the passage's tokens, per method.

One prefill pass per reading configuration, no generation. Every method reads the question and ONE passage (the
benchmark gives the gold passage, so localization is measured apart from retrieval), and every weight is the
attention of the **last prompt position** (the query that produces the first answer token) over the passage's
own tokens (not its title):

- `retrieval_heads`: the pathway's extra query heads, as the docid search runs them (`retrieval_mode`: the LoRA
  adapter off unless it serves retrieval; pathway on, bridge off), on the joint answer prompt; mean over the
  pathway layers and their heads;
- `trained_reader`: the stage-2 reader (adapter, pathway and bridge on, as `joint_reader="trained"` reads), the
  base's last `ANSWER_ATTENTION_LAYERS` layers, mean over layers and heads; `trained_reader_bridge`: the same
  pass's bridge cross-attention, mean over its heads (what the app's heatmap draws for that reader);
- `base_reader`: the RAG reader, i.e. the base LLM (adapter, pathway and bridge off) on the RAG prompt
  (`unirag.rag.build_prompt`), last layers as for `trained_reader`.

The last-layers mean from the last prompt position is the project's one definition of "answer attention" (the
joint reader's trace and `rag.AnswerAttentionRecorder` use it), so the figures measure what the app draws.
Without a stage-2 adapter (`model.reader_trained` False) the trained reader is the base LLM: its two methods are
left out rather than reported twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from unirag.answer_sentences import SentenceLocalization, localize
from unirag.data import Passage
from unirag.joint.modeling import JointModel
from unirag.joint.prompts import answer_prompt
from unirag.joint.reader import ANSWER_ATTENTION_LAYERS

METHODS = ("retrieval_heads", "trained_reader", "trained_reader_bridge", "base_reader")
METHOD_WORDS = {
    "retrieval_heads": "the joint model's retrieval heads (pathway layers' extra query heads)",
    "trained_reader": f"the stage-2 reader's answer attention (last {ANSWER_ATTENTION_LAYERS} layers)",
    "trained_reader_bridge": "the stage-2 reader's bridge cross-attention",
    "base_reader": f"the RAG reader (base LLM) answer attention (last {ANSWER_ATTENTION_LAYERS} layers)",
}


@dataclass
class PassageAttention:
    """Weights of one method over a passage's tokens, with each token's character span in `passage.text`."""

    method: str
    offsets: list[tuple[int, int]]  # per passage token: [start, end) in the passage text (may reach before 0)
    weights: list[float]


def _passage_tokens(char_offsets: Sequence[tuple[int, int]], text_start: int, text_end: int
                    ) -> tuple[list[int], list[tuple[int, int]]]:
    """(positions, offsets relative to the passage text) of the prompt tokens overlapping [text_start, text_end)."""
    positions, offsets = [], []
    for i, (a, b) in enumerate(char_offsets):
        if b > a and b > text_start and a < text_end:
            positions.append(i)
            offsets.append((a - text_start, b - text_start))
    return positions, offsets


def _text_start(piece_start: int, passage: Passage) -> int:
    # A piece is f"{title}: {text}" (joint answer prompt and RAG context alike); the text follows the title.
    return piece_start + (len(passage.title) + 2 if passage.title else 0)


def _last_layers(model: JointModel) -> tuple[int, ...]:
    n = len(model.decoder.layers)
    return tuple(range(max(0, n - ANSWER_ATTENTION_LAYERS), n))


def _mean_last_row(attentions: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Mean over layers and heads of the last query position's attention row, [S]."""
    rows = [a[0, :, -1, :].float().mean(0) for a in attentions if a is not None]
    return torch.stack(rows).mean(0)


def _rag_prompt(tokenizer, question: str, passage: Passage) -> tuple[list[int], list[tuple[int, int]], int]:
    """(ids, character offsets, start of the passage text) of the RAG reader's prompt for one passage."""
    from unirag.rag import build_prompt, format_context

    context = format_context([passage])
    prompt = build_prompt(tokenizer, question, context)
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)  # as Reader tokenizes it
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]], _text_start(prompt.rfind(context),
                                                                                          passage)


@torch.inference_mode()
def passage_attention(model: JointModel, tokenizer, question: str, passage: Passage,
                      methods: Sequence[str] = METHODS) -> dict[str, PassageAttention]:
    """Each method's attention over `passage`'s tokens (see the module docstring); methods the model cannot run
    (the trained reader without a stage-2 adapter) are absent from the result."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown localization method(s) {unknown}; choose from {METHODS}")
    out: dict[str, PassageAttention] = {}
    device = model.device
    wanted = set(methods)
    if wanted & {"retrieval_heads", "trained_reader", "trained_reader_bridge"}:
        prompt = answer_prompt(model, tokenizer, question, [(passage.id, passage.title, passage.text)])
        if not prompt.passage_chars:
            raise ValueError("the tokenizer gives no character offsets: a fast tokenizer is needed")
        start = _text_start(prompt.passage_chars[0][0], passage)
        positions, offsets = _passage_tokens(prompt.char_offsets, start, start + len(passage.text))
        ids = torch.tensor([prompt.ids], device=device)
        index = torch.tensor(positions, dtype=torch.long, device=device)
        if "retrieval_heads" in wanted:
            with model.retrieval_mode():
                result = model(ids, pathway=True, bridge=False, output_attentions=True, attention_layers=(),
                               logits_to_keep=1)
            row = _mean_last_row(result.retrieval_attentions)
            out["retrieval_heads"] = PassageAttention("retrieval_heads", offsets, row[index].tolist())
        if model.reader_trained and wanted & {"trained_reader", "trained_reader_bridge"}:
            layers = _last_layers(model)
            with model.reading_mode(adapter=True):
                result = model(ids, pathway=True, bridge=True, output_attentions=True, attention_layers=layers,
                               logits_to_keep=1)
            if "trained_reader" in wanted:
                row = _mean_last_row([result.attentions[i] for i in layers])
                out["trained_reader"] = PassageAttention("trained_reader", offsets, row[index].tolist())
            if "trained_reader_bridge" in wanted and result.bridge_attentions is not None:
                row = result.bridge_attentions[0, :, -1, :].float().mean(0)
                out["trained_reader_bridge"] = PassageAttention("trained_reader_bridge", offsets, row[index].tolist())
    if "base_reader" in wanted:
        rag_ids, rag_offsets, start = _rag_prompt(tokenizer, question, passage)
        positions, offsets = _passage_tokens(rag_offsets, start, start + len(passage.text))
        layers = _last_layers(model)
        with model.reading_mode(adapter=False):
            result = model(torch.tensor([rag_ids], device=device), pathway=False, bridge=False,
                           output_attentions=True, attention_layers=layers, logits_to_keep=1)
        row = _mean_last_row([result.attentions[i] for i in layers])
        index = torch.tensor(positions, dtype=torch.long, device=device)
        out["base_reader"] = PassageAttention("base_reader", offsets, row[index].tolist())
    return out




def retrieval_heads_localization(model: JointModel, tokenizer, question: str, answers: Sequence[str],
                                 passage: Passage) -> SentenceLocalization:
    """The passage's sentences, the answer sentence (when the answer is located) and the retrieval heads'
    sentence ranking, for the app: one prefill pass, no generation."""
    attention = passage_attention(model, tokenizer, question, passage, methods=("retrieval_heads",))
    return localize(passage.text, question, answers,
                    {name: (a.offsets, a.weights) for name, a in attention.items()})


__all__ = ["METHODS", "METHOD_WORDS", "PassageAttention", "passage_attention", "retrieval_heads_localization"]
