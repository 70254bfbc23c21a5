"""docs/RESULTS.md and docs/notes/studies.md, regenerated from the results store (`results/*.jsonl`).

    python -m benchmarks.report            # rewrite both reports' generated blocks
    python -m benchmarks.report --check    # exit 1 if either is stale (the tests run this)

A report marks each generated block `<!-- results:NAME -->` … `<!-- /results -->`: NAME is either
CORPUS:PRECISION[:SPLIT][:other] (`unirag.results.render_table`: one corpus × precision table; `:other` the
older, not shipped models' rows) or one of BLOCKS, the renderers of particular studies below (the summary the
report opens with, the 4-bit recovery, the honest baselines, the docid search levers, ...). The studies the app
shows too (localization, GR vs DR, the cost of 4-bit) are rendered by `unirag.studies`. Every number comes from a
store row, or (the training curves) from the shipped checkpoints' `loss_log.jsonl`; regenerating twice gives the
same bytes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from unirag.batching import MAX_BATCH
from unirag.errors import UniragError
from unirag.paths import REPO_ROOT
from unirag.results import (
    APP_PERFORMANCE_PREFIX,
    BUILD_PREFIX,
    PRECISION_WORDS,
    PRECISIONS,
    SEARCH_LEVER_PREFIX,
    SPLITS,
    SYSTEMS,
    _cell,
    _shipped,
    default_store,
    format_p,
    load_store,
    render_table,
)
from unirag.results import paired_p as results_paired_p
from unirag.settings import InferenceSettings
from unirag.studies import GR_VS_DR_PREFIX, render_gr_vs_dr, render_gr_vs_dr_trend, render_localization

REPORTS = (REPO_ROOT / "docs" / "RESULTS.md", REPO_ROOT / "docs" / "notes" / "studies.md")
COMMAND = "python -m benchmarks.report"

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


def _baseline_roles(rows: Sequence[Mapping[str, Any]], corpus: str, split: str, precision: str,
                    current: bool = False) -> dict[str, Mapping[str, Any]]:
    """The rows the comparison reads, by role: dense and BM25 top-1, dense + self-check, the docid search alone
    (beam 10, no self-check) and the joint model's recommended setting with its self-check. `current`: leave out
    rows whose settings say they are superseded (measured on a checkpoint since retrained)."""
    roles: dict[str, Mapping[str, Any]] = {}
    for r in rows:
        if (r["corpus"], r["split"], r["precision"]) != (corpus, split, precision) or not _shipped(r) \
                or (current and r["settings"].get("superseded")):
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


def _sign_test_cell(row: Mapping[str, Any], against: Mapping[str, Any] | None) -> str:
    """"only row right / only against right, p" from the two rows' stored outcomes; "–" when not comparable."""
    pair = results_paired_p(row, against) if against is not None and against is not row else None
    return f"{pair['only_a']} / {pair['only_b']}, p {format_p(pair['p'])}" if pair else "–"


def _paired_p(row: Mapping[str, Any] | None, against: Mapping[str, Any] | None, metric: str) -> Any:
    if row is None or against is None:
        return None
    for pair in row.get("paired", []):
        if pair["against"] == against["run"] and pair.get("metric", "accuracy") == metric:
            return pair["p"]
    return None


def baseline_checks(rows: Sequence[Mapping[str, Any]], corpus: str, split: str, precision: str,
                    current: bool = False) -> list[tuple[str, float, float]]:
    """The issue's targets on one corpus, split and precision, as (target, measured, bound), where both are
    measured: the docid search alone at R@1 ≥ 0.80 on nq and ≥ dense R@1 on squad, the joint model at or above
    dense + self-check (R@1 and accuracy) and at or above dense top-1 (accuracy)."""
    roles = _baseline_roles(rows, corpus, split, precision, current)

    def metric(role: str, key: str) -> Any:
        return roles[role]["metrics"].get(key) if role in roles else None

    bar = NQ_SEARCH_R1_TARGET if corpus == "nq" else metric("rag", "recall@1")
    checks = (("docid search alone, R@1 (beam 10)", metric("search", "recall@1"), bar),
              ("docid search alone, R@1 (the recommended beam)", metric("joint", "candidate_recall@1"), bar),
              ("joint R@1 vs dense + self-check", metric("joint", "recall@1"), metric("rag-selfcheck", "recall@1")),
              ("joint accuracy vs dense + self-check", metric("joint", "accuracy"),
               metric("rag-selfcheck", "accuracy")),
              ("joint accuracy vs dense top-1 (RAG top-1)", metric("joint", "accuracy"), metric("rag", "accuracy")))
    return [(text, value, bound) for text, value, bound in checks if value is not None and bound is not None]


def _met(value: float, bound: float) -> str:
    return "**met**" if value >= bound else "**missed**"


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
            for text, value, bound in baseline_checks(rows, corpus, split, precision):
                targets.append(f"| {where} | {text} ≥ {bound:.3f} | {value:.3f} | {_met(value, bound)} |")
    return "\n".join(lines) + "\n\n" + "\n".join(targets)


# --------------------------------------------------------------------------------------------- docid search levers


def _lever_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    picked = [r for r in rows if r["run"].startswith(SEARCH_LEVER_PREFIX)]
    # corpus, then the app's precision first (PRECISIONS order), then as stored
    return sorted(picked, key=lambda r: (r["corpus"], PRECISIONS.index(r["precision"]), r["split"]))


def _lever_paired(row: Mapping[str, Any]) -> str:
    cells = [f"{pair['only_a']} / {pair['only_b']} vs *{pair['against']}*, p {format_p(pair['p'])}"
             for pair in row.get("paired", []) if pair.get("metric", "accuracy") == "recall@1"]
    return "; ".join(cells) or "–"


def render_search_levers(rows: Sequence[Mapping[str, Any]]) -> str:
    """Stage-1 levers of the docid search: the search alone (beam 10, no answers) on dev; how the stage-1 run went
    (epochs, examples, minutes, held-out train R@1 at the end of every epoch, then at its end); and the paired sign
    test of dev R@1 against the shipped checkpoint's search where one was run (questions only this lever / only
    the other finds first). A lever whose row says it is superseded (its checkpoint since retrained) says so."""
    head = ("| corpus, precision | lever | stage-1 epochs | stage-1 examples | stage-1 minutes | held-out R@1 by epoch "
            "| held-out R@1 / R@3 | dev R@1 | dev R@3 | dev R@10 | dev R@1 paired (only this / only the other) |")
    lines = [head, "|" + "---|" * 11]
    for r in _lever_rows(rows):
        m, s = r["metrics"], r["settings"]
        curve = " → ".join(_cell(v, 2) for v in m.get("heldout_curve_recall@1") or []) or "–"
        name = r["run"][len(SEARCH_LEVER_PREFIX):] + (" (superseded)" if s.get("superseded") else "")
        lines.append(f"| {r['corpus']}, {r['precision']} | {name} | "
                     f"{_cell(s.get('stage1_epochs'))} | {_cell(s.get('stage1_examples'))} | "
                     f"{_cell(m.get('stage1_minutes'), 0)} | {curve} | {_cell(m.get('heldout_recall@1'), 2)} / "
                     f"{_cell(m.get('heldout_recall@3'), 2)} | {_cell(m['recall@1'])} | {_cell(m['recall@3'])} | "
                     f"{_cell(m['recall@k'])} | {_lever_paired(r)} |")
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


def render_prompt_study(rows: Sequence[Mapping[str, Any]]) -> str:
    """The prompt-only baseline (`reader_prompt` short: an instruction and one worked example) against the plain
    prompt: the base reader with the gold passage, on the same train questions (rows with settings.prompt_study),
    and the paired sign test of their accuracy from the stored outcomes."""
    picked = [r for r in rows if r["settings"].get("prompt_study")]
    lines = ["| corpus, questions, precision | prompt | n | EM | F1 | accuracy | latency ms | paired vs plain |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(picked, key=lambda r: (r["corpus"], r["split"], r["settings"].get("reader_prompt") != "plain")):
        m = r["metrics"]
        plain = next((o for o in picked if o["corpus"] == r["corpus"] and o["split"] == r["split"]
                      and o["precision"] == r["precision"] and o["settings"].get("reader_prompt") == "plain"), None)
        cell = _sign_test_cell(r, plain)
        lines.append(f"| {r['corpus']}, {r['split']}, {r['precision']} | {r['settings'].get('reader_prompt')} | "
                     f"{r['n']} | {_cell(m['em'])} | {_cell(m['f1'])} | {_cell(m['accuracy'])} | "
                     f"{_cell(m['latency_ms_median'], 0)} | {cell} |")
    return "\n".join(lines)


def render_builds(rows: Sequence[Mapping[str, Any]]) -> str:
    """`python -m unirag build` on a corpus of its own (`benchmarks.build_recall`): the build's cost on this CPU
    and its docid search against dense MiniLM on questions it never trained on."""
    picked = sorted((r for r in rows if r["run"].startswith(BUILD_PREFIX)), key=lambda r: (r["corpus"], r["run"],
                                                                                           r["split"]))
    lines = ["| corpus | build | questions | passages | stage-1 examples, epochs | stage-1 min / 100 passages | "
             "joint R@1 | joint R@3 | dense R@1 | dense R@3 |", "|" + "---|" * 10]
    for r in picked:
        m, s = r["metrics"], r["settings"]
        lines.append(f"| {r['corpus']} | {r['run'][len(BUILD_PREFIX):]} | {r['split']} ({r['n']}) | "
                     f"{_cell(s.get('passages'))} | {_cell(s.get('stage1_examples'))}, {_cell(s.get('stage1_epochs'))} "
                     f"| {_cell(m.get('stage1_minutes_per_100_passages'), 1)} | {_cell(m['recall@1'])} | "
                     f"{_cell(m['recall@3'])} | {_cell(m.get('dense_recall@1'))} | {_cell(m.get('dense_recall@3'))} |")
    return "\n".join(lines)


def render_app_performance(rows: Sequence[Mapping[str, Any]]) -> str:
    """`benchmarks.app_performance`: the app as a user meets it, start to the first answer and several users at
    once (the newest row of each run name), with the issue's two targets."""
    newest: dict[str, Mapping[str, Any]] = {}
    for r in rows:
        if r["run"].startswith(APP_PERFORMANCE_PREFIX) and r["date"] >= newest.get(r["run"], {}).get("date", ""):
            newest[r["run"]] = r
    lines = ["| setting | max batch | start → first answer, s | median latency, s | 4 at once: last answer, s | "
             "ratio to one | RSS, MB | date |", "|" + "---|" * 8]
    for run, r in sorted(newest.items()):
        m, s = r["metrics"], r["settings"]
        lines.append(f"| {run[len(APP_PERFORMANCE_PREFIX):]} | {_cell(s.get('max_batch'))} | "
                     f"{_cell(m.get('start_to_first_answer_s'), 1)} | {_cell(m.get('latency_median_s'), 2)} | "
                     f"{_cell(m.get('concurrent_last_s'), 2)} | {_cell(m.get('concurrent_ratio'), 2)} | "
                     f"{_cell(m.get('rss_mb_after_warmup'), 0)} | {r['date']} |")
    fresh = [r for run, r in newest.items() if r["settings"].get("fresh_cache")
             and r["settings"].get("max_batch") in (None, MAX_BATCH)]
    if fresh:
        m = max(fresh, key=lambda r: r["date"])["metrics"]
        first, ratio = m.get("start_to_first_answer_s"), m.get("concurrent_ratio")
        lines += ["", f"Targets: a fresh-cache start answers within 60 s: {_cell(first, 1)} s "
                      f"{_met(-first, -60.0) if first is not None else '–'}; 4 questions at once within 2x one: "
                      f"{_cell(ratio, 2)}x {_met(-ratio, -2.0) if ratio is not None else '–'}."]
    return "\n".join(lines)


def render_query_generator(rows: Sequence[Mapping[str, Any]]) -> str:
    """`benchmarks.querygen_throughput`: questions sampled a second and the round-trip filter's keep rate."""
    from benchmarks.querygen_throughput import PREFIX

    lines = ["| corpus | run | passages | sampled | kept | keep rate | questions a second | date |", "|" + "---|" * 8]
    for r in sorted((r for r in rows if r["run"].startswith(PREFIX)), key=lambda r: (r["corpus"], r["run"])):
        m, s = r["metrics"], r["settings"]
        lines.append(f"| {r['corpus']} | {r['run'][len(PREFIX):]} | {r['n']} | {_cell(s.get('sampled'))} | "
                     f"{_cell(s.get('kept'))} | {_cell(m.get('keep_rate'), 3)} | "
                     f"{_cell(m.get('questions_per_second'), 2)} | {r['date']} |")
    return "\n".join(lines)


CHOICE_PREFIX = "checkpoint choice: "


def render_checkpoint_choice(rows: Sequence[Mapping[str, Any]]) -> str:
    """The held-out train questions a shipped checkpoint was chosen on (`data/heldout/`): each candidate's row, with
    the sign test of its accuracy against the shipped candidate of the same system, where both stored outcomes."""
    picked = [r for r in rows if r["run"].startswith(CHOICE_PREFIX)]
    shipped = {(r["corpus"], r["system"]): r for r in picked if "(shipped)" in r["run"]}
    lines = ["| corpus | candidate | questions | precision | EM | F1 | accuracy | R@1 | accuracy paired with the "
             "shipped (only this / only the shipped) |", "|" + "---|" * 9]
    for r in sorted(picked, key=lambda r: (r["corpus"], r["system"], r["run"])):
        m, paired = r["metrics"], _sign_test_cell(r, shipped.get((r["corpus"], r["system"])))
        lines.append(f"| {r['corpus']} | {r['run'][len(CHOICE_PREFIX):]} | {r['split']} ({r['n']}) | "
                     f"{r['precision']} | {_cell(m['em'])} | {_cell(m['f1'])} | {_cell(m['accuracy'])} | "
                     f"{_cell(m['recall@1'])} | {paired} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- rounds


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


# --------------------------------------------------------------------------------------------- the summary


APP_PRECISION = InferenceSettings().precision  # the precision the app loads (the recovered 4-bit)
SUMMARY_CORPORA = ("nq", "squad")
SUMMARY_LABELS = {
    "norag": "No RAG (the LLM alone)", "rag": "dense RAG (MiniLM top-k)", "bm25": "BM25 top-k",
    "hybrid": "hybrid (dense + BM25, RRF)", "rag-selfcheck": "dense + self-check", "joint": "**joint**",
    "joint-no-match": "joint, path log-prob only", "evidence": "evidence (FM-index)",
    "rag-joint-reader": "dense top-k, stage-2 reader", "joint-gold": "gold passage, stage-2 reader",
    "gold": "gold passage, base reader",
}
SUMMARY_METRICS = (("em", "EM"), ("f1", "F1"), ("accuracy", "accuracy"), ("recall@1", "R@1"))


def _summary_eligible(row: Mapping[str, Any], precision: str) -> bool:
    s = row["settings"]
    return (row["corpus"] in SUMMARY_CORPORA and row["precision"] == precision and row["split"] in SPLITS
            and _shipped(row) and not s.get("superseded") and not s.get("localization")
            and not row["run"].startswith((SEARCH_LEVER_PREFIX, GR_VS_DR_PREFIX))
            and row["metrics"].get("accuracy") is not None)


def summary_split(rows: Sequence[Mapping[str, Any]], corpus: str, precision: str = APP_PRECISION) -> str | None:
    """The question set a corpus's summary column reads: of the report's splits (full dev first), the one whose
    rows cover the most systems in `precision`, ties to the larger; None if the corpus has none."""
    covered: dict[str, set[str]] = {}
    for r in rows:
        if r["corpus"] == corpus and _summary_eligible(r, precision):
            covered.setdefault(r["split"], set()).add(r["system"])
    if not covered:
        return None
    return max(covered, key=lambda split: (len(covered[split]), -SPLITS.index(split)))


def summary_row(rows: Sequence[Mapping[str, Any]], system: str, corpus: str, split: str | None,
                precision: str = APP_PRECISION) -> Mapping[str, Any] | None:
    """The row that speaks for `system` in the summary: for the joint model its recommended setting, else what a
    fresh machine serves (no passage cache); for every other system its best row (F1, then accuracy), as the app
    picks its baseline. None when nothing is measured."""
    picked = [r for r in rows if r["system"] == system and r["corpus"] == corpus and r["split"] == split
              and _summary_eligible(r, precision)]
    if not picked:
        return None
    if system == "joint":
        for flag in ("recommended", "fresh_machine"):
            flagged = [r for r in picked if r["settings"].get(flag)]
            if flagged:
                picked = flagged
                break
    return max(picked, key=lambda r: (r["metrics"].get("f1") or 0.0, r["metrics"]["accuracy"], r["run"]))


BASE_READER_BASELINES = ("rag", "bm25", "hybrid")  # the baselines the app's right-hand side can start on


def _summary_checks(rows: Sequence[Mapping[str, Any]], corpus: str,
                    precision: str) -> list[tuple[str, float, float, str]]:
    """The joint model's summary row against dense RAG's (R@1) and against the best base-reader baseline (F1, then
    accuracy: the app's choice), on the corpus's summary questions: (target, measured, bound, the bound's run)."""
    split = summary_split(rows, corpus, precision)
    joint, dense = (summary_row(rows, s, corpus, split, precision) for s in ("joint", "rag"))
    baselines = [r for r in (summary_row(rows, s, corpus, split, precision) for s in BASE_READER_BASELINES) if r]
    best = max(baselines, key=lambda r: (r["metrics"].get("f1") or 0.0, r["metrics"]["accuracy"]), default=None)
    checks = []
    for text, against, key in (("joint R@1 ≥ dense R@1", dense, "recall@1"),
                               ("joint F1 ≥ the best baseline's", best, "f1"),
                               ("joint accuracy ≥ the best baseline's", best, "accuracy")):
        if joint and against and None not in (joint["metrics"].get(key), against["metrics"].get(key)):
            checks.append((text, joint["metrics"][key], against["metrics"][key], against["run"]))
    return checks


def summary_targets(rows: Sequence[Mapping[str, Any]], precision: str = APP_PRECISION) -> list[str]:
    """The issue's targets in `precision`, met or missed, one line each (both corpora on it): the summary rows'
    checks, the baseline comparison's (rows not superseded), and the best docid search measured on all of nq dev
    against the 0.80 bar."""
    by_target: dict[str, list[str]] = {}
    for corpus in SUMMARY_CORPORA:
        split = summary_split(rows, corpus, precision)
        for text, value, bound, run in _summary_checks(rows, corpus, precision):
            by_target.setdefault(text, []).append(f"{corpus} {split} {value:.3f} vs ≥ {bound:.3f} (*{run}*) "
                                                  f"{_met(value, bound)}")
    for corpus, split in BASELINE_SPLITS:
        for text, value, bound in baseline_checks(rows, corpus, split, precision, current=True):
            by_target.setdefault(text, []).append(f"{corpus} {split} {value:.3f} vs ≥ {bound:.3f} {_met(value, bound)}")
    out = [f"- {text}: {'; '.join(parts)}" for text, parts in by_target.items()]
    levers = [r for r in rows if r["run"].startswith(SEARCH_LEVER_PREFIX) and r["corpus"] == "nq"
              and r["split"] == "dev" and r["precision"] == precision and r["metrics"].get("recall@1") is not None]
    if levers:
        best = max(levers, key=lambda r: (r["metrics"]["recall@1"], r["run"]))
        value = best["metrics"]["recall@1"]
        out.append(f"- docid search alone, R@1 (beam 10), the best search measured on all nq dev questions (*"
                   f"{best['run'][len(SEARCH_LEVER_PREFIX):]}*): nq dev {value:.3f} vs ≥ "
                   f"{NQ_SEARCH_R1_TARGET:.3f} {_met(value, NQ_SEARCH_R1_TARGET)}")
    return out


READER_SYSTEMS = ("gold", "joint-gold")  # the readers alone: the gold passage read by the base / stage-2 reader


def render_summary(rows: Sequence[Mapping[str, Any]], precision: str = APP_PRECISION) -> str:
    """The report's opening: one row a named system, EM / F1 / accuracy / R@1 on each corpus's dev questions in
    the app's precision ("–": not measured), the rows read, then the issue's targets met or missed."""
    splits = {corpus: summary_split(rows, corpus, precision) for corpus in SUMMARY_CORPORA}
    head = ["system"]
    for corpus in SUMMARY_CORPORA:
        split = splits[corpus] or "dev"
        head += [f"{corpus} {split} {label}" for _, label in SUMMARY_METRICS]
    head.append("rows read")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    # The readers first (the gold passage in hand: how well each reader answers when retrieval is perfect).
    readers = [s for s in SYSTEMS if s in READER_SYSTEMS]
    for system in [*readers, *(s for s in SYSTEMS if s not in READER_SYSTEMS)]:
        cells, runs = [f"{SUMMARY_LABELS[system]} (`{system}`)"], []
        for corpus in SUMMARY_CORPORA:
            r = summary_row(rows, system, corpus, splits[corpus], precision)
            cells += [_cell(r["metrics"].get(key)) if r else "–" for key, _ in SUMMARY_METRICS]
            if r:
                runs.append(f"{corpus}: {r['run']}")
        lines.append("| " + " | ".join([*cells, "; ".join(runs) or "–"]) + " |")
    sizes = {c: next((r["n"] for r in rows if r["corpus"] == c and r["split"] == splits[c]
                      and _summary_eligible(r, precision)), None) for c in SUMMARY_CORPORA}
    note = (f"{PRECISION_WORDS[precision]}; questions: " + ", ".join(
        f"{c} {splits[c]} ({sizes[c]})" if splits[c] else f"{c}: none in this precision" for c in SUMMARY_CORPORA))
    targets = summary_targets(rows, precision)
    return ("\n".join(lines) + f"\n\n{note}.\n\n**Targets ({precision}).**\n\n"
            + "\n".join(targets or ["- none measured"]))


# --------------------------------------------------------------------------------------------- the report


MARKER = re.compile(r"(<!-- results:(?P<corpus>[\w-]+):(?P<precision>\w+)(?::(?P<split>dev(?:\[:\d+\])?))?"
                    r"(?::(?P<other>other))? -->\n)"
                    r"(?P<body>.*?)(?P<end><!-- /results -->)", re.S)


# Blocks rendered from the whole store (or the checkpoints' logs), by name: `<!-- results:NAME -->`.
BLOCKS = {
    "summary": render_summary,
    "recovery": render_recovery,
    "baselines": render_baselines,
    "search-levers": render_search_levers,
    "training-curves": lambda rows: render_training_curves(),
    "localization": render_localization,
    "gr-vs-dr": render_gr_vs_dr,
    "gr-vs-dr-trend": render_gr_vs_dr_trend,
    "rounds": render_rounds,
    "prompt-study": render_prompt_study,
    "builds": render_builds,
    "app-performance": render_app_performance,
    "checkpoint-choice": render_checkpoint_choice,
    "query-generator": render_query_generator,
}
BLOCK_MARKER = re.compile(r"(<!-- results:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(?P<end><!-- /results -->)", re.S)


def update_report(text: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """`text` with every `<!-- results:CORPUS:PRECISION[:SPLIT][:other] -->` … `<!-- /results -->` block
    regenerated (`:other`: the rows of older, not shipped models), and every named block of `BLOCKS`
    (`<!-- results:summary -->`, `<!-- results:recovery -->`, ...)."""
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
    parser = argparse.ArgumentParser(prog=COMMAND, description="Regenerate the reports' tables from the store.")
    parser.add_argument("reports", nargs="*", type=Path,
                        help="Markdown files with <!-- results:… --> markers (default: docs/RESULTS.md and "
                             "docs/notes/studies.md)")
    parser.add_argument("--store", type=Path, default=None, help="results store folder (default: results/)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a report's tables are stale; write nothing")
    args = parser.parse_args(argv)
    stale = []
    try:
        rows = load_store(args.store)
        for report in args.reports or REPORTS:
            text = report.read_text(encoding="utf-8")
            new = update_report(text, rows)
            if new == text:
                continue
            if args.check:
                stale.append(report)
            else:
                report.write_text(new, encoding="utf-8")
                print(f"{report}: tables regenerated from {args.store or default_store()}.")
    except (OSError, UniragError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for report in stale:
        print(f"{report}: tables are stale; run `{COMMAND}`.", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
