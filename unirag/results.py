"""The results store: one JSON row per measured run, in `results/<corpus>.jsonl`, and the report's tables.

A row says what was run in plain words (`run`), which named system it is, on which data and precision, with the
full settings, the metrics `python -m unirag eval` printed, the command, date and machine. docs/RESULTS.md's
tables are generated from the store (`python -m unirag.results docs/RESULTS.md`; `--check` fails when stale), so
the report cannot drift from the data.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from unirag.errors import UniragError
from unirag.paths import REPO_ROOT
from unirag.systems import SYSTEM_NAMES


def default_store() -> Path:
    """The repository's `results/`, or UNIRAG_RESULTS (a copy of the store, tests), read at call time."""
    return Path(os.environ.get("UNIRAG_RESULTS") or REPO_ROOT / "results")


MACHINE = "2-core CPU, 24 GB"
LLM = "embedded SmolLM2-135M-Instruct"

# The project's named systems (unirag.systems), in the order the report lists them.
SYSTEMS = ("norag", "rag", "bm25", "hybrid", "rag-selfcheck", "joint", "joint-no-match", "evidence",
           "rag-joint-reader", "joint-gold", "gold")
assert set(SYSTEMS) == set(SYSTEM_NAMES), "the report orders every named system"
SYSTEM_WORDS = {
    "norag": "the LLM alone, no context",
    "rag": "dense MiniLM top-k read by the base LLM",
    "bm25": "BM25 top-k read by the base LLM",
    "hybrid": "dense MiniLM and BM25 fused by reciprocal rank, top-k read by the base LLM",
    "rag-selfcheck": "dense MiniLM top N re-ranked by the joint model's self-check, its top documents read",
    "joint": "the joint model's docid search (path log-prob + document match), its top documents read",
    "joint-no-match": "the docid search ranked by path log-prob alone (no document match)",
    "evidence": "the docid search's documents constrain evidence the base LLM writes (FM-index); the answer reads it",
    "rag-joint-reader": "dense MiniLM top-k read by the joint model's stage-2 reader",
    "joint-gold": "the gold passage read by the joint model's stage-2 reader",
    "gold": "the gold passage read by the base LLM",
}
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
OPTIONAL: dict[str, type | tuple[type, ...]] = {"paired": list, "labels": dict}
PAIRED_KEYS = ("against", "only_a", "only_b", "p")

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
    return row


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
           "date": _dt.datetime.now(_dt.timezone.utc).date().isoformat(), "machine": MACHINE,
           "source": "python -m unirag eval"}
    if labels:
        row["labels"] = labels
    return validate_row(row, f"summary of {run!r}")


# --------------------------------------------------------------------------------------------- tables


TABLE_HEADERS = ("run", "n", "accuracy", "EM", "F1", "R@1", "R@3", "context tokens", "latency ms", "p vs RAG top-5")


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
          shipped: bool | None = True) -> list[dict]:
    """The report's rows for one corpus, precision and split, in reading order: No RAG, RAG k=1/3/5 and the other
    baselines, the joint model's recommended setting, the other joint rows, then the ablation systems and the
    gold-passage ceilings.

    `shipped`: True keeps the baselines and the shipped checkpoints' rows, False the older models' rows, None all
    (older models last).
    """
    # Localization rows (no answers, their own table: render_localization) stay out of the QA tables.
    picked = sorted((r for r in rows if r["corpus"] == corpus and r["precision"] == precision
                     and r["split"] == split and (shipped is None or _shipped(r) == shipped)
                     and not r["settings"].get("localization")  # levers, localization: their own tables
                     and not r["run"].startswith(SEARCH_LEVER_PREFIX)), key=_order)
    out = []
    for r in picked:
        m = r["metrics"]
        p = next((q["p"] for q in r.get("paired", []) if q["against"].startswith("RAG top-5")), None)
        out.append({"run": r["run"], "n": r["n"], "accuracy": m["accuracy"], "em": m["em"], "f1": m["f1"],
                     "recall@1": m["recall@1"], "recall@3": m["recall@3"], "context": m["context_tokens_mean"],
                     "latency_ms": m["latency_ms_median"], "p_vs_rag5": p,
                     "recommended": bool(r["settings"].get("recommended")),
                     "fresh_machine": bool(r["settings"].get("fresh_machine"))})
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
        cells = [name, _cell(t["n"]), *(_cell(t[k]) for k in ("accuracy", "em", "f1", "recall@1", "recall@3")),
                 _cell(t["context"], 0), _cell(t["latency_ms"], 0), format_p(t["p_vs_rag5"])]
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


def quantization_cost(rows: Iterable[Mapping[str, Any]], recovered_only: bool = False) -> list[str]:
    """Sentences comparing the 4-bit accuracy of a run (recovered, and NF4 without the recovery, where measured)
    with its fp32 accuracy (same corpus, split and run name); empty if no run has both. `recovered_only`: only the
    runs measured with the recovered 4-bit."""
    pairs: dict[tuple[str, str, str], dict[str, Mapping[str, Any]]] = {}
    for r in rows:
        if r["metrics"].get("accuracy") is not None:
            pairs.setdefault((r["corpus"], r["split"], r["run"]), {})[r["precision"]] = r
    out = []
    for (corpus, split, run), pair in sorted(pairs.items()):
        if "fp32" not in pair or not {"4bit", "nf4"} & set(pair) or (recovered_only and "4bit" not in pair):
            continue
        fp32 = pair["fp32"]["metrics"]["accuracy"]
        accuracy = {p: pair[p]["metrics"]["accuracy"] for p in ("4bit", "nf4") if p in pair}
        parts = [f"{a:.3f} {PRECISION_WORDS[p]} ({(a - fp32) * 100:+.1f} points)" for p, a in accuracy.items()]
        n = pair["4bit" if "4bit" in pair else "nf4"]["n"]
        out.append(f"{corpus}/{split} · {run}: accuracy {' and '.join(parts)} against {fp32:.3f} in fp32 (n={n}).")
    return out


# --------------------------------------------------------------------------------------------- 4-bit recovery


LEVER_PREFIX = "4-bit recovery lever: "
# The dev rows the recovery is judged on (issue: gold passage >= 0.95 x fp32; RAG top-1 and the joint model's
# setting within 0.02 of fp32), by run name, with the target each must meet.
RECOVERY_RUNS = (("gold passage, base reader", "ratio", 0.95), ("RAG top-1", "delta", 0.02),
                 ("joint, 1 doc, beam 10, base reader", "delta", 0.02),
                 # the checkpoints' recommended settings (with the self-check), on the first 100 questions
                 ("joint, 1 doc, beam 10, self-check 5 (w 16), base reader", "delta", 0.02),
                 ("joint, 1 doc, beam 32, self-check 10 (likelihood alone), base reader", "delta", 0.02))


def render_recovery(rows: Sequence[Mapping[str, Any]]) -> str:
    """Two tables: every lever on held-out train questions (KL to fp32, answers), and the dev rows of the
    recovered 4-bit against fp32 and NF4 with the targets met or missed."""
    levers: dict[str, dict[str, Mapping[str, Any]]] = {}
    for r in rows:
        if r["run"].startswith(LEVER_PREFIX):
            levers.setdefault(r["run"][len(LEVER_PREFIX):], {})[r["corpus"]] = r
    head = ("| lever | memory MB | KL to fp32 nq / squad (questions a corpus) | same answer as fp32 nq / "
            "squad | accuracy nq / squad (answers a corpus) | fp32 on those questions | s an answer |")
    lines = [head, "|" + "---|" * 7]
    order = sorted(levers, key=lambda name: min(r["metrics"]["kl_to_fp32"] for r in levers[name].values()))
    for name in order:
        by = levers[name]
        first = next(iter(by.values()))

        def pair(key: str, digits: int = 3, by=by) -> str:
            return " / ".join(_cell(by[c]["metrics"].get(key), digits) if c in by else "–" for c in ("nq", "squad"))

        def kl(by=by) -> str:  # spans 1e-5 to 1: two significant digits
            return " / ".join(f"{by[c]['metrics']['kl_to_fp32']:.2g}" if c in by else "–" for c in ("nq", "squad"))

        n = first["metrics"].get("n_generated")
        lines.append(f"| {name} | {_cell(first['metrics'].get('memory_mb'), 0)} | "
                     f"{kl()} (n={first['n']}) | {pair('agreement_with_fp32', 2)} | {pair('accuracy', 2)} "
                     f"(n={n}) | {pair('fp32_accuracy_same_questions', 2)} | {pair('seconds_per_question', 1)} |")
    dev = ["| corpus, split | run | fp32 | NF4, no recovery | 4-bit recovered | recovered − fp32 | target |",
           "|" + "---|" * 7]
    index = {(r["corpus"], r["split"], r["run"], r["precision"]): r for r in rows}
    for corpus, split in (("nq", "dev"), ("squad", "dev[:300]"), ("nq", "dev[:100]"), ("squad", "dev[:100]")):
        for run, kind, bound in RECOVERY_RUNS:
            got = {p: index.get((corpus, split, run, p)) for p in ("fp32", "nf4", "4bit")}
            if got["4bit"] is None or got["fp32"] is None:
                continue
            acc = {p: (r["metrics"]["accuracy"] if r else None) for p, r in got.items()}
            if kind == "ratio":
                met, goal = acc["4bit"] >= bound * acc["fp32"], f"≥ {bound:g} × fp32 = {bound * acc['fp32']:.3f}"
            else:
                met, goal = abs(acc["4bit"] - acc["fp32"]) <= bound, f"within {bound:g} of fp32"
            dev.append(f"| {corpus}, {split} | {run} | {_cell(acc['fp32'])} | {_cell(acc['nf4'])} | "
                       f"{_cell(acc['4bit'])} | {acc['4bit'] - acc['fp32']:+.3f} | {goal}: "
                       f"{'**met**' if met else '**missed**'} |")
    return "\n".join(lines) + "\n\n" + "\n".join(dev)


# --------------------------------------------------------------------------------------------- honest baselines


# The questions the baseline comparison is measured on: the self-check without the passage cache re-reads N
# passages a question, so both corpora's first 100 dev questions, every row of the comparison on the same ones.
BASELINE_SPLITS = (("nq", "dev[:100]"), ("squad", "dev[:100]"))
NQ_SEARCH_R1_TARGET = 0.80  # the bar for nq; on squad the bar is dense R@1 on the same questions


def _baseline_roles(rows: Sequence[Mapping[str, Any]], corpus: str, split: str,
                    precision: str) -> dict[str, Mapping[str, Any]]:
    """The rows the comparison reads, by role: dense and BM25 top-1, dense + self-check, the docid search alone
    (beam 10, no self-check) and the joint model's recommended setting with its self-check."""
    roles: dict[str, Mapping[str, Any]] = {}
    for r in rows:
        if (r["corpus"], r["split"], r["precision"]) != (corpus, split, precision) or not _shipped(r):
            continue
        s, system = r["settings"], r["system"]
        if system in ("rag", "bm25") and s.get("rag_k") == 1 and r["run"] in ("RAG top-1", "BM25 top-1"):
            roles[system] = r
        elif system == "rag-selfcheck":
            roles["rag-selfcheck"] = r
        elif system == "joint" and not s.get("self_check") and s.get("beam_width") == 10 and s.get("k_docs") == 1 \
                and s.get("joint_reader", "base") == "base" and r["run"] == "joint, 1 doc, beam 10, base reader":
            roles["search"] = r
        elif system == "joint" and s.get("self_check") and s.get("recommended"):
            roles["joint"] = r
    return roles


def _paired_p(row: Mapping[str, Any] | None, against: Mapping[str, Any] | None, metric: str) -> Any:
    if row is None or against is None:
        return None
    for pair in row.get("paired", []):
        if pair["against"] == against["run"] and pair.get("metric", "accuracy") == metric:
            return pair["p"]
    return None


def render_baselines(rows: Sequence[Mapping[str, Any]]) -> str:
    """Per corpus and precision: every baseline next to the joint model, with paired sign tests against the joint
    model's recommended setting; then the issue's targets, met or missed."""
    head = ("| corpus, split, precision | system (run) | accuracy | R@1 | candidates' own R@1 | gold among the "
            "candidates | p accuracy vs joint | p R@1 vs joint |")
    lines = [head, "|" + "---|" * 8]
    targets = ["| corpus, split, precision | target | measured | |", "|---|---|---|---|"]
    names = {"rag": "dense", "bm25": "BM25", "rag-selfcheck": "dense + self-check", "search": "docid search alone",
             "joint": "joint, recommended (search + self-check)"}
    for precision in ("fp32", "4bit"):
        for corpus, split in BASELINE_SPLITS:
            roles = _baseline_roles(rows, corpus, split, precision)
            if "joint" not in roles and "rag-selfcheck" not in roles:
                continue
            where = f"{corpus}, {split}, {precision}"
            joint = roles.get("joint")
            for role, label in names.items():
                r = roles.get(role)
                if r is None:
                    continue
                m = r["metrics"]
                lines.append(f"| {where} | {label} ({r['run']}) | {_cell(m['accuracy'])} | {_cell(m['recall@1'])} | "
                             f"{_cell(m.get('candidate_recall@1'))} | {_cell(m.get('candidate_recall@n'))} | "
                             f"{format_p(_paired_p(r, joint, 'accuracy'))} | "
                             f"{format_p(_paired_p(r, joint, 'recall@1'))} |")

            def metric(role: str, key: str, roles: dict = roles) -> Any:
                return roles[role]["metrics"].get(key) if role in roles else None

            bar = NQ_SEARCH_R1_TARGET if corpus == "nq" else metric("rag", "recall@1")
            checks = (("docid search alone, R@1 (beam 10)", metric("search", "recall@1"), bar),
                      ("docid search alone, R@1 (the recommended beam)", metric("joint", "candidate_recall@1"), bar),
                      ("joint R@1 vs dense + self-check", metric("joint", "recall@1"),
                       metric("rag-selfcheck", "recall@1")),
                      ("joint accuracy vs dense + self-check", metric("joint", "accuracy"),
                       metric("rag-selfcheck", "accuracy")),
                      ("joint accuracy vs dense top-1 (RAG top-1)", metric("joint", "accuracy"),
                       metric("rag", "accuracy")))
            for text, value, bound in checks:
                if value is not None and bound is not None:
                    met = "**met**" if value >= bound else "**missed**"
                    targets.append(f"| {where} | {text} ≥ {bound:.3f} | {value:.3f} | {met} |")
    return "\n".join(lines) + "\n\n" + "\n".join(targets)


SEARCH_LEVER_PREFIX = "docid search lever: "


def render_search_levers(rows: Sequence[Mapping[str, Any]]) -> str:
    """Stage-1 levers of the docid search: the search alone (beam 10, no answers) on dev, and the held-out train
    recall at the end of stage 1."""
    lines = ["| corpus, precision | lever | stage-1 examples | held-out R@1 / R@3 | dev R@1 | dev R@3 | dev R@10 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["run"].startswith(SEARCH_LEVER_PREFIX):
            m = r["metrics"]
            lines.append(f"| {r['corpus']}, {r['precision']} | {r['run'][len(SEARCH_LEVER_PREFIX):]} | "
                         f"{r['settings'].get('stage1_examples', '–')} | {_cell(m.get('heldout_recall@1'), 2)} / "
                         f"{_cell(m.get('heldout_recall@3'), 2)} | {_cell(m['recall@1'])} | {_cell(m['recall@3'])} | "
                         f"{_cell(m['recall@k'])} |")
    return "\n".join(lines)


def render_training_curves(checkpoints: Sequence[Path] | None = None) -> str:
    """The shipped checkpoints' training logs (`loss_log.jsonl`): loss and held-out train R@1/R@3 at the end of
    every stage-1 epoch and at each stage-2 validation, to judge whether a longer stage 1 would pay."""
    if checkpoints is None:
        checkpoints = sorted((REPO_ROOT / "checkpoints").glob("*/loss_log.jsonl"))
    lines = ["| checkpoint | stage | epoch / step | loss (docid) | held-out R@1 | held-out R@3 | questions |",
             "|---|---|---|---|---|---|---|"]
    for log in checkpoints:
        for line in Path(log).read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            valid = entry.get("valid")
            if not valid:
                continue
            when = f"epoch {entry['epoch']}" if "epoch" in entry else f"step {entry['step']}"
            loss = entry.get("loss", entry.get("loss_docid"))
            lines.append(f"| {Path(log).parent.name} | {entry['stage']} | {when} | {_cell(loss)} | "
                         f"{_cell(valid['recall@1'], 2)} | {_cell(valid['recall@3'], 2)} | {valid['n']} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- localization


LOCALIZATION_KEYS = ("localization@1", "localization@3")


def render_localization(rows: Sequence[Mapping[str, Any]]) -> str:
    """One table per corpus, split and precision of the `python -m benchmarks.localization` rows (settings carry
    `localization`: the method): top-1 and top-3 answer-sentence localization per method, methods in
    `unirag.localization.REPORT_ORDER`. Empty when the store has no such rows."""
    from unirag.localization import REPORT_ORDER

    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        if r["settings"].get("localization") and all(k in r["metrics"] for k in LOCALIZATION_KEYS):
            groups.setdefault((r["corpus"], r["split"], r["precision"]), []).append(r)
    order = {name: i for i, name in enumerate(REPORT_ORDER)}
    parts = []
    for (corpus, split, precision), group in sorted(groups.items()):
        group = sorted(group, key=lambda r: (order.get(r["settings"]["localization"], len(order)), r["run"]))
        m = group[0]["metrics"]
        facts = [f"n={group[0]['n']}"]
        if m.get("sentences_mean") is not None:
            facts.append(f"{m['sentences_mean']:.1f} sentences a passage")
        if m.get("answer_repeated") is not None:
            facts.append(f"answer string in more than one sentence: {m['answer_repeated']}")
        if m.get("skipped") is not None:
            facts.append(f"skipped (answer not located): {m['skipped']}")
        lines = [f"**{corpus}, {split}, {PRECISION_WORDS.get(precision, precision)}** ({'; '.join(facts)})", "",
                 "| method | top-1 | top-3 |", "|---|---|---|"]
        for r in group:
            name = r["run"].split(": ", 1)[-1]
            lines.append(f"| {name} | {_cell(r['metrics']['localization@1'])} | "
                         f"{_cell(r['metrics']['localization@3'])} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


# --------------------------------------------------------------------------------------------- GR vs DR


GR_VS_DR_PREFIX = "gr-vs-dr: "  # rows of `python -m benchmarks.gr_vs_dr`; settings["gr_vs_dr"] names the system
GR_VS_DR_ROLES = (("search", "docid search alone (beam 10)"), ("self-check", "docid search + self-check"),
                  ("dense", "dense MiniLM"))


def _gr_vs_dr_rows(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in rows if r["run"].startswith(GR_VS_DR_PREFIX) and r["settings"].get("gr_vs_dr")]


def gr_vs_dr_points(rows: Iterable[Mapping[str, Any]], role: str, split: str, metric: str,
                    precision: str = "fp32") -> list[tuple[int, float]]:
    """(passages, metric) of one system on one split, by corpus size (the plot's line). Dense rows are fp32 only:
    the encoder does not change with the LLM's precision."""
    want = "fp32" if role == "dense" else precision
    points = {r["settings"]["passages"]: r["metrics"][metric] for r in _gr_vs_dr_rows(rows)
              if r["settings"]["gr_vs_dr"] == role and r["split"] == split and r["precision"] == want
              and r["metrics"].get(metric) is not None}
    return sorted(points.items())


def render_gr_vs_dr(rows: Sequence[Mapping[str, Any]]) -> str:
    """Corpus size against R@1 / R@3 of the docid search (alone and with the self-check) and of dense MiniLM, per
    split and precision of the docid search (dense: its fp32 row on the same corpus and split)."""
    picked = _gr_vs_dr_rows(rows)
    by = {(r["corpus"], r["split"], r["precision"], r["settings"]["gr_vs_dr"]): r for r in picked}
    # dev first, then fp32 before 4-bit, then by corpus size
    groups = sorted({(r["split"] != "dev", r["split"], PRECISIONS.index(r["precision"]) * -1, r["precision"],
                      r["settings"]["passages"], r["corpus"]) for r in picked if r["settings"]["gr_vs_dr"] != "dense"})
    head = ["corpus (passages)", "split", "precision", "questions",
            *(f"{words} R@1 / R@3" for _, words in GR_VS_DR_ROLES), "search + self-check − dense, R@1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, split, _, precision, passages, corpus in groups:
        got = {role: by.get((corpus, split, "fp32" if role == "dense" else precision, role))
               for role, _ in GR_VS_DR_ROLES}
        cells = [f"{corpus} ({passages:,})", split, precision,
                 _cell(next(r["n"] for r in got.values() if r is not None))]
        for role, _ in GR_VS_DR_ROLES:
            r = got[role]
            cells.append(f"{_cell(r['metrics']['recall@1'])} / {_cell(r['metrics']['recall@3'])}" if r else "–")
        gap = None
        if got["self-check"] and got["dense"] and None not in (got["self-check"]["metrics"]["recall@1"],
                                                                got["dense"]["metrics"]["recall@1"]):
            gap = got["self-check"]["metrics"]["recall@1"] - got["dense"]["metrics"]["recall@1"]
        cells.append(f"{gap:+.3f}" if gap is not None else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gr_vs_dr_trend(points: Sequence[tuple[int, float]], at: int = 100_000) -> tuple[float, float] | None:
    """Least-squares line of a metric against log10(passages): (change per tenfold corpus, value extrapolated to
    `at` passages, clipped to [0, 1]). None below three sizes: two points always fit a line and say nothing of a
    bend. A crude reading: a straight line in log size, far beyond the largest measured corpus."""
    if len(points) < 3:
        return None
    xs = [math.log10(n) for n, _ in points]
    ys = [v for _, v in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return slope, min(1.0, max(0.0, my + slope * (math.log10(at) - mx)))


GR_VS_DR_TREND_SPLITS = ("dev", "dev-common")  # each size's nq dev questions; those every size measured


def render_gr_vs_dr_trend(rows: Sequence[Mapping[str, Any]], metric: str = "recall@1",
                          min_passages: int = 1000) -> str:
    """Per question set and system: R@1 change per tenfold corpus and its straight-line extrapolation to 100k
    passages, from the fp32 sizes of at least `min_passages` (smaller ones are undertrained by the equal-epochs
    recipe)."""
    lines = [f"| questions | system | sizes (passages ≥ {min_passages:,}) | {metric} change per 10× passages | "
             f"{metric} extrapolated to 100k passages |", "|---|---|---|---|---|"]
    for split in GR_VS_DR_TREND_SPLITS:
        for role, words in GR_VS_DR_ROLES:
            points = [(n, v) for n, v in gr_vs_dr_points(rows, role, split, metric) if n >= min_passages]
            if not points and split != "dev":
                continue
            trend = gr_vs_dr_trend(points)
            sizes = ", ".join(f"{n:,}" for n, _ in points) or "–"
            cells = (f"{trend[0]:+.3f}", _cell(trend[1])) if trend else ("– (fewer than 3 sizes)", "–")
            lines.append(f"| {split} | {words} | {sizes} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def render_rounds(rows: Sequence[Mapping[str, Any]]) -> str:
    """Runs with more than one round (`--rounds`): accuracy and R@1 after each round, and the questions each later
    round turned right (helped) or wrong (hurt) against the round before."""
    lines = ["| corpus, split, precision | run | n | accuracy by round | R@1 by round | helped / hurt by round |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        m = r["metrics"]
        if not m.get("round_accuracy"):
            continue
        accuracy, recall = (" → ".join(_cell(v) for v in (m.get(key) or [])) for key in ("round_accuracy",
                                                                                        "round_recall@1"))
        changes = ", ".join(f"+{h} / −{w}" for h, w in zip(m.get("round_helped") or [], m.get("round_hurt") or [],
                                                            strict=True))
        lines.append(f"| {r['corpus']}, {r['split']}, {r['precision']} | {r['run']} | {r['n']} | "
                     f"{accuracy} | {recall} | {changes} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- the report


MARKER = re.compile(r"(<!-- results:(?P<corpus>[\w-]+):(?P<precision>\w+)(?::(?P<split>dev(?:\[:\d+\])?))?"
                    r"(?::(?P<other>other))? -->\n)"
                    r"(?P<body>.*?)(?P<end><!-- /results -->)", re.S)


# Blocks rendered from the whole store (or the checkpoints' logs), by name: `<!-- results:NAME -->`.
BLOCKS = {
    "recovery": render_recovery,
    "baselines": render_baselines,
    "search-levers": render_search_levers,
    "training-curves": lambda rows: render_training_curves(),
    "localization": render_localization,
    "gr-vs-dr": render_gr_vs_dr,
    "gr-vs-dr-trend": render_gr_vs_dr_trend,
    "rounds": render_rounds,
}
BLOCK_MARKER = re.compile(r"(<!-- results:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(?P<end><!-- /results -->)", re.S)


def update_report(text: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """`text` with every `<!-- results:CORPUS:PRECISION[:SPLIT][:other] -->` … `<!-- /results -->` block
    regenerated (`:other`: the rows of older, not shipped models), and every named block of `BLOCKS`
    (`<!-- results:recovery -->`, `<!-- results:baselines -->`, ...)."""
    def block(match: re.Match) -> str:
        if match["name"] not in BLOCKS:
            raise UniragError(f"unknown results block {match.group(1).strip()!r}: one of {', '.join(BLOCKS)}.")
        return f"{match.group(1)}{BLOCKS[match['name']](rows)}\n{match['end']}"

    text = BLOCK_MARKER.sub(block, text)

    def fill(match: re.Match) -> str:
        corpus, precision, split = match["corpus"], match["precision"], match["split"] or "dev"
        if precision not in PRECISIONS or split not in SPLITS:
            raise UniragError(f"bad results marker {match.group(1).strip()!r}: precision one of "
                              f"{', '.join(PRECISIONS)}, split one of {', '.join(SPLITS)}.")
        body = render_table(rows, corpus, precision, split, shipped=not match["other"])
        return f"{match.group(1)}{body}\n{match['end']}"

    return MARKER.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unirag.results",
                                     description="Regenerate the results tables of a report from the store.")
    parser.add_argument("report", type=Path, help="Markdown file with <!-- results:CORPUS:PRECISION --> markers")
    parser.add_argument("--store", type=Path, default=None, help="results store folder (default: results/)")
    parser.add_argument("--check", action="store_true", help="exit 1 if the report's tables are stale; write nothing")
    args = parser.parse_args(argv)
    try:
        rows = load_store(args.store)
        text = args.report.read_text(encoding="utf-8")
        new = update_report(text, rows)
    except (OSError, UniragError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            print(f"{args.report}: tables are stale; run `python -m unirag.results {args.report}`.", file=sys.stderr)
            return 1
        return 0
    if new != text:
        args.report.write_text(new, encoding="utf-8")
        print(f"{args.report}: tables regenerated from {args.store or default_store()}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
