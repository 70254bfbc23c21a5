"""The joint model reads its documents: greedy answer with the KV cache, and the answer-attention trace."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch

from unirag import streaming
from unirag.answer import AnswerAttention
from unirag.errors import UniragError
from unirag.joint.modeling import JointModel
from unirag.joint.padding import left_pad, pad_token_id
from unirag.joint.prompts import Prompt, answer_prompt, token_strings
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
    reader_prompt: str = "plain",
) -> AnswerGeneration:
    """Greedy answer from (doc_id, title, text) passages with the KV cache; stops at EOS or a newline.
    adapter=False reads without the stage-2 LoRA adapter (with pathway and bridge off: the base LLM).

    answer_mode "span": every token continues a word-bounded span of one passage's text (`unirag.spans`), the
    answer ending only at a word boundary. Leading newlines are skipped rather than ending the answer empty.
    The attention trace has, for each answer token, the weights of the query that produced it over the context
    tokens: bridge attention when the bridge is on, else the base's last layers, averaged over heads (and layers).
    A listener (`unirag.streaming`) gets the answer so far after every token.
    """
    return answer_many_with_docs(model, tokenizer, [question], [passages], max_new_tokens, output_attentions,
                                 pathway, bridge, adapter, answer_mode, reader_prompt)[0]


@torch.inference_mode()
def answer_many_with_docs(
    model: JointModel,
    tokenizer,
    questions: Sequence[str],
    passages: Sequence[Sequence[tuple[str, str, str]]],
    max_new_tokens: int = 32,
    output_attentions: bool = True,
    pathway: bool = True,
    bridge: bool = True,
    adapter: bool = True,
    answer_mode: str = "free",
    reader_prompt: str = "plain",
) -> list[AnswerGeneration]:
    """`answer_with_docs` for several questions (each with its own passages) in one set of forwards: the prompts
    left-padded into one prefill, then one row per unfinished answer. Each row keeps its own stop (EOS, newline,
    budget), span constraint and attention trace (over its own context positions), so its answer is the one
    `answer_with_docs` gives it alone, up to float rounding. Finished rows leave the batch. Only a single question
    streams its tokens."""
    if len(questions) != len(passages):
        raise UniragError(f"{len(questions)} questions but {len(passages)} passage lists.")
    if not questions:
        return []
    with model.reading_mode(adapter):
        return _answer_many(model, tokenizer, list(questions), list(passages), max_new_tokens, output_attentions,
                            pathway, bridge, answer_mode, reader_prompt)


@dataclass
class _Row:
    """One answer being written."""

    prompt: Prompt
    context: torch.Tensor  # its context positions in the padded batch
    constraint: SpanConstraint | None
    answer_ids: list[int] = field(default_factory=list)
    weights: list[list[float]] = field(default_factory=list)
    stop: str = "max_new_tokens"
    started: bool = False

    def choose(self, logits: torch.Tensor) -> int:
        """The greedy next token, inside the span constraint when there is one."""
        return int((self.constraint.mask(logits, self.answer_ids) if self.constraint is not None else logits).argmax())

    def take(self, token: int, tokenizer, eos: set[int], attention: Callable[[], list[float]]) -> bool:
        """Add the chosen token; True when the answer ends here (the token is then kept only when it carries text
        before a newline). `attention` gives the row's trace for this step."""
        if token in eos:
            self.stop = "eos"
            return True
        piece = tokenizer.decode([token])
        if "\n" in piece:
            before = piece.split("\n", 1)[0]
            if self.started or before.strip():
                if before.strip():
                    self.answer_ids.append(token)
                    self.weights.append(attention())
                self.stop = "newline"
                return True
            return False  # a leading newline is fed back to the model but is not part of the answer
        self.answer_ids.append(token)
        self.weights.append(attention())
        self.started = self.started or bool(piece.strip())
        return False


def _answer_many(model: JointModel, tokenizer, questions: list[str],
                 passages: list[Sequence[tuple[str, str, str]]], max_new_tokens: int, output_attentions: bool,
                 pathway: bool, bridge: bool, answer_mode: str = "free",
                 reader_prompt: str = "plain") -> list[AnswerGeneration]:
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
    newline = set(tokenizer.encode("\n", add_special_tokens=False)[-1:])
    prompts = [answer_prompt(model, tokenizer, q, ps, reader_prompt) for q, ps in zip(questions, passages, strict=True)]
    batch = left_pad([p.ids for p in prompts], pad_token_id(tokenizer), device)
    rows = []
    for prompt, pad, ps in zip(prompts, batch.pads, passages, strict=True):
        constraint = None
        if answer_mode == "span" and ps:
            constraint = SpanConstraint(tokenizer, [text for _, _, text in ps], eos | newline, max_new_tokens)
        context = torch.tensor([pad + i for i in prompt.context_positions], dtype=torch.long, device=device)
        rows.append(_Row(prompt, context, constraint))

    def attention_row(out, b: int, row: _Row) -> list[float]:
        if not output_attentions or row.context.numel() == 0:
            return []
        if use_bridge:
            weights = out.bridge_attentions[b, :, -1, :].float().mean(0)
        else:
            weights = torch.stack([out.attentions[i][b, :, -1, :].float() for i in last_layers]).mean(dim=(0, 1))
        return weights[row.context].tolist()

    out = model(batch.ids, attention_mask=batch.mask, position_ids=batch.positions, use_cache=True,
                logits_to_keep=1, **kwargs)
    live = list(range(len(rows)))  # batch row b of the last forward writes answer live[b]
    stream = len(rows) == 1 and streaming.listening()
    for step in range(1, max_new_tokens + 1):
        keep, tokens = [], []
        for b, r in enumerate(live):
            row = rows[r]
            token = row.choose(out.lm_logits[b, -1])
            if not row.take(token, tokenizer, eos, partial(attention_row, out, b, row)):
                keep.append(b)
                tokens.append(token)
        if stream and keep:
            streaming.emit("token", tokenizer.decode(rows[0].answer_ids, skip_special_tokens=True).strip())
        if not keep or step == max_new_tokens:
            break
        cache = out.past_key_values
        if len(keep) < len(live):  # finished answers leave the batch
            cache.batch_select_indices(torch.tensor(keep, device=device))
            live = [live[b] for b in keep]
        mask, positions = batch.step(live, step)
        out = model(torch.tensor([[t] for t in tokens], device=device), attention_mask=mask, position_ids=positions,
                    past_key_values=cache, use_cache=True, **kwargs)
    return [_generation(tokenizer, row, output_attentions, use_bridge, len(last_layers)) for row in rows]


def _generation(tokenizer, row: _Row, output_attentions: bool, use_bridge: bool, layers: int) -> AnswerGeneration:
    """A finished row as an `AnswerGeneration`: a span answer cut back to a word boundary, its source found."""
    answer_ids, weights, span = row.answer_ids, row.weights, None
    if row.constraint is not None:
        answer_ids, span = finish_span(row.constraint, answer_ids, stopped=row.stop != "max_new_tokens")
        weights = weights[: len(answer_ids)]
    prompt = row.prompt
    text = tokenizer.decode(answer_ids, skip_special_tokens=True).split("\n", 1)[0].strip()
    attention = AnswerAttention(
        answer_tokens=token_strings(tokenizer, answer_ids),
        context_tokens=token_strings(tokenizer, [prompt.ids[i] for i in prompt.context_positions]),
        weights=weights if output_attentions else [],
        doc_spans=prompt.doc_spans,
        source=("bridge" if use_bridge else f"base_last_{layers}_layers") if output_attentions else None,
    )
    return AnswerGeneration(
        text=text,
        token_ids=answer_ids,
        prompt_tokens=len(prompt.ids),
        context_tokens=len(prompt.context_positions),
        answer_tokens=len(answer_ids),
        stop_reason=row.stop,
        attention=attention,
        span=span,
    )



__all__ = ["ANSWER_ATTENTION_LAYERS", "AnswerGeneration", "answer_many_with_docs", "answer_with_docs", "eos_ids"]
