"""The joint model reads its documents: greedy answer with the KV cache, and the answer-attention trace."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from unirag.answer import AnswerAttention
from unirag.joint.modeling import JointModel
from unirag.joint.prompts import answer_prompt, token_strings
from unirag.spans import SpanConstraint, SpanSource, finish_span

ANSWER_ATTENTION_LAYERS = 4  # base layers averaged for the answer heatmap when the bridge is off


@dataclass
class AnswerGeneration:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    context_tokens: int
    answer_tokens: int
    stop_reason: str  # "eos", "newline" or "max_new_tokens"
    attention: AnswerAttention
    span: SpanSource | None = None  # span answers: where the span sits (passage index, characters in its text)



def eos_ids(model: JointModel, tokenizer) -> set[int]:
    """The ids that end an answer: the tokenizer's EOS and the generation config's."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model.causal_lm, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    return ids


@torch.inference_mode()
def answer_with_docs(
    model: JointModel,
    tokenizer,
    question: str,
    passages: Sequence[tuple[str, str, str]],
    max_new_tokens: int = 32,
    output_attentions: bool = True,
    pathway: bool = True,
    bridge: bool = True,
    adapter: bool = True,
    answer_mode: str = "free",
) -> AnswerGeneration:
    """Greedy answer from (doc_id, title, text) passages with the KV cache; stops at EOS or a newline.
    adapter=False reads without the stage-2 LoRA adapter (with pathway and bridge off: the base LLM).

    answer_mode "span": every token continues a word-bounded span of one passage's text (`unirag.spans`), the
    answer ending only at a word boundary. Leading newlines are skipped rather than ending the answer empty.
    The attention trace has, for each answer token, the weights of the query that produced it over the context
    tokens: bridge attention when the bridge is on, else the base's last layers, averaged over heads (and layers).
    """
    with model.reading_mode(adapter):
        return _answer_with_docs(model, tokenizer, question, passages, max_new_tokens, output_attentions, pathway,
                                 bridge, answer_mode)


def _answer_with_docs(model: JointModel, tokenizer, question: str, passages: Sequence[tuple[str, str, str]],
                      max_new_tokens: int, output_attentions: bool, pathway: bool, bridge: bool,
                      answer_mode: str = "free") -> AnswerGeneration:
    prompt = answer_prompt(model, tokenizer, question, passages)
    device = model.device
    num_layers = len(model.decoder.layers)
    last_layers = tuple(range(max(0, num_layers - ANSWER_ATTENTION_LAYERS), num_layers))
    use_bridge = bridge and pathway
    kwargs = {
        "pathway": pathway,
        "bridge": use_bridge,
        "output_attentions": output_attentions,
        "attention_layers": () if use_bridge else last_layers,
    }
    eos = eos_ids(model, tokenizer)
    constraint = None
    if answer_mode == "span" and passages:
        newline = tokenizer.encode("\n", add_special_tokens=False)[-1:]
        constraint = SpanConstraint(tokenizer, [text for _, _, text in passages], eos | set(newline), max_new_tokens)
    ctx = torch.tensor(prompt.context_positions, dtype=torch.long, device=device)

    def attention_row(out) -> list[float]:
        if not output_attentions or ctx.numel() == 0:
            return []
        if use_bridge:
            row = out.bridge_attentions[0, :, -1, :].float().mean(0)
        else:
            row = torch.stack([out.attentions[i][0, :, -1, :].float() for i in last_layers]).mean(dim=(0, 1))
        return row[ctx].tolist()

    out = model(torch.tensor([prompt.ids], device=device), use_cache=True, logits_to_keep=1, **kwargs)
    answer_ids: list[int] = []
    rows: list[list[float]] = []
    stop, started = "max_new_tokens", False
    for _ in range(max_new_tokens):
        logits = out.lm_logits[0, -1]
        token = int((constraint.mask(logits, answer_ids) if constraint is not None else logits).argmax())
        if token in eos:
            stop = "eos"
            break
        piece = tokenizer.decode([token])
        if "\n" in piece:
            before = piece.split("\n", 1)[0]
            if started or before.strip():
                if before.strip():
                    answer_ids.append(token)
                    rows.append(attention_row(out))
                stop = "newline"
                break
            # A leading newline is fed back to the model but is not part of the answer.
        else:
            answer_ids.append(token)
            rows.append(attention_row(out))
            started = started or bool(piece.strip())
        out = model(torch.tensor([[token]], device=device), past_key_values=out.past_key_values, use_cache=True,
                    **kwargs)

    span = None
    if constraint is not None:
        kept, span = finish_span(constraint, answer_ids, stopped=stop != "max_new_tokens")
        rows = rows[: len(kept)]
        answer_ids = kept
    text = tokenizer.decode(answer_ids, skip_special_tokens=True).split("\n", 1)[0].strip()
    attention = AnswerAttention(
        answer_tokens=token_strings(tokenizer, answer_ids),
        context_tokens=token_strings(tokenizer, [prompt.ids[i] for i in prompt.context_positions]),
        weights=rows if output_attentions else [],
        doc_spans=prompt.doc_spans,
        source=("bridge" if use_bridge else f"base_last_{len(last_layers)}_layers") if output_attentions else None,
    )
    return AnswerGeneration(
        text=text,
        token_ids=answer_ids,
        prompt_tokens=len(prompt.ids),
        context_tokens=len(prompt.context_positions),
        answer_tokens=len(answer_ids),
        stop_reason=stop,
        attention=attention,
        span=span,
    )



__all__ = ["ANSWER_ATTENTION_LAYERS", "AnswerGeneration", "answer_with_docs", "eos_ids"]
