"""The results store: one JSON row per measured run, in `results/<corpus>.jsonl`, and its per-corpus tables.

A row says what was run in plain words (`run`), which named system it is, on which data and precision, with the
full settings, the metrics `python -m unirag eval` printed, the command, date and machine. `table` /
`render_table` give one corpus, precision and split's rows in reading order (`python -m unirag.results` prints
every corpus × precision table). The report, docs/RESULTS.md, and the renderers of particular studies live beside
the benchmarks that measure them: `python -m benchmarks.report` (`--check` fails when the report is stale);
the studies the app also shows are `unirag.studies`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from unirag.errors import UniragError
from unirag.paths import REPO_ROOT
from unirag.systems import SPECS, SYSTEM_NAMES


def default_store() -> Path:
    """The repository's `results/`, or UNIRAG_RESULTS (a copy of the store, tests), read at call time."""
    return Path(os.environ.get("UNIRAG_RESULTS") or REPO_ROOT / "results")


MACHINE = "2-core CPU, 24 GB"  # what `machine()` says when the machine cannot be measured (and older rows say)


def machine() -> str:
    """This machine as a store row names it: cores and total memory, e.g. "2-core CPU, 24 GB" (GiB, rounded);
    MACHINE when either cannot be read."""
    try:
        cores = os.cpu_count()
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return MACHINE
    if not cores or memory <= 0:
        return MACHINE
    return f"{cores}-core CPU, {round(memory / 2 ** 30)} GB"


LLM = "embedded SmolLM2-135M-Instruct"

# The project's named systems and their one-line summaries: unirag.systems is the one place they are defined.
SYSTEMS = SYSTEM_NAMES  # in the order the report lists them
SYSTEM_WORDS = {name: spec.summary for name, spec in SPECS.items()}
# "4bit": the recovered 4-bit (HQQ, unirag.quantization); "nf4": bitsandbytes NF4 without the recovery (every
# 4-bit row measured before it); "8bit": bitsandbytes LLM.int8 (a recovery lever, for reference); "fp32".
PRECISIONS = ("4bit", "nf4", "8bit", "fp32")
PRECISION_WORDS = {"4bit": "4-bit (recovered, HQQ)", "nf4": "NF4 (no recovery)", "8bit": "8-bit", "fp32": "fp32"}
SPLITS = ("dev", "dev[:300]", "dev[:100]")  # the question sets the report and the Evaluation tab show
SPLIT = re.compile(r"^[\w.-]+(\[\d*:\d*\])?$")  # a question file's name, optionally with the slice evaluated
METRIC_KEYS = ("accuracy", "em", "f1", "recall@1", "recall@3", "recall@k", "k", "context_tokens_mean",
               "latency_ms_median", "wall_time_s")
# Metrics of some systems only (older rows lack them), copied from a summary when it has them: with a self-check,
# the candidate generator's own top-1 (docid search or dense) and the gold among its N; the evidence system's
# evidence holding a gold answer.
EXTRA_METRIC_KEYS = ("candidate_recall@1", "candidate_recall@n", "evidence_has_answer")
FIELDS: dict[str, type | tuple[type, ...]] = {
    "run": str, "system": str, "corpus": str, "split": str, "precision": str, "n": int, "settings": dict,
    "metrics": dict, "command": str, "date": str, "machine": str, "source": str,
}
OPTIONAL: dict[str, type | tuple[type, ...]] = {"paired": list, "labels": dict, "outcomes": dict}
# Per-question right/wrong of a run, so any two runs on the same questions get a sign test without their eval files:
# {"ids": hash of the sorted question ids, "accuracy": one "0"/"1" a question, in sorted-id order}.
OUTCOME_KEYS = ("ids", "accuracy")
PAIRED_KEYS = ("against", "only_a", "only_b", "p")
# Rows of `benchmarks.generative_recall --store`: the docid search alone (no answers), kept out of the QA tables.
SEARCH_LEVER_PREFIX = "docid search lever: "
# Rows of `benchmarks.app_performance --store`: start-up and concurrency of the app (no answers' quality).
APP_PERFORMANCE_PREFIX = "app performance: "
# Rows of `benchmarks.build_recall --store`: a `python -m unirag build` checkpoint's search on an uploaded corpus.
BUILD_PREFIX = "build: "

METRIC_DEFINITIONS = (
    "**accuracy**: the normalised gold answer occurs in the output; **EM / F1**: SQuAD-style exact match and token "
    "F1 against the gold answers; **R@1 / R@3**: the gold passage is first / in the top 3 of the system's ranking "
    "(the docid search for the joint model, MiniLM cosine for RAG; 1.000 when the gold passage is forced); "
    "**context**: mean prompt tokens of retrieved text; **latency**: median ms a question during the run "
    "(batched baselines and shared CPUs: compare only latencies timed alone, see the latency section); "
    "**p vs RAG top-5**: exact two-sided sign test on the questions only one of the two answers correctly."
)


# --------------------------------------------------------------------------------------------- validation


def validate_row(row: Any, where: str = "row") -> dict[str, Any]:
    """Return `row` if it is a well-formed store row, else raise UniragError naming `where` and the field."""
    if not isinstance(row, dict):
        raise UniragError(f"{where}: a results row must be a JSON object, got {type(row).__name__}.")
    missing = [k for k in FIELDS if k not in row]
    if missing:
        raise UniragError(f"{where}: missing field(s) {', '.join(missing)} (every row needs {', '.join(FIELDS)}).")
    unknown = sorted(set(row) - set(FIELDS) - set(OPTIONAL))
    if unknown:
        raise UniragError(f"{where}: unknown field(s) {', '.join(unknown)}; put extra labels under `labels`.")
    for key, kind in {**FIELDS, **OPTIONAL}.items():
        if key in row and (not isinstance(row[key], kind) or isinstance(row[key], bool)):
            raise UniragError(f"{where}: `{key}` must be {getattr(kind, '__name__', kind)}, got {row[key]!r}.")
        if kind is str and key in row and not row[key].strip():
            raise UniragError(f"{where}: `{key}` is empty.")
    if row["system"] not in SYSTEMS:
        raise UniragError(f"{where}: unknown system {row['system']!r}; use one of {', '.join(SYSTEMS)}.")
    if row["precision"] not in PRECISIONS:
        raise UniragError(f"{where}: precision {row['precision']!r} is not one of {', '.join(PRECISIONS)}.")
    if not SPLIT.match(row["split"]):
        raise UniragError(f"{where}: split {row['split']!r} must be a question file's name, optionally sliced "
                          "(dev, dev[:300]).")
    metrics = row["metrics"]
    absent = [k for k in METRIC_KEYS if k not in metrics]
    if absent:
        raise UniragError(f"{where}: metrics lack {', '.join(absent)} (write null where unknown).")
    for key, value in metrics.items():
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (value is None or numeric or (isinstance(value, list) and all(isinstance(v, (int, float))
                                                                              for v in value))):
            raise UniragError(f"{where}: metric `{key}` must be a number or null, got {value!r}.")
    for i, pair in enumerate(row.get("paired", [])):
        if not isinstance(pair, dict) or any(k not in pair for k in PAIRED_KEYS):
            raise UniragError(f"{where}: paired[{i}] needs {', '.join(PAIRED_KEYS)}.")
    outcomes = row.get("outcomes")
    if outcomes is not None:
        bits = outcomes.get("accuracy")
        if any(k not in outcomes for k in OUTCOME_KEYS) or not isinstance(bits, str) or set(bits) - {"0", "1"} \
                or len(bits) != row["n"]:
            raise UniragError(f"{where}: `outcomes` needs ids and accuracy: one 0/1 a question ({row['n']}).")
    return row


def outcomes_of(records: Sequence[Mapping[str, Any]], metric: str = "accuracy") -> dict[str, str]:
    """A row's `outcomes` from an eval's per-question records (each with an id and a 0/1 `metric`)."""
    import hashlib

    ordered = sorted(records, key=lambda r: str(r["id"]))
    ids = [str(r["id"]) for r in ordered]
    if len(set(ids)) != len(ids):
        raise UniragError("A question occurs twice among the records; their outcomes cannot be stored.")
    if any(r.get(metric) not in (0, 1, 0.0, 1.0) for r in ordered):
        raise UniragError(f"{metric!r} is not 0/1 for every question; the store keeps right/wrong outcomes only.")
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]
    return {"ids": digest, metric: "".join("1" if float(r[metric]) == 1.0 else "0" for r in ordered)}


def paired_p(row: Mapping[str, Any], against: Mapping[str, Any]) -> dict[str, Any] | None:
    """The sign test of `row` against `against` from their stored outcomes (None when either has none or they
    were measured on different questions): {"against", "only_a", "only_b", "p"}."""
    from unirag.eval import sign_test_p

    a, b = row.get("outcomes"), against.get("outcomes")
    if not a or not b or a["ids"] != b["ids"]:
        return None
    only_a = sum(x == "1" and y == "0" for x, y in zip(a["accuracy"], b["accuracy"], strict=True))
    only_b = sum(x == "0" and y == "1" for x, y in zip(a["accuracy"], b["accuracy"], strict=True))
    return {"against": against["run"], "only_a": only_a, "only_b": only_b, "p": round(sign_test_p(only_a, only_b), 4)}


def _key(row: Mapping[str, Any]) -> tuple[str, str, str, str]:
    return row["run"], row["corpus"], row["precision"], row["split"]


# --------------------------------------------------------------------------------------------- load / append


def load_store(store_dir: Path | str | None = None, corpus: str | None = None) -> list[dict[str, Any]]:
    """Every row of `<store_dir>/*.jsonl` (or `<corpus>.jsonl`), validated; errors name the file and line.

    `store_dir` defaults to the repository's `results/` (or UNIRAG_RESULTS).
    """
    store_dir = Path(store_dir or default_store())
    paths = [store_dir / f"{corpus}.jsonl"] if corpus else sorted(store_dir.glob("*.jsonl"))
    rows: list[dict[str, Any]] = []
    seen: dict[tuple[str, str, str, str], str] = {}
    for path in paths:
        if not path.is_file():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise UniragError(f"{where}: not valid JSON ({exc}); fix or remove the line.") from exc
            validate_row(row, where)
            if _key(row) in seen:
                raise UniragError(f"{where}: run {row['run']!r} ({row['precision']}, {row['split']}) is already "
                                  f"in {seen[_key(row)]}; rename one of them.")
            seen[_key(row)] = where
            rows.append(row)
    return rows


def _dump(row: Mapping[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False)


def append_run(row: dict[str, Any], store_dir: Path | None = None, replace: bool = False) -> Path:
    """Add `row` to `<store_dir>/<corpus>.jsonl` and return that path.

    Refuses a row whose run name, corpus, precision and split are already stored, unless `replace` (then the old
    row is replaced in place). The file is rewritten through a temporary file and `os.replace`, so a crash never
    leaves half a store.
    """
    validate_row(row, f"new row {row.get('run')!r}" if isinstance(row, dict) else "new row")
    store_dir = Path(store_dir or default_store())
    store_dir.mkdir(parents=True, exist_ok=True)
    path = store_dir / f"{row['corpus']}.jsonl"
    old = load_store(store_dir, row["corpus"])
    lines, replaced = [], False
    for existing in old:
        if _key(existing) == _key(row):
            if not replace:
                raise UniragError(f"{path}: run {row['run']!r} ({row['precision']}, {row['split']}) is already "
                                  "stored; give the run another name or pass replace=True.")
            existing, replaced = row, True
        lines.append(_dump(existing))
    if not replaced:
        lines.append(_dump(row))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=store_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def row_from_summary(summary: dict[str, Any], *, run: str, system: str, corpus: str, split: str, precision: str,
                     settings: dict[str, Any], command: str) -> dict[str, Any]:
    """A store row from an eval summary (`unirag.eval.summarize` output); fills date (today, UTC) and machine.

    The metrics are copied as they are; summary keys that are not metrics are kept verbatim under `labels`.
    """
    summary = summary.get("summary", summary)
    metrics = {k: summary.get(k) for k in METRIC_KEYS}
    # Timings, and a multi-round run's per-round lists (unirag.eval.ROUND_KEYS), are metrics too.
    metrics.update({k: v for k, v in summary.items() if (k.endswith("_s") or k.startswith("round_"))
                    and k not in metrics})
    metrics.update({k: summary[k] for k in EXTRA_METRIC_KEYS if summary.get(k) is not None})
    labels = {k: v for k, v in summary.items()
              if k not in metrics and k not in (*EXTRA_METRIC_KEYS, "n", "corpus", "precision")}
    row = {"run": run, "system": system, "corpus": corpus, "split": split, "precision": precision,
           "n": summary.get("n"), "settings": dict(settings), "metrics": metrics, "command": command,
           "date": _dt.datetime.now(_dt.timezone.utc).date().isoformat(), "machine": machine(),
           "source": "python -m unirag eval"}
    if labels:
        row["labels"] = labels
    return validate_row(row, f"summary of {run!r}")


# --------------------------------------------------------------------------------------------- tables


TABLE_HEADERS = ("run", "n", "EM", "F1", "accuracy", "R@1", "R@3", "context tokens", "latency ms", "p vs RAG top-5")


def _shipped(row: Mapping[str, Any]) -> bool:
    # Rows of models that are not the shipped checkpoints (older levers) say settings.shipped = false.
    return bool(row["settings"].get("shipped", True))


def _order(row: Mapping[str, Any]) -> tuple:
    s = row["settings"]
    # The recommended joint setting right after the baseline rows it is measured against; older models last.
    return (not _shipped(row), "" if _shipped(row) else str(s.get("checkpoint")),
            SYSTEMS.index(row["system"]) if not s.get("recommended") else SYSTEMS.index("joint") - 0.5,
            s.get("pathway_layers") or 0, s.get("rag_k") or 0, s.get("k_docs") or 0, s.get("joint_reader") != "base",
            s.get("beam_width") or 0, s.get("self_check") or 0, s.get("self_check_weight") or 0, row["run"])


def table(rows: Iterable[Mapping[str, Any]], corpus: str, precision: str, split: str = "dev",
          shipped: bool | None = True, against: str | None = None) -> list[dict]:
    """The report's rows for one corpus, precision and split, in reading order: No RAG, RAG k=1/3/5 and the other
    baselines, the joint model's recommended setting, the other joint rows, then the ablation systems and the
    gold-passage ceilings.

    `shipped`: True keeps the baselines and the shipped checkpoints' rows, False the older models' rows, None all
    (older models last). `against`: a run name; each row's "p" is then its sign test against that run (from both
    rows' stored outcomes; None where either lacks them), else the stored test against RAG top-5.
    """
    rows = list(rows)
    # Localization rows (no answers: unirag.studies.render_localization) and the docid search levers (the search
    # alone: benchmarks.report) stay out of the QA tables.
    picked = sorted((r for r in rows if r["corpus"] == corpus and r["precision"] == precision
                     and r["split"] == split and (shipped is None or _shipped(r) == shipped)
                     and not r["settings"].get("localization")
                     and not r["run"].startswith((SEARCH_LEVER_PREFIX, APP_PERFORMANCE_PREFIX, BUILD_PREFIX))),
                    key=_order)
    reference = next((r for r in rows if r["run"] == against and r["corpus"] == corpus
                      and r["precision"] == precision and r["split"] == split), None) if against else None
    out = []
    for r in picked:
        m = r["metrics"]
        if against:
            pair = paired_p(r, reference) if reference is not None and r is not reference else None
            p = pair["p"] if pair else None
        else:
            p = next((q["p"] for q in r.get("paired", []) if q["against"].startswith("RAG top-5")), None)
        out.append({"run": r["run"], "n": r["n"], "accuracy": m["accuracy"], "em": m["em"], "f1": m["f1"],
                     "recall@1": m["recall@1"], "recall@3": m["recall@3"], "context": m["context_tokens_mean"],
                     "latency_ms": m["latency_ms_median"], "p": p,
                     "recommended": bool(r["settings"].get("recommended")),
                     "fresh_machine": bool(r["settings"].get("fresh_machine")),
                     "superseded": bool(r["settings"].get("superseded"))})
    return out


def _cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_p(p: Any) -> str:
    """A p-value as the report writes it: two significant digits (p spans 0.5 to 1e-7); a bound such as "<1e-4"
    is kept as written; "–" when there is none. A p stored rounded to 4 decimals as 0 is "<1e-4"."""
    if isinstance(p, (int, float)) and p == 0:
        return "<1e-4"
    return f"{p:.2g}" if isinstance(p, float) else _cell(p)


def render_table(rows: Iterable[Mapping[str, Any]], corpus: str, precision: str, split: str = "dev",
                 shipped: bool | None = True) -> str:
    lines = ["| " + " | ".join(TABLE_HEADERS) + " |", "|" + "---|" * len(TABLE_HEADERS)]
    for t in table(rows, corpus, precision, split, shipped):
        name = f"**{t['run']}** (recommended)" if t["recommended"] else t["run"]
        name += " (fresh machine)" if t["fresh_machine"] else ""
        name += " (superseded)" if t["superseded"] else ""  # measured on a checkpoint since retrained
        cells = [name, _cell(t["n"]), *(_cell(t[k]) for k in ("em", "f1", "accuracy", "recall@1", "recall@3")),
                 _cell(t["context"], 0), _cell(t["latency_ms"], 0), format_p(t["p"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_tables(rows: Sequence[Mapping[str, Any]] | None = None) -> str:
    """Every corpus × precision table of the store (full dev split), as Markdown."""
    rows = load_store() if rows is None else rows
    parts = []
    for corpus in sorted({r["corpus"] for r in rows}):
        for precision in PRECISIONS:
            if any(r["corpus"] == corpus and r["precision"] == precision for r in rows):
                parts.append(f"### {corpus}/dev, {precision}\n\n{render_table(rows, corpus, precision)}")
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unirag.results",
                                     description="Print every corpus × precision table of the results store (full "
                                                 "dev split). docs/RESULTS.md: python -m benchmarks.report.")
    parser.add_argument("report", nargs="?", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, default=None, help="results store folder (default: results/)")
    parser.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.report is not None or args.check:
        print("error: the report is regenerated by `python -m benchmarks.report` now (`--check` to test it).",
              file=sys.stderr)
        return 2
    try:
        print(render_tables(load_store(args.store)), end="")
    except UniragError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
