"""Corpus and question loading, with line-numbered validation.

Formats:
- corpus JSONL: one `{"id", "title", "text"}` object per line;
- questions JSONL: one `{"id", "question", "answers": [str], "doc_id"?}` object per line;
- raw SQuAD v1.1 JSON (`{"data": [{"title", "paragraphs": [...]}]}`), giving both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from unirag.errors import DataError, UniragError
from unirag.paths import default_data_dir

MAX_QUESTION_CHARS = 2000
# Longest passage text kept at load. The shipped corpora's longest is 4,063 characters (squad); a reader sees
# ~8k tokens (SmolLM2), and one unbounded passage (a 1 MB line) made reading try to allocate 137 GB.
MAX_PASSAGE_CHARS = 8000
# Longest title kept (the reader sees "title: text"): the shipped corpora's longest is far below it, and a 1 MB
# title made `ask` try to allocate 124 GB.
MAX_TITLE_CHARS = 300
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s")

log = logging.getLogger(__name__)
DATASETS = ("nq", "squad")


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str

    def as_context(self) -> str:
        return f"{self.title}: {self.text}" if self.title else self.text


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    answers: tuple[str, ...]
    doc_id: str | None = None


@dataclass
class Corpus:
    passages: list[Passage]
    source: str = ""
    notices: list[str] = field(default_factory=list)  # what loading changed (e.g. long passages truncated)
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index = {p.id: i for i, p in enumerate(self.passages)}

    def __len__(self) -> int:
        return len(self.passages)

    def __iter__(self) -> Iterator[Passage]:
        return iter(self.passages)

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._index

    def __getitem__(self, doc_id: str) -> Passage:
        try:
            return self.passages[self._index[doc_id]]
        except KeyError:
            raise UniragError(f"Document id {doc_id!r} is not in the corpus {self.source}") from None

    def position(self, doc_id: str) -> int:
        return self._index[doc_id]

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.passages]

    @property
    def fingerprint(self) -> str:
        """Content hash: any change to ids, titles or texts changes it."""
        digest = hashlib.sha256()
        for p in self.passages:
            for part in (p.id, p.title, p.text):
                digest.update(part.encode("utf-8"))
                digest.update(b"\x00")
        return digest.hexdigest()[:16]


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object), raising DataError with the line number on bad bytes or JSON."""
    if path.is_dir():
        inside = sorted(f.name for f in path.glob("*.jsonl"))
        hint = f" (it holds {', '.join(inside[:4])})" if inside else ""
        raise DataError(f"{path} is a folder, not a JSONL file{hint}; give the file's path.")
    if not path.is_file():
        raise DataError(f"File not found: {path}")
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid UTF-8 ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON (truncated or corrupted line?): {exc.msg}") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _require_str(obj: dict, key: str, where: str, allow_empty: bool = False) -> str:
    if key not in obj:
        raise DataError(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value


def truncate_passage(text: str, max_chars: int = MAX_PASSAGE_CHARS) -> str:
    """`text` cut to at most `max_chars`: at the last sentence end in the second half of the limit, else the last
    space, else hard."""
    if len(text) <= max_chars:
        return text
    head = text[: max_chars + 1]  # +1: a sentence end or space right at the limit still counts
    ends = [m.end() for m in _SENTENCE_END.finditer(head) if m.end() > max_chars // 2]
    if ends:
        return head[: ends[-1]].rstrip()
    space = head.rfind(" ", max_chars // 2)
    return (head[:space] if space > 0 else text[:max_chars]).rstrip()


def _bounded(passages: list[Passage], source: str) -> Corpus:
    """The corpus, passages longer than MAX_PASSAGE_CHARS and titles longer than MAX_TITLE_CHARS truncated, with
    one notice (and one warning) for each kind."""
    long_ids = [p.id for p in passages if len(p.text) > MAX_PASSAGE_CHARS]
    notices = []
    long_titles = [p.id for p in passages if len(p.title) > MAX_TITLE_CHARS]
    if long_titles:
        passages = [Passage(p.id, truncate_passage(p.title, MAX_TITLE_CHARS), p.text)
                    if len(p.title) > MAX_TITLE_CHARS else p for p in passages]
        shown = ", ".join(long_titles[:10]) + (", ..." if len(long_titles) > 10 else "")
        notices.append(f"{len(long_titles)} title{'s' if len(long_titles) > 1 else ''} longer than "
                       f"{MAX_TITLE_CHARS:,} characters {'were' if len(long_titles) > 1 else 'was'} truncated: {shown}")
        log.warning("%s: %s", source, notices[-1])
    if long_ids:
        passages = [Passage(p.id, p.title, truncate_passage(p.text)) if len(p.text) > MAX_PASSAGE_CHARS else p
                    for p in passages]
        shown = ", ".join(long_ids[:10]) + (", ..." if len(long_ids) > 10 else "")
        notices.append(f"{len(long_ids)} passage{'s' if len(long_ids) > 1 else ''} longer than "
                       f"{MAX_PASSAGE_CHARS:,} characters {'were' if len(long_ids) > 1 else 'was'} truncated: {shown}")
        log.warning("%s: %s", source, notices[-1])
    return Corpus(passages, source=source, notices=notices)


def load_corpus(path: str | Path) -> Corpus:
    """Load a corpus from JSONL, or the paragraphs of a raw SQuAD JSON file."""
    path = Path(path)
    if path.suffix == ".json":
        return load_squad_json(path)[0]
    passages: list[Passage] = []
    first_line: dict[str, int] = {}
    for lineno, obj in _read_jsonl(path):
        where = f"{path}:{lineno}"
        doc_id = _require_str(obj, "id", where)
        if doc_id in first_line:
            raise DataError(f"{where}: duplicate id {doc_id!r} (first seen on line {first_line[doc_id]})")
        first_line[doc_id] = lineno
        title = _require_str(obj, "title", where, allow_empty=True) if "title" in obj else ""
        passages.append(Passage(doc_id, title.strip(), _require_str(obj, "text", where).strip()))
    if not passages:
        raise DataError(f"{path}: the corpus is empty")
    return _bounded(passages, str(path))


def load_questions(path: str | Path, corpus: Corpus | None = None) -> list[Question]:
    """Load questions from JSONL (or raw SQuAD JSON); check gold doc ids against `corpus` if given."""
    path = Path(path)
    if path.suffix == ".json":
        squad_corpus, questions = load_squad_json(path)
        corpus = corpus or squad_corpus
        _check_doc_ids(questions, corpus, {q.id: 0 for q in questions}, path)
        return questions
    questions: list[Question] = []
    first_line: dict[str, int] = {}
    for lineno, obj in _read_jsonl(path):
        where = f"{path}:{lineno}"
        qid = _require_str(obj, "id", where)
        if qid in first_line:
            raise DataError(f"{where}: duplicate id {qid!r} (first seen on line {first_line[qid]})")
        first_line[qid] = lineno
        text = _require_str(obj, "question", where)
        if "answers" not in obj:
            raise DataError(f"{where}: missing field 'answers' (a list of gold answer strings)")
        answers = obj["answers"]
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise DataError(f"{where}: field 'answers' must be a list of strings")
        doc_id = obj.get("doc_id")
        if doc_id is not None and not isinstance(doc_id, str):
            raise DataError(f"{where}: field 'doc_id' must be a string")
        golds = tuple(a.strip() for a in answers if a.strip())
        if not golds:  # no gold answer: every metric would score it 0 and silently lower the mean
            raise DataError(f"{where}: question {qid!r} has no gold answer (field 'answers' is empty); "
                            "give at least one answer string or remove the question")
        questions.append(Question(qid, text.strip(), golds, doc_id))
    if not questions:
        raise DataError(f"{path}: no questions found")
    if corpus is not None:
        _check_doc_ids(questions, corpus, first_line, path)
    return questions


def _check_doc_ids(questions: list[Question], corpus: Corpus, lines: dict[str, int], path: Path) -> None:
    for q in questions:
        if q.doc_id is not None and q.doc_id not in corpus:
            raise DataError(
                f"{path}:{lines.get(q.id, '?')}: doc_id {q.doc_id!r} of question {q.id!r} is not in the corpus "
                f"{corpus.source} (is this the question file of another corpus?)"
            )


def load_squad_json(path: str | Path) -> tuple[Corpus, list[Question]]:
    """Raw SQuAD v1.1 JSON → (corpus of paragraphs `sq<article>-<paragraph>`, questions)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"File not found: {path}")
    try:
        blob = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: invalid UTF-8 at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON (truncated file?): {exc.msg}") from None
    if not isinstance(blob, dict) or not isinstance(blob.get("data"), list):
        raise DataError(f"{path}: not a SQuAD file (expected a top-level 'data' list)")
    passages: list[Passage] = []
    questions: list[Question] = []
    seen: set[str] = set()
    for a, article in enumerate(blob["data"]):
        title = str(article.get("title", "")).replace("_", " ")
        for p, para in enumerate(article.get("paragraphs", [])):
            doc_id = f"sq{a:02d}-{p:03d}"
            context = str(para.get("context", "")).strip()
            if not context:
                raise DataError(f"{path}: article {a} paragraph {p} has an empty context")
            passages.append(Passage(doc_id, title, context))
            for qa in para.get("qas", []):
                qid = str(qa.get("id", ""))
                if not qid or qid in seen:
                    raise DataError(f"{path}: article {a} paragraph {p}: missing or duplicate question id {qid!r}")
                seen.add(qid)
                answers = tuple(a for a in dict.fromkeys(str(x.get("text", "")).strip() for x in qa.get("answers", []))
                                if a)
                if not answers:  # SQuAD 2.0's unanswerable questions: this loader reads v1.1 only
                    raise DataError(f"{path}: article {a} paragraph {p}: question {qid!r} has no gold answer "
                                    "(a SQuAD 2.0 file? pass SQuAD v1.1)")
                questions.append(Question(qid, str(qa.get("question", "")).strip(), answers, doc_id))
    if not passages:
        raise DataError(f"{path}: no paragraphs found")
    return _bounded(passages, str(path)), questions


def dataset_paths(name: str, split: str = "dev", data_dir: str | Path | None = None) -> tuple[Path, Path]:
    """(corpus, questions) paths of a shared dataset, e.g. ("nq", "dev")."""
    if name not in DATASETS:
        raise UniragError(f"Unknown dataset {name!r}; choose one of {', '.join(DATASETS)} or pass file paths.")
    root = Path(data_dir) if data_dir else default_data_dir()
    corpus, questions = root / name / "corpus.jsonl", root / name / f"{split}.jsonl"
    for path in (corpus, questions):
        if not path.is_file():
            raise DataError(f"{path} not found. Set UNIRAG_DATA or pass --corpus/--questions explicitly.")
    return corpus, questions


def prepare_question(text: str, max_chars: int = MAX_QUESTION_CHARS) -> tuple[str, list[str]]:
    """Normalise a user question; returns (text, notices). Empty input is an error; long input is cut."""
    if not isinstance(text, str):
        raise UniragError("The question must be text.")
    cleaned = " ".join(text.split())
    if not cleaned:
        raise UniragError("The question is empty: type a question.")
    notices: list[str] = []
    if len(cleaned) > max_chars:
        notices.append(f"The question was {len(cleaned):,} characters long; it was truncated to {max_chars:,}.")
        cleaned = cleaned[:max_chars]
    if not mostly_latin(cleaned):
        notices.append(NOT_ENGLISH_NOTICE)
    return cleaned, notices


NOT_ENGLISH_NOTICE = ("The corpora, the sentence encoder and the LLM are English: a question in another script is "
                      "retrieved and answered poorly. Ask in English for a fair comparison.")


def mostly_latin(text: str, share: float = 0.5) -> bool:
    """Whether at least `share` of the letters are Latin (ASCII or accented); a question with no letters counts."""
    import unicodedata

    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return True
    latin = sum(ch.isascii() or "LATIN" in unicodedata.name(ch, "") for ch in letters)
    return latin >= share * len(letters)
