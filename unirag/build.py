"""`python -m unirag build`: a joint checkpoint for any corpus, in one resumable job.

The docid tree (k-means over MiniLM), then stage 1 of the joint model with the shipped recipe scaled to the corpus:
indexing pseudo-queries from every passage, dense distillation at every tree level and over every document
(`level_distill_weight=1, document_distill_weight=1`), optionally generated queries (`--generate-queries`, the
querygen adapter; ~3 s a passage on a CPU). No questions are needed; with `--questions` some are held out to
validate on and `--stage2-steps N` also trains the reader. Rerunning the same command continues an interrupted
build. The folder loads like a shipped checkpoint (`ask`/`eval --checkpoint DIR`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from unirag.data import Corpus, Question, load_corpus, load_questions
from unirag.errors import UniragError
from unirag.paths import REPO_ROOT, cache_dir, write_json_atomic

MIN_PASSAGES = 10  # below this a docid tree has nothing to learn that a list would not say
MIN_STEPS = 200  # stage-1 optimizer steps at least: the schedule warms up over 50, small corpora need more epochs
MAX_SCALED_EPOCHS = 40
MAX_HELD_OUT = 100  # as the shipped checkpoints' validation_questions
QUERYGEN_ADAPTER = REPO_ROOT / "checkpoints" / "querygen"
SUMMARY_FILE = "build.json"
# The shipped checkpoints' stage-1 recipe where it differs from TrainConfig's defaults.
RECIPE = {"level_distill_weight": 1.0, "document_distill_weight": 1.0}
# What a resumed build may change; any other setting must match the checkpoint's.
RESUMABLE_CHANGES = {"corpus", "questions", "out", "stage1_epochs", "stage2_steps", "save_every"}
PHASES = ("docid tree", "generated queries", "stage 1", "stage 2")


@dataclass
class BuildOptions:
    """What `build` does beyond TrainConfig (whose fields it takes as they are)."""

    train: Any  # unirag.joint.training.TrainConfig
    generate_queries: bool = False  # sample generated queries with the querygen adapter first
    querygen_adapter: str = str(QUERYGEN_ADAPTER)
    querygen_style: str = "nq"  # the generator's prompt style: nq (search queries) or squad (crowd questions)
    progress_file: str | None = None  # JSON progress for the app, rewritten every second

    @property
    def phases(self) -> list[str]:
        config = self.train
        return [p for p in PHASES if (p != "generated queries" or self.generate_queries)
                and (p != "stage 2" or config.stage2_steps > 0)]


# ------------------------------------------------------------------------------------------ the recipe


def scaled_epochs(examples: int, batch_size: int, base: int = 8) -> int:
    """Stage-1 epochs for a corpus: the shipped 8, more when that is fewer than MIN_STEPS steps (capped)."""
    steps = max(1, math.ceil(examples / batch_size))
    return min(MAX_SCALED_EPOCHS, max(base, math.ceil(MIN_STEPS / steps)))


def held_out_count(questions: int) -> int:
    """Questions held out to validate on: a fifth, at most MAX_HELD_OUT; none of fewer than 5."""
    return 0 if questions < 5 else min(MAX_HELD_OUT, questions // 5)


def check_corpus(corpus: Corpus) -> None:
    if len(corpus) < MIN_PASSAGES:
        raise UniragError(f"{corpus.source} holds {len(corpus)} passage(s); a docid model needs at least "
                          f"{MIN_PASSAGES}.")


def check_questions_path(path: str) -> None:
    if Path(path).stem in ("dev", "test", "validation"):
        raise UniragError(f"{path} looks like an evaluation split; build trains on its questions, so give training "
                          "questions (evaluate on the others with `eval`).")


def saved_state(out: Path) -> dict | None:
    """The trainer state of a checkpoint folder, or None when it holds none."""
    from unirag.joint.training import STATE_FILE

    path = out / STATE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UniragError(f"{path} is unreadable ({exc}); remove {out} or choose another --out.") from None


def check_out(out: Path, corpus: Corpus, config: Any) -> bool:
    """Whether `out` holds this build to continue (True) or nothing yet (False); an error when it holds another
    corpus's checkpoint, other settings or files that are no checkpoint."""
    if out.exists() and not out.is_dir():
        raise UniragError(f"--out {out} is a file; give a folder.")
    if not out.is_dir() or not any(out.iterdir()):
        return False
    state = saved_state(out)
    tree_file = out / "docid_tree.json"
    if state is None or not tree_file.is_file():
        raise UniragError(f"{out} holds files that are no build checkpoint; choose an empty or new folder.")
    built_for = json.loads(tree_file.read_text(encoding="utf-8")).get("corpus_fingerprint")
    if built_for != corpus.fingerprint:
        raise UniragError(f"{out} holds the checkpoint of another corpus (fingerprint {built_for}, this corpus "
                          f"{corpus.fingerprint}); choose another --out.")
    saved, wanted = state.get("config", {}), asdict(config)
    changed = sorted(k for k in wanted if k not in RESUMABLE_CHANGES and k in saved and saved[k] != wanted[k])
    if changed:
        raise UniragError(f"{out} was built with other settings ({', '.join(changed)}); rerun with the same ones "
                          "or choose another --out.")
    return True


# ------------------------------------------------------------------------------------------ progress


def current_bar() -> Any | None:
    """The tqdm bar started last among those open in this process (the training loops' own bars)."""
    from tqdm.std import tqdm as std_tqdm

    with std_tqdm.get_lock():
        bars = [b for b in list(getattr(std_tqdm, "_instances", ())) if getattr(b, "total", None)]
    return max(bars, key=lambda b: getattr(b, "start_t", 0.0), default=None)


_EPOCH = re.compile(r"stage 1 epoch (\d+)/(\d+)")
# Which of the training code's bars measure each phase (others, e.g. the teacher's embedding, are sub-steps).
PHASE_BARS = {"docid tree": "", "generated queries": "generating queries", "stage 1": "stage 1 epoch",
              "stage 2": "stage 2"}
# Seconds on this 2-core CPU, one torch thread (docs/build.md): what the estimate starts from before a bar runs.
SECONDS = {"tree_per_passage": 0.05, "tree_fixed": 15.0, "query_per_passage": 3.4, "cache_per_batch": 2.0,
           "stage1_per_batch": 2.9, "stage2_per_step": 9.0, "model_load": 20.0}


def bar_progress(phase: str, desc: str, n: int, total: int, seconds: float) -> tuple[float, float | None]:
    """(fraction of `phase` done, seconds left in it) from a bar, (0, None) when the bar is not the phase's own
    measure; stage 1's epochs count as one phase."""
    if not desc.startswith(PHASE_BARS.get(phase, desc)):
        return 0.0, None
    rate = n / seconds if seconds > 0 and n > 0 else None
    match = _EPOCH.search(desc)
    if match:
        epoch, epochs = int(match.group(1)), int(match.group(2))
        done, whole = (epoch - 1) * total + n, epochs * total
    else:
        done, whole = n, total
    left = (whole - done) / rate if rate else None
    return min(1.0, done / max(whole, 1)), left


def estimate_seconds(options: BuildOptions, passages: int, examples: int | None = None) -> dict[str, float]:
    """Expected seconds of each phase, from the corpus size and the measured rates (SECONDS)."""
    config = options.train
    generated = 6 * passages if options.generate_queries else 0  # ~6 of 8 samples a passage survive the filter
    examples = examples or config.pseudo_queries * passages + generated
    batches = math.ceil(examples / config.batch_size)
    epochs = config.stage1_epochs or scaled_epochs(examples, config.batch_size)
    estimates = {"docid tree": SECONDS["tree_fixed"] + SECONDS["tree_per_passage"] * passages,
                 "generated queries": SECONDS["model_load"] + SECONDS["query_per_passage"] * passages,
                 "stage 1": SECONDS["model_load"] + batches * (SECONDS["cache_per_batch"]
                                                               + epochs * SECONDS["stage1_per_batch"]),
                 "stage 2": SECONDS["stage2_per_step"] * config.stage2_steps}
    return {phase: round(estimates[phase], 1) for phase in options.phases}


def default_estimate(passages: int) -> float:
    """Expected seconds of a build with the default recipe (what the app's page announces before training)."""
    options = options_from_args(["--corpus", "corpus.jsonl", "--out", "ckpt"])
    return sum(estimate_seconds(options, passages).values())


class ProgressReporter:
    """Prints each phase and, given a file, rewrites a JSON snapshot of the job every second: the phase, its step
    among the phases, the open bar, the overall fraction and the seconds left (the open bar's rate for its phase,
    the estimates for the phases after it)."""

    def __init__(self, phases: list[str], path: str | Path | None = None, interval: float = 1.0,
                 estimates: dict[str, float] | None = None) -> None:
        self.phases = phases
        self.path = Path(path) if path else None
        self.interval = interval
        self.estimates = estimates or {}
        self.began = self.phase_began = time.time()
        self.status: dict[str, Any] = {"state": "running", "phase": phases[0], "step": 1, "steps": len(phases)}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ProgressReporter:
        if self.path is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True, name="build-progress")
            self._thread.start()
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if exc is not None:
            message = str(exc) if isinstance(exc, UniragError) else f"{type(exc).__name__}: {exc}"
            self.finish("failed", message)

    def phase(self, name: str) -> None:
        step = self.phases.index(name) + 1
        self.phase_began = time.time()
        self.status.update(phase=name, step=step, detail="", done=0, total=0)
        print(f"[build] step {step}/{len(self.phases)}: {name}", file=sys.stderr, flush=True)
        self.write()

    def _weights(self) -> list[float]:
        return [max(self.estimates.get(p, 1.0), 1.0) for p in self.phases]

    def snapshot(self) -> dict[str, Any]:
        if self.status["state"] != "running":
            return dict(self.status)
        phase, now = self.status["phase"], time.time()
        part, left = 0.0, None
        bar = current_bar()
        if bar is not None:
            desc, n, total = str(getattr(bar, "desc", "") or ""), int(bar.n), int(bar.total)
            part, left = bar_progress(phase, desc, n, total, now - bar.start_t)
            self.status.update(detail=desc, done=n, total=total)
        weights, index = self._weights(), self.phases.index(phase)
        if left is None:  # no measure yet: the estimate, never quite done
            spent = now - self.phase_began
            left = max(weights[index] - spent, 0.05 * weights[index])
            part = min(spent / weights[index], 0.95)
        self.status.update(fraction=round((sum(weights[:index]) + part * weights[index]) / sum(weights), 4),
                           seconds_left=round(left + sum(weights[index + 1:]), 1), elapsed=round(now - self.began, 1))
        return dict(self.status)

    def write(self) -> None:
        status = self.snapshot()
        if self.path is not None:
            write_json_atomic(self.path, status)

    def finish(self, state: str, message: str = "", **extra: Any) -> None:
        self.status.update(state=state, message=message, seconds_left=0 if state == "done" else None,
                           elapsed=round(time.time() - self.began, 1), **extra)
        if state == "done":
            self.status["fraction"] = 1.0
        self.write()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.write()
            except (OSError, RuntimeError):  # a bar closing while read, a full disk: the next tick retries
                continue


def read_progress(path: str | Path) -> dict[str, Any] | None:
    """The last snapshot a build wrote, or None before its first."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------ the job


def generated_queries_path(corpus: Corpus, options: BuildOptions) -> Path:
    """Where a corpus's generated queries live: the cache, by corpus and generator (a rerun continues them)."""
    from unirag.querygen import _adapter_digest

    digest = _adapter_digest(options.querygen_adapter) or "base"
    return cache_dir() / "generated" / f"{corpus.fingerprint}-{digest}-{options.querygen_style}.jsonl"


def generate_queries(corpus: Corpus, options: BuildOptions, banned: list[str]) -> str:
    """Generated queries for every passage (resumable), their file's path."""
    from unirag.querygen import SamplingConfig
    from unirag.querygen import generate_queries as sample

    config = options.train
    path = generated_queries_path(corpus, options)
    path.parent.mkdir(parents=True, exist_ok=True)
    adapter = options.querygen_adapter
    if not (Path(adapter) / "adapter_model.safetensors").is_file():
        raise UniragError(f"The query generator {adapter} is missing (adapter_model.safetensors); train it with "
                          "`python -m unirag querygen train` or build without --generate-queries.")
    summary = sample(config.corpus, adapter, str(path), SamplingConfig(passage_words=100, seed=config.seed),
                     banned, config.base_model, style=options.querygen_style)
    print(f"[build] generated queries: {json.dumps(summary)}", file=sys.stderr, flush=True)
    return str(path)


def split_questions(config: Any, corpus: Corpus) -> tuple[list[Question], list[Question], list[Question]]:
    """(held out, trained on, evaluation questions beside the file) of `--questions`; all empty without it."""
    from unirag.joint.training import evaluation_questions, held_out_split

    if not config.questions:
        return [], [], []
    questions = load_questions(config.questions, corpus)
    valid, train_qs = held_out_split(questions, config.seed, config.validation_questions)
    return valid, train_qs, evaluation_questions(config, corpus)


def banned_files(config: Any) -> list[str]:
    """The evaluation splits beside the questions file: no generated query may equal one of theirs."""
    if not config.questions:
        return []
    return [str(p) for split in ("dev", "test") if (p := Path(config.questions).with_name(f"{split}.jsonl")).is_file()]


def prepare(options: BuildOptions) -> tuple[Corpus, bool]:
    """The corpus and whether the build continues; every input checked before any model loads."""
    config = options.train
    if config.questions:
        check_questions_path(config.questions)
    if config.stage2_steps > 0 and not config.questions:
        raise UniragError("--stage2-steps trains the reader on question-answer pairs: give --questions.")
    if config.stage2_steps < 0:
        raise UniragError(f"--stage2-steps must be 0 or more (got {config.stage2_steps}).")
    corpus = load_corpus(config.corpus)
    check_corpus(corpus)
    if config.stage1_lora:
        config.adapter_in_retrieval = True  # as train: the stage-1 adapter serves retrieval
    return corpus, check_out(Path(config.out), corpus, config)


def run_build(options: BuildOptions, reporter: ProgressReporter | None = None) -> dict[str, Any]:
    """Tree, (generated queries,) stage 1 (and stage 2): the checkpoint in options.train.out and a summary."""
    from transformers import set_seed

    from unirag.docids import TreeConfig, load_or_build_tree
    from unirag.joint import training

    config = options.train
    corpus, resume = prepare(options)
    reporter = reporter or ProgressReporter(options.phases)
    reporter.estimates = estimate_seconds(options, len(corpus))
    minutes: dict[str, float] = {}
    clock = time.time()

    def lap(name: str) -> None:
        nonlocal clock
        minutes[name] = round((time.time() - clock) / 60, 2)
        clock = time.time()

    set_seed(config.seed)
    reporter.phase("docid tree")
    tree = load_or_build_tree(corpus, TreeConfig(k=config.tree_k, c=config.tree_c, seed=config.seed))
    valid, train_qs, evaluation = split_questions(config, corpus)
    lap("docid tree")
    if options.generate_queries:
        reporter.phase("generated queries")
        config.generated_queries = generate_queries(corpus, options, banned_files(config))
        lap("generated queries")
    examples = training.stage1_examples(corpus, train_qs, tree, config, evaluation=evaluation, validation=valid)
    if not config.stage1_epochs:
        config.stage1_epochs = scaled_epochs(len(examples), config.batch_size)
    reporter.estimates = estimate_seconds(options, len(corpus), len(examples))
    print(f"[build] {len(corpus)} passages, {len(examples)} stage-1 examples, {config.stage1_epochs} epochs, "
          f"{len(train_qs)} questions trained on, {len(valid)} held out; tree depth {tree.depth}",
          file=sys.stderr, flush=True)
    accelerator = training.make_accelerator()
    model, tokenizer, state = training.build_or_resume(config, corpus, tree, resume, accelerator)
    out = Path(config.out)
    reporter.phase("stage 1")
    if state["stage"] == 1 and state["epoch"] < config.stage1_epochs:
        state = training.run_stage1(model, tokenizer, corpus, tree, examples, valid, config, state, out, accelerator)
    lap("stage 1")
    if config.stage2_steps > 0 and (state["stage"] == 1 or state["step"] < config.stage2_steps):
        reporter.phase("stage 2")
        state = training.run_stage2(model, tokenizer, corpus, tree, examples, train_qs, valid, config, state, out,
                                    accelerator)
        lap("stage 2")
    summary = build_summary(corpus, config, examples, valid, train_qs, minutes, out)
    write_json_atomic(out / SUMMARY_FILE, summary, indent=1)
    return summary


def last_validation(out: Path) -> dict:
    """The held-out R@k of the last logged epoch or step that has one ({} without held-out questions)."""
    from unirag.joint.training import LOSS_LOG

    path = out / LOSS_LOG
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return next((r["valid"] for r in reversed(records) if r.get("valid")), {})


def build_summary(corpus: Corpus, config: Any, examples: list, valid: list, train_qs: list,
                  minutes: dict[str, float], out: Path) -> dict[str, Any]:
    """What was built, from what, and how long each phase took (this run's minutes; a resumed run's are partial)."""
    return {
        "checkpoint": str(out), "corpus": config.corpus, "corpus_fingerprint": corpus.fingerprint,
        "passages": len(corpus), "stage1_examples": len(examples), "stage1_epochs": config.stage1_epochs,
        "generated_queries": config.generated_queries or None, "questions_trained": len(train_qs),
        "questions_held_out": len(valid), "stage2_steps": config.stage2_steps, "minutes": minutes,
        "stage1_minutes_per_100_passages": round(100 * minutes.get("stage 1", 0.0) / max(len(corpus), 1), 2),
        "valid": last_validation(out), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


# ------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    """TrainConfig's flags with the recipe's defaults (epochs and held-out count scaled to the data when unset),
    `--questions` optional, plus the build's own."""
    from unirag.joint.training import TrainConfig

    parser = argparse.ArgumentParser(prog="python -m unirag build", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps = field_helps(TrainConfig)
    for f in fields(TrainConfig):
        flags = ["--" + f.name.replace("_", "-")] + (["--epochs"] if f.name == "stage1_epochs" else [])
        default = RECIPE.get(f.name, f.default)
        text = helps.get(f.name, "")
        if f.name in ("stage1_epochs", "validation_questions"):
            default, text = None, text + " (unset: scaled to the corpus / questions)"
        if f.type in ("bool", bool):
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif f.name in ("corpus", "out"):
            parser.add_argument(*flags, required=True, help=text)
        elif f.name == "questions":
            parser.add_argument(*flags, default="", help="question-answer pairs (JSONL, optional): trained on, some "
                                "held out to validate on; needed by --stage2-steps")
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(*flags, type=kind, default=default, help=text)
    parser.add_argument("--generate-queries", action="store_true",
                        help="sample generated queries for every passage first (~3 s a passage on a CPU)")
    parser.add_argument("--querygen-adapter", default=str(QUERYGEN_ADAPTER), help="the query generator's adapter")
    parser.add_argument("--querygen-style", default="nq", choices=["nq", "squad"],
                        help="generated questions like NQ's search queries or SQuAD's crowd questions")
    parser.add_argument("--progress-file", default=None, help="rewrite a JSON progress snapshot here every second")
    return parser


def field_helps(cls: type) -> dict[str, str]:
    """A config dataclass's --help texts: its fields' `help` metadata only. Source comments are lab notes for
    maintainers (e.g. which setting beat which in RESULTS.md), never CLI text."""
    return {f.name: f.metadata["help"] for f in fields(cls) if "help" in f.metadata}


def options_from_args(argv: list[str]) -> BuildOptions:
    from unirag.joint.training import TrainConfig

    args = vars(build_parser().parse_args(argv))
    own = {name: args.pop(name) for name in ("generate_queries", "querygen_adapter", "querygen_style",
                                             "progress_file")}
    if args["stage1_epochs"] is not None and args["stage1_epochs"] < 1:
        raise UniragError(f"--epochs must be at least 1 (got {args['stage1_epochs']}).")
    held_out = args.pop("validation_questions")
    config = TrainConfig(**args, validation_questions=held_out if held_out is not None else 0)
    config.stage1_epochs = args["stage1_epochs"] or 0  # 0: scaled once the examples are counted
    if held_out is None and config.questions:
        config.validation_questions = held_out_count(count_lines(config.questions))
    return BuildOptions(config, **own)


def count_lines(path: str) -> int:
    """Non-blank lines of a JSONL file (0 when it is missing: loading it says why)."""
    try:
        with open(path, "rb") as handle:
            return sum(1 for line in handle if line.strip())
    except OSError:
        return 0


def main(argv: list[str], run: Callable[[BuildOptions, ProgressReporter], dict] = run_build) -> int:
    options = options_from_args(argv)
    with ProgressReporter(options.phases, options.progress_file) as reporter:
        summary = run(options, reporter)
        reporter.finish("done", f"built {summary['checkpoint']}", summary=summary)
    print(json.dumps(summary), flush=True)
    return 0


# ------------------------------------------------------------------------------------------ the app's queue

LOCK_FILE = "build.lock"  # in the shared cache: one build at a time per machine, whichever server started it
JOB_PROGRESS, JOB_LOG = "build_progress.json", "build.log"
ACTIVE = ("queued", "waiting", "running")


@dataclass
class BuildJob:
    """One session's build: `python -m unirag build` in a subprocess, its files in the session's folder."""

    session: str
    corpus: Path
    out: Path
    folder: Path  # the session's folder: progress file, log and the build's own cache
    extra: tuple[str, ...] = ()
    state: str = "queued"  # queued, waiting (another server's build), running, done, failed, cancelled
    message: str = ""
    submitted: float = 0.0
    process: Any = None  # subprocess.Popen while running

    @property
    def progress_file(self) -> Path:
        return self.folder / JOB_PROGRESS

    @property
    def log_file(self) -> Path:
        return self.folder / JOB_LOG


def build_command(job: BuildJob) -> list[str]:
    return [sys.executable, "-m", "unirag", "build", "--corpus", str(job.corpus), "--out", str(job.out),
            "--progress-file", str(job.progress_file), *job.extra]


def build_threads() -> int:
    """Torch threads of an app's build: half the usable cores (one of two), the rest keep answering."""
    from unirag.runtime import usable_cpus

    return max(1, usable_cpus() // 2)


def isolated_env(folder: Path) -> dict[str, str]:
    """The build's environment: its own cache inside the session folder (embeddings, tree, stage-1 caches go when
    the session does) sharing the converted models of the main cache, and its thread count."""
    shared = cache_dir() / "models"
    shared.mkdir(parents=True, exist_ok=True)
    own = folder / "cache"
    own.mkdir(parents=True, exist_ok=True)
    if not (own / "models").exists():
        (own / "models").symlink_to(shared, target_is_directory=True)
    threads = str(build_threads())
    return {**os.environ, "UNIRAG_CACHE": str(own), "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def failure_message(job: BuildJob, code: int) -> str:
    """Why a build stopped: its progress file's message, else the CLI's `error:` line, else the exit code."""
    status = read_progress(job.progress_file) or {}
    if status.get("state") == "failed" and status.get("message"):
        return str(status["message"])
    try:
        lines = job.log_file.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    errors = [line[len("error: "):] for line in lines if line.startswith("error: ")]
    return errors[-1] if errors else f"the build stopped (exit {code}); its log is {job.log_file}"


class BuildQueue:
    """Builds one at a time, first come first served, in a worker thread; across servers on one machine a file
    lock in the shared cache serialises them too. One job a session."""

    def __init__(self, command: Callable[[BuildJob], list[str]] = build_command,
                 env: Callable[[Path], dict[str, str]] = isolated_env, lock_path: Path | None = None,
                 poll: float = 1.0) -> None:
        self.command, self.env, self.poll = command, env, poll
        self.lock_path = lock_path
        self._jobs: dict[str, BuildJob] = {}
        self._order: list[BuildJob] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._worker: threading.Thread | None = None

    def submit(self, session: str, corpus: Path, out: Path, folder: Path, extra: tuple[str, ...] = ()) -> BuildJob:
        with self._lock:
            current = self._jobs.get(session)
            if current is not None and current.state in ACTIVE:
                raise UniragError("This session's docid model is already training (or queued).")
            job = BuildJob(session, Path(corpus), Path(out), Path(folder), tuple(extra), submitted=time.time())
            self._jobs[session] = job
            self._order.append(job)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._run, daemon=True, name="unirag-build-queue")
                self._worker.start()
        self._wake.set()
        return job

    def job(self, session: str) -> BuildJob | None:
        return self._jobs.get(session)

    def position(self, job: BuildJob) -> int:
        """0 while it runs (or waits for the machine), else its place among the queued builds (1 = next)."""
        with self._lock:
            queued = [j for j in self._order if j.state == "queued"]
        return queued.index(job) + 1 if job in queued else 0

    def status(self, session: str) -> dict[str, Any] | None:
        """The session's build: state, queue position, message and the build's last progress snapshot."""
        job = self._jobs.get(session)
        if job is None:
            return None
        progress = read_progress(job.progress_file) if job.state in ("running", "done", "failed") else None
        return {"state": job.state, "position": self.position(job), "message": job.message, "out": str(job.out),
                "progress": progress or {}}

    def cancel(self, session: str, wait: float = 0.0) -> None:
        """Drop the session's build: out of the queue, or its process stopped (waited for up to `wait` seconds,
        so that the caller may delete its folder)."""
        with self._lock:
            job = self._jobs.pop(session, None)
            if job is None:
                return
            if job.state in ACTIVE:
                job.state, job.message = "cancelled", "cancelled"
            process = job.process
        if process is not None and process.poll() is None:
            process.terminate()  # the subprocess this queue started, by its own handle
            try:
                process.wait(timeout=wait) if wait else None
            except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired: it stops on its own later
                pass

    def _next(self) -> BuildJob | None:
        with self._lock:
            self._order = [j for j in self._order if j.state in ACTIVE]
            return next((j for j in self._order if j.state == "queued"), None)

    def _run(self) -> None:
        while True:
            job = self._next()
            if job is None:
                self._wake.wait(self.poll)
                self._wake.clear()
                continue
            self._build(job)

    def _build(self, job: BuildJob) -> None:
        import fcntl
        import subprocess

        lock_path = self.lock_path or cache_dir() / LOCK_FILE
        with open(lock_path, "a+") as lock:
            job.state = "waiting"
            while True:  # polled, not blocking: a cancelled job must not wait for the machine
                if job.state == "cancelled":
                    return
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    time.sleep(self.poll)
            try:
                self._start(job, subprocess)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _start(self, job: BuildJob, subprocess: Any) -> None:
        from unirag.paths import REPO_ROOT

        job.folder.mkdir(parents=True, exist_ok=True)
        job.progress_file.unlink(missing_ok=True)
        with self._lock:
            if job.state == "cancelled":
                return
            job.state = "running"
            with job.log_file.open("ab") as log:
                job.process = subprocess.Popen(self.command(job), stdout=log, stderr=subprocess.STDOUT,
                                               env=self.env(job.folder), cwd=REPO_ROOT, start_new_session=True)
        code = job.process.wait()
        with self._lock:
            if job.state == "cancelled":
                return
            job.state = "done" if code == 0 else "failed"
            job.message = "built" if code == 0 else failure_message(job, code)
