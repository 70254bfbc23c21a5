"""Your own passages: an upload or pasted text → a validated corpus in a per-session temporary folder.

Accepted: JSONL (one `{"id", "title", "text"}` object a line; `id` and `title` optional) or plain text (one passage
a paragraph, paragraphs separated by blank lines; ids generated, the title a short first line or the first words).
Limits: MAX_PASSAGES passages, MAX_BYTES bytes, passages up to unirag.data's MAX_PASSAGE_CHARS. Each problem is
one DataError naming it (and its line or paragraph). The corpus is written as corpus.jsonl into a folder under
the cache (`<cache>/sessions/`) that `SessionFolders.close` deletes when the session ends.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unirag.data import MAX_PASSAGE_CHARS, MAX_TITLE_CHARS, Corpus, Passage, load_corpus, prepare_question
from unirag.errors import DataError
from unirag.paths import cache_dir

MAX_PASSAGES = 1000
MAX_BYTES = 5 * 2**20
TITLE_WORDS = 8  # a plain-text passage's title when its first line is no heading: its first words
HEADING_WORDS = 12  # a paragraph's first line of at most this many words, not ending a sentence, is its title
LIMITS = (f"up to {MAX_PASSAGES:,} passages and {MAX_BYTES // 2**20} MB; JSONL (id, title, text) or plain text, "
          f"one passage a paragraph; each passage up to {MAX_PASSAGE_CHARS:,} characters")
SESSIONS = "sessions"
CORPUS_FILE = "corpus.jsonl"


@dataclass
class Upload:
    """A parsed upload: its passages, the format it was read as, and what parsing changed."""

    passages: list[Passage]
    format: str  # "jsonl" or "text"
    notices: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ parsing


def decode(raw: bytes, name: str) -> str:
    """The upload as text: refuses empty, oversized, binary and non-UTF-8 input, each with its own message."""
    if len(raw) > MAX_BYTES:
        raise DataError(f"{name} is {len(raw) / 2**20:.1f} MB; the limit is {MAX_BYTES // 2**20} MB "
                        f"({MAX_PASSAGES:,} passages).")
    if not raw.strip():
        raise DataError(f"{name} is empty: give passages as JSONL or as plain text, one passage a paragraph.")
    if b"\x00" in raw[:8192]:  # text never holds NUL bytes; PDFs, images, zips and Word files do
        raise DataError(f"{name} is a binary file, not text: upload JSONL or plain text (UTF-8).")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{name} is not UTF-8 text (invalid byte on line {line}): save it as UTF-8 and upload it "
                        "again.") from None


def looks_like_jsonl(text: str) -> bool:
    first = next((line for line in text.splitlines() if line.strip()), "")
    return first.lstrip().startswith("{")


def parse_jsonl(text: str, name: str) -> list[Passage]:
    """Passages from JSONL lines; a missing id becomes `p<line>`, a missing title empty."""
    passages, seen = [], {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{name}, line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON ({exc.msg}); every line must be one JSON object.") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object with a \"text\" field, got {type(obj).__name__}.")
        doc_id, title, body = obj.get("id", f"p{lineno}"), obj.get("title", ""), obj.get("text")
        for key, value in (("id", doc_id), ("title", title), ("text", body)):
            if not isinstance(value, str):
                problem = "is missing" if value is None else f"must be a string, not {type(value).__name__}"
                raise DataError(f"{where}: field \"{key}\" {problem}.")
        if doc_id.strip() in seen:
            raise DataError(f"{where}: duplicate id {doc_id.strip()!r} (first on line {seen[doc_id.strip()]}).")
        seen[doc_id.strip()] = lineno
        passages.append(checked(Passage(doc_id.strip(), " ".join(title.split()), body.strip()), where))
    return passages


def split_heading(paragraph: str) -> tuple[str, str]:
    """(title, text) of a plain-text paragraph: a short first line not ending a sentence is its heading; else the
    title is its first words."""
    lines = [line.strip() for line in paragraph.strip().splitlines() if line.strip()]
    first = lines[0]
    if len(lines) > 1 and len(first.split()) <= HEADING_WORDS and not first.endswith((".", "!", "?", ":", ";")):
        return first.strip("#* "), " ".join(" ".join(lines[1:]).split())
    text = " ".join(" ".join(lines).split())
    words = text.split()
    title = " ".join(words[:TITLE_WORDS]).rstrip(",;:.") + ("…" if len(words) > TITLE_WORDS else "")
    return title, text


def parse_text(text: str, name: str) -> list[Passage]:
    """One passage a paragraph (blank-line separated), ids p1, p2, …"""
    paragraphs = [p for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    passages = []
    for number, paragraph in enumerate(paragraphs, start=1):
        title, body = split_heading(paragraph)
        passages.append(checked(Passage(f"p{number}", title, body), f"{name}, paragraph {number}"))
    return passages


def checked(passage: Passage, where: str) -> Passage:
    """The passage when it is within the limits; a DataError naming the problem otherwise."""
    if not passage.text:
        raise DataError(f"{where}: the passage text is empty.")
    if not passage.id:
        raise DataError(f"{where}: the id is empty.")
    if len(passage.text) > MAX_PASSAGE_CHARS:
        raise DataError(f"{where}: the passage is {len(passage.text):,} characters long; the limit is "
                        f"{MAX_PASSAGE_CHARS:,}. Split it into paragraphs (blank lines between them).")
    if len(passage.title) > MAX_TITLE_CHARS:
        raise DataError(f"{where}: the title is {len(passage.title):,} characters long; the limit is "
                        f"{MAX_TITLE_CHARS:,}.")
    return passage


def parse_upload(raw: bytes | str, name: str = "the pasted text") -> Upload:
    """Passages from an upload's bytes or pasted text, validated (DataError: one message for the first problem)."""
    text = decode(raw.encode("utf-8") if isinstance(raw, str) else raw, name)
    kind = "jsonl" if looks_like_jsonl(text) else "text"
    passages = parse_jsonl(text, name) if kind == "jsonl" else parse_text(text, name)
    if not passages:
        raise DataError(f"{name} holds no passages.")
    if len(passages) > MAX_PASSAGES:
        raise DataError(f"{name} holds {len(passages):,} passages; the limit is {MAX_PASSAGES:,}.")
    notices = [] if kind == "jsonl" else [f"Read as plain text: {len(passages)} paragraph(s), one passage each."]
    return Upload(passages, kind, notices)


def read_upload(path: str | Path) -> Upload:
    """An uploaded file's passages; its size is checked before it is read whole."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"The upload {path.name} is gone; upload it again.")
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise DataError(f"{path.name} is {size / 2**20:.1f} MB; the limit is {MAX_BYTES // 2**20} MB "
                        f"({MAX_PASSAGES:,} passages).")
    return parse_upload(path.read_bytes(), path.name)


def write_corpus(passages: list[Passage], folder: Path) -> Corpus:
    """corpus.jsonl in `folder`, read back through unirag.data's loader (the rules every corpus meets)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CORPUS_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps({"id": p.id, "title": p.title, "text": p.text}, ensure_ascii=False) + "\n"
                           for p in passages), encoding="utf-8")
    tmp.replace(path)
    return load_corpus(path)


# ------------------------------------------------------------------------------------------ session folders


def sessions_root() -> Path:
    return cache_dir() / SESSIONS


class SessionFolders:
    """One temporary folder a browser session, under the cache; deleted by `close` (the page's unload and its
    state's delete callback) and, for folders a crashed server left, by `sweep`."""

    def __init__(self, root: Path | None = None) -> None:
        self._root = root
        self._folders: dict[str, Path] = {}
        self._lock = threading.Lock()

    @property
    def root(self) -> Path:
        root = self._root or sessions_root()
        root.mkdir(parents=True, exist_ok=True)
        return root

    def folder(self, session: str) -> Path:
        """The session's folder, made on first use."""
        with self._lock:
            if session not in self._folders or not self._folders[session].is_dir():
                self._folders[session] = Path(tempfile.mkdtemp(prefix="session-", dir=self.root))
            return self._folders[session]

    def save(self, session: str, upload: Upload) -> Corpus:
        """The session's corpus, replacing its previous one (and whatever was built from it)."""
        folder = self.folder(session)
        for child in folder.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        return write_corpus(upload.passages, folder)

    def close(self, session: str) -> None:
        with self._lock:
            folder = self._folders.pop(session, None)
        if folder is not None:
            remove_folder(folder, self.root)

    def sweep(self, max_age_hours: float = 24.0) -> int:
        """Delete session folders not touched for `max_age_hours` (a server killed before its sessions ended)."""
        live = set(self._folders.values())
        cutoff, removed = time.time() - max_age_hours * 3600, 0
        for folder in self.root.glob("session-*"):
            if folder not in live and folder.is_dir() and folder.stat().st_mtime < cutoff:
                removed += remove_folder(folder, self.root)
        return removed


def remove_folder(folder: Path, root: Path) -> bool:
    """Delete `folder` when it lies inside `root` (never anything else, whatever a state value says)."""
    folder, root = Path(folder).resolve(), Path(root).resolve()
    if root not in folder.parents or not folder.is_dir():
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


# ------------------------------------------------------------------------------------------ answering on them

SIDES = {"joint": "Joint model (your docid model)", "rag": "Dense RAG (MiniLM)", "bm25": "BM25"}
CHECKPOINT_DIR = "ckpt"
ARCHIVE = "docid-model.zip"
BUILD_ARGS_ENV = "UNIRAG_BUILD_ARGS"


@dataclass
class SessionCorpus:
    """One session's corpus and the systems answering on it; the joint model joins once its build is done."""

    corpus: Corpus
    folder: Path
    systems: dict[str, Any]  # "rag", "bm25" → named systems on the base LLM
    joint: Any = None  # the named system "joint" on the built checkpoint
    joint_error: str | None = None

    @property
    def checkpoint(self) -> Path:
        return self.folder / CHECKPOINT_DIR


class YourPassages:
    """The "Your passages" tab's library side: per session, its uploaded corpus (in its own folder), dense and
    BM25 RAG on it at once, its docid model built through the one-at-a-time `BuildQueue`, then the joint side."""

    def __init__(self, pipeline: Any, folders: SessionFolders | None = None, queue: Any = None) -> None:
        from unirag.build import BuildQueue

        self.pipeline = pipeline
        self.folders = folders or SessionFolders()
        self.queue = queue or BuildQueue()
        self._sessions: dict[str, SessionCorpus] = {}
        self._lock = threading.Lock()
        self.folders.sweep()  # folders a killed server left behind

    def use(self, session: str, upload: Upload) -> SessionCorpus:
        """The session's new corpus (its previous one, and any build of it, dropped) with dense and BM25 ready."""
        self.queue.cancel(session, wait=10.0)
        corpus = self.folders.save(session, upload)
        state = SessionCorpus(corpus, self.folders.folder(session), self._baselines(corpus))
        with self._lock:
            self._sessions[session] = state
        return state

    def _baselines(self, corpus: Corpus) -> dict[str, Any]:
        """Dense and BM25 RAG on the app's shared reader and encoder; the embeddings stay in memory (nothing of a
        session is cached outside its folder)."""
        from unirag.docids import passage_text
        from unirag.rag import DenseRetriever
        from unirag.sparse import BM25Retriever
        from unirag.systems import build_system

        # The pipeline's loaded-once models (private accessors: the page's own loading uses them the same way).
        encoder, reader = self.pipeline.shared_encoder("yours"), self.pipeline.shared_reader("yours")
        vectors = encoder.encode_passages([passage_text(p.title, p.text) for p in corpus])
        dense = DenseRetriever(corpus, encoder, vectors)
        return {"rag": build_system("rag", corpus, reader=reader, retriever=dense),
                "bm25": build_system("bm25", corpus, reader=reader, retriever=BM25Retriever(corpus))}

    def get(self, session: str) -> SessionCorpus:
        state = self._sessions.get(session)
        if state is None:
            raise DataError("Upload or paste your passages first.")
        return state

    def settings(self) -> Any:
        from unirag.settings import InferenceSettings

        return InferenceSettings(precision=self.pipeline.config.precision)

    def ask(self, session: str, question: str) -> dict[str, Any]:
        """side → Answer, or the message why that side cannot answer (the joint side while it trains)."""
        text, _ = prepare_question(question)
        state, settings = self.get(session), self.settings()
        self.joint_ready(session)
        results: dict[str, Any] = {"joint": state.joint_error or self.joint_waiting(session)}
        if state.joint is not None:
            results["joint"] = state.joint.answer(text, settings)
        for side, system in state.systems.items():
            with self.pipeline.side_lock("rag"):  # the page's base LLM: one forward pass at a time
                results[side] = system.answer(text, settings)
        return results

    def joint_waiting(self, session: str) -> str:
        status = self.queue.status(session)
        if status is None:
            return "Not trained yet: press “Train the docid model”; dense and BM25 answer meanwhile."
        return f"Training the docid model: {describe_build(status)[0]}"

    def train(self, session: str) -> dict[str, Any]:
        """Queue the session's build (the recipe of `python -m unirag build`, on the app's base LLM)."""
        from unirag.build import MIN_PASSAGES

        state = self.get(session)
        if len(state.corpus) < MIN_PASSAGES:
            raise DataError(f"Training a docid model needs at least {MIN_PASSAGES} passages (you gave "
                            f"{len(state.corpus)}); dense and BM25 answer on any number.")
        llm = self.pipeline.config.llm
        # UNIRAG_BUILD_ARGS: further `build` flags for every build of this server (e.g. "--epochs 8" on a Space).
        extra = (("--base-model", llm) if llm else ()) + tuple(shlex.split(os.environ.get(BUILD_ARGS_ENV, "")))
        self.queue.submit(session, state.folder / CORPUS_FILE, state.checkpoint, state.folder, extra)
        return self.queue.status(session) or {}

    def joint_ready(self, session: str) -> bool:
        """Whether the joint side answers; loads the built checkpoint on the first call after its build."""
        state = self._sessions.get(session)
        status = self.queue.status(session)
        if state is None or state.joint is not None or status is None or status["state"] != "done":
            return state is not None and state.joint is not None
        from unirag.joint import JointSystem
        from unirag.systems import build_system

        config = self.pipeline.config
        try:
            joint = JointSystem.from_checkpoint(state.checkpoint, state.corpus, precision=config.precision,
                                                base_model=config.llm, device=config.device)
        except Exception as exc:  # noqa: BLE001 - a broken build must not take the other sides down
            state.joint_error = f"The built docid model could not be loaded: {exc}"
            return False
        state.joint = build_system("joint", state.corpus, joint=joint)
        return True

    def archive(self, session: str) -> Path:
        """The built checkpoint as one zip (without the optimizer state) for download."""
        import zipfile

        state = self.get(session)
        if not (state.checkpoint / "joint_config.json").is_file():
            raise DataError("No docid model yet: train one first.")
        target = state.folder / ARCHIVE
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(state.checkpoint.rglob("*")):
                if path.is_file() and path.name != "optimizer.safetensors":
                    archive.write(path, Path(CHECKPOINT_DIR) / path.relative_to(state.checkpoint))
            archive.write(state.folder / CORPUS_FILE, CORPUS_FILE)
        return target

    def close(self, session: str) -> None:
        """The session ended: its build stopped, its models dropped, its folder deleted."""
        self.queue.cancel(session, wait=10.0)
        with self._lock:
            dropped = self._sessions.pop(session, None)
        self.folders.close(session)
        if dropped is not None and dropped.joint is not None:
            from unirag.backbones import release_memory

            del dropped
            release_memory()


def describe_build(status: dict[str, Any]) -> tuple[str, float | None]:
    """(one line for the page, fraction done or None) of a `BuildQueue.status`."""
    state, progress = status["state"], status.get("progress") or {}
    if state == "queued":
        return f"queued: position {status['position']} (one training at a time on this machine)", 0.0
    if state == "waiting":
        return "waiting for another training on this machine to finish", 0.0
    if state == "failed":
        return f"failed: {status['message']}", None
    if state == "done":
        return "done: the joint model answers on your passages", 1.0
    if state == "cancelled":
        return "cancelled", None
    step = f"step {progress.get('step', 1)}/{progress.get('steps', '?')}: {progress.get('phase', 'starting')}"
    detail = progress.get("detail") or ""
    if detail and progress.get("total"):
        detail = f" ({detail}, {progress.get('done', 0)}/{progress['total']})"
    left = progress.get("seconds_left")
    eta = f", about {_duration(left)} left" if isinstance(left, (int, float)) else ""
    return f"training, {step}{detail}{eta}", progress.get("fraction", 0.0)


def _duration(seconds: float) -> str:
    return f"{max(1, round(seconds / 60))} min" if seconds >= 90 else f"{max(1, round(seconds))} s"
