"""Orchestration behind the app: per-corpus lazy loading and one question through both systems.

    Pipeline(AppConfig.from_env())
      .bundle("nq")            corpus + dev questions, dense retriever, joint checkpoint (model + its docid tree),
                               and the settings it starts from (`InferenceSettings.from_existing`)
      .ask("nq", question, settings, baseline="bm25")  → Comparison(joint SideResult, the baseline's SideResult,
                                                                    gold question if from the dataset)

Several users at once: concurrent `ask` calls with the same corpus, settings and baseline are answered as one batch
(`unirag.batching`: each side's model reads the batch's questions together); a question alone streams as before.

The right-hand side is one of the `BASELINES` (dense RAG by default): each a named system of `unirag.systems`.

The RAG side never depends on the joint side: a missing checkpoint, an unimportable `unirag.joint` or an
error while decoding docids is reported in `Comparison.joint.error` / `CorpusBundle.joint_message` and the
dense RAG answer is still produced. Errors the user can fix are `UniragError`s with the command to run.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from unirag import runtime, streaming
from unirag.answer import Answer, display_answer
from unirag.batching import MAX_BATCH, Batcher, concurrent_requests
from unirag.data import DATASETS, Corpus, Question, dataset_paths, load_corpus, load_questions, prepare_question
from unirag.errors import UniragError
from unirag.eval import contains_answer, exact_match, normalize_answer, token_f1
from unirag.paths import REPO_ROOT, default_data_dir
from unirag.settings import InferenceSettings, check_precision
from unirag.systems import PAGE_BASELINES, RETRIEVER_OF, SPECS, build_system

log = logging.getLogger("unirag.app")

# Upper bound ZeroGPU reserves for one question (both sides); shorter reservations are scheduled sooner.
GPU_SECONDS = 120
REREAD_GPU_SECONDS = 60  # one re-read of both sides (no retrieval)
PRECISION_LABELS = {"4bit": "4-bit (HQQ, recovered)", "nf4": "4-bit NF4 (bitsandbytes, no recovery)", "fp32": "fp32"}
CORPUS_LABELS = {"nq": "Natural Questions", "squad": "SQuAD v1.1"}
# The right-hand side's choices (named systems of unirag.systems): label, and what its document scores are.
BASELINES = {name: SPECS[name].label for name in PAGE_BASELINES}
BASELINE_SCORES = {name: SPECS[name].scores for name in PAGE_BASELINES}

Progress = Callable[[str], None]
LOAD_STAGES = 7  # about how many `_say` stages a first load goes through (corpus, encoder, embeddings, LLM, joint…)


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def _whole_env(name: str, default: int) -> int:
    value = _env(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise UniragError(f"{name} must be a whole number, got {value!r}.") from None


def llm_tag(llm: str | None) -> str:
    """Short name of the base LLM used in checkpoint folder names: `nq-smollm2`, `nq-qwen3-4b-instruct-2507`."""
    if llm in (None, "", "embedded") or str(llm).startswith("embedded:"):
        return "smollm2"
    name = Path(str(llm).rstrip("/")).name.lower()
    return re.sub(r"[^a-z0-9.]+", "-", name).strip("-") or "llm"


@dataclass
class AppConfig:
    """Where models, checkpoints and data come from (not how a question is answered: that is
    `unirag.settings.InferenceSettings`). Every field has an environment variable (for HF Spaces)."""

    llm: str | None = None  # UNIRAG_LLM: hub id or folder; None = embedded SmolLM2-135M
    encoder: str | None = None  # UNIRAG_ENCODER: hub id, "dpr", or None = embedded all-MiniLM-L6-v2
    precision: str = "4bit"  # UNIRAG_PRECISION: "4bit" (recovered, HQQ), "nf4" (no recovery) or "fp32"
    checkpoint_dir: Path = field(default_factory=lambda: REPO_ROOT / "checkpoints")  # UNIRAG_CHECKPOINT_DIR
    data_dir: Path | None = None  # UNIRAG_DATA (else ../shared/data when it exists, else the repo's data/)
    corpora: tuple[str, ...] = DATASETS
    n_examples: int = 12
    # UNIRAG_PARALLEL_SIDES=0 answers the two sides one after the other. Together (the default) each side
    # runs on its own thread and core: the two models are separate, so a round trip costs the slower side.
    parallel_sides: bool = True
    # UNIRAG_MAX_BATCH: questions asked at once that are answered as one batch (1 answers them one at a time).
    max_batch: int = MAX_BATCH
    # "cuda" on a GPU Space (and on ZeroGPU, where `spaces` emulates CUDA at load time), else "cpu".
    device: str = field(default_factory=runtime.device)

    def __post_init__(self) -> None:
        self.precision = check_precision(self.precision)
        self.checkpoint_dir = Path(self.checkpoint_dir)
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise UniragError(f"max_batch must be a whole number of at least 1, got {self.max_batch!r}.")
        unknown = [c for c in self.corpora if c not in DATASETS]
        if unknown:
            raise UniragError(f"Unknown corpus {unknown[0]!r}: choose from {', '.join(DATASETS)}.")

    @classmethod
    def from_env(cls, **overrides: Any) -> AppConfig:
        values: dict[str, Any] = {
            "llm": _env("UNIRAG_LLM"),
            "encoder": _env("UNIRAG_ENCODER"),
            "precision": _env("UNIRAG_PRECISION") or "4bit",
            "checkpoint_dir": Path(_env("UNIRAG_CHECKPOINT_DIR") or REPO_ROOT / "checkpoints"),
            "data_dir": Path(p) if (p := _env("UNIRAG_DATA")) else None,
            "parallel_sides": (_env("UNIRAG_PARALLEL_SIDES") or "1").lower() not in ("0", "false", "no"),
            "max_batch": _whole_env("UNIRAG_MAX_BATCH", MAX_BATCH),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def precision_label(self) -> str:
        return PRECISION_LABELS[self.precision]

    def data_root(self) -> Path:
        return Path(self.data_dir) if self.data_dir else default_data_dir()

    def checkpoint_candidates(self, corpus: str) -> list[Path]:
        root = self.checkpoint_dir
        first = root / f"{corpus}-{llm_tag(self.llm)}"
        others = [Path(p) for p in sorted(glob.glob(str(root / f"{corpus}-*"))) if Path(p) != first]
        return [first, *others]

    def find_checkpoint(self, corpus: str) -> Path | None:
        for path in self.checkpoint_candidates(corpus):
            if (path / "joint_config.json").is_file():
                return path
        return None

    def train_command(self, corpus: str) -> str:
        data = self.data_root() / corpus
        out = self.checkpoint_candidates(corpus)[0]
        llm = f" --base-model {self.llm}" if self.llm else ""
        return (f"python -m unirag train --corpus {_rel(data / 'corpus.jsonl')} --questions "
                f"{_rel(data / 'train.jsonl')}{llm} --out {_rel(out)}")


def _rel(path: Path) -> str:
    """A path relative to the working directory when that is shorter (`../shared/data/nq/corpus.jsonl`)."""
    path = Path(path)
    try:
        rel = os.path.relpath(path.resolve(), Path.cwd())
    except ValueError:  # another drive
        return str(path)
    return rel if len(rel) < len(str(path)) or not path.is_absolute() else str(path)


# --------------------------------------------------------------------------------------------- results


@dataclass
class SideResult:
    """One system's answer for one question, or why there is none."""

    answer: Answer | None = None
    error: str | None = None
    gold_found: bool | None = None  # None when the question is not from the dataset
    gold_rank: int | None = None  # 1-based rank of the gold passage among the selected documents
    correct: bool | None = None  # contains_answer on the raw output, None when not from the dataset
    # On the displayed answer span (`display_answer`), normalised: exact match and token F1 against the best gold.
    exact: bool | None = None
    f1: float | None = None
    # Joint side, dev questions whose answer is located in the gold passage: the passage's answer sentence and
    # the retrieval heads' sentence ranking on it (unirag.answer_sentences.SentenceLocalization).
    localization: Any = None


@dataclass
class Comparison:
    corpus: str
    question: str
    gold: Question | None
    joint: SideResult
    rag: SideResult  # the baseline's answer (`baseline` names it)
    settings: InferenceSettings = field(default_factory=InferenceSettings)
    baseline: str = "rag"

    @property
    def baseline_title(self) -> str:
        """The right-hand card's title: the baseline and how many documents it read."""
        s = self.settings
        if self.baseline == "rag-selfcheck":
            return f"{BASELINES[self.baseline]} · top-{s.k_docs} of {s.documents_searched}"
        if self.baseline == "evidence":
            return f"{BASELINES[self.baseline]} · from top-{s.evidence_docs}"
        return f"{BASELINES[self.baseline]} · top-{s.rag_k}"


@dataclass
class CorpusBundle:
    """Everything loaded for one corpus."""

    name: str
    corpus: Corpus
    questions: list[Question]
    rag: Any  # RagSystem: dense RAG, the default baseline
    tree: Any = None  # DocidTree: the checkpoint's, else the cached one (for the tree tab)
    tree_source: str = ""
    joint: Any = None  # JointSystem (the loaded model, tree and corpus) or None
    joint_message: str | None = None  # why the joint side is unavailable (shown on the page)
    # The settings the page starts from: the checkpoint's recommended setting for the precision, else defaults.
    settings: InferenceSettings = field(default_factory=InferenceSettings)
    # The right-hand side it starts with: the store's best base-reader baseline for this corpus and precision.
    baseline_default: str = "rag"
    baseline_reason: str = ""
    checkpoint: Path | None = None
    load_seconds: float = 0.0
    # BASELINES name → system answering like `rag` (answer / read); rag-selfcheck and evidence run on the
    # joint model, so they exist only when it is loaded.
    baselines: dict[str, Any] = field(default_factory=dict)
    _by_text: dict[str, Question] = field(default_factory=dict, repr=False)
    _joint_system: Any = field(default=None, repr=False)

    @property
    def joint_system(self) -> Any:
        """The named system "joint" on the loaded joint model (the page's left side), or None."""
        if self.joint is None:
            return None
        if self._joint_system is None or self._joint_system.joint is not self.joint:
            self._joint_system = build_system("joint", self.corpus, joint=self.joint)
        return self._joint_system

    def __post_init__(self) -> None:
        for q in self.questions:
            self._by_text.setdefault(normalize_answer(q.question), q)
        self.baselines.setdefault("rag", self.rag)

    def baseline(self, name: str) -> Any:
        """The loaded baseline `name`; a UniragError says why one is missing."""
        _check_baseline(name)
        if name not in self.baselines:
            why = self.joint_message or "The joint model is not loaded."
            raise UniragError(f"{BASELINES[name]} runs on the joint model: {why}")
        return self.baselines[name]

    def match(self, question: str) -> Question | None:
        """The dataset question with this text (case and punctuation insensitive), if any."""
        return self._by_text.get(normalize_answer(question))

    def examples(self, n: int = 12) -> list[str]:
        """Up to n dev questions spread over the file (deterministic), with a gold passage and a short answer."""
        usable = [q for q in self.questions if q.doc_id and q.answers and len(q.question) <= 120]
        if len(usable) <= n:
            return [q.question for q in usable]
        step = len(usable) / n
        return [usable[int(i * step)].question for i in range(n)]

    def titles(self) -> dict[str, str]:
        return {p.id: p.title for p in self.corpus}

    def texts(self) -> dict[str, tuple[str, str]]:
        return {p.id: (p.title, p.text) for p in self.corpus}


# --------------------------------------------------------------------------------------------- pipeline


class Pipeline:
    """Lazy, thread-safe loading per corpus and the side-by-side answer of both systems."""

    def __init__(self, config: AppConfig | None = None, progress: Progress | None = None):
        self.config = config or AppConfig.from_env()
        self._progress = progress
        self._bundles: dict[str, CorpusBundle] = {}
        self._errors: dict[str, str] = {}
        self._stage: dict[str, str] = {}
        self._stage_count: dict[str, int] = {}  # stages reached in the current load: the banner's percentage
        self._locks = {name: threading.Lock() for name in self.config.corpora}
        self._llm_lock = threading.Lock()
        # One forward pass per model at a time (the RAG reader is shared by all corpora).
        self._side_locks = {"joint": threading.Lock(), "rag": threading.Lock()}
        self._reader = None
        self._encoder = None
        self._worker: ThreadPoolExecutor | None = None
        # Concurrent asks → batches, one batch at a time (key: corpus, settings, baseline; item: bundle, question).
        self.batcher: Batcher[tuple[str, InferenceSettings, str], tuple[CorpusBundle, str], Comparison] = Batcher(
            self._answer_batch, self._answer_alone, max_batch=self.config.max_batch, name="unirag-ask")

    @property
    def ask_concurrency(self) -> int:
        """Asks the web server should let in at once: a batch answering and the next one gathering."""
        return concurrent_requests(self.config.max_batch)

    def side_lock(self, side: str) -> threading.Lock:
        """The lock of a side's model ("joint" or "rag", the base LLM every corpus and upload shares): hold it
        around any forward pass on that model made outside `ask` / `reask`."""
        return self._side_locks[side]

    # ------------------------------------------------------------------------- status / progress

    def _say(self, corpus: str, message: str) -> None:
        self._stage[corpus] = message
        self._stage_count[corpus] = self._stage_count.get(corpus, 0) + 1
        print(f"[unirag] {corpus}: {message}", flush=True)
        if self._progress is not None:
            self._progress(f"{corpus}: {message}")

    def status(self) -> dict[str, Any]:
        """Per corpus: "ready" / "loading the model (n%): <stage>" / "error: <message>" / "not loaded"; plus page
        messages."""
        corpora = {}
        for name in self.config.corpora:
            if name in self._bundles:
                corpora[name] = "ready"
            elif name in self._errors:
                corpora[name] = f"error: {self._errors[name]}"
            elif name in self._stage:  # a rough percentage: stages reached of the usual count, never 100 before ready
                done = min(95, round(100 * (self._stage_count.get(name, 1) - 1) / LOAD_STAGES))
                corpora[name] = f"loading the model ({done}%): {self._stage[name]}"
            else:
                corpora[name] = "not loaded"
        return {
            "precision": self.config.precision_label,
            "llm": self.config.llm or "embedded SmolLM2-135M-Instruct",
            "encoder": self.config.encoder or "embedded all-MiniLM-L6-v2",
            "corpora": corpora,
            "messages": self.messages(),
        }

    def messages(self) -> list[str]:
        out = []
        for name in self.config.corpora:
            if name in self._errors:
                out.append(f"{CORPUS_LABELS[name]}: {self._errors[name]}")
            elif name in self._bundles and self._bundles[name].joint_message:
                out.append(f"{CORPUS_LABELS[name]}: {self._bundles[name].joint_message}")
        return out

    def loaded(self, name: str) -> CorpusBundle | None:
        return self._bundles.get(name)

    # ------------------------------------------------------------------------- loading

    def shared_reader(self, corpus: str):
        """The base LLM for the dense-RAG side (shared by all corpora and uploads), loaded once; `corpus` names
        who asked, in the progress messages."""
        with self._llm_lock:
            if self._reader is None:
                from unirag.backbones import load_llm
                from unirag.rag import Reader

                self._say(corpus, f"loading the LLM ({self.status()['llm']}, {self.config.precision_label})…")
                model, tokenizer = load_llm(self.config.llm, precision=self.config.precision,
                                            device=self.config.device)
                self._reader = Reader(model, tokenizer)
            return self._reader

    def shared_encoder(self, corpus: str):
        """The sentence encoder of the dense side (shared by all corpora and uploads), loaded once."""
        with self._llm_lock:
            if self._encoder is None:
                from unirag.backbones import SentenceEncoder

                self._say(corpus, "loading the sentence encoder…")
                self._encoder = SentenceEncoder(self.config.encoder)
            return self._encoder

    def bundle(self, name: str) -> CorpusBundle:
        """Load (once) and return a corpus with its systems. Raises UniragError with what to run if it can't."""
        if name not in self._locks:
            raise UniragError(f"Unknown corpus {name!r}: choose from {', '.join(self.config.corpora)}.")
        if name in self._bundles:
            return self._bundles[name]
        with self._locks[name]:
            if name in self._bundles:
                return self._bundles[name]
            self._errors.pop(name, None)
            self._stage_count[name] = 0
            try:
                bundle = self._load(name)
            except UniragError as exc:
                self._errors[name] = str(exc)
                self._say(name, f"failed: {exc}")
                raise
            except Exception as exc:  # keep the server alive; show the cause on the page
                log.exception("loading %s failed", name)
                self._errors[name] = f"{type(exc).__name__}: {exc}"
                self._say(name, f"failed: {type(exc).__name__}: {exc}")
                raise UniragError(f"Loading {name} failed ({type(exc).__name__}: {exc}); see the console.") from None
            self._bundles[name] = bundle
            return bundle

    def _load(self, name: str) -> CorpusBundle:
        from unirag.docids import corpus_embeddings
        from unirag.rag import DenseRetriever
        from unirag.sparse import BM25Retriever, HybridRetriever

        start = time.perf_counter()
        self._say(name, "reading the corpus and dev questions…")
        try:
            corpus_path, dev_path = dataset_paths(name, "dev", self.config.data_root())
        except UniragError as exc:
            raise UniragError(f"{exc} The app needs the corpora: the repo's `data/` folder, `../shared/data` "
                              "or `UNIRAG_DATA`.") from None
        corpus = load_corpus(corpus_path)
        for notice in corpus.notices:  # e.g. passages truncated at load
            self._say(name, notice)
        questions = load_questions(dev_path, corpus)
        encoder = self.shared_encoder(name)
        self._say(name, f"embedding {len(corpus):,} passages (cached after the first run)…")
        embeddings = corpus_embeddings(corpus, encoder, progress=True)
        retriever = DenseRetriever(corpus, encoder, embeddings)
        reader = self.shared_reader(name)
        self._say(name, "indexing the corpus for BM25…")
        bm25 = BM25Retriever(corpus)  # in memory: well under a second for the shipped corpora
        rankers = {"dense": retriever, "bm25": bm25, "hybrid": HybridRetriever(retriever, bm25)}
        rag = build_system("rag", corpus, reader=reader, retriever=retriever)
        bundle = CorpusBundle(name, corpus, questions, rag, settings=InferenceSettings(precision=self.config.precision))
        self._load_joint(bundle)
        self._apply_store_baseline(bundle)
        # Every right-hand choice is a named system; those on the joint model use its own base LLM (and passage
        # cache), so no second LLM is loaded, and exist only when it is.
        for baseline in PAGE_BASELINES:
            if SPECS[baseline].reader == "joint" and bundle.joint is None:
                continue
            bundle.baselines[baseline] = build_system(
                baseline, corpus, reader=reader, retriever=rankers.get(RETRIEVER_OF.get(baseline, "")),
                joint=bundle.joint, encoder=encoder)  # evidence's lookahead shares the encoder: no 2nd MiniLM
        if bundle.tree is None:
            from unirag.docids import TreeConfig, load_or_build_tree

            self._say(name, "building the docid tree for the corpus tab (cached)…")
            config = TreeConfig(encoder=self.config.encoder or TreeConfig.encoder)
            bundle.tree = load_or_build_tree(corpus, config, encoder=encoder, progress=True)
            bundle.tree_source = "cache (k-means over the encoder's embeddings)"
        bundle.load_seconds = time.perf_counter() - start
        self._say(name, f"ready in {bundle.load_seconds:.1f} s")
        return bundle

    def _load_joint(self, bundle: CorpusBundle) -> None:
        name = bundle.name
        ckpt = self.config.find_checkpoint(name)
        if ckpt is None:
            looked = _rel(self.config.checkpoint_candidates(name)[0])
            bundle.joint_message = (
                f"No joint checkpoint found (looked for `{looked}/joint_config.json`). Train one with "
                f"`{self.config.train_command(name)}`; until then only the dense RAG column answers."
            )
            self._say(name, "no joint checkpoint: " + bundle.joint_message)
            return
        try:
            from unirag.joint import JointSystem
        except ImportError as exc:
            bundle.joint_message = (f"The joint model code is not importable ({exc}); only the dense RAG column "
                                    "answers. Reinstall with `make install`.")
            self._say(name, bundle.joint_message)
            return
        try:
            self._say(name, f"loading the joint checkpoint {_rel(ckpt)} ({self.config.precision_label})…")
            bundle.joint = JointSystem.from_checkpoint(ckpt, bundle.corpus, precision=self.config.precision,
                                                       base_model=self.config.llm, device=self.config.device)
            bundle.tree, bundle.tree_source, bundle.checkpoint = bundle.joint.tree, f"checkpoint {_rel(ckpt)}", ckpt
            self._attach_passage_cache(bundle)
            self._apply_recommended(bundle, ckpt)
        except UniragError as exc:
            bundle.joint_message = f"The joint checkpoint {_rel(ckpt)} could not be loaded: {exc}"
            self._say(name, bundle.joint_message)
        except Exception as exc:  # a broken checkpoint must not take the RAG column down with it
            log.exception("joint checkpoint %s failed to load", ckpt)
            bundle.joint_message = (f"The joint checkpoint {_rel(ckpt)} could not be loaded "
                                    f"({type(exc).__name__}: {exc}).")
            self._say(name, bundle.joint_message)

    def _attach_passage_cache(self, bundle: CorpusBundle) -> None:
        """Use the self-check passage cache when one was built for this base, precision and corpus (`python -m
        unirag index --self-check-cache`); the app never builds it (a pass over every passage)."""
        from unirag.joint.passage_cache import PassageCache

        cache = PassageCache.find(bundle.joint.model, bundle.corpus)
        bundle.joint.passage_cache = cache
        if cache is not None:
            self._say(bundle.name, f"self-check reads the passage cache {cache.path}")

    def _apply_recommended(self, bundle: CorpusBundle, ckpt: Path) -> None:
        """The checkpoint's measured setting for the app's precision: what the page and the API start from."""
        try:
            bundle.settings = InferenceSettings.from_existing(
                ckpt, self.config.precision, passage_cache=bundle.joint.passage_cache is not None)
        except UniragError as exc:  # a bad settings file must not take the model down: report it, use defaults
            bundle.settings = InferenceSettings(precision=self.config.precision)
            self._say(bundle.name, f"ignoring the checkpoint's recommended settings: {exc}")
            return
        self._say(bundle.name, f"settings: {bundle.settings.to_dict()}")
        for notice in bundle.settings.notices:
            self._say(bundle.name, notice)

    def _apply_store_baseline(self, bundle: CorpusBundle) -> None:
        """Start the right-hand side on the store's best baseline row for this corpus and precision (its system
        and k), so the page shows the comparison the results report makes."""
        try:
            from unirag.results import load_store

            best = best_baseline(load_store(corpus=bundle.name), self.config.precision, bundle.corpus.fingerprint)
        except UniragError as exc:  # a broken store must not stop the page: dense RAG as before
            self._say(bundle.name, f"results store unreadable, the baseline starts as dense RAG: {exc}")
            return
        if best is None:
            return
        bundle.baseline_default = best["system"]
        bundle.settings = bundle.settings.replace(rag_k=best["rag_k"])
        bundle.baseline_reason = (f"{BASELINES[best['system']]} top-{best['rag_k']}: the best baseline row in the "
                                  f"results store for {bundle.name} {best['split']} in {self.config.precision} "
                                  f"(F1 {best['f1']:.3f}, run {best['run']!r})")
        self._say(bundle.name, f"baseline: {bundle.baseline_reason}")

    def start_settings(self, name: str) -> InferenceSettings:
        """The settings a loaded corpus starts from (defaults before it is loaded)."""
        bundle = self.loaded(name)
        return bundle.settings if bundle is not None else InferenceSettings(precision=self.config.precision)

    def preload(self, names: list[str] | None = None) -> threading.Thread:
        """Load corpora in a background thread (progress on the console and in `status()`)."""

        def run() -> None:
            with runtime.all_cores():  # the server answers nothing until the first corpus is loaded
                for name in names or list(self.config.corpora[:1]):
                    try:
                        self.bundle(name)
                    except UniragError:
                        pass  # recorded in status()

        thread = threading.Thread(target=run, name="unirag-preload", daemon=True)
        thread.start()
        return thread

    # ------------------------------------------------------------------------- answering

    def ask(self, name: str, question: str, settings: InferenceSettings | None = None, baseline: str | None = None,
            **changes: Any) -> Comparison:
        """The joint model and the `baseline` (one of BASELINES) on one question, with `settings` (default: the
        corpus's start settings) and `changes` to them (validated). Bad input raises UniragError; a failing side is
        reported in its result.

        Calls from several threads at once with the same corpus, settings and baseline are answered as one batch
        (`unirag.batching`); a call alone in its batch is answered as it always was, streaming included."""
        text, _ = prepare_question(question)
        if baseline is not None:
            _check_baseline(baseline)
        bundle = self.bundle(name)  # loading stays outside the GPU call: ZeroGPU wants models placed at load time
        baseline = baseline or bundle.baseline_default
        settings = (settings or bundle.settings).replace(**changes)
        return self.batcher.submit((bundle.name, settings, baseline), (bundle, text))

    def _answer_alone(self, key: tuple[str, InferenceSettings, str], item: tuple[CorpusBundle, str]) -> Comparison:
        _, settings, baseline = key
        bundle, text = item
        return answer_on_device(self, bundle, text, settings, baseline)

    def _answer_batch(self, key: tuple[str, InferenceSettings, str],
                      items: list[tuple[CorpusBundle, str]]) -> list[Comparison]:
        _, settings, baseline = key
        return answer_many_on_device(self, items[0][0], [text for _, text in items], settings, baseline)

    def ask_stream(self, name: str, question: str, settings: InferenceSettings | None = None,
                   baseline: str | None = None, **changes: Any) -> Iterator[streaming.Event | Comparison]:
        """`ask`, yielding its progress as it happens: `streaming.Event`s (the docid search level by level, each
        side's answer token by token), then the `Comparison`. Errors are raised as `ask` raises them. A question
        answered in a batch with others (users asking at once) yields no events: its `Comparison` comes whole."""
        stream = streaming.Stream()
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                with stream.side("page"):
                    outcome["comparison"] = self.ask(name, question, settings, baseline, **changes)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread below
                outcome["error"] = exc
            finally:
                stream.close()

        worker = threading.Thread(target=work, name="unirag-ask", daemon=True)
        worker.start()
        yield from stream.events()
        worker.join()
        if "error" in outcome:
            raise outcome["error"]
        yield outcome["comparison"]

    def _answer(self, bundle: CorpusBundle, text: str, settings: InferenceSettings,
                baseline: str = "rag") -> Comparison:
        joint = bundle.joint_system
        rag_run = partial(_baseline_answer, bundle, baseline, text, settings)  # a missing baseline: on its card
        return self._both_sides(bundle, text, settings,
                                None if joint is None else partial(joint.answer, text, settings), rag_run, baseline)

    def _answer_many(self, bundle: CorpusBundle, texts: list[str], settings: InferenceSettings,
                     baseline: str = "rag") -> list[Comparison]:
        """`_answer` for several questions: each side answers them as one batch (the joint model's batched docid
        search and reading, the baseline's batched reader), the two sides at once as in `_both_sides`. A side whose
        batch fails answers its questions one at a time, so an error lands on its own question's card."""
        golds = [bundle.match(text) for text in texts]
        joint_side: Future[list[SideResult]] | None = None
        if bundle.joint_system is None:
            message = bundle.joint_message or "The joint model is not loaded."
            joint_results = [SideResult(error=message) for _ in texts]
        else:
            run_joint = partial(self._joint_sides, bundle, texts, settings, golds)
            if self.config.parallel_sides:
                joint_side = self._joint_worker().submit(run_joint)
            else:
                joint_results = run_joint()
        uses_joint = getattr(bundle.baselines.get(baseline), "joint", None) is not None  # waits, as in _both_sides
        rag_results = self._sides_many(
            "joint" if uses_joint else "rag", partial(_baseline_answers, bundle, baseline, texts, settings),
            [partial(_baseline_answer, bundle, baseline, text, settings) for text in texts], golds)
        if joint_side is not None:
            joint_results = joint_side.result()
        from unirag.backbones import release_memory

        release_memory(collect=False)
        return [Comparison(bundle.name, text, gold, joint, rag, settings, baseline)
                for text, gold, joint, rag in zip(texts, golds, joint_results, rag_results, strict=True)]

    def _joint_sides(self, bundle: CorpusBundle, texts: list[str], settings: InferenceSettings,
                     golds: list[Question | None]) -> list[SideResult]:
        system = bundle.joint_system
        results = self._sides_many("joint", partial(system.answer_batch, texts, settings),
                                   [partial(system.answer, text, settings) for text in texts], golds)
        return [self._localized(bundle, result, gold) for result, gold in zip(results, golds, strict=True)]

    def _sides_many(self, side: str, run_many: Callable[[], list[Answer]], singles: Sequence[Callable[[], Answer]],
                    golds: Sequence[Question | None]) -> list[SideResult]:
        """One side's batch; if it fails, each question alone (`_side`), so the error reaches only its card."""
        try:
            with self._side_locks[side]:
                answers = run_many()
        except Exception:  # noqa: BLE001 - which question failed is unknown: ask each alone
            log.warning("the %s side's batch failed; answering its questions one at a time:\n%s", side,
                        traceback.format_exc())
            return [self._side(side, run, gold) for run, gold in zip(singles, golds, strict=True)]
        return [mark_gold(answer, gold) for answer, gold in zip(answers, golds, strict=True)]

    def _both_sides(self, bundle: CorpusBundle, text: str, settings: InferenceSettings,
                    joint_run: Callable[[], Answer] | None, rag_run: Callable[[], Answer],
                    baseline: str = "rag") -> Comparison:
        """Both sides on one question, at once on two threads (parallel_sides); a failing side is reported on its
        card, never raised (the other side still answers)."""
        gold = bundle.match(text)
        comparison = Comparison(bundle.name, text, gold, SideResult(), SideResult(), settings, baseline)
        joint_side: Future[SideResult] | None = None
        stream = streaming.current()
        if stream is not None:  # someone watches (`ask_stream`): each side's events under its own name
            joint_run = None if joint_run is None else stream.bind("joint", joint_run)
            rag_run = stream.bind("rag", rag_run)
        if joint_run is None:
            comparison.joint.error = bundle.joint_message or "The joint model is not loaded."
        else:
            run_joint = partial(self._joint_side, bundle, joint_run, gold)
            if self.config.parallel_sides:
                joint_side = self._joint_worker().submit(run_joint)
            else:
                comparison.joint = run_joint()
        # A baseline on the joint model (rag-selfcheck) waits for the joint side: one forward pass per model.
        uses_joint = getattr(bundle.baselines.get(baseline), "joint", None) is not None
        comparison.rag = self._side("joint" if uses_joint else "rag", rag_run, gold)
        if joint_side is not None:
            comparison.joint = joint_side.result()
        from unirag.backbones import release_memory

        release_memory(collect=False)  # attention traces and KV caches leave freed heap pages behind
        return comparison

    def find_document(self, name: str, text: str) -> str:
        """The corpus id a user typed: an id ("d12"), else a title (exact, else the one title containing it)."""
        corpus = self.bundle(name).corpus
        query = (text or "").strip()
        if not query:
            raise UniragError("Give a document id (e.g. one shown on a card) or a title.")
        if query in corpus:
            return query
        folded = query.casefold()
        exact = [p.id for p in corpus if p.title.casefold() == folded]
        if exact:
            return exact[0]
        partial = [p for p in corpus if folded in p.title.casefold()]
        if len(partial) == 1:
            return partial[0].id
        if partial:
            shown = "; ".join(f"{p.id} ({p.title})" for p in partial[:5])
            raise UniragError(f"{len(partial)} titles contain {query!r} (e.g. {shown}): give the document id.")
        raise UniragError(f"No document {query!r} in the {CORPUS_LABELS.get(name, name)} corpus (neither an id nor "
                          "a title).")

    def reask(self, name: str, question: str, settings: InferenceSettings | None = None,
              joint_docs: Sequence[str | tuple[str, float]] | None = None,
              rag_docs: Sequence[str | tuple[str, float]] | None = None, note: str | None = None,
              baseline: str = "rag", **changes: Any) -> Comparison:
        """Both sides re-read `question` from the given documents (ids, or (id, score) pairs), without a new
        retrieval: how the answer depends on a document removed or forced. A side given None answers as in `ask`.
        `note` (e.g. "re-read without d12") is added to each re-read answer's notices. Ids not in the corpus are a
        UniragError."""
        text, _ = prepare_question(question)
        _check_baseline(baseline)
        bundle = self.bundle(name)
        settings = (settings or bundle.settings).replace(**changes)
        joint_pairs = None if joint_docs is None else _doc_pairs(bundle.corpus, joint_docs)
        rag_pairs = None if rag_docs is None else _doc_pairs(bundle.corpus, rag_docs)
        return reread_on_device(self, bundle, text, settings, joint_pairs, rag_pairs, note, baseline)

    def _reread(self, bundle: CorpusBundle, text: str, settings: InferenceSettings,
                joint_pairs: DocPairs | None, rag_pairs: DocPairs | None,
                note: str | None, baseline: str = "rag") -> Comparison:
        joint = bundle.joint_system

        def noted(run: Callable[[], Answer]) -> Callable[[], Answer]:
            def wrapped() -> Answer:
                answer = run()
                if note:
                    answer.notices.insert(0, note)
                return answer
            return wrapped

        joint_run = None
        if joint is not None:
            if joint_pairs is None:
                joint_run = partial(joint.answer, text, settings)
            else:
                joint_run = noted(lambda: joint.read(text, joint_pairs, settings))
        def rag_run() -> Answer:
            rag = bundle.baseline(baseline)
            if rag_pairs is None:
                return rag.answer(text, settings, with_attention=True)
            return noted(lambda: rag.read(text, rag_pairs, settings, with_attention=True))()

        return self._both_sides(bundle, text, settings, joint_run, rag_run, baseline)

    def _joint_worker(self) -> ThreadPoolExecutor:
        with self._llm_lock:
            if self._worker is None:
                self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unirag-joint")
            return self._worker

    def _joint_side(self, bundle: CorpusBundle, run: Callable[[], Answer], gold: Question | None) -> SideResult:
        """The joint side, and for a dev question its gold passage's sentence localization (one more prefill)."""
        return self._localized(bundle, self._side("joint", run, gold), gold)

    def _localized(self, bundle: CorpusBundle, result: SideResult, gold: Question | None) -> SideResult:
        if result.answer is not None and gold is not None and gold.doc_id in bundle.corpus:
            result.localization = self._localize(bundle, gold)
        return result

    def _localize(self, bundle: CorpusBundle, gold: Question) -> Any:
        """The retrieval heads' sentence ranking on the gold passage; None when the answer is not located in it
        or the model cannot say (localization is extra: it never fails a request)."""
        passage = bundle.corpus[gold.doc_id]
        try:  # the splitter (pysbd) is imported here: an environment without it still answers
            from unirag.answer_sentences import answer_sentence, split_sentences
            from unirag.joint.passage_attention import retrieval_heads_localization

            if answer_sentence(passage.text, gold.answers, split_sentences(passage.text)) is None:
                return None  # no model pass for an answer that is not in the passage
            with self._side_locks["joint"]:
                return retrieval_heads_localization(bundle.joint.model, bundle.joint.tokenizer, gold.question,
                                                    gold.answers, passage)
        except Exception:  # localization is extra: the answers stand without it
            log.warning("localization failed:\n%s", traceback.format_exc())
            return None

    def _side(self, side: str, run: Callable[[], Answer], gold: Question | None) -> SideResult:
        try:
            with self._side_locks[side]:
                answer = run()
        except UniragError as exc:
            return SideResult(error=str(exc))
        except Exception as exc:  # one side failing must not kill the request, the other side or the server
            log.error("answering failed:\n%s", traceback.format_exc())
            return SideResult(error=f"Internal error ({type(exc).__name__}: {exc}). See the server console.")
        return mark_gold(answer, gold)


STORE_BASELINES = ("rag", "bm25", "hybrid")  # read by the base LLM, as every page baseline row was measured


def best_baseline(rows: Sequence[Mapping[str, Any]], precision: str, fingerprint: str) -> dict[str, Any] | None:
    """The best base-reader baseline row (highest F1, then accuracy) among `rows` measured on this corpus (its
    fingerprint) in `precision`, compared on the largest question set that has any: {"system", "rag_k", "split",
    "f1", "run"}; None if none."""
    usable = [r for r in rows if r.get("system") in STORE_BASELINES and r.get("precision") == precision
              and (r.get("settings") or {}).get("corpus_fingerprint") == fingerprint
              and isinstance((r.get("metrics") or {}).get("f1"), (int, float))
              and isinstance((r.get("settings") or {}).get("rag_k"), int)
              and not (r.get("settings") or {}).get("superseded")]
    if not usable:
        return None
    largest = max(r["n"] for r in usable)
    on_split = [r for r in usable if r["n"] == largest]
    best = max(on_split, key=lambda r: (r["metrics"]["f1"], r["metrics"].get("accuracy") or 0.0))
    return {"system": best["system"], "rag_k": int(best["settings"]["rag_k"]), "split": best["split"],
            "f1": float(best["metrics"]["f1"]), "run": best["run"]}


def _check_baseline(name: str) -> None:
    if name not in BASELINES:
        raise UniragError(f"Unknown baseline {name!r}: choose from {', '.join(BASELINES)}.")


@runtime.gpu_function(duration=GPU_SECONDS)
def answer_on_device(pipeline: Pipeline, bundle: CorpusBundle, text: str, settings: InferenceSettings,
                     baseline: str = "rag") -> Comparison:
    """Both sides' answering in one call: on ZeroGPU the GPU is attached only inside `@spaces.GPU` functions, and
    one call per question (not one per side) waits for a GPU once. A plain call everywhere else."""
    return pipeline._answer(bundle, text, settings, baseline)


@runtime.gpu_function(duration=GPU_SECONDS)
def answer_many_on_device(pipeline: Pipeline, bundle: CorpusBundle, texts: list[str], settings: InferenceSettings,
                          baseline: str = "rag") -> list[Comparison]:
    """Both sides' answering of a batch in one GPU call (a batch costs little more than one question)."""
    return pipeline._answer_many(bundle, texts, settings, baseline)


def _baseline_answer(bundle: CorpusBundle, baseline: str, text: str, settings: InferenceSettings) -> Answer:
    return bundle.baseline(baseline).answer(text, settings, with_attention=True)


def _baseline_answers(bundle: CorpusBundle, baseline: str, texts: list[str], settings: InferenceSettings
                      ) -> list[Answer]:
    """The baseline on several questions: one batch when it reads in batches (`answer_batch`), else one by one."""
    system = bundle.baseline(baseline)
    batch = getattr(system, "answer_batch", None)
    if batch is None:
        return [system.answer(text, settings, with_attention=True) for text in texts]
    return batch(texts, settings, with_attention=True)


def mark_gold(answer: Answer, gold: Question | None) -> SideResult:
    """Whether the side found the gold passage (and at which rank) and whether its answer is correct."""
    result = SideResult(answer=answer)
    if gold is None:
        return result
    if gold.answers:
        result.correct = bool(contains_answer(answer.text, gold.answers))
        shown = display_answer(answer.text, answer.question)
        result.exact = bool(exact_match(shown, gold.answers))
        result.f1 = float(token_f1(shown, gold.answers))
    if gold.doc_id:
        ids = answer.doc_ids
        result.gold_found = gold.doc_id in ids
        result.gold_rank = ids.index(gold.doc_id) + 1 if result.gold_found else None
    return result


DocPairs = list[tuple[str, float | None]]  # documents to re-read: (id, score), None = score unknown


@runtime.gpu_function(duration=REREAD_GPU_SECONDS)
def reread_on_device(pipeline: Pipeline, bundle: CorpusBundle, text: str, settings: InferenceSettings,
                     joint_pairs: DocPairs | None, rag_pairs: DocPairs | None,
                     note: str | None, baseline: str = "rag") -> Comparison:
    """Both sides' re-reading in one call: on ZeroGPU the GPU is attached only inside `@spaces.GPU` functions."""
    return pipeline._reread(bundle, text, settings, joint_pairs, rag_pairs, note, baseline)


def _doc_pairs(corpus: Corpus, docs: Sequence[str | tuple[str, float]]) -> DocPairs:
    """(doc id, score) pairs, every id checked against the corpus (a bare id's score is None: not known)."""
    pairs = [(d, None) if isinstance(d, str) else (str(d[0]), float(d[1])) for d in docs]
    missing = [d for d, _ in pairs if d not in corpus]
    if missing:
        raise UniragError(f"Document {missing[0]!r} is not in the corpus; use an id shown on a document card.")
    return pairs
