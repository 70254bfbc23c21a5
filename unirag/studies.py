"""The studies the app shows beside the per-corpus tables, rendered from the results store: answer-sentence
localization, generative vs dense retrieval as the corpus grows, and the cost of 4-bit against fp32.

The app's Studies and About tabs and `unirag.viz`'s scaling figure read these; docs/RESULTS.md and its notes
embed the same tables through `python -m benchmarks.report`, which renders every other study (the 4-bit
recovery, the baselines, the docid search levers, ...).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from unirag.results import PRECISION_WORDS, PRECISIONS, _cell

# --------------------------------------------------------------------------------------------- 4-bit vs fp32


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


# --------------------------------------------------------------------------------------------- localization


LOCALIZATION_KEYS = ("localization@1", "localization@3")


def render_localization(rows: Sequence[Mapping[str, Any]]) -> str:
    """One table per corpus, split and precision of the `python -m benchmarks.localization` rows (settings carry
    `localization`: the method): top-1 and top-3 answer-sentence localization per method, methods in
    `unirag.answer_sentences.REPORT_ORDER`. Empty when the store has no such rows."""
    from unirag.answer_sentences import REPORT_ORDER

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
