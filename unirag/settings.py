"""Every inference knob in one place: its limits, its default, its validation.

    settings = InferenceSettings.from_existing(checkpoint, precision="4bit", passage_cache=True, beam_width=16)

One order of precedence, for the app, `ask` and `eval` alike:

    explicit argument  >  the checkpoint's recommended setting for the loaded precision  >  library default

A recommended self-check is quick only with the passage cache (`python -m unirag index --self-check-cache`):
without one, `from_existing` applies the checkpoint's `without_cache` setting (measured on its own, a results row
of its own), or, when the checkpoint has none, keeps the recommended documents and reader, switches the
self-check off and narrows the beam to `NO_CACHE_BEAM`; it says so in `notices`. Explicit values always win.
Settings are validated once, when they are made; the systems trust them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from unirag.errors import UniragError

# Shared vocabulary of the library, the eval files and the UI.
# "4bit": the recovered 4-bit weights (HQQ, unirag.quantization); "nf4": bitsandbytes NF4 without the recovery
# (what "4bit" meant before, `--no-recovery`); "fp32": float32.
PRECISIONS = ("4bit", "nf4", "fp32")
# Who reads the joint model's documents: its stage-2 reader (LoRA adapter, pathway and bridge), or the base LLM,
# the weights the RAG side reads with (then the two sides differ only in what they retrieved).
JOINT_READERS = ("trained", "base")
# How both sides decode an answer: "span" (a word-bounded span of the documents read, unirag.spans) or "free".
ANSWER_MODES = ("span", "free")
READER_PROMPTS = ("plain", "short")
_PRECISION_ALIASES = {"4-bit": "4bit", "int4": "4bit", "hqq": "4bit", "float32": "fp32"}

RECOMMENDED_FILE = "recommended_settings.json"
NO_CACHE_BEAM = 10  # the beam the page used before self-check existed; wider beams only feed the self-check
MAX_SELF_CHECK_WEIGHT = 1e6  # already ranks by the likelihood alone; larger could overflow scores to -inf

# name: (low, high) for the whole-number knobs
LIMITS: dict[str, tuple[int, int]] = {
    "k_docs": (1, 3),
    "beam_width": (1, 32),
    "rag_k": (1, 10),
    "max_new_tokens": (1, 128),
    "self_check": (0, 32),
    "evidence_docs": (1, 3),  # as k_docs: the joint search's documents, here the evidence's candidates
    "evidence_tokens": (1, 128),
    "evidence_lookahead": (0, 32),
    "rounds": (1, 3),
}

HELP = {
    "k_docs": "documents the joint model selects and reads",
    "beam_width": "beams of the trie-constrained docid search",
    "rag_k": "dense passages the RAG baseline reads",
    "max_new_tokens": "answer length budget (tokens)",
    "self_check": "re-rank the search's top N documents (N >= 2) by how likely the question is after each, under "
                  "the base LLM (query likelihood); 0 = off",
    "self_check_weight": "weight of the question's mean log-probability against the search score (large = the "
                         "likelihood alone)",
    "joint_reader": "who reads the joint model's documents: 'trained' (its stage-2 reader) or 'base' (the base LLM, "
                    "the RAG side's reader)",
    "evidence_docs": "evidence system: documents of the joint search (+ self-check) the evidence may be copied from",
    "evidence_tokens": "evidence system: longest evidence (tokens) the base LLM writes, every token constrained to "
                       "continue a substring of a candidate document",
    "evidence_lookahead": "evidence system: forward-looking decoding, the weight W of each allowed token's lookahead "
                          "(W x the best cosine, MiniLM, between the question and the text the token leads to, added "
                          "to its log-probability); 0 = the LLM's choice alone",
    "rounds": "rounds of retrieval and answering (joint): round r > 1 searches docids again with the question plus "
              "round r-1's answer, then reads the question again; the last round's answer is final. 1 = one pass",
    "answer_mode": "how every reader decodes: 'span' (a word-bounded span copied from the documents read, which "
                   "the answer then cites) or 'free' (unconstrained greedy text)",
    "reader_prompt": "how the base LLM is asked: 'plain' (Q: {question}, the documents, A:) or 'short' (plus an "
                     "instruction to answer with a short phrase copied from the documents and one worked example: "
                     "the prompt-only baseline); the stage-2 reader always reads 'plain', as it was trained",
    "precision": "'4bit' (the recovered 4-bit: HQQ, groups of 32), 'nf4' (bitsandbytes NF4, no recovery) or 'fp32'",
}


def normalize_precision(value: str) -> str:
    """"4bit", "nf4" or "fp32" from the spellings users write (4-bit, int4, hqq, float32); others unchanged."""
    value = str(value).strip().lower()
    return _PRECISION_ALIASES.get(value, value)


def check_precision(value: str) -> str:
    precision = normalize_precision(value)
    if precision not in PRECISIONS:
        raise UniragError(f"Unknown precision {value!r}: use one of {', '.join(PRECISIONS)}.")
    return precision


def precision_from_flags(load_in_4bit: bool, no_recovery: bool = False) -> str:
    """The precision the command-line flags `--load-in-4bit [--no-recovery]` ask for."""
    if no_recovery and not load_in_4bit:
        raise UniragError("--no-recovery applies to 4-bit weights: use it with --load-in-4bit.")
    return ("nf4" if no_recovery else "4bit") if load_in_4bit else "fp32"


def _whole(name: str, value: Any) -> int:
    """An int within LIMITS[name]; numeric strings and integral floats (sliders send 2.0) are accepted."""
    low, high = LIMITS[name]
    if isinstance(value, bool):
        raise UniragError(f"{name} must be a whole number, got {value!r}.")
    try:
        number = int(value)
        if isinstance(value, float) and value != number:
            raise ValueError
    except (TypeError, ValueError):
        raise UniragError(f"{name} must be a whole number, got {value!r}.") from None
    if not low <= number <= high:
        raise UniragError(f"{name} must be between {low} and {high}, got {number}.")
    return number


@dataclass(frozen=True)
class InferenceSettings:
    """One question's settings for every system. Make them with `from_existing` (layered) or directly (defaults)."""

    k_docs: int = 1
    beam_width: int = 10
    rag_k: int = 5
    max_new_tokens: int = 32
    self_check: int = 0
    self_check_weight: float = 4.0
    joint_reader: str = "trained"
    evidence_docs: int = 3
    evidence_tokens: int = 48
    evidence_lookahead: int = 0
    rounds: int = 1  # UniGen-style iterative enhancement (JointSystem.answer); 1 = one search and one read
    answer_mode: str = "free"
    reader_prompt: str = "plain"
    precision: str = "4bit"
    # What the layering did that a user should know (e.g. the self-check switched off without a passage cache).
    notices: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise in place once, here
        for name in LIMITS:
            set_(self, name, _whole(name, getattr(self, name)))
        if self.self_check == 1:
            raise UniragError("self_check needs at least 2 documents to compare (0 switches it off).")
        weight = self.self_check_weight
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight <= MAX_SELF_CHECK_WEIGHT:
            raise UniragError(f"self_check_weight must be a number in (0, {MAX_SELF_CHECK_WEIGHT:g}], got {weight!r}.")
        set_(self, "self_check_weight", float(weight))
        if self.joint_reader not in JOINT_READERS:
            raise UniragError(f"joint_reader must be one of {', '.join(JOINT_READERS)}, got {self.joint_reader!r}.")
        if self.answer_mode not in ANSWER_MODES:
            raise UniragError(f"answer_mode must be one of {', '.join(ANSWER_MODES)}, got {self.answer_mode!r}.")
        if self.reader_prompt not in READER_PROMPTS:
            raise UniragError(f"reader_prompt must be one of {', '.join(READER_PROMPTS)}, got {self.reader_prompt!r}.")
        set_(self, "precision", check_precision(self.precision))
        set_(self, "notices", tuple(self.notices))

    @property
    def search_width(self) -> int:
        """The beam the docid search runs with: wide enough for every document selected or self-checked."""
        return max(self.beam_width, self.k_docs, self.self_check)

    @property
    def documents_searched(self) -> int:
        """Distinct documents the search must return: those read, or the self-check's candidates."""
        return max(self.k_docs, self.self_check)

    def replace(self, **changes: Any) -> InferenceSettings:
        """A validated copy with `changes` (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("notices")
        return data

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.name != "notices")

    @classmethod
    def from_existing(cls, checkpoint: str | Path | None = None, precision: str = "4bit",
                      passage_cache: bool = True, **explicit: Any) -> InferenceSettings:
        """explicit (non-None) > `checkpoint`'s recommended setting for `precision` > defaults.

        passage_cache: whether the joint system has a passage cache; without one a recommended self-check is
        switched off (explicit values are kept as given)."""
        unknown = sorted(set(explicit) - set(cls.names()))
        if unknown:
            raise UniragError(f"Unknown setting(s) {', '.join(unknown)}; known: {', '.join(cls.names())}.")
        precision = check_precision(explicit.pop("precision", None) or precision)
        values: dict[str, Any] = {}
        notices: list[str] = []
        recommended = RecommendedSettings.load(checkpoint, precision) if checkpoint is not None else None
        if recommended is not None:
            values.update(recommended.values)
            if recommended.values.get("self_check") and not passage_cache and explicit.get("self_check") is None:
                fallback = recommended.without_cache
                if fallback is not None:
                    values.update(fallback.values)
                else:
                    values["self_check"] = 0
                    values["beam_width"] = min(values.get("beam_width", NO_CACHE_BEAM), NO_CACHE_BEAM)
                notices.append(
                    f"The checkpoint recommends self-check {recommended.values['self_check']}, which is quick only "
                    "with the passage cache (`python -m unirag index --self-check-cache`); without it: self-check "
                    f"{values.get('self_check', 0)}, beam {values.get('beam_width', NO_CACHE_BEAM)}"
                    + (f" ({fallback.reason})." if fallback is not None and fallback.reason else "."))
        values.update({k: v for k, v in explicit.items() if v is not None})
        settings = cls(precision=precision, notices=tuple(notices), **values)
        if explicit.get("self_check_weight") is not None and not settings.self_check:
            raise UniragError("self_check_weight needs self_check N >= 2: with the self-check off it has no effect.")
        return settings


@dataclass(frozen=True)
class RecommendedSettings:
    """The setting a checkpoint's authors measured best, per precision, with a one-line reason naming its results
    row: `recommended_settings.json` = {"4bit": {...values, "reason": "...", "without_cache": {...values, "reason":
    "..."}}, "fp32": {...}} (or one object for every precision). `without_cache`: the changes that apply when the
    self-check passage cache is missing (a fresh machine), measured on their own."""

    values: dict[str, Any]
    reason: str = ""
    without_cache: RecommendedSettings | None = None

    KEYS = ("k_docs", "beam_width", "self_check", "self_check_weight", "joint_reader", "rag_k", "max_new_tokens",
            "rounds", "evidence_docs", "evidence_tokens", "evidence_lookahead", "answer_mode")

    @classmethod
    def load(cls, checkpoint_dir: str | Path, precision: str) -> RecommendedSettings | None:
        """The setting for `precision`, or None when the checkpoint ships none for it. A malformed file is an error."""
        path = Path(checkpoint_dir) / RECOMMENDED_FILE
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UniragError(f"{path} is not readable JSON ({exc}).") from None
        if not isinstance(raw, dict):
            raise UniragError(f"{path} must hold a JSON object.")
        precision = check_precision(precision)
        if any(key in PRECISIONS for key in raw):  # one setting per precision
            others = sorted(set(raw) - set(PRECISIONS))
            if others:
                raise UniragError(f"{path} holds settings per precision; unknown key(s) {', '.join(others)} "
                                  f"(known: {', '.join(PRECISIONS)}).")
            raw = raw.get(precision)
            if raw is None:
                return None
            if not isinstance(raw, dict):
                raise UniragError(f"{path}: the {precision} setting must be a JSON object.")
        return cls._parse(dict(raw), path, precision)

    @classmethod
    def _parse(cls, raw: dict[str, Any], path: Path, precision: str, nested: bool = False) -> RecommendedSettings:
        reason = raw.pop("reason", "")
        without = raw.pop("without_cache", None) if not nested else None
        unknown = sorted(set(raw) - set(cls.KEYS))
        if unknown:
            raise UniragError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: "
                              f"{', '.join(cls.KEYS)}, reason" + ("" if nested else ", without_cache") + ".")
        if not isinstance(reason, str) or "\n" in reason:
            raise UniragError(f"{path}: reason must be one line of text.")
        if without is not None and not isinstance(without, dict):
            raise UniragError(f"{path}: without_cache must be a JSON object of settings.")
        fallback = cls._parse(dict(without), path, precision, nested=True) if without is not None else None
        try:  # validated with the same rules as every setting, with and without the cache
            InferenceSettings(precision=precision, **raw)
            if fallback is not None:
                InferenceSettings(precision=precision, **{**raw, **fallback.values})
        except UniragError as exc:
            raise UniragError(f"{path}: {exc}") from None
        return cls(raw, reason, fallback)

    def to_json(self) -> dict[str, Any]:
        data = {**self.values, "reason": self.reason}
        if self.without_cache is not None:
            data["without_cache"] = self.without_cache.to_json()
        return data

    def save(self, checkpoint_dir: str | Path, precision: str) -> Path:
        """Write (or replace) this precision's entry, keeping the others."""
        path = Path(checkpoint_dir) / RECOMMENDED_FILE
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        if data and not any(key in PRECISIONS for key in data):
            data = {p: data for p in PRECISIONS}  # one shared setting becomes one per precision
        data[check_precision(precision)] = self.to_json()
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        return path


__all__ = ["ANSWER_MODES", "HELP", "InferenceSettings", "JOINT_READERS", "LIMITS", "PRECISIONS", "RECOMMENDED_FILE",
           "RecommendedSettings", "check_precision", "normalize_precision", "precision_from_flags"]
