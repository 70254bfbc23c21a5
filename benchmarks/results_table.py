"""Print a Markdown table of `python -m unirag eval` summaries (the rows of docs/RESULTS.md).

    python benchmarks/results_table.py checkpoints/nq-smollm2/eval_*.json runs/eval_*.json

Each file is a `--summary-out` file ({"summary": {...}}) or an `--out` file (summary + records).
Rows keep the order of the arguments; nothing is computed here that eval did not print.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLUMNS = ("run", "precision", "n", "accuracy", "em", "f1", "recall@1", "recall@3", "recall@k", "context_tokens_mean",
           "latency_ms_median", "wall_time_s")
ONE_DECIMAL = ("context_tokens_mean", "latency_ms_median", "wall_time_s")
HEADERS = ("run", "precision", "n", "accuracy", "EM", "F1", "R@1", "R@3", "R@k (k)", "mean context tokens",
           "median latency ms", "wall s")


def row(summary: dict, fallback_run: str) -> list[str]:
    def cell(key: str) -> str:
        value = summary.get(key)
        if key == "run":
            return str(value or fallback_run)
        if key == "recall@k":
            return "–" if value is None else f"{value:.3f} ({summary.get('k')})"
        if value is None:
            return "–"
        if isinstance(value, float):
            return f"{value:.1f}" if key in ONE_DECIMAL else f"{value:.3f}"
        return str(value)

    return [cell(k) for k in COLUMNS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    print("| " + " | ".join(HEADERS) + " |")
    print("|" + "---|" * len(HEADERS))
    for path in args.files:
        try:
            blob = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            print(f"skipping {path}: {exc}", file=sys.stderr)
            continue
        summary = blob.get("summary", blob)
        fallback = path.stem.removeprefix("eval_")
        print("| " + " | ".join(row(summary, fallback)) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
