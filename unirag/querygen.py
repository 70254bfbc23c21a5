"""In-domain query generation for indexing (DSI-QG / Doc2Query-- style): `python -m unirag querygen ...`.

1. `train`: LoRA fine-tune of the LLM as a passage → question generator on the train splits' (gold passage,
   question) pairs; a held-out slice of those pairs picks the best save (lowest loss). Resumable.
2. `generate`: sample several questions a passage (top-k / nucleus), deduplicate, drop any that equals a
   dev question, and keep those whose source passage dense (MiniLM) or BM25 ranks first (the round-trip
   filter). Rows are appended as each batch finishes; a rerun continues. The file's settings sit in a
   `<out>.meta.json` beside it, so a stage-1 retrain reads the queries without regenerating them.

Only train questions ever reach the generator or the output; `load_generated_queries` checks again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from unirag.data import Corpus, Question, load_corpus, load_questions
from unirag.errors import UniragError
from unirag.paths import file_sha256, write_json_atomic

# {style} names the corpus the pairs came from (its folder name): NQ's search queries and SQuAD's crowd questions
# differ in form, and one generator learns both.
QUERY_PROMPT = "Passage: {passage}\nWrite a {style} question that this passage answers.\nQuestion:"
EVALUATION_SPLITS = ("dev", "test", "validation")


def normalize_question(text: str) -> str:
    """The form used to deduplicate and to compare with held-back questions: lower case, words only."""
    return " ".join("".join(ch if ch.isalnum() else " " for ch in text.lower()).split())


def passage_for_prompt(title: str, text: str, words: int) -> str:
    body = " ".join(text.split()[:words])
    return f"{title}. {body}" if title else body


def prompt_text(title: str, text: str, words: int, style: str) -> str:
    return QUERY_PROMPT.format(passage=passage_for_prompt(title, text, words), style=style)


def corpus_style(corpus_path: str | Path) -> str:
    """The prompt's style tag for a corpus file: its folder name (nq, squad, ...)."""
    return Path(corpus_path).resolve().parent.name


def check_train_split(path: str | Path) -> None:
    if Path(path).stem in EVALUATION_SPLITS:
        raise UniragError(f"{path} looks like an evaluation split; the generator trains on train splits only.")


@dataclass
class GeneratorConfig:
    corpora: list[str]  # corpus.jsonl files, one per questions file
    questions: list[str]  # their train splits (never dev/test)
    out: str  # adapter folder (resumable)
    base_model: str | None = None  # default: the embedded SmolLM2-135M-Instruct
    seed: int = 0
    passage_words: int = 120  # words of the passage the prompt shows
    held_out_pairs: int = 200  # train pairs kept apart to pick the best save
    steps: int = 1500  # optimizer steps
    batch_size: int = 8
    lr: float = 5e-4
    lora_r: int = 16
    lora_alpha: int = 32
    lora_layers: int = 12  # LoRA on the top N layers: backpropagation stops below them
    eval_every: int = 100  # steps between held-out losses (and saves)
    # Stage 1 holds out this many train questions per corpus (seeded by `seed`) to choose its settings on; the
    # generator never sees their pairs, so it cannot hand them back to stage 1 as generated queries.
    stage1_validation: int = 100


def train_pairs(corpora: Sequence[Corpus], question_sets: Sequence[Sequence[Question]], styles: Sequence[str]
                ) -> list[tuple[str, str, str, str]]:
    """(title, text, style, question) for every train question with a gold passage, corpora in order."""
    pairs = []
    for corpus, questions, style in zip(corpora, question_sets, styles, strict=True):
        for q in questions:
            if q.doc_id is not None:
                passage = corpus[q.doc_id]
                pairs.append((passage.title, passage.text, style, q.question))
    return pairs


def encode_pair(tokenizer, title: str, text: str, style: str, question: str, words: int
                ) -> tuple[list[int], list[int]]:
    """(input ids, labels): the prompt is masked out; the target is " {question}" then EOS."""
    prompt = tokenizer(prompt_text(title, text, words, style), add_special_tokens=True)["input_ids"]
    target = tokenizer(" " + question.strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + target, [-100] * len(prompt) + target


def _batch(pairs: list[tuple[list[int], list[int]]], pad: int):
    from unirag.joint.training import pad_labelled

    return pad_labelled(pairs, pad)


def _loss(model, ids, mask, labels) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def held_out_loss(model, encoded: list[tuple[list[int], list[int]]], pad: int, batch_size: int) -> float:
    model.eval()
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            ids, mask, labels = _batch(encoded[start : start + batch_size], pad)
            n = int((labels[:, 1:] != -100).sum())
            total += float(_loss(model, ids, mask, labels)) * n
            tokens += n
    model.train()
    return total / max(tokens, 1)


def _load_base(name: str | None):
    from unirag.backbones import load_llm

    model, tokenizer = load_llm(name, precision="fp32", attn_implementation="sdpa")
    if tokenizer.eos_token_id is None:
        raise UniragError("The generator's tokenizer has no EOS token to end a question with.")
    return model, tokenizer


def _add_lora(model, config: GeneratorConfig):
    from peft import LoraConfig, get_peft_model

    n_layers = model.config.num_hidden_layers
    layers = list(range(max(0, n_layers - config.lora_layers), n_layers)) if config.lora_layers else None
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.05, bias="none",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                      task_type="CAUSAL_LM", layers_to_transform=layers, layers_pattern="layers" if layers else None)
    return get_peft_model(model, lora)


def train_generator(config: GeneratorConfig, progress: bool = True) -> Path:
    """Fine-tune; saves `last/` every eval_every steps (resume point) and `best/` at the lowest held-out loss."""
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup, set_seed

    if len(config.corpora) != len(config.questions) or not config.corpora:
        raise UniragError("Give one train questions file per corpus (--corpus and --questions in pairs).")
    for path in config.questions:
        check_train_split(path)
    set_seed(config.seed)
    corpora = [load_corpus(c) for c in config.corpora]
    from unirag.joint.training import held_out_split

    question_sets = [held_out_split(load_questions(q, c), config.seed, config.stage1_validation)[1]
                     for q, c in zip(config.questions, corpora, strict=True)]
    pairs = train_pairs(corpora, question_sets, [corpus_style(c) for c in config.corpora])
    random.Random(config.seed).shuffle(pairs)
    held, train = pairs[: config.held_out_pairs], pairs[config.held_out_pairs :]
    if not train or not held:
        raise UniragError(f"{len(pairs)} (passage, question) pairs: too few to train and hold out "
                          f"{config.held_out_pairs}.")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "generator_state.json"
    model, tokenizer = _load_base(config.base_model)
    state = {"step": 0, "best_loss": math.inf, "best_step": 0, "curve": []}
    if (out / "last").is_dir() and state_path.is_file():
        from peft import PeftModel

        state = json.loads(state_path.read_text())
        if state.get("config") != asdict(config):
            raise UniragError(f"{out} holds a generator trained with other settings; use another --out.")
        model = PeftModel.from_pretrained(model, str(out / "last"), is_trainable=True)
    else:
        model = _add_lora(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    if (out / "last" / "optimizer.pt").is_file():
        optimizer.load_state_dict(torch.load(out / "last" / "optimizer.pt"))
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    scheduler = get_cosine_schedule_with_warmup(optimizer, 50, config.steps, last_epoch=state["step"] - 1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encode = lambda p: encode_pair(tokenizer, *p, config.passage_words)  # noqa: E731
    held_encoded = sorted((encode(p) for p in held), key=lambda e: len(e[0]))
    order = list(range(len(train)))
    epoch_orders: dict[int, list[int]] = {}

    def example(i: int) -> int:  # the i-th example of the run: a fresh seeded shuffle each epoch (resume-safe)
        epoch, offset = divmod(i, len(order))
        if epoch not in epoch_orders:
            epoch_orders[epoch] = order[:]
            random.Random(config.seed * 1000 + epoch).shuffle(epoch_orders[epoch])
        return epoch_orders[epoch][offset]

    model.train()
    bar = tqdm(range(state["step"], config.steps), initial=state["step"], total=config.steps,
               desc="query generator", unit="step", disable=not progress)
    running: list[float] = []
    started = time.time()
    for step in bar:
        batch = [encode(train[example(step * config.batch_size + j)]) for j in range(config.batch_size)]
        loss = _loss(model, *_batch(batch, pad))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        running.append(float(loss))
        bar.set_postfix(loss=f"{sum(running[-20:]) / len(running[-20:]):.3f}")
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            valid = held_out_loss(model, held_encoded, pad, config.batch_size)
            point = {"step": step + 1, "train_loss": round(sum(running) / len(running), 4),
                     "held_out_loss": round(valid, 4), "seconds": round(time.time() - started, 1)}
            running = []
            state["curve"].append(point)
            print(json.dumps(point), file=sys.stderr, flush=True)
            if valid < state["best_loss"]:
                state.update(best_loss=valid, best_step=step + 1)
                _save_adapter(model, out / "best")
            _save_adapter(model, out / "last")
            torch.save(optimizer.state_dict(), out / "last" / "optimizer.pt")
            state.update(step=step + 1, config=asdict(config), pairs=len(train), held_out=len(held))
            write_json_atomic(state_path, state, indent=1)
    return out / "best"


def _save_adapter(model, path: Path) -> None:
    import shutil

    tmp = path.with_name(path.name + ".saving")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


# ------------------------------------------------------------------------------------------ generation


@dataclass
class SamplingConfig:
    samples: int = 8  # questions sampled a passage (before dedup and filter)
    top_k: int = 10
    top_p: float = 0.95
    temperature: float = 1.0
    max_new_tokens: int = 40  # a sample still open after this many tokens is dropped
    passage_words: int = 120
    batch_passages: int = 4  # passages a generate() call (each sampled `samples` times)
    seed: int = 0


def clean_question(text: str) -> str | None:
    """The first line, trimmed; None when it is no question (too short, or cut off without an ending)."""
    line = text.strip().split("\n")[0].strip()
    if len(line.split()) < 3 or len(line) > 300:
        return None
    return line


def dedupe(questions: Sequence[str], banned: set[str] = frozenset()) -> list[str]:
    """Distinct questions in order (by `normalize_question`), without any whose form is in `banned`."""
    seen, out = set(banned), []
    for q in questions:
        key = normalize_question(q)
        if key and key not in seen:
            seen.add(key)
            out.append(q)
    return out


def sample_questions(model, tokenizer, passages: Sequence[tuple[str, str]], config: SamplingConfig,
                     seed: int, style: str) -> list[list[str]]:
    """Sampled questions per passage ((title, text) pairs), seeded per call. Each prompt is read once and its KV
    cache repeated for the samples (generate(num_return_sequences=n) would re-read it n times)."""
    texts = [prompt_text(title, text, config.passage_words, style) for title, text in passages]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=True)
    generator = torch.Generator().manual_seed(seed)
    n = config.samples
    eos = tokenizer.eos_token_id
    newline = {i for i in tokenizer("\n", add_special_tokens=False)["input_ids"]}
    with torch.inference_mode():
        mask = enc["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=positions, use_cache=True)
        cache = out.past_key_values
        cache.batch_repeat_interleave(n)
        logits = out.logits[:, -1].float().repeat_interleave(n, dim=0)
        mask = mask.repeat_interleave(n, dim=0)
        last = positions[:, -1].repeat_interleave(n, dim=0)
        tokens: list[list[int]] = [[] for _ in range(mask.shape[0])]
        done = torch.zeros(mask.shape[0], dtype=torch.bool)
        for _ in range(config.max_new_tokens):
            picked = _sample(logits, config, generator)
            for row in torch.nonzero(~done).flatten().tolist():
                token = int(picked[row])
                if token == eos or token in newline:
                    done[row] = True
                else:
                    tokens[row].append(token)
            if bool(done.all()):
                break
            picked = picked.masked_fill(done, eos)
            mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], dim=1)
            last = last + 1
            out = model(input_ids=picked.unsqueeze(1), attention_mask=mask, position_ids=last.unsqueeze(1),
                        past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1].float()
    # A sample that never ended within the budget is cut mid-question: dropped (None from clean_question).
    decoded = [tokenizer.decode(t, skip_special_tokens=True) if done[i] else "" for i, t in enumerate(tokens)]
    return [decoded[i * n : (i + 1) * n] for i in range(len(passages))]


def _sample(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """One token a row: temperature, then top-k, then nucleus (top-p) filtering, then a seeded draw."""
    logits = logits / config.temperature
    if config.top_k > 0:
        kth = torch.topk(logits, min(config.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(ordered, dim=-1) > config.top_p  # keep the token that crosses top_p
        logits = logits.scatter(1, order, ordered.masked_fill(drop, float("-inf")))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)


def round_trip_keep(doc_id: str, question: str, rankers: Sequence) -> bool:
    """Doc2Query--: keep a generated question only if some ranker ranks its source passage first."""
    return any(r.search(question, 1)[0][0] == doc_id for r in rankers)


@dataclass
class GenerationStats:
    passages: int = 0
    sampled: int = 0
    distinct: int = 0
    kept: int = 0
    seconds: float = 0.0
    per_ranker_first: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict:
        return {**asdict(self), "keep_rate": round(self.kept / max(self.distinct, 1), 4),
                "questions_per_second": round(self.sampled / max(self.seconds, 1e-9), 3)}


def generate_queries(corpus_path: str, adapter: str | None, out: str, config: SamplingConfig,
                     banned_question_files: Sequence[str] = (), base_model: str | None = None,
                     limit: int | None = None, progress: bool = True, style: str | None = None,
                     rankers: dict | None = None) -> dict:
    """Sample, dedupe, filter and append `{doc_id, question}` rows to `out` (resumes by passage). `rankers`
    (name → retriever with `search(text, k)`) default to dense MiniLM and BM25 over the corpus."""
    from tqdm.auto import tqdm

    corpus = load_corpus(corpus_path)
    style = style or corpus_style(corpus_path)
    banned = set()
    for path in banned_question_files:
        banned |= {normalize_question(q.question) for q in load_questions(path)}
    out_path, meta_path = Path(out), Path(str(out) + ".meta.json")
    settings = {"corpus": Path(corpus_path).name, "corpus_fingerprint": corpus.fingerprint,
                "adapter": adapter, "adapter_sha256": _adapter_digest(adapter), "base_model": base_model or "embedded",
                "prompt": QUERY_PROMPT, "style": style, "sampling": asdict(config),
                "filter": f"{' or '.join(rankers or ['dense', 'bm25'])} ranks the source passage first",
                "banned": [Path(p).name for p in banned_question_files]}
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    if meta is not None and meta.get("settings") != settings:
        raise UniragError(f"{out} was generated with other settings (see {meta_path}); choose another --out.")
    done: set[str] = set()
    stats = GenerationStats()
    if out_path.is_file() and meta is not None:
        stats = GenerationStats(**{k: v for k, v in meta["stats"].items() if k in GenerationStats.__dataclass_fields__})
        done = set(meta.get("passages_done", []))
    elif out_path.is_file():
        raise UniragError(f"{out} exists without its {meta_path.name}; remove it or choose another --out.")
    model, tokenizer = _load_base(base_model)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.eval()
    if rankers is None:
        from unirag.rag import DenseRetriever
        from unirag.sparse import BM25Retriever

        rankers = {"dense": DenseRetriever.from_corpus(corpus, progress=progress),
                   "bm25": BM25Retriever.from_corpus(corpus)}
    # Chunks are fixed by the corpus order (and seeded by their first passage), so a resumed run samples what an
    # uninterrupted one would have; `limit` counts passages from the start of the corpus, in whole chunks.
    passages = list(corpus)
    chunks = [passages[i : i + config.batch_passages] for i in range(0, len(passages), config.batch_passages)]
    if limit is not None:
        chunks = chunks[: math.ceil(limit / config.batch_passages)]
    chunks = [c for c in chunks if not all(p.id in done for p in c)]
    bar = tqdm(total=sum(map(len, chunks)), desc=f"generating queries ({Path(corpus_path).parent.name})",
               unit="passage", disable=not progress)
    order = {p.id: i for i, p in enumerate(corpus)}
    for chunk in chunks:
        began = time.time()
        raw = sample_questions(model, tokenizer, [(p.title, p.text) for p in chunk], config,
                               seed=config.seed * 1_000_003 + order[chunk[0].id], style=style)
        rows = []
        for passage, samples in zip(chunk, raw, strict=True):
            cleaned = [q for q in (clean_question(s) for s in samples) if q]
            distinct = dedupe(cleaned, banned)
            stats.sampled += len(samples)
            stats.distinct += len(distinct)
            for q in distinct:
                firsts = [name for name, r in rankers.items() if round_trip_keep(passage.id, q, [r])]
                for name in firsts:
                    stats.per_ranker_first[name] = stats.per_ranker_first.get(name, 0) + 1
                if firsts:
                    rows.append({"doc_id": passage.id, "question": q, "kept_by": firsts})
            done.add(passage.id)
        stats.kept += len(rows)
        stats.passages += len(chunk)
        stats.seconds += time.time() - began
        with out_path.open("a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        write_json_atomic(meta_path, {"settings": settings, "stats": asdict(stats),
                                      "summary": stats.summary(), "passages_done": sorted(done),
                                      "complete": len(done) == len(corpus),
                                      "updated": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1)
        bar.update(len(chunk))
        bar.set_postfix(kept=stats.kept, keep=f"{stats.kept / max(stats.distinct, 1):.2f}")
    bar.close()
    return stats.summary()


def _adapter_digest(adapter: str | None) -> str | None:
    if not adapter:
        return None
    path = Path(adapter) / "adapter_model.safetensors"
    return file_sha256(path)[:16] if path.is_file() else None


def load_generated_queries(path: str | Path, corpus: Corpus, banned: Sequence[Question] = ()
                           ) -> list[tuple[str, str]]:
    """(question, doc_id) rows of a generated-queries file, checked: the corpus matches its meta, every doc_id is
    in the corpus, and no row equals a held-back (`banned`) question."""
    path = Path(path)
    meta_path = Path(str(path) + ".meta.json")
    if not path.is_file() or not meta_path.is_file():
        raise UniragError(f"Generated queries {path} (and its {meta_path.name}) not found.")
    meta = json.loads(meta_path.read_text())
    if meta["settings"]["corpus_fingerprint"] != corpus.fingerprint:
        raise UniragError(f"{path} was generated for another corpus than {corpus.source}.")
    forbidden = {normalize_question(q.question) for q in banned}
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if row["doc_id"] not in corpus:
            raise UniragError(f"{path}:{lineno}: doc_id {row['doc_id']!r} is not in the corpus.")
        if normalize_question(row["question"]) in forbidden:
            raise UniragError(f"{path}:{lineno}: a generated question equals a held-back question; regenerate "
                              "with that split banned.")
        rows.append((row["question"], row["doc_id"]))
    return rows


def queries_fingerprint(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ CLI


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m unirag querygen", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    tr = sub.add_parser("train", help="fine-tune the generator (LoRA) on train (passage, question) pairs")
    tr.add_argument("--corpus", action="append", required=True, help="corpus.jsonl (repeat, one per --questions)")
    tr.add_argument("--questions", action="append", required=True, help="its train.jsonl (repeat)")
    tr.add_argument("--out", required=True, help="adapter folder (resumable)")
    for f in GeneratorConfig.__dataclass_fields__.values():
        if f.name not in ("corpora", "questions", "out"):
            kind = int if f.type in ("int", int) else float if f.type in ("float", float) else str
            tr.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default)
    gen = sub.add_parser("generate", help="sample, dedupe and round-trip-filter questions for every passage")
    gen.add_argument("--corpus", required=True)
    gen.add_argument("--adapter", default=None, help="the generator's adapter folder (querygen train's best/)")
    gen.add_argument("--out", required=True, help="queries JSONL (appended; its settings in <out>.meta.json)")
    gen.add_argument("--ban", action="append", default=[],
                     help="a held-back questions file: no generated question may equal one of them (repeat)")
    gen.add_argument("--limit", type=int, default=None, help="only the first N passages (throughput benchmark)")
    gen.add_argument("--base-model", default=None)
    for f in SamplingConfig.__dataclass_fields__.values():
        kind = int if f.type in ("int", int) else float
        gen.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default)
    args = vars(parser.parse_args(argv))
    verb = args.pop("verb")
    if verb == "train":
        args["corpora"], args["questions"] = args.pop("corpus"), args.pop("questions")
        best = train_generator(GeneratorConfig(**args))
        print(json.dumps({"adapter": str(best)}))
        return 0
    sampling = SamplingConfig(**{k: args.pop(k) for k in SamplingConfig.__dataclass_fields__})
    summary = generate_queries(args["corpus"], args["adapter"], args["out"], sampling, args["ban"],
                               args["base_model"], args["limit"])
    print(json.dumps(summary))
    return 0
