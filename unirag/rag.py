"""Baselines on the same LLM: No RAG, and RAG: vanilla dense (DPR-style, a faiss index), or any other ranker
(`unirag.sparse`: BM25, hybrid) read the same way.

All read with `Reader`, which owns the prompt `Q: {query}\\n{context}\\nA:` (wrapped in the
model's chat template when it has one) and greedy decoding with a short answer budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from unirag import streaming
from unirag.answer import Answer, AnswerAttention, AnswerSpan, RetrievedDoc, Trace
from unirag.data import Corpus, Passage, prepare_question
from unirag.errors import UniragError
from unirag.settings import InferenceSettings

DEFAULT_MAX_NEW_TOKENS = InferenceSettings().max_new_tokens  # the one default, from the settings object
RANKED_AT_LEAST = 3  # dense RAG ranks at least this many documents, whatever k it reads (for R@3)


def format_context(passages: list[Passage]) -> str:
    return "\n".join(p.as_context() for p in passages)


def user_text(question: str, context: str) -> str:
    return f"Q: {question}\n{context}\nA:" if context else f"Q: {question}\nA:"


# reader_prompt "short", the prompt-only baseline: an instruction and one worked example (not from any dataset).
SHORT_ANSWER_INSTRUCTION = ("Answer the question with the shortest phrase from the passage that answers it: a few "
                            "words copied from the passage, not a sentence.")
SHORT_ANSWER_EXAMPLE = ("who wrote the play hamlet",
                        "Hamlet: The Tragedy of Hamlet, Prince of Denmark, is a tragedy written by William "
                        "Shakespeare sometime between 1599 and 1601.",
                        "William Shakespeare")


def reader_messages(text: str, reader_prompt: str = "plain") -> list[dict[str, str]]:
    """The chat turns around one user text (`user_text`): alone ("plain"), or after the instruction and the worked
    example ("short")."""
    if reader_prompt == "plain":
        return [{"role": "user", "content": text}]
    if reader_prompt != "short":
        raise UniragError(f"Unknown reader_prompt {reader_prompt!r}: use plain or short.")
    question, context, answer = SHORT_ANSWER_EXAMPLE
    return [{"role": "system", "content": SHORT_ANSWER_INSTRUCTION},
            {"role": "user", "content": user_text(question, context)},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": text}]


def plain_reader_text(text: str, reader_prompt: str = "plain") -> str:
    """`reader_messages` as plain text, for tokenizers without a chat template."""
    turns = reader_messages(text, reader_prompt)
    return "\n\n".join(t["content"] + (" " + turns[i + 1]["content"] if t["role"] == "user" and i + 1 < len(turns)
                                        and turns[i + 1]["role"] == "assistant" else "")
                       for i, t in enumerate(turns) if t["role"] != "assistant")


def build_prompt(tokenizer, question: str, context: str, use_chat_template: bool = True,
                 reader_prompt: str = "plain") -> str:
    """The one prompt every system reads with (joint reader included).

    "plain" has no system message of our own: on 40 NQ train questions with the gold passage, SmolLM2 scored
    0.65 (accuracy, "contains gold") with its default system prompt, 0.45 with a "short answer" one and 0.15
    without the template; "short" is that instruction plus a worked example, measured by EM/F1 in the store.
    """
    text = user_text(question, context)
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(reader_messages(text, reader_prompt), add_generation_prompt=True,
                                             tokenize=False)
    return plain_reader_text(text, reader_prompt)


def clean_generation(text: str) -> str:
    """The answer is the first non-empty line: small models ramble on after it."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


class AnswerAttentionRecorder:
    """Records, during greedy generation, the last layers' attention of each new query position.

    Row i is the attention of the query that produced answer token i (the prompt's last position, then
    each fed-back token), mean over heads and layers: the same definition as the joint model's heatmap,
    and no second forward pass over prompt + answer. Needs eager attention (SDPA returns no weights).
    """

    def __init__(self, model, last_layers: int = 4) -> None:
        layers = _decoder_layers(model)
        self._handles = [layer.self_attn.register_forward_hook(self._hook) for layer in layers[-last_layers:]]
        self._step: list[torch.Tensor] = []
        self.steps: list[torch.Tensor] = []  # per generated token: [batch, kv_len]

    def _hook(self, module, args, output) -> None:
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            return
        self._step.append(weights[:, :, -1, :].float().mean(dim=1))
        if len(self._step) == len(self._handles):
            self.steps.append(torch.stack(self._step).mean(dim=0))
            self._step = []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def rows(self, batch_row: int, n_answer: int, span: tuple[int, int], offset: int) -> list[list[float]]:
        """Answer tokens × context tokens for one batch row; `offset` is its left padding."""
        start, end = span
        out = []
        for step in self.steps[:n_answer]:
            row = step[batch_row, offset + start: offset + end]
            out.append((row / row.sum().clamp(min=1e-9)).tolist())  # renormalised over the context
        return out


def _decoder_layers(model):
    # The same lookup as JointModel.decoder: the causal LM's base model holds the layers.
    layers = getattr(getattr(model, getattr(model, "base_model_prefix", "model"), None), "layers", None)
    if layers is None:
        raise UniragError(f"Cannot find the decoder layers of {type(model).__name__} for the attention trace.")
    return layers


@dataclass
class ReaderOutput:
    text: str
    prompt_tokens: int
    context_tokens: int
    answer_tokens: int
    generate_ms: float
    attention: dict
    span: tuple[int, int, int] | None = None  # a span answer's (passage index, start char, end char) in its text


class _TextEvents:
    """A `generate` streamer: each new token sends the answer so far as a "token" event (`unirag.streaming`)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.ids, self.prompt_seen = tokenizer, [], False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate's first call carries the prompt
            self.prompt_seen = True
            return
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        streaming.emit("token", clean_generation(self.tokenizer.decode(self.ids, skip_special_tokens=True)))

    def end(self) -> None:
        pass


class Reader:
    """Greedy short-answer generation from a question and passages."""

    def __init__(self, model, tokenizer, use_chat_template: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.use_chat_template = use_chat_template
        newline = tokenizer.encode("\n", add_special_tokens=False)
        stops = {tokenizer.eos_token_id, *(newline[-1:] if newline else [])}
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
            stops.add(im_end)
        self.stop_ids = sorted(s for s in stops if s is not None)

    def context_span(self, prompt: str, context: str) -> tuple[int, int]:
        """Token span of the context inside the prompt (by character offsets)."""
        if not context:
            return (0, 0)
        start_char = prompt.rfind(context)
        enc = self.tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=False)
        inside = [
            i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > start_char and a < start_char + len(context)
        ]
        return (inside[0], inside[-1] + 1) if inside else (0, 0)

    def read(
        self, question: str, passages: list[Passage], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        with_attention: bool = False,
    ) -> ReaderOutput:
        return self.read_many([question], [passages], max_new_tokens, with_attention)[0]

    @torch.inference_mode()
    def read_many(
        self,
        questions: list[str],
        passages: list[list[Passage]],
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        with_attention: bool = False,
        answer_mode: str = "free",
        reader_prompt: str = "plain",
    ) -> list[ReaderOutput]:
        """Read a batch (left-padded greedy decoding); latency is the batch's time split evenly. answer_mode "span":
        each answer is a word-bounded span of its own passages (`unirag.spans`); rows without passages read freely."""
        contexts = [format_context(p) for p in passages]
        prompts = [
            build_prompt(self.tokenizer, q, c, self.use_chat_template, reader_prompt)
            for q, c in zip(questions, contexts, strict=True)
        ]
        self.tokenizer.padding_side = "left"
        batch = self.tokenizer(prompts, return_tensors="pt", add_special_tokens=False, padding=True)
        recorder = AnswerAttentionRecorder(self.model) if with_attention else None
        width = batch["input_ids"].shape[1]
        start = time.perf_counter()
        constraints = None
        extra = {}
        if answer_mode == "span" and any(passages):
            from transformers import LogitsProcessorList

            from unirag.spans import SpanConstraint, SpanLogitsProcessor

            constraints = [SpanConstraint(self.tokenizer, [p.text for p in ps], self.stop_ids, max_new_tokens)
                           if ps else None for ps in passages]
            extra["logits_processor"] = LogitsProcessorList([SpanLogitsProcessor(constraints, width)])
        if len(prompts) == 1 and streaming.listening():  # one question on the page: show its answer as it grows
            extra["streamer"] = _TextEvents(self.tokenizer)
        try:
            output = self.model.generate(
                **{k: v.to(self.model.device) for k, v in batch.items()},
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=self.stop_ids,
                pad_token_id=self.tokenizer.pad_token_id,
                **extra,
            ).cpu()  # token ids back from a GPU; a no-op on the CPU
        finally:
            if recorder is not None:
                recorder.remove()
        elapsed = (time.perf_counter() - start) * 1000 / len(prompts)
        results = []
        stops = torch.tensor(self.stop_ids + [self.tokenizer.pad_token_id])
        for row, (prompt, context) in enumerate(zip(prompts, contexts, strict=True)):
            prompt_ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
            new_ids = output[row, width:]
            cut = torch.isin(new_ids, stops).nonzero()
            new_ids = new_ids[: int(cut[0]) if len(cut) else len(new_ids)]
            span = None
            if constraints is not None and constraints[row] is not None:
                from unirag.spans import finish_span

                kept, source = finish_span(constraints[row], new_ids.tolist(), stopped=bool(len(cut)))
                new_ids = new_ids[: len(kept)]
                span = (source.doc_index, source.start, source.end) if source is not None else None
            text = clean_generation(self.tokenizer.decode(new_ids, skip_special_tokens=True))
            n_context = len(self.tokenizer(context, add_special_tokens=False)["input_ids"]) if context else 0
            attention = {}
            if recorder is not None and recorder.steps and len(new_ids):
                start_tok, end_tok = self.context_span(prompt, context)
                attention = {
                    "answer_tokens": self.tokenizer.convert_ids_to_tokens(new_ids.tolist()),
                    "context_tokens": self.tokenizer.convert_ids_to_tokens(prompt_ids[start_tok:end_tok].tolist()),
                    "weights": recorder.rows(row, len(new_ids), (start_tok, end_tok), width - len(prompt_ids)),
                }
            results.append(
                ReaderOutput(text, int(prompt_ids.shape[0]), n_context, int(len(new_ids)), elapsed, attention, span)
            )
        return results


class DenseRetriever:
    """Bi-encoder retrieval over a faiss inner-product index of the cached passage embeddings."""

    def __init__(self, corpus: Corpus, encoder, embeddings: np.ndarray):
        import faiss

        if embeddings.ndim != 2 or embeddings.shape[0] != len(corpus):
            raise UniragError(f"{embeddings.shape[0]} embeddings for {len(corpus)} passages: rebuild the index.")
        width = getattr(encoder, "dim", None)
        if width is not None and embeddings.shape[1] != width:  # else faiss fails later with a bare assert
            raise UniragError(f"The passage embeddings are {embeddings.shape[1]} wide but the encoder "
                              f"{getattr(encoder, 'name', '')} gives {width}: delete the cached embeddings of this "
                              "corpus (UNIRAG_CACHE/embeddings) and run again.")
        self.corpus = corpus
        self.encoder = encoder
        self.index = faiss.IndexFlatIP(embeddings.shape[1])
        self.index.add(np.ascontiguousarray(embeddings, dtype=np.float32))

    @classmethod
    def from_corpus(cls, corpus: Corpus, encoder_name: str | None = None, progress: bool = True) -> DenseRetriever:
        from unirag.backbones import SentenceEncoder
        from unirag.docids import corpus_embeddings

        encoder = SentenceEncoder(encoder_name)
        return cls(corpus, encoder, corpus_embeddings(corpus, encoder, progress=progress))

    def search_many(self, questions: list[str], k: int) -> list[list[tuple[str, float]]]:
        if k < 1:
            raise UniragError(f"k must be at least 1 (got {k}).")
        k = min(k, len(self.corpus))
        queries = np.asarray(self.encoder.encode_queries(questions), dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.index.d:  # an encoder without `dim`: checked here
            raise UniragError(f"The encoder {getattr(self.encoder, 'name', '')} gives {queries.shape[-1]}-wide "
                              f"queries but the passage embeddings are {self.index.d} wide: delete the cached "
                              "embeddings of this corpus (UNIRAG_CACHE/embeddings) and run again.")
        scores, rows = self.index.search(queries, k)
        ids = self.corpus.ids
        return [
            [(ids[r], float(s)) for r, s in zip(rr, ss, strict=True) if r >= 0]
            for rr, ss in zip(rows, scores, strict=True)
        ]

    def search(self, question: str, k: int) -> list[tuple[str, float]]:
        return self.search_many([question], k)[0]

    def similarity(self, question: str, doc_ids: list[str]) -> list[float]:
        """The question's cosine with these passages (the score `search` would give them)."""
        query = self.encoder.encode_queries([question])[0]
        return [float(query @ self.index.reconstruct(self.corpus.position(d))) for d in doc_ids]


def _answers(
    name: str,
    questions: list[str],
    notices: list[list[str]],
    outs: list[ReaderOutput],
    docs: list[list[RetrievedDoc]],
    retrieve_ms: float | None,
) -> list[Answer]:
    answers = []
    for question, note, out, found in zip(questions, notices, outs, docs, strict=True):
        timings = {"retrieve": retrieve_ms} if retrieve_ms is not None else {}
        timings["generate"] = out.generate_ms
        trace = Trace(answer_attention=AnswerAttention(**out.attention))
        if out.span is not None:
            doc_index, start, end = out.span
            trace.answer_span = AnswerSpan(found[doc_index].doc_id, start, end)
        answers.append(
            Answer(
                name,
                question,
                out.text,
                found,
                out.prompt_tokens,
                out.context_tokens,
                out.answer_tokens,
                timings,
                note,
                trace,
            )
        )
    return answers


class NoRagSystem:
    """The LLM answers from the question alone."""

    name = "norag"

    def __init__(self, reader: Reader):
        self.reader = reader

    def answer_many(self, questions: list[str], settings: InferenceSettings | None = None,
                    with_attention: bool = False) -> list[Answer]:
        settings = settings or InferenceSettings()
        prepared = [prepare_question(q) for q in questions]
        texts = [q for q, _ in prepared]
        outs = self.reader.read_many(texts, [[] for _ in texts], settings.max_new_tokens, with_attention)
        return _answers(self.name, texts, [n for _, n in prepared], outs, [[] for _ in texts], None)

    def answer(self, question: str, settings: InferenceSettings | None = None, with_attention: bool = False) -> Answer:
        return self.answer_many([question], settings, with_attention)[0]


def _read_ranked(name: str, reader: Reader, corpus: Corpus, questions: list[str], settings: InferenceSettings,
                 ranked: list[list[tuple[str, float]]], k: int, retrieve_ms: float | None,
                 with_attention: bool) -> list[Answer]:
    """Each question's top `k` of its ranking read together; the whole ranking kept when it is longer (R@3)."""
    prepared = [prepare_question(q) for q in questions]
    texts = [q for q, _ in prepared]
    hits = [row[:k] for row in ranked]
    passages = [[corpus[doc_id] for doc_id, _ in row] for row in hits]
    outs = reader.read_many(texts, passages, settings.max_new_tokens, with_attention, settings.answer_mode,
                            settings.reader_prompt)
    docs = [
        [RetrievedDoc(p.id, p.title, p.text, score) for p, (_, score) in zip(ps, row, strict=True)]
        for ps, row in zip(passages, hits, strict=True)
    ]
    answers = _answers(name, texts, [n for _, n in prepared], outs, docs, retrieve_ms)
    for answer, row in zip(answers, ranked, strict=True):
        if len(row) > len(answer.docs):
            answer.ranked_doc_ids = [doc_id for doc_id, _ in row]
    return answers


class RagSystem:
    """RAG: the retriever's top `settings.rag_k` passages concatenated into the prompt. Vanilla dense RAG ("rag")
    with a `DenseRetriever`; any ranker with the same `search_many` / `similarity` / `corpus` reads the same way
    (`unirag.sparse`: "bm25", "hybrid")."""

    def __init__(self, retriever: DenseRetriever, reader: Reader, name: str = "rag"):
        self.retriever = retriever
        self.reader = reader
        self.name = name

    def answer_many(self, questions: list[str], settings: InferenceSettings | None = None,
                    with_attention: bool = False) -> list[Answer]:
        settings = settings or InferenceSettings()
        texts = [prepare_question(q)[0] for q in questions]
        start = time.perf_counter()
        # At least 3 ranked (R@3 is reported for every k); the top k of a ranking do not depend on that.
        ranked = self.retriever.search_many(texts, max(settings.rag_k, RANKED_AT_LEAST))
        retrieve_ms = (time.perf_counter() - start) * 1000 / len(texts)
        return _read_ranked(self.name, self.reader, self.retriever.corpus, questions, settings, ranked,
                            settings.rag_k, retrieve_ms, with_attention)

    def answer(self, question: str, settings: InferenceSettings | None = None, with_attention: bool = False) -> Answer:
        return self.answer_many([question], settings, with_attention)[0]

    def read(self, question: str, hits: list[tuple[str, float | None]], settings: InferenceSettings | None = None,
             with_attention: bool = False) -> Answer:
        """Read given passages, no retrieval (a document removed or forced); a passage without a score gets the
        retriever's score for it (cosine for dense), as if the retriever had found it."""
        missing = [doc_id for doc_id, score in hits if score is None]
        cosine = dict(zip(missing, self.retriever.similarity(prepare_question(question)[0], missing), strict=True))
        ranked = [(doc_id, cosine[doc_id] if score is None else score) for doc_id, score in hits]
        return _read_ranked(self.name, self.reader, self.retriever.corpus, [question], settings or InferenceSettings(),
                            [ranked], len(ranked), 0.0, with_attention)[0]


class GoldPassageSystem:
    """Each question's gold passage alone, read by the base LLM: the reader's upper bound (no retrieval)."""

    name = "gold"

    def __init__(self, reader: Reader, corpus: Corpus):
        self.reader = reader
        self.corpus = corpus

    def answer_many(self, questions: list[str], gold_doc_ids: list[str], settings: InferenceSettings | None = None,
                    with_attention: bool = False) -> list[Answer]:
        ranked = [[(doc_id, 1.0)] for doc_id in gold_doc_ids]
        return _read_ranked(self.name, self.reader, self.corpus, questions, settings or InferenceSettings(), ranked,
                            1, 0.0, with_attention)
