"""Two-stage training of the joint model: `python -m unirag train ...`.

Stage 1 (retrieval warm-up): the base LLM is frozen; the pathway, the docid head and the docid
entry embeddings learn query → docid from training questions plus indexing examples made from every
passage (title, sentences). Because everything below the first pathway layer is frozen, the hidden
states entering that layer are computed once and cached on disk; epochs then run only the top layers.
(The docid tokens' bottom embeddings stay frozen in stage 1 for the same reason; their trainable
part is the entry embedding added at the first pathway layer.)

Stage 2 (joint): LoRA on the base plus the stage-1 parameters plus the bridge, on a balanced mix
of the docid loss and the answer loss. The answer loss reads the documents the model itself
retrieves (its top docids; for a share of examples with the gold passage among them), with the gold answer as
the documents write it (a span) as the target; held-out reader F1 picks the best step.

Runs are seeded, show progress, log losses to the checkpoint folder and resume from the last save.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from unirag import docids
from unirag.backbones import load_llm
from unirag.data import Corpus, Question, load_corpus, load_questions
from unirag.docids import DocidTree, TreeConfig, load_or_build_tree
from unirag.errors import UniragError
from unirag.joint.config import JointConfig
from unirag.joint.distillation import (
    TeacherRanking,
    bm25_document_probs,
    document_distillation,
    document_paths,
    level_distillation,
)
from unirag.joint.modeling import JointModel, tree_prefixes
from unirag.joint.prompts import answer_prompt, retrieval_prompt
from unirag.joint.search import search_docids
from unirag.paths import cache_dir
from unirag.settings import normalize_precision

STATE_FILE = "trainer_state.json"
TRAIN_PRECISIONS = ("fp32", "nf4")
LOSS_LOG = "loss_log.jsonl"


def option(default: Any, help: str) -> Any:  # noqa: A002 - argparse's word
    """A TrainConfig field with its --help text (field metadata: the one source of the CLI's help)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    corpus: str = field(metadata={"help": "corpus.jsonl (id, title, text)"})
    questions: str = field(metadata={"help": "the train split only: dev questions must never be trained on"})
    out: str = field(metadata={"help": "checkpoint folder (written atomically; --resume continues from it)"})
    base_model: str | None = option(None, "hub id or folder; default: the embedded SmolLM2-135M-Instruct")
    precision: str = option("fp32", "the base's weights while training: 'fp32', or 'nf4' (bitsandbytes: stage 2 "
                                    "QLoRA-style)")
    dtype: str = option("float32", "compute dtype of the base (bfloat16 on GPUs)")
    seed: int = option(0, "seeds python, numpy and torch; also the held-out split")
    # docid tree
    tree_k: int = option(10, "k-means branching factor per level")
    tree_c: int = option(10, "a cluster with more than c documents is split again")
    # architecture
    pathway_layers: int = option(8, "the retrieval pathway sits in the top N decoder layers")
    retrieval_heads: int = option(4, "extra query heads per pathway layer (rounded to a multiple of the KV heads)")
    retrieval_mlp_dim: int = option(512, "width of the retrieval MLP")
    bridge_dim: int = option(0, "inner width of the cross-attention bridge (0 = the base's hidden size)")
    # semantic docid scores: node embeddings from the tree's cluster centroids, plus a distillation loss that
    # pulls the model's query vector towards the docid encoder's embedding of the query text
    semantic_docids: bool = option(True, "add the semantic node scores to the docid head's logits")
    distill_weight: float = option(1.0, "weight of the query-vector distillation loss")
    # The search ranks finished paths by log-prob + document match, but the per-level loss only contrasts a
    # document with its <= k siblings; this term contrasts it with every document of the corpus.
    doc_contrast_weight: float = option(0.0, "weight of the all-documents cross-entropy of the document match")
    # The teacher's ranking as the target (unirag.joint.distillation): its softmax over all documents, summed
    # onto the tree's nodes, against the docid head's child distribution at each level of the gold path...
    level_distill_weight: float = option(0.0, "weight of the per-level KL to the teacher's node mass")
    # ...and against the semantic scorer's match with every document (how the search ranks finished paths).
    document_distill_weight: float = option(0.0, "weight of the all-documents KL to the teacher's softmax")
    distill_temperature: float = option(0.05, "temperature of the teacher's softmax over cosines")
    # On squad BM25 ranks better than MiniLM: the teacher's softmax can mix in BM25's.
    bm25_teacher_weight: float = option(0.0, "share of BM25's softmax in the teacher's document distribution "
                                             "(0 = dense)")
    bm25_temperature: float = option(1.0, "temperature of BM25's softmax over its scores")
    # In-domain generated queries (python -m unirag querygen generate): more (query, docid) examples per passage.
    generated_queries: str = option("", "a generated-queries JSONL for this corpus (\"\" = none)")
    generated_per_passage: int = option(0, "at most this many generated queries a passage (0 = all in the file)")
    # indexing data: pseudo-queries per passage (title+first sentence, then further sentences)
    pseudo_queries: int = option(3, "pseudo-queries per passage (more than its sentences: every sentence once)")
    pseudo_query_words: int = option(32, "maximum words per pseudo-query")
    index_passages: bool = option(False, "also the passage text itself (its first passage_words words) -> docid")
    passage_words: int = option(128, "maximum words of a passage-text indexing example")
    validation_questions: int = option(100, "held out from the train split to pick/monitor, never dev")
    # stage 1
    stage1_epochs: int = option(4, "epochs of stage 1 (retrieval warm-up, base frozen)")
    stage1_lr: float = option(2e-3, "AdamW peak learning rate, cosine schedule")
    batch_size: int = option(32, "stage-1 batch size")
    # The reader stays the base LLM (adapter off while answering) until stage 2 trains it.
    stage1_lora: bool = option(False, "LoRA on the pathway layers already in stage 1 (implies --adapter-in-retrieval)")
    stage1_lora_lr: float = option(5e-4, "peak learning rate of the stage-1 LoRA weights (lower than the new modules')")
    # stage 2
    stage2_steps: int = option(0, "steps of stage 2 (LoRA + bridge, docid + answer loss); 0 skips it")
    stage2_lr: float = option(3e-4, "AdamW learning rate of stage 2")
    stage2_docid_batch: int = option(8, "docid examples per stage-2 step")
    stage2_answer_batch: int = option(2, "answer examples per stage-2 step (read from the model's own retrieval)")
    stage2_docs: int = option(2, "documents the answer examples read")
    # The rest read the model's own retrieval as it is, so the reader also meets wrong documents.
    stage2_gold_rate: float = option(0.5, "share of answer examples whose documents hold the gold passage")
    stage2_select_every: int = option(0, "held-out reader F1 every N stage-2 steps; the best is kept in "
                                         "<out>.best (0 = off)")
    stage2_select_questions: int = option(60, "held-out questions of that F1")
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA alpha")
    # Backpropagation stops below the lowest LoRA layer, which is what makes stage 2 affordable on a CPU
    # (SmolLM2, one thread: ~8 s per step instead of 16-20 s with all 30 layers).
    lora_layers: int = option(8, "LoRA on the top N decoder layers (0: all)")
    # Off: the adapter is the reader's only; the answer loss then trains LoRA and the bridge, the docid loss the
    # retrieval parameters. On: the adapter serves retrieval and reading.
    adapter_in_retrieval: bool = option(False, "docid generation with the LoRA adapter on")
    save_every: int = option(50, "steps between checkpoints")

    @classmethod
    def from_args(cls, argv: list[str]) -> TrainConfig:
        parser = argparse.ArgumentParser(prog="python -m unirag train", description=__doc__.split("\n\n")[0],
                                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            text = f.metadata.get("help")
            if f.type in ("bool", bool):
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
            elif f.name in ("corpus", "questions", "out"):
                parser.add_argument(flag, required=True, help=text)
            else:
                kind = {"int": int, "float": float}.get(str(f.type), str)
                parser.add_argument(flag, type=kind, default=f.default, help=text)
        parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
        parser.add_argument("--load-in-4bit", action="store_true", help=argparse.SUPPRESS)  # the older spelling
        args = vars(parser.parse_args(argv))
        resume = args.pop("resume")
        if args.pop("load_in_4bit"):
            print("note: train's --load-in-4bit is spelled --precision nf4 now.", file=sys.stderr)
            args["precision"] = "nf4"
        config = cls(**args)
        config.resume = resume  # type: ignore[attr-defined]
        return config


def make_accelerator():
    """accelerate's Accelerator: DDP under `accelerate launch` (gradients averaged in buckets during backward), a
    plain single process otherwise (prepare() then returns the module itself)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # find_unused_parameters: each pass (docid, answer) uses only part of the trainable parameters.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    # cpu=True without a GPU: multi-process CPU runs (gloo) are otherwise not detected as distributed.
    return Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp])


def shard(batches: list, accelerator) -> list:
    """This process's batches; every process gets the same count (each step's gradient all-reduce must match)."""
    world = accelerator.num_processes
    if world == 1:
        return batches
    usable = len(batches) // world * world
    return batches[accelerator.process_index : usable : world]


class TrainStep(torch.nn.Module):
    """The losses of one training step as one module's forward, so that DDP (which averages the gradients of the
    parameters its forward used) sees every use of a trainable parameter, the semantic scorer's included."""

    def __init__(self, model: JointModel, config: TrainConfig, documents: torch.Tensor | None,
                 ranking: TeacherRanking | None = None) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.documents = documents
        self.ranking = ranking

    def forward(self, kind: str, *args):
        return getattr(self, kind)(*args)

    def _docid_terms(self, outputs, positions, targets, allowed, node_rows, teacher, sparse=None):
        """(loss, {term: detached value}) of one docid batch."""
        config = self.config
        semantic, distill, query = semantic_terms(self.model, outputs, positions, node_rows, teacher)
        contrast = document_contrast(self.model, query, targets, node_rows,
                                     self.documents if config.doc_contrast_weight else None)
        picked = picked_logits(outputs.docid_logits, positions, semantic)
        loss = docid_cross_entropy(picked, targets, allowed) + config.distill_weight * distill + \
            config.doc_contrast_weight * contrast
        terms = {"distill": distill.detach()}
        if config.doc_contrast_weight:
            terms["doc_contrast"] = contrast.detach()
        if self.ranking is not None and teacher is not None and query is not None:
            probs = self.ranking.document_probs(teacher, sparse, config.bm25_teacher_weight)
            if config.level_distill_weight:
                level = level_distillation(picked, allowed, targets, node_rows, self.ranking.node_mass(probs))
                loss = loss + config.level_distill_weight * level
                terms["level_kl"] = level.detach()
            if config.document_distill_weight:
                matches = self.model.semantic.matches(query, self.documents)
                doc_kl = document_distillation(matches, probs)
                loss = loss + config.document_distill_weight * doc_kl
                terms["document_kl"] = doc_kl.detach()
        return loss, terms

    def stage1(self, ids, mask, hidden, layer, positions, targets, allowed, node_rows, teacher, sparse=None):
        """Stage 1: the top layers from the cached states entering `layer`; (loss, distill, contrast)."""
        outputs = self.model(ids, attention_mask=mask, inputs_embeds=hidden, start_layer=layer, pathway=True,
                             bridge=False, return_lm_logits=False)
        return self._docid_terms(outputs, positions, targets, allowed, node_rows, teacher, sparse)

    def docid(self, ids, mask, positions, targets, allowed, node_rows, teacher, sparse=None):
        """Stage 2's docid loss: a full forward (LoRA changes the lower layers too, so no cache here)."""
        with self.model.retrieval_mode():
            outputs = self.model(ids, attention_mask=mask, pathway=True, bridge=True, return_lm_logits=False)
        return self._docid_terms(outputs, positions, targets, allowed, node_rows, teacher, sparse)

    def answer(self, ids, mask, labels):
        """Stage 2's answer loss: next-token cross-entropy on the answer tokens."""
        logits = self.model(ids, attention_mask=mask, pathway=True, bridge=True).lm_logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


# ------------------------------------------------------------------------------------------ examples

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def query_sentences(text: str) -> list[str]:
    """The passage's sentences of 4+ words, as pseudo-queries use them (unirag.answer_sentences splits for display)."""
    return [s.strip() for s in _SENTENCE.split(text) if len(s.split()) >= 4]


def _clip(text: str, words: int) -> str:
    return " ".join(text.split()[:words])


def indexing_queries(title: str, text: str, n: int, words: int) -> list[str]:
    """Pseudo-queries for one passage: title + first sentence, then its next sentences."""
    sentences = query_sentences(text) or [text]
    queries = [_clip(f"{title}. {sentences[0]}" if title else sentences[0], words)]
    queries += [_clip(s, words) for s in sentences[1:n]]
    return queries[:n]


def stage1_examples(corpus: Corpus, questions: list[Question], tree: DocidTree, config: TrainConfig,
                    evaluation: Sequence[Question] = (), validation: Sequence[Question] = ()
                    ) -> list[tuple[str, tuple[int, ...]]]:
    """(text, docid): train questions, pseudo-queries from each passage's text, and generated queries. A generated
    query equal to an `evaluation` question is an error (the generator bans them); one equal to a held-out
    `validation` question is dropped."""
    examples = [(q.question, tree.docid_of(q.doc_id)) for q in questions if q.doc_id is not None]
    if config.generated_queries:
        from unirag.querygen import load_generated_queries, normalize_question

        held_out = {normalize_question(q.question) for q in validation}
        per_passage: dict[str, int] = {}
        for text, doc_id in load_generated_queries(config.generated_queries, corpus, evaluation):
            if normalize_question(text) in held_out:
                continue
            per_passage[doc_id] = per_passage.get(doc_id, 0) + 1
            if not config.generated_per_passage or per_passage[doc_id] <= config.generated_per_passage:
                examples.append((text, tree.docid_of(doc_id)))
    for passage in corpus:
        docid = tree.docid_of(passage.id)
        examples += [(query, docid) for query in
                     indexing_queries(passage.title, passage.text, config.pseudo_queries, config.pseudo_query_words)]
        if config.index_passages:
            text = f"{passage.title}. {passage.text}" if passage.title else passage.text
            examples.append((_clip(text, config.passage_words), docid))
    return examples


@dataclass
class EncodedExample:
    input_ids: list[int]  # retrieval prompt + teacher-forced docid tokens
    first_target: int  # position whose docid logits predict level 0
    targets: list[int]  # docid-head indices per level
    allowed: list[list[int]]  # allowed docid-head indices per level (the trie)
    nodes: list[list[int]] | None = None  # semantic node-table rows of those children (same shape as allowed)


def encode_example(model: JointModel, tokenizer, tree: DocidTree, text: str, docid: tuple[int, ...]
                   ) -> EncodedExample:
    prompt, _ = retrieval_prompt(model, tokenizer, text)
    inputs = prompt + [model.docid_token_id(level, s) for level, s in enumerate(docid[:-1])]
    targets = [model.docid_vocab_index(level, s) for level, s in enumerate(docid)]
    children = [tree.allowed(docid[:level]) for level in range(len(docid))]
    allowed = [[model.docid_vocab_index(level, s) for s in kids] for level, kids in enumerate(children)]
    nodes = None
    if model.semantic is not None:
        nodes = [model.node_rows(tree, [docid[:level] + (s,) for s in kids]) for level, kids in enumerate(children)]
    return EncodedExample(inputs, len(prompt) - 1, targets, allowed, nodes)


def collate(examples: list[EncodedExample], vocab: int, pad_id: int):
    """Right-padded ids, mask, target positions, a trie mask over the docid vocabulary, and the semantic
    node rows of the allowed children (-1 elsewhere; None without a semantic scorer)."""
    width = max(len(e.input_ids) for e in examples)
    levels = max(len(e.targets) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    positions = torch.zeros((len(examples), levels), dtype=torch.long)
    targets = torch.full((len(examples), levels), -100, dtype=torch.long)
    allowed = torch.zeros((len(examples), levels, vocab), dtype=torch.bool)
    semantic = examples[0].nodes is not None
    node_rows = torch.full((len(examples), levels, vocab), -1, dtype=torch.long) if semantic else None
    for row, e in enumerate(examples):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[row, : len(e.input_ids)] = 1
        for level, (target, options) in enumerate(zip(e.targets, e.allowed, strict=True)):
            positions[row, level] = e.first_target + level
            targets[row, level] = target
            allowed[row, level, options] = True
            if node_rows is not None:
                node_rows[row, level, options] = torch.tensor(e.nodes[level])
    allowed[targets == -100] = True  # padding levels: any row works, the loss ignores them
    return ids, mask, positions, targets, allowed, node_rows


def picked_logits(docid_logits: torch.Tensor, positions: torch.Tensor, semantic: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """[B, levels, vocab]: the docid head's logits at each level's position, plus the semantic scores (the beam
    search adds the same scores)."""
    picked = docid_logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, docid_logits.shape[-1])).float()
    return picked + semantic if semantic is not None else picked


def docid_cross_entropy(picked: torch.Tensor, targets: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Cross-entropy restricted to the trie's allowed children (as the beam search renormalises)."""
    picked = picked.masked_fill(~allowed, float("-inf"))
    return torch.nn.functional.cross_entropy(picked.flatten(0, 1), targets.flatten(), ignore_index=-100)


def docid_loss(docid_logits: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor,
               allowed: torch.Tensor, semantic: torch.Tensor | None = None) -> torch.Tensor:
    """The gold path's cross-entropy from the docid head's logits (`semantic` [B, levels, vocab] added)."""
    return docid_cross_entropy(picked_logits(docid_logits, positions, semantic), targets, allowed)


def semantic_terms(model: JointModel, outputs, positions: torch.Tensor, node_rows: torch.Tensor | None,
                   teacher: torch.Tensor | None):
    """(semantic scores [B, levels, vocab] or None, distillation loss or 0, query vectors [B, D] or None)."""
    if model.semantic is None or node_rows is None or outputs.query_vectors is None:
        return None, torch.zeros(()), None
    rows = torch.arange(positions.shape[0])
    query = outputs.query_vectors[rows, positions[:, 0]]  # the <retrieve_token> position: the prompt only
    scores = model.semantic.scores(query.unsqueeze(1).expand(-1, node_rows.shape[1], -1), node_rows)
    distill = (1 - (query * teacher).sum(-1)).mean() if teacher is not None else torch.zeros(())
    return scores, distill, query


def document_rows(model: JointModel, tree: DocidTree) -> torch.Tensor:
    """Semantic node-table rows of every document (the leaves), in the tree's document order."""
    return torch.tensor(model.node_rows(tree, tree.docids), dtype=torch.long)


def stage_documents(model: JointModel, tree: DocidTree, config: TrainConfig) -> torch.Tensor | None:
    """The leaf rows the all-documents terms (contrast, document KL) compare against, or None."""
    if model.semantic is None or not (config.doc_contrast_weight or config.document_distill_weight):
        return None
    return document_rows(model, tree)


def document_contrast(model: JointModel, query: torch.Tensor | None, targets: torch.Tensor, node_rows: torch.Tensor,
                      documents: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy of the gold document's match (scaled cosine, as the search's ranking uses it) against the
    match of every document in `documents` (leaf rows). The gold leaf is the target child at the last level."""
    if query is None or documents is None:
        return torch.zeros(())
    last = (targets != -100).sum(1) - 1
    rows = torch.arange(targets.shape[0], device=targets.device)
    gold = node_rows[rows, last, targets[rows, last]]
    match = gold.unsqueeze(1) == documents.to(gold.device).unsqueeze(0)  # [B, N]
    if not bool(match.any(1).all()):
        raise UniragError("A training docid's leaf is not among the tree's documents.")
    logits = model.semantic.matches(query, documents.to(query.device))
    return torch.nn.functional.cross_entropy(logits, match.float().argmax(1))


def uses_teacher_ranking(config: TrainConfig) -> bool:
    return bool(config.level_distill_weight or config.document_distill_weight)


def teacher_ranking(model: JointModel, tree: DocidTree, corpus: Corpus, config: TrainConfig
                    ) -> TeacherRanking | None:
    """The teacher's document softmax over this tree's documents (None when no ranking loss is on)."""
    if not uses_teacher_ranking(config):
        return None
    if model.semantic is None:
        raise UniragError("--level-distill-weight and --document-distill-weight need the semantic docid scorer "
                          "(--semantic-docids).")
    embeddings = docids.corpus_embeddings(corpus, encoder_name=tree.config.encoder)
    order = [corpus.position(doc_id) for doc_id in tree.doc_ids]
    paths = document_paths(lambda prefixes: model.node_rows(tree, prefixes), tree.docids)
    return TeacherRanking(embeddings[order], paths, model.config.semantic_nodes, config.distill_temperature)


def teacher_sparse_probs(tree: DocidTree, corpus: Corpus, examples, config: TrainConfig) -> torch.Tensor | None:
    """BM25's softmax over the tree's documents for each stage-1 example [N, D]; None unless the teacher mixes it
    in."""
    if not (uses_teacher_ranking(config) and config.bm25_teacher_weight):
        return None
    if not 0 < config.bm25_teacher_weight <= 1:
        raise UniragError(f"--bm25-teacher-weight must lie in [0, 1] (got {config.bm25_teacher_weight}).")
    from unirag.sparse import BM25Retriever

    bm25 = BM25Retriever(corpus)
    order = np.asarray([corpus.position(doc_id) for doc_id in tree.doc_ids])
    print(f"[train] BM25 teacher over {len(examples)} texts", file=sys.stderr, flush=True)
    return bm25_document_probs(lambda text: bm25.scores(text)[order], [text for text, _ in examples],
                               config.bm25_temperature)


def teacher_vectors(model: JointModel, tree: DocidTree, examples, config: TrainConfig) -> torch.Tensor | None:
    """Distillation targets [N, D] for the stage-1 examples, or None (no scorer, or no distillation loss)."""
    if model.semantic is None or (config.distill_weight == 0 and not uses_teacher_ranking(config)):
        return None
    vectors = torch.from_numpy(query_embeddings([text for text, _ in examples], tree.config.encoder)).float()
    if vectors.shape[1] != model.config.semantic_dim:
        raise UniragError(f"The teacher encoder gives {vectors.shape[1]}-dim vectors; the model's semantic_dim is "
                          f"{model.config.semantic_dim}.")
    return torch.nn.functional.normalize(vectors, dim=-1)


def query_embeddings(texts: list[str], encoder_name: str) -> np.ndarray:
    """The docid encoder's query embeddings of the training texts (the distillation targets), cached on disk."""
    key = hashlib.sha256(json.dumps([encoder_name, texts]).encode()).hexdigest()[:20]
    path = cache_dir() / "stage1" / f"teacher-{key}.npy"
    if path.is_file():
        return np.load(path)
    from unirag.backbones import SentenceEncoder

    name = None if encoder_name == TreeConfig.encoder else encoder_name
    vectors = SentenceEncoder(name).encode_queries(texts, progress=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + f".{os.getpid()}.tmp.npy")
    np.save(tmp, vectors)
    os.replace(tmp, path)
    return vectors


# ------------------------------------------------------------------------------------------ stage-1 cache


def boundary_cache_key(model: JointModel, tree: DocidTree, encoded: list[EncodedExample], config: TrainConfig
                       ) -> str:
    """What the cached lower-layer states depend on: base, layers, inputs and the (frozen) extra-token embeddings.
    The embeddings enter at fp16 precision, so a resumed run (weights stored as fp16) finds the same cache."""
    extra = model.extra_embed.weight.detach().to(torch.float16).float().sum().item()
    key_src = json.dumps([config.base_model, model.pathway_layer_ids, tree.corpus_fingerprint,
                          [e.input_ids for e in encoded], round(extra, 3)])
    return hashlib.sha256(key_src.encode()).hexdigest()[:20]


def boundary_cache(model: JointModel, examples: list[EncodedExample], key: str, batch_size: int
                   ) -> list[torch.Tensor]:
    """Hidden states entering the first pathway layer, per example (fp16, cached on disk by `key`)."""
    path = cache_dir() / "stage1" / f"{key}.safetensors"
    if path.is_file():
        blob = load_file(path)
        flat, lengths = blob["hidden"], blob["lengths"].tolist()
        if len(lengths) == len(examples):
            return list(torch.split(flat, lengths))
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    states: list[torch.Tensor | None] = [None] * len(examples)
    layer = model.pathway_layer_ids[0]
    for start in tqdm(range(0, len(order), batch_size), desc="stage 1: caching frozen lower layers", unit="batch"):
        rows = order[start : start + batch_size]
        ids, mask, *_ = collate([examples[i] for i in rows], model.docid_head.out_features, 0)
        with torch.inference_mode():
            hidden = model.hidden_before_layer(ids, mask, layer)
        for j, i in enumerate(rows):
            states[i] = hidden[j, : len(examples[i].input_ids)].to(torch.float16).clone()
    done = [s for s in states if s is not None]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    save_file({"hidden": torch.cat(done), "lengths": torch.tensor([len(s) for s in done])}, str(tmp))
    os.replace(tmp, path)
    return done


# ------------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(model: JointModel, tree: DocidTree, optimizer: torch.optim.Optimizer, out: Path,
                    state: dict, config: TrainConfig) -> None:
    """Atomic-ish save: write to a sibling folder, then swap, so a kill never leaves a broken checkpoint."""
    tmp = out.with_name(out.name + ".saving")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, tree=tree)
    tensors, layout = {}, {}
    for g, group in enumerate(optimizer.param_groups):
        for p_i, param in enumerate(group["params"]):
            for name, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value):
                    tensors[f"{g}.{p_i}.{name}"] = value.detach().float().contiguous()
                else:
                    layout[f"{g}.{p_i}.{name}"] = value
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / STATE_FILE).write_text(json.dumps({**state, "optimizer_scalars": layout, "config": asdict(config)}))
    if (out / LOSS_LOG).is_file():
        (tmp / LOSS_LOG).write_bytes((out / LOSS_LOG).read_bytes())
    for name in os.listdir(out) if out.exists() else []:
        if name.startswith("eval_") or name == "RESULTS.md":
            (tmp / name).write_bytes((out / name).read_bytes())
    if out.exists():
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def load_optimizer(optimizer: torch.optim.Optimizer, out: Path, scalars: dict) -> None:
    path = out / "optimizer.safetensors"
    if not path.is_file():  # shipped checkpoints leave it out (git-ignored: it is larger than the model)
        print(f"[train] {path} not found: resuming with fresh optimizer moments", file=sys.stderr, flush=True)
        return
    tensors = load_file(str(path))
    for g, group in enumerate(optimizer.param_groups):
        for p_i, param in enumerate(group["params"]):
            entry = {name.split(".", 2)[2]: value for name, value in tensors.items() if name.startswith(f"{g}.{p_i}.")}
            entry.update({k.split(".", 2)[2]: v for k, v in scalars.items() if k.startswith(f"{g}.{p_i}.")})
            if entry:
                optimizer.state[param] = {k: (v.to(param.dtype) if torch.is_tensor(v) and k != "step" else v)
                                          for k, v in entry.items()}


def log_losses(out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / LOSS_LOG).open("a") as handle:
        handle.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------------------ evaluation


def retrieval_recall(model: JointModel, tokenizer, tree: DocidTree, questions: list[Question],
                     beam_width: int = 10, ks: tuple[int, ...] = (1, 3), progress: bool = False,
                     rescore: bool = True) -> dict:
    """R@k of the model's own docid search (held-out train questions while training; dev in the benchmark)."""
    hits = dict.fromkeys(ks, 0)
    model.eval()
    with torch.inference_mode():
        for q in tqdm(questions, desc="docid search", unit="q", disable=not progress):
            found = [b.doc_id for b in search_docids(model, tokenizer, q.question, tree, beam_width, max(ks),
                                                     pathway=True, bridge=model.reader_trained,
                                                     rescore=rescore).beams]
            for k in ks:
                hits[k] += q.doc_id in found[:k]
    n = max(len(questions), 1)
    return {**{f"recall@{k}": round(hits[k] / n, 4) for k in ks}, "n": len(questions)}


# ------------------------------------------------------------------------------------------ training


def _precision(config: TrainConfig) -> str:
    """The precision the base loads in to train: fp32, or NF4 for QLoRA (the recovered 4-bit serves from weights
    trained in fp32: its grid is the checkpoint's, not the optimiser's)."""
    precision = normalize_precision(config.precision)
    if precision not in TRAIN_PRECISIONS:
        raise UniragError(f"--precision {config.precision!r}: train in {' or '.join(TRAIN_PRECISIONS)}; the app's "
                          "recovered 4-bit reads checkpoints trained in fp32.")
    return precision


def build_or_resume(config: TrainConfig, corpus: Corpus, tree: DocidTree, resume: bool, accelerator):
    out = Path(config.out)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(config.dtype)
    if dtype is None:
        raise UniragError(f"--dtype {config.dtype!r}: use float32, bfloat16 or float16.")
    device = str(accelerator.device) if accelerator.device.type != "cpu" else None
    if resume and (out / STATE_FILE).is_file():
        model = JointModel.from_pretrained(out, precision=_precision(config), base_model=config.base_model,
                                           dtype=dtype, device=device)
        state = json.loads((out / STATE_FILE).read_text())
        return model, model.tokenizer, state
    if out.exists() and any(out.iterdir()) and not resume:
        raise UniragError(f"{out} already holds files; pass --resume to continue it or choose another --out.")
    base, tokenizer = load_llm(config.base_model, precision=_precision(config), dtype=dtype, device=device)
    doc_vectors = docids.corpus_embeddings(corpus, encoder_name=tree.config.encoder) if config.semantic_docids \
        else None
    joint_config = JointConfig(
        docid_levels=tree.depth, docid_branching=tree.branching, base_model=config.base_model,
        pathway_layers=config.pathway_layers, retrieval_heads=config.retrieval_heads,
        retrieval_mlp_dim=config.retrieval_mlp_dim, bridge_dim=config.bridge_dim,
        semantic_dim=int(doc_vectors.shape[1]) if doc_vectors is not None else 0,
        semantic_nodes=len(tree_prefixes(tree)) if doc_vectors is not None else 0,
    )
    model = JointModel(base, joint_config, tokenizer)
    if doc_vectors is not None:
        model.init_semantic_nodes(tree, dict(zip(corpus.ids, doc_vectors, strict=True)))
    if config.stage1_lora:
        # Only the pathway layers: the layers below are frozen and cached in stage 1.
        model.enable_lora(r=config.lora_r, alpha=config.lora_alpha, layers=model.pathway_layer_ids)
        model.config.adapter_in_retrieval = True
        model.config.adapter_in_reading = False
    return model, tokenizer, {"stage": 1, "epoch": 0, "step": 0, "best_recall@1": -1.0}


def run_stage1(model: JointModel, tokenizer, corpus: Corpus, tree: DocidTree, examples, valid: list[Question],
               config: TrainConfig, state: dict, out: Path, accelerator) -> dict:
    from transformers import get_cosine_schedule_with_warmup

    encoded = [encode_example(model, tokenizer, tree, text, docid) for text, docid in examples]
    key = boundary_cache_key(model, tree, encoded, config)
    with accelerator.main_process_first():  # the main process writes the disk caches, the others read them
        cached = boundary_cache(model, encoded, key, config.batch_size)
        teacher = teacher_vectors(model, tree, examples, config)
        ranking = teacher_ranking(model, tree, corpus, config)
    sparse = teacher_sparse_probs(tree, corpus, examples, config)
    documents = stage_documents(model, tree, config)
    device = model.device
    params = model.stage1_parameters()
    lora = [p for n, p in model.named_parameters() if "lora_" in n] if config.stage1_lora else []
    groups = [{"params": params, "lr": config.stage1_lr}]
    if lora:
        groups.append({"params": lora, "lr": config.stage1_lora_lr})
    params = params + lora
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(groups, lr=config.stage1_lr, weight_decay=0.0)
    if state.get("optimizer_scalars") is not None and state["stage"] == 1 and state["epoch"] > 0:
        load_optimizer(optimizer, out, state["optimizer_scalars"])
    vocab = model.docid_head.out_features
    pad = tokenizer.pad_token_id or 0
    layer = model.pathway_layer_ids[0]
    steps_per_epoch = len(shard(list(range(math.ceil(len(encoded) / config.batch_size))), accelerator))
    total = steps_per_epoch * config.stage1_epochs
    # Cosine decay after a 50-step linear warm-up, over this process's steps; a resumed run starts where it stopped.
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    scheduler = get_cosine_schedule_with_warmup(optimizer, 50, total, last_epoch=state["epoch"] * steps_per_epoch - 1)
    # Not the scheduler: accelerate would step it once per process each step; it follows this process's steps.
    step_fn, prepared = accelerator.prepare(TrainStep(model, config, documents, ranking), optimizer,
                                            device_placement=[False, False])  # load_llm placed the model
    for epoch in range(state["epoch"], config.stage1_epochs):
        rng = random.Random(config.seed * 1000 + epoch)
        # Length-bucketed shuffled batches: little padding, different batches each epoch.
        order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i].input_ids), rng.random()))
        batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        rng.shuffle(batches)
        batches = shard(batches, accelerator)
        model.train()
        running, terms = [], {}
        began = time.time()
        bar = tqdm(batches, desc=f"stage 1 epoch {epoch + 1}/{config.stage1_epochs}", unit="batch",
                   disable=not accelerator.is_main_process)
        for rows in bar:
            batch = [encoded[i] for i in rows]
            ids, mask, positions, targets, allowed, node_rows = _to(device, *collate(batch, vocab, pad))
            hidden = torch.zeros(ids.shape[0], ids.shape[1], cached[rows[0]].shape[-1])
            for j, i in enumerate(rows):
                hidden[j, : cached[i].shape[0]] = cached[i].float()
            loss, parts = step_fn("stage1", ids, mask, hidden.to(device, model.dtype), layer, positions,
                                              targets, allowed, node_rows,
                                              teacher[rows].to(device) if teacher is not None else None,
                                              sparse[rows].to(device) if sparse is not None else None)
            prepared.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, 1.0)
            prepared.step()
            scheduler.step()
            running.append(loss.item())
            for name, value in parts.items():
                terms.setdefault(name, []).append(float(value))
            bar.set_postfix(loss=f"{sum(running[-50:]) / len(running[-50:]):.3f}")
        state.update(stage=1, epoch=epoch + 1, step=0)
        if not accelerator.is_main_process:
            accelerator.wait_for_everyone()  # the main process validates and saves
            continue
        metrics = retrieval_recall(model, tokenizer, tree, valid) if valid else {}
        record = {"stage": 1, "epoch": epoch + 1, "loss": round(sum(running) / len(running), 4),
                  **{name: round(sum(values) / len(values), 4) for name, values in terms.items()},
                  "valid": metrics, "examples": len(encoded), "minutes": round((time.time() - began) / 60, 2),
                  "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        log_losses(out, record)
        print(json.dumps(record), flush=True)
        save_checkpoint(model, tree, optimizer, out, state, config)
        accelerator.wait_for_everyone()
    accelerator.free_memory()  # drops this stage's DDP wrapper (and its gradient hooks) before stage 2 makes its own
    return state


def answer_target(answers: Sequence[str], texts: Sequence[str]) -> str:
    """The answer as the documents write it: the first gold (in gold order) found in a text, case-insensitively,
    at word boundaries, copied with the text's own casing, so the target is a span the reader can point at;
    else the first gold as given."""
    for gold in answers:
        if not gold.strip():
            continue
        pattern = re.compile(r"(?<!\w)" + re.escape(gold.strip()) + r"(?!\w)", re.IGNORECASE)
        for text in texts:
            found = pattern.search(text)
            if found:
                return found.group(0)
    return answers[0]


def answer_documents(found: Sequence[str], gold: str | None, n_docs: int, with_gold: bool,
                     rng: random.Random) -> list[str]:
    """The documents an answer example reads: the search's top n_docs, and with_gold the gold passage in place of
    a random one where the search missed it (so its position teaches nothing)."""
    docs = list(found[:n_docs])
    if with_gold and gold and gold not in docs:
        if len(docs) < n_docs:
            docs.insert(rng.randrange(len(docs) + 1), gold)
        else:
            docs[rng.randrange(len(docs))] = gold
    return docs


def _answer_example(model: JointModel, tokenizer, corpus: Corpus, tree: DocidTree, question: Question,
                    n_docs: int, with_gold: bool = False, rng: random.Random | None = None
                    ) -> tuple[list[int], list[int]]:
    """(input ids, labels) for one answer example, reading the model's own top docids (with_gold: the gold
    passage among them)."""
    with torch.no_grad():
        beams = search_docids(model, tokenizer, question.question, tree, 10, n_docs, pathway=True, bridge=True).beams
    docs = answer_documents([b.doc_id for b in beams], question.doc_id, n_docs, with_gold, rng or random.Random(0))
    passages = [(d, corpus[d].title, corpus[d].text) for d in docs]
    prompt = answer_prompt(model, tokenizer, question.question, passages).ids
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if not isinstance(eos, int) or eos == tokenizer.unk_token_id:
        eos = tokenizer.eos_token_id
    answer = answer_target(question.answers, [text for _, _, text in passages])
    target = tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
    return prompt + target, [-100] * len(prompt) + target


def reader_scores(model: JointModel, tokenizer, corpus: Corpus, questions: Sequence[Question],
                  max_new_tokens: int = 32) -> dict:
    """EM / F1 / contains of the model's reader with each question's gold passage in hand (no retrieval)."""
    from unirag.eval import contains_answer, exact_match, token_f1
    from unirag.joint.reader import answer_with_docs

    asked = [q for q in questions if q.doc_id and q.answers]
    totals = {"em": 0.0, "f1": 0.0, "contains": 0.0}
    model.eval()
    for q in asked:
        doc = corpus[q.doc_id]
        text = answer_with_docs(model, tokenizer, q.question, [(doc.id, doc.title, doc.text)],
                                max_new_tokens=max_new_tokens, output_attentions=False).text
        totals["em"] += exact_match(text, q.answers)
        totals["f1"] += token_f1(text, q.answers)
        totals["contains"] += contains_answer(text, q.answers)
    n = max(len(asked), 1)
    return {**{k: round(v / n, 4) for k, v in totals.items()}, "n": len(asked)}


def run_stage2(model: JointModel, tokenizer, corpus: Corpus, tree: DocidTree, examples, train_qs: list[Question],
               valid: list[Question], config: TrainConfig, state: dict, out: Path, accelerator) -> dict:
    from transformers import get_constant_schedule_with_warmup

    if not model.lora_enabled:
        n_layers = len(model.decoder.layers)
        if config.lora_layers < 0:
            raise UniragError(f"--lora-layers {config.lora_layers}: use 0 (all layers) or a positive count.")
        top = range(max(0, n_layers - config.lora_layers), n_layers) if config.lora_layers else None
        model.enable_lora(r=config.lora_r, alpha=config.lora_alpha, layers=top)
        model.config.adapter_in_retrieval = config.adapter_in_retrieval
    elif model.config.adapter_in_retrieval != config.adapter_in_retrieval:
        flag = "--adapter-in-retrieval" if model.config.adapter_in_retrieval else "--no-adapter-in-retrieval"
        raise UniragError(f"{out} was trained with {flag}; resume it with the same setting.")
    model.config.adapter_in_reading = True  # from here on the adapter is also the reader's
    retrieval_params = {id(p) for p in model.stage_parameters(1)}
    params = model.trainable_parameters(stage=2)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.stage2_lr, weight_decay=0.0)
    with accelerator.main_process_first():  # the main process writes the teacher cache, the others read it
        teacher = teacher_vectors(model, tree, examples, config)
        ranking = teacher_ranking(model, tree, corpus, config)
    sparse = teacher_sparse_probs(tree, corpus, examples, config)
    documents = stage_documents(model, tree, config)
    device = model.device
    start_step = state["step"] if state["stage"] == 2 else 0
    if state["stage"] == 2 and start_step > 0:
        load_optimizer(optimizer, out, state.get("optimizer_scalars", {}))
    # A 20-step linear warm-up, then constant; a resumed run starts where it stopped.
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    scheduler = get_constant_schedule_with_warmup(optimizer, 20, last_epoch=start_step - 1)
    step_fn, prepared = accelerator.prepare(TrainStep(model, config, documents, ranking), optimizer,
                                            device_placement=[False, False])
    vocab = model.docid_head.out_features
    pad = tokenizer.pad_token_id or 0
    answerable = [q for q in train_qs if q.answers]
    bar = tqdm(range(start_step, config.stage2_steps), desc="stage 2 (docid + answer)", unit="step",
               initial=start_step, total=config.stage2_steps, disable=not accelerator.is_main_process)
    running = []
    for step in bar:
        rng = random.Random(config.seed * 7919 + step + 1_000_003 * accelerator.process_index)  # own examples
        model.train()
        picks = [rng.randrange(len(examples)) for _ in range(config.stage2_docid_batch)]
        batch = [encode_example(model, tokenizer, tree, *examples[i]) for i in picks]
        docid_inputs = _to(device, *collate(batch, vocab, pad))
        # Answer loss: read the documents the model itself retrieves.
        model.eval()
        pairs = [_answer_example(model, tokenizer, corpus, tree, answerable[rng.randrange(len(answerable))],
                                 config.stage2_docs, rng.random() < config.stage2_gold_rate, rng)
                 for _ in range(config.stage2_answer_batch)]
        model.train()
        a_ids, a_mask, labels = _to(device, *pad_labelled(pairs, pad))
        prepared.zero_grad(set_to_none=True)
        # The balanced mix 0.5 × answer + 0.5 × docid, one pass after the other: each forward is followed by its own
        # backward (what DDP needs); the answer pass only accumulates, the docid pass's backward averages the sum.
        with accelerator.no_sync(step_fn):
            loss_answer = step_fn("answer", a_ids, a_mask, labels)
            accelerator.backward(0.5 * loss_answer)
        if not model.config.adapter_in_retrieval:
            # The answer loss may not move the retrieval parameters (their docid loss does).
            for p in params:
                if id(p) in retrieval_params:
                    p.grad = None
        loss_docid, parts = step_fn("docid", *docid_inputs,
                                    teacher[picks].to(device) if teacher is not None else None,
                                    sparse[picks].to(device) if sparse is not None else None)
        distill = parts["distill"]
        accelerator.backward(0.5 * loss_docid)
        accelerator.clip_grad_norm_(params, 1.0)
        prepared.step()
        scheduler.step()
        running.append((loss_docid.item(), loss_answer.item(), float(distill.detach())))
        recent = running[-20:]
        bar.set_postfix(docid=f"{sum(r[0] for r in recent) / len(recent):.3f}",
                        answer=f"{sum(r[1] for r in recent) / len(recent):.3f}")
        if (step + 1) % config.save_every == 0 or step + 1 == config.stage2_steps:
            record = {"stage": 2, "step": step + 1,
                      "loss_docid": round(sum(r[0] for r in running) / len(running), 4),
                      "loss_answer": round(sum(r[1] for r in running) / len(running), 4),
                      "distill": round(sum(r[2] for r in running) / len(running), 4),
                      "time": time.strftime("%Y-%m-%d %H:%M:%S")}
            running = []
            state.update(stage=2, step=step + 1)
            if accelerator.is_main_process:  # the main process logs, validates and saves; the others wait
                if step + 1 == config.stage2_steps and valid:
                    record["valid"] = retrieval_recall(model, tokenizer, tree, valid)
                selecting = config.stage2_select_every > 0 and valid and (
                    (step + 1) % config.stage2_select_every == 0 or step + 1 == config.stage2_steps)
                if selecting:
                    record["valid_reader"] = reader_scores(model, tokenizer, corpus,
                                                           valid[: config.stage2_select_questions])
                improved = selecting and record["valid_reader"]["f1"] > state.get("best_reader_f1", -1.0)
                if improved:
                    state.update(best_reader_f1=record["valid_reader"]["f1"], best_reader_step=step + 1)
                log_losses(out, record)
                print(json.dumps(record), flush=True)
                save_checkpoint(model, tree, optimizer, out, state, config)
                if improved:
                    save_best(model, tree, out, state, config)
            accelerator.wait_for_everyone()
    return state


def save_best(model: JointModel, tree: DocidTree, out: Path, state: dict, config: TrainConfig) -> None:
    """The checkpoint with the best held-out reader F1 so far, beside the run (`<out>.best`, no optimizer)."""
    best = out.with_name(out.name + ".best")
    tmp = out.with_name(out.name + ".best.saving")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, tree=tree)
    (tmp / STATE_FILE).write_text(json.dumps({**state, "config": asdict(config)}))
    (tmp / LOSS_LOG).write_bytes((out / LOSS_LOG).read_bytes())
    if best.exists():
        shutil.rmtree(best)
    tmp.rename(best)


def pad_labelled(pairs: list[tuple[list[int], list[int]]], pad: int):
    """(ids, mask, labels) right-padded from (input ids, labels) pairs; padded labels are -100."""
    width = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, (inp, lab) in enumerate(pairs):
        ids[row, : len(inp)] = torch.tensor(inp)
        mask[row, : len(inp)] = 1
        labels[row, : len(lab)] = torch.tensor(lab)
    return ids, mask, labels


def held_out_split(questions: list[Question], seed: int, n: int) -> tuple[list[Question], list[Question]]:
    """(held-out questions with a gold document, training questions): the first n of a seeded shuffle are held
    out to pick and monitor settings, never trained on (benchmarks re-create it from trainer_state.json)."""
    shuffled = questions[:]
    random.Random(seed).shuffle(shuffled)
    return [q for q in shuffled[:n] if q.doc_id], shuffled[n:]


def evaluation_questions(config: TrainConfig, corpus: Corpus) -> list[Question]:
    """The evaluation splits beside the train file (dev.jsonl, test.jsonl): what no generated query may equal."""
    found = []
    for split in ("dev", "test"):
        path = Path(config.questions).with_name(f"{split}.jsonl")
        if path.is_file():
            found += load_questions(path, corpus)
    return found


def train(config: TrainConfig, resume: bool = False) -> Path:
    if Path(config.questions).stem in ("dev", "test", "validation"):
        raise UniragError(f"{config.questions} looks like an evaluation split; train on the train split only.")
    from transformers import set_seed

    set_seed(config.seed)  # python, numpy and torch
    corpus = load_corpus(config.corpus)
    questions = load_questions(config.questions, corpus)
    valid, train_qs = held_out_split(questions, config.seed, config.validation_questions)
    out = Path(config.out)
    accelerator = make_accelerator()
    with accelerator.main_process_first():  # the main process builds and caches the tree, the others load it
        tree = load_or_build_tree(corpus, TreeConfig(k=config.tree_k, c=config.tree_c, seed=config.seed))
    if config.stage1_lora:
        config.adapter_in_retrieval = True
    model, tokenizer, state = build_or_resume(config, corpus, tree, resume, accelerator)
    if state["stage"] == 1 and model.lora_enabled != config.stage1_lora:
        raise UniragError(f"{out} was trained {'with' if model.lora_enabled else 'without'} --stage1-lora; resume "
                          "it with the same setting.")
    if tree.corpus_fingerprint != corpus.fingerprint:
        raise UniragError("The docid tree does not match the corpus.")
    examples = stage1_examples(corpus, train_qs, tree, config, evaluation=evaluation_questions(config, corpus),
                               validation=valid)
    print(f"[train] {len(train_qs)} train questions, {len(valid)} held out, {len(examples)} stage-1 examples, "
          f"tree depth {tree.depth}, branching {tree.branching}", file=sys.stderr, flush=True)
    if state["stage"] == 1 and state["epoch"] < config.stage1_epochs:
        state = run_stage1(model, tokenizer, corpus, tree, examples, valid, config, state, out, accelerator)
    if config.stage2_steps > 0 and (state["stage"] == 1 or state["step"] < config.stage2_steps):
        state = run_stage2(model, tokenizer, corpus, tree, examples, train_qs, valid, config, state, out, accelerator)
    dump = os.environ.get("UNIRAG_DUMP_WEIGHTS")
    if dump:  # tests: each process writes its final trainable weights, to check the processes agree
        save_file({n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                  f"{dump}{accelerator.process_index}.safetensors")
    return out


def _to(device: torch.device, *tensors):
    return tuple(t.to(device) if t is not None else None for t in tensors)


def main(argv: list[str]) -> int:
    config = TrainConfig.from_args(argv)
    train(config, resume=getattr(config, "resume", False))
    return 0
