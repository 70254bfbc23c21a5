"""Generative vs dense retrieval as the corpus grows: R@1/R@3 of the docid search (alone and with the self-check)
and of dense MiniLM retrieval on nested nq corpora of growing size.

Theory (Zhang et al.) says generative retrieval's globally normalised objective should degrade less than dense
retrieval as the corpus grows; this measures it on the project's own data and training recipe:

    python -m benchmarks.gr_vs_dr build --sizes 300,1000,all,union --out runs/gr_vs_dr
    python -m benchmarks.gr_vs_dr train --size 300               # `python -m unirag train`, stage 1 only
    python -m benchmarks.gr_vs_dr measure --size 300 --record    # [--precision 4bit]
    python -m benchmarks.gr_vs_dr common --sizes 1000,all,union --record  # the questions every size measured
    python -m benchmarks.gr_vs_dr plot                           # docs/gr_vs_dr.png from the results store

Sizes: N (a seeded random subset of N nq passages; smaller subsets are nested in larger ones), `all` (the whole nq
corpus) and `union` (nq + squad). Each size's questions are the nq train/dev questions whose gold passage is in
its corpus, so a small corpus has few dev questions; the union adds a seeded sample of squad's questions, as many
per passage as nq has (`match_density`), so every size trains on the same supervision per passage, and measures
them apart (`dev` is nq's dev questions at every size, `dev-squad` the union's squad ones). Every size trains with
the same flags (TRAIN_FLAGS); run one torch process per core (`OMP_NUM_THREADS=1`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unirag.data import Corpus, Passage, Question, load_corpus, load_questions
from unirag.errors import UniragError
from unirag.paths import REPO_ROOT, default_data_dir, write_json_atomic

OUT = REPO_ROOT / "runs" / "gr_vs_dr"
PLOT = REPO_ROOT / "docs" / "gr_vs_dr.png"
SEED = 0
# Stage 1 only, the same at every size: the pathway depth of the shipped checkpoints and the epochs they trained.
TRAIN_FLAGS = ("--pathway-layers", "8", "--stage1-epochs", "3", "--stage2-steps", "0")
# The self-check measured: the shipped checkpoints' recommended fp32 setting (chosen on held-out nq train questions).
SELF_CHECK_N = 5
SELF_CHECK_WEIGHT = 16.0
BEAM_WIDTH = 10
DENSE_K = 10  # dense ranking depth (recall@k), as deep as the search's beam
COMMON_SPLIT = "dev-common"  # the dev questions every compared size measured (`common`)
RUN_PREFIX = "gr-vs-dr: "
# role (settings["gr_vs_dr"]) → words in the run name
ROLES = {"search": "docid search alone, beam 10", "self-check": "docid search + self-check",
         "dense": "dense MiniLM"}


# --------------------------------------------------------------------------------------------- build


@dataclass
class Dataset:
    corpus: Corpus
    train: list[Question]
    dev: list[Question]


def store_corpus_name(size: str) -> str:
    """The results-store corpus name of a size (one store file each): nq-300, nq-all, nq+squad."""
    if size == "union":
        return "nq+squad"
    return f"nq-{size}"


def check_size(size: str) -> str:
    if size in ("all", "union") or (size.isdigit() and int(size) > 0):
        return size
    raise UniragError(f"size {size!r}: a passage count, `all` or `union`.")


def load_dataset(folder: Path) -> Dataset:
    corpus = load_corpus(folder / "corpus.jsonl")
    return Dataset(corpus, load_questions(folder / "train.jsonl", corpus), load_questions(folder / "dev.jsonl", corpus))


def nested_order(corpus: Corpus, seed: int = SEED) -> list[str]:
    """The corpus's ids in a seeded random order: the first N are the N-passage subset, so subsets are nested."""
    ids = corpus.ids
    random.Random(seed).shuffle(ids)
    return ids


def subset(data: Dataset, n: int, seed: int = SEED) -> Dataset:
    """N passages (the first N of `nested_order`, in corpus order) and the questions whose gold passage is in them."""
    if n > len(data.corpus):
        raise UniragError(f"a {n}-passage subset of a {len(data.corpus)}-passage corpus")
    keep = set(nested_order(data.corpus, seed)[:n])
    corpus = Corpus([p for p in data.corpus if p.id in keep], source=f"{data.corpus.source}[{n} of {len(data.corpus)}]")
    return Dataset(corpus, [q for q in data.train if q.doc_id in keep], [q for q in data.dev if q.doc_id in keep])


def union(parts: dict[str, Dataset]) -> Dataset:
    """The datasets' corpora and questions pooled. Ids stay as they are when distinct (nq and squad's are); if any
    passage or question id collides, every id is prefixed with its dataset's name ("nq/...")."""
    passage_ids = [p.id for d in parts.values() for p in d.corpus]
    question_ids = [q.id for d in parts.values() for q in [*d.train, *d.dev]]
    prefix = len(set(passage_ids)) < len(passage_ids) or len(set(question_ids)) < len(question_ids)

    def name(part: str, value: str | None) -> str | None:
        return f"{part}/{value}" if prefix and value is not None else value

    passages: list[Passage] = []
    train: list[Question] = []
    dev: list[Question] = []
    for part, d in parts.items():
        passages += [Passage(name(part, p.id), p.title, p.text) for p in d.corpus]
        train += [Question(name(part, q.id), q.question, q.answers, name(part, q.doc_id)) for q in d.train]
        dev += [Question(name(part, q.id), q.question, q.answers, name(part, q.doc_id)) for q in d.dev]
    return Dataset(Corpus(passages, source="+".join(parts)), train, dev)


def match_density(data: Dataset, like: Dataset, seed: int = SEED) -> Dataset:
    """`data` with a seeded sample of its train and dev questions, as many per passage as `like` has, so that a
    pooled corpus is not a size with more supervision per passage than the others (squad has five times nq's)."""
    def sample(questions: list[Question], reference: list[Question]) -> list[Question]:
        n = round(len(reference) / len(like.corpus) * len(data.corpus))
        if n >= len(questions):
            return questions
        keep = set(random.Random(seed).sample(range(len(questions)), n))
        return [q for i, q in enumerate(questions) if i in keep]

    return Dataset(data.corpus, sample(data.train, like.train), sample(data.dev, like.dev))


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def write_dataset(data: Dataset, folder: Path, manifest: dict[str, Any]) -> None:
    """corpus.jsonl, train.jsonl and dev.jsonl in the project's formats (read back by unirag.data), and a manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_jsonl(folder / "corpus.jsonl", [{"id": p.id, "title": p.title, "text": p.text} for p in data.corpus])
    for split, questions in (("train", data.train), ("dev", data.dev)):
        _write_jsonl(folder / f"{split}.jsonl", [{"id": q.id, "question": q.question, "answers": list(q.answers),
                                                  "doc_id": q.doc_id} for q in questions])
    write_json_atomic(folder / "manifest.json", {**manifest, "passages": len(data.corpus), "train": len(data.train),
                                                 "dev": len(data.dev), "corpus_fingerprint": data.corpus.fingerprint},
                      indent=1)


def build_sizes(sizes: Sequence[str], data_dir: Path, out: Path, seed: int = SEED) -> dict[str, Dataset]:
    """Write every size's folder under `out`; returns the datasets by size."""
    sources = {name: load_dataset(data_dir / name) for name in ("nq", "squad")
               if name == "nq" or "union" in sizes}
    built = {}
    for size in sizes:
        if size == "all":
            data = sources["nq"]
        elif size == "union":
            parts = {"nq": sources["nq"], "squad": match_density(sources["squad"], sources["nq"], seed)}
            data = union(parts)
        else:
            data = subset(sources["nq"], int(size), seed)
        manifest = {"size": size, "seed": seed, "data_dir": str(data_dir), "store_corpus": store_corpus_name(size)}
        if size == "union":  # which dev questions came from which corpus (`measure` splits them)
            manifest["dev_ids"] = {part: [q.id for q in d.dev] for part, d in parts.items()}
        write_dataset(data, out / size, manifest)
        print(f"[build] {size}: {len(data.corpus)} passages, {len(data.train)} train and {len(data.dev)} dev "
              f"questions -> {out / size}", file=sys.stderr, flush=True)
        built[size] = data
    return built


# --------------------------------------------------------------------------------------------- train


def train_command(folder: Path, extra: Sequence[str] = ()) -> list[str]:
    """The project's training CLI for one size (always --resume: it starts fresh when there is nothing to resume)."""
    return [sys.executable, "-m", "unirag", "train", "--corpus", str(folder / "corpus.jsonl"),
            "--questions", str(folder / "train.jsonl"), "--out", str(folder / "ckpt"), *TRAIN_FLAGS, *extra,
            "--resume"]


def train(folder: Path, extra: Sequence[str] = ()) -> int:
    """Run `python -m unirag train` (progress bars and per-epoch records stream through); log the wall time."""
    if not (folder / "corpus.jsonl").is_file():
        raise UniragError(f"{folder} has no corpus.jsonl: run `python -m benchmarks.gr_vs_dr build` first.")
    command = train_command(folder, extra)
    print("[train] " + " ".join(command), file=sys.stderr, flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.strftime("%Y-%m-%d %H:%M:%S")
    code = subprocess.call(command, env=env, cwd=REPO_ROOT)
    with (folder / "train_runs.jsonl").open("a") as handle:  # one line per (resumed) run: when and how it ended
        handle.write(json.dumps({"start": start, "end": time.strftime("%Y-%m-%d %H:%M:%S"), "exit": code,
                                 "command": command[1:]}) + "\n")
    return code


# --------------------------------------------------------------------------------------------- measure


def held_out(folder: Path, train_questions: list[Question]) -> list[Question]:
    """The train questions the size's training run held out (seed and count from its trainer_state.json)."""
    from unirag.joint.training import held_out_split

    config = json.loads((folder / "ckpt" / "trainer_state.json").read_text())["config"]
    return held_out_split(train_questions, config["seed"], config["validation_questions"])[0]


def question_splits(data: Dataset, manifest: dict[str, Any], held: list[Question]) -> dict[str, list[Question]]:
    """The measured question sets: `dev` is nq's dev questions at every size (so a curve follows one population);
    the union's squad dev questions are `dev-squad`; `train-held-out` what the size's training set aside."""
    dev = [q for q in data.dev if q.doc_id]
    if "dev_ids" not in manifest:
        return {"dev": dev, "train-held-out": held}
    parts = {part: set(ids) for part, ids in manifest["dev_ids"].items()}
    return {"dev": [q for q in dev if q.id in parts["nq"]], "dev-squad": [q for q in dev if q.id in parts["squad"]],
            "train-held-out": held}


def rank_questions(system, dense, questions: list[Question], precision: str, progress: bool = True) -> list[dict]:
    """Per question: the gold id and each system's ranking (ids, best first) and seconds.

    `system` a JointSystem, `dense` a DenseRetriever over the same corpus (None: no dense ranking)."""
    import torch
    from tqdm.auto import tqdm

    from unirag.joint.search import search_docids
    from unirag.settings import InferenceSettings

    check = InferenceSettings(k_docs=1, beam_width=BEAM_WIDTH, self_check=SELF_CHECK_N,
                              self_check_weight=SELF_CHECK_WEIGHT, precision=precision)
    records = []
    dense_hits = dense.search_many([q.question for q in questions], DENSE_K) if dense is not None else None
    system.model.eval()
    for i, q in enumerate(tqdm(questions, desc="gr vs dr", unit="q", disable=not progress)):
        record: dict[str, Any] = {"id": q.id, "gold": q.doc_id}
        start = time.perf_counter()
        with torch.inference_mode():  # the search alone, called as `retrieval_recall` (training, generative_recall)
            beams = search_docids(system.model, system.tokenizer, q.question, system.tree, BEAM_WIDTH, BEAM_WIDTH,
                                  pathway=True, bridge=system.model.reader_trained).beams
        record["search"], record["search_s"] = [b.doc_id for b in beams], time.perf_counter() - start
        start = time.perf_counter()
        with torch.inference_mode():
            retrieval = system.retrieve(q.question, check)  # the library's search + self-check, as the app runs it
        record["self-check"], record["self-check_s"] = retrieval.ranking, time.perf_counter() - start
        record["self-check_candidates"] = [b.doc_id for b in retrieval.search.beams]
        if dense_hits is not None:
            record["dense"] = [doc_id for doc_id, _ in dense_hits[i]]
        records.append(record)
    return records


def recall(records: list[dict], role: str, k: int) -> float | None:
    if not records:
        return None
    return round(sum(r["gold"] in r[role][:k] for r in records) / len(records), 4)


def summarize(records: list[dict], role: str) -> dict[str, Any]:
    """A role's metrics in the results store's keys (answers are not generated: accuracy/EM/F1 null)."""
    depth = {"search": BEAM_WIDTH, "self-check": SELF_CHECK_N, "dense": DENSE_K}[role]
    seconds = [r[f"{role}_s"] for r in records if f"{role}_s" in r]
    summary = {"n": len(records), "accuracy": None, "em": None, "f1": None, "recall@1": recall(records, role, 1),
               "recall@3": recall(records, role, 3), "recall@k": recall(records, role, depth), "k": depth,
               "context_tokens_mean": None,
               "latency_ms_median": round(statistics.median(seconds) * 1000, 1) if seconds else None,
               "wall_time_s": round(sum(seconds), 1) if seconds else None}
    if role == "self-check":  # the candidate generator's own top-1, and the gold among the N it hands over
        summary["candidate_recall@1"] = recall(records, "self-check_candidates", 1)
        summary["candidate_recall@n"] = recall(records, "self-check_candidates", SELF_CHECK_N)
    return summary


def measure(folder: Path, precision: str = "fp32", limit: int | None = None, progress: bool = True,
            command: str = "", encoder=None, splits: Sequence[str] | None = None) -> dict:
    """Rank the size's dev and held-out train questions with the three systems; the result (records and
    summaries) is written to `<folder>/measure_<precision>.json` and returned. `splits`: only these question sets,
    merged into that file's other splits of the same corpus (one split at a time on a slow machine). `encoder`:
    the dense side's (default: the embedded MiniLM, as the `rag` system; tests pass a stand-in)."""
    from unirag.docids import passage_text
    from unirag.joint import JointSystem
    from unirag.rag import DenseRetriever

    data = load_dataset(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    available = question_splits(data, manifest, held_out(folder, data.train))
    unknown = sorted(set(splits or ()) - set(available))
    if unknown:
        raise UniragError(f"size {manifest['size']} has no split(s) {', '.join(unknown)}: {', '.join(available)}.")
    questions_by_split = {name: qs for name, qs in available.items() if splits is None or name in splits}
    system = JointSystem.from_checkpoint(folder / "ckpt", data.corpus, precision=precision,
                                         attn_implementation="sdpa", traces=False)
    # Dense retrieval does not depend on the LLM's precision: measured (and recorded) with the fp32 runs only.
    dense = None
    if precision == "fp32":
        if encoder is None:
            dense = DenseRetriever.from_corpus(data.corpus, progress=progress)
        else:
            texts = [passage_text(p.title, p.text) for p in data.corpus]
            dense = DenseRetriever(data.corpus, encoder, encoder.encode_passages(texts))
    result: dict[str, Any] = {"folder": str(folder), "precision": precision, "passages": len(data.corpus),
                              "command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "manifest": manifest, "splits": {}}
    path = folder / f"measure_{precision}.json"
    if splits is not None and path.is_file():  # keep the splits measured before, if on the same corpus
        before = json.loads(path.read_text())
        if before["manifest"].get("corpus_fingerprint") == manifest.get("corpus_fingerprint"):
            result["splits"] = {k: v for k, v in before["splits"].items() if k not in questions_by_split}
    for split, questions in questions_by_split.items():
        records = rank_questions(system, dense, questions[:limit], precision, progress)
        roles = [role for role in ROLES if role != "dense" or dense is not None]
        result["splits"][split] = {"summaries": {role: summarize(records, role) for role in roles},
                                   "records": records, "command": command}
        print(json.dumps({split: recalls(result["splits"][split]["summaries"])}), flush=True)
    write_json_atomic(path, result)
    return result


def recalls(summaries: dict[str, dict]) -> dict[str, dict]:
    """Each role's n and recalls: the line a measurement prints per split."""
    return {role: {k: v for k, v in s.items() if k.startswith("recall") or k == "n"} for role, s in summaries.items()}


def on_common_questions(results: Sequence[dict], split: str = "dev", name: str = COMMON_SPLIT) -> list[dict]:
    """Each size's measurement restricted to the `split` questions every size measured (with nested corpora: the
    smallest size's), as a split `name` of its own: the same questions as the corpus grows, nothing else changing
    but the corpus and the model trained on it."""
    common = set.intersection(*({r["id"] for r in result["splits"][split]["records"]} for result in results))
    sizes = [result["manifest"]["size"] for result in results]
    out = []
    for result in results:
        records = [r for r in result["splits"][split]["records"] if r["id"] in common]
        summaries = {role: {**summarize(records, role), "common_to_sizes": sizes}
                     for role in result["splits"][split]["summaries"]}
        out.append({**result, "splits": {name: {"summaries": summaries, "records": records}}})
    return out


def training_settings(folder: Path) -> dict[str, Any]:
    """What the checkpoint was trained with (trainer_state.json) and its stage-1 epoch end times (loss_log)."""
    state = json.loads((folder / "ckpt" / "trainer_state.json").read_text())
    config = state["config"]
    keys = ("pathway_layers", "stage1_epochs", "stage2_steps", "pseudo_queries", "semantic_docids", "tree_k",
            "tree_c", "seed", "validation_questions", "batch_size", "stage1_lr")
    log = folder / "ckpt" / "loss_log.jsonl"
    epochs = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    return {**{k: config[k] for k in keys}, "trained_stage": state["stage"], "trained_epochs": state["epoch"],
            "epoch_end_times": [e["time"] for e in epochs if e.get("stage") == 1]}


def rows_of(result: dict, command: str) -> list[dict]:
    """One results-store row per measured (split, system) of one size."""
    from unirag.results import LLM, row_from_summary

    folder = Path(result["folder"])
    size = result["manifest"]["size"]
    corpus = store_corpus_name(size)
    where = "nq + squad" if size == "union" else "nq"
    base = {"gr_vs_dr_size": size, "passages": result["passages"], "corpus_dir": str(folder.relative_to(REPO_ROOT))
            if folder.is_relative_to(REPO_ROOT) else str(folder), "corpus_fingerprint":
            result["manifest"]["corpus_fingerprint"], "subset_seed": result["manifest"]["seed"], "shipped": False,
            "encoder": "embedded all-MiniLM-L6-v2"}
    rows = []
    for split, block in result["splits"].items():
        for role, summary in block["summaries"].items():
            if role == "dense":
                settings = {**base, "gr_vs_dr": role, "rag_k": DENSE_K, "retriever": "dense MiniLM cosine (faiss)"}
                system, precision = "rag", "fp32"
            else:
                settings = {**base, "gr_vs_dr": role, "llm": LLM, "checkpoint": settings_dir(folder),
                            "beam_width": BEAM_WIDTH, "k_docs": 1, "self_check": SELF_CHECK_N if role == "self-check"
                            else 0, "ranking": "path log-prob + document match",
                            "training": training_settings(folder)}
                if role == "self-check":
                    settings.update(self_check_weight=SELF_CHECK_WEIGHT, passage_cache=False)
                system, precision = "joint", result["precision"]
            run = f"{RUN_PREFIX}{ROLES[role]}, {result['passages']:,} passages ({where})"
            row = row_from_summary(summary, run=run, system=system, corpus=corpus, split=split, precision=precision,
                                   settings=settings, command=block.get("command") or command)
            row["source"] = "python -m benchmarks.gr_vs_dr"
            rows.append(row)
    return rows


def settings_dir(folder: Path) -> str:
    ckpt = folder / "ckpt"
    return str(ckpt.relative_to(REPO_ROOT)) if ckpt.is_relative_to(REPO_ROOT) else str(ckpt)


def record(result: dict, command: str, store_dir: Path | None = None) -> None:
    from unirag.results import append_run

    for row in rows_of(result, command):
        append_run(row, store_dir, replace=True)
        print(f"[record] {row['corpus']} / {row['split']} / {row['precision']}: {row['run']}", file=sys.stderr)


# --------------------------------------------------------------------------------------------- plot


def plot(rows: Sequence[dict], path: Path = PLOT) -> Path:
    """R@1 and R@3 against the number of passages (log scale), one line per system; dev solid, the questions common
    to the sizes dotted, held-out train dashed.
    From the results store's gr-vs-dr rows (fp32 for the docid search and dense MiniLM)."""
    import matplotlib

    matplotlib.use("Agg")  # no display here
    import matplotlib.pyplot as plt

    from unirag.studies import gr_vs_dr_points

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    colours = {"search": "tab:orange", "self-check": "tab:red", "dense": "tab:blue"}
    for ax, metric in zip(axes, ("recall@1", "recall@3"), strict=True):
        for role, words in ROLES.items():
            # dev: solid line, dots; held-out train: dashed, triangles (told apart even at one size)
            for split, style, marker in (("dev", "-", "o"), ("dev-common", ":", "s"), ("train-held-out", "--", "^")):
                points = gr_vs_dr_points(rows, role, split, metric)
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, style, marker=marker, color=colours[role], label=f"{words} ({split})")
        ax.set_xscale("log")
        sizes = sorted({n for line in ax.get_lines() for n in line.get_xdata()})
        if sizes:  # label the measured sizes only: log-scale minor labels overlap on a short axis
            ax.set_xticks(sizes, [f"{int(n):,}" for n in sizes])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("passages in the corpus")
        ax.set_title(metric.replace("recall", "R"))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("recall of the gold passage")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.suptitle("Generative (docid search) vs dense retrieval as the corpus grows (fp32)")
    fig.tight_layout(rect=(0, 0.15 if handles else 0, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from unirag.cli import add_precision_flags, precision_of

    parser = argparse.ArgumentParser(prog="python -m benchmarks.gr_vs_dr", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write each size's corpus.jsonl, train.jsonl and dev.jsonl")
    b.add_argument("--sizes", default="300,1000,all,union", help="comma-separated: N, all, union")
    b.add_argument("--out", type=Path, default=OUT)
    b.add_argument("--data", type=Path, default=None, help="folder with nq/ and squad/ (default: UNIRAG_DATA, "
                                                           "../shared/data)")
    b.add_argument("--seed", type=int, default=SEED)
    for name, text in (("train", "train one size's joint model (`python -m unirag train`, stage 1)"),
                       ("measure", "R@1/R@3 of the docid search (alone, + self-check) and dense MiniLM")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--size", required=True, type=check_size)
        p.add_argument("--out", type=Path, default=OUT)
    sub.choices["train"].add_argument("extra", nargs=argparse.REMAINDER,
                                      help="after `--`: further `python -m unirag train` flags (keep them equal "
                                           "across sizes)")
    m = sub.choices["measure"]
    add_precision_flags(m)
    m.add_argument("--limit", type=int, default=None, help="the first N questions of each split only (a smoke run)")
    m.add_argument("--splits", default=None, help="comma-separated question sets (dev, dev-squad, train-held-out), "
                                                  "merged into the saved measurement; default: all")
    m.add_argument("--record", action="store_true", help="append one row per (split, system) to the results store")
    r = sub.add_parser("record", help="record a size's saved measurement (measure_<precision>.json)")
    r.add_argument("--size", required=True, type=check_size)
    r.add_argument("--out", type=Path, default=OUT)
    r.add_argument("--precision", default="fp32")
    c = sub.add_parser("common", help=f"the sizes' saved measurements on the dev questions they all measured "
                                      f"(split {COMMON_SPLIT!r})")
    c.add_argument("--sizes", default="1000,all,union", help="comma-separated sizes, each measured")
    c.add_argument("--out", type=Path, default=OUT)
    c.add_argument("--precision", default="fp32")
    c.add_argument("--record", action="store_true", help="append one row per (size, system) to the results store")
    pl = sub.add_parser("plot", help="docs/gr_vs_dr.png from the results store's gr-vs-dr rows")
    pl.add_argument("--path", type=Path, default=PLOT)
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            data = args.data or default_data_dir()
            if not (data / "nq" / "train.jsonl").is_file():
                parser.error(f"{data}/nq/train.jsonl not found: pass --data or set UNIRAG_DATA to the shared data")
            build_sizes([check_size(s.strip()) for s in args.sizes.split(",")], data, args.out, args.seed)
        elif args.command == "train":
            extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
            return train(args.out / args.size, extra)
        elif args.command == "measure":
            if args.limit is not None and args.record:
                parser.error("--limit measures part of the questions: do not --record it")
            precision = precision_of(args)
            command = " ".join(["python -m benchmarks.gr_vs_dr", *argv])
            splits = [x.strip() for x in args.splits.split(",")] if args.splits else None
            result = measure(args.out / args.size, precision, args.limit, command=command, splits=splits)
            if args.record:
                record(result, command)
        elif args.command == "record":
            result = json.loads((args.out / args.size / f"measure_{args.precision}.json").read_text())
            record(result, result["command"])  # the command that measured it
        elif args.command == "common":
            sizes = [check_size(size.strip()) for size in args.sizes.split(",")]
            paths = [args.out / size / f"measure_{args.precision}.json" for size in sizes]
            missing = [str(path) for path in paths if not path.is_file()]
            if missing:
                raise UniragError(f"not measured yet: {', '.join(missing)} (`measure --size SIZE` first).")
            command = " ".join(["python -m benchmarks.gr_vs_dr", *argv])
            for result in on_common_questions([json.loads(path.read_text()) for path in paths]):
                print(json.dumps({result["manifest"]["size"]: recalls(result["splits"][COMMON_SPLIT]["summaries"])}))
                if args.record:
                    record(result, command)
        elif args.command == "plot":
            from unirag.results import load_store

            print(plot(load_store(), args.path))
    except UniragError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
