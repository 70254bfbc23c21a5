"""The query generator's throughput (questions sampled a second) and its round-trip filter's keep rate.

    python -m benchmarks.querygen_throughput --corpus nq --passages 24 --store   # a fresh timed run
    python -m benchmarks.querygen_throughput --from-meta data/generated/nq-queries.jsonl --store

A fresh run samples the first `--passages` passages of the corpus with the committed generator
(`checkpoints/querygen`) and its data file's sampling settings, into a temporary file (nothing committed is
touched). `--from-meta` records the figures the generation run behind a committed queries file measured over
the whole corpus (its `.meta.json`). Either way one results-store row: settings in full, the command, the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "query generator: "


def row_from(summary: dict, settings: dict, corpus: str, scope: str, command: str) -> dict:
    from unirag.results import METRIC_KEYS, machine, validate_row

    metrics = {k: None for k in METRIC_KEYS}
    metrics.update(questions_per_second=summary["questions_per_second"], keep_rate=summary["keep_rate"],
                   wall_time_s=round(summary["seconds"], 1))
    row = {"run": f"{PREFIX}throughput and keep rate, {scope}", "system": "joint", "corpus": corpus,
           "split": "corpus", "precision": "fp32", "n": summary["passages"],
           "settings": {**settings, "sampled": summary["sampled"], "distinct": summary["distinct"],
                        "kept": summary["kept"], "threads": int(os.environ.get("OMP_NUM_THREADS") or 0) or None},
           "metrics": metrics, "command": command, "date": time.strftime("%Y-%m-%d"), "machine": machine(),
           "source": "python -m benchmarks.querygen_throughput"}
    return validate_row(row, "query generator row")


def fresh_run(corpus: str, passages: int) -> tuple[dict, dict]:
    from unirag.data import dataset_paths
    from unirag.querygen import SamplingConfig, generate_queries

    corpus_path, dev = dataset_paths(corpus, "dev")
    meta = json.loads((ROOT / "data" / "generated" / f"{corpus}-queries.jsonl.meta.json").read_text())
    sampling = SamplingConfig(**meta["settings"]["sampling"])
    bans = [str(dev)] + [str(p) for p in [dev.with_name("test.jsonl")] if p.is_file()]  # as the committed run
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "queries.jsonl"
        summary = generate_queries(str(corpus_path), str(ROOT / "checkpoints" / "querygen"), str(out), sampling,
                                   bans, limit=passages)
        settings = json.loads(Path(str(out) + ".meta.json").read_text())["settings"]
    return summary, settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.querygen_throughput",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default="nq", help="a dataset name under the data folder (nq, squad)")
    parser.add_argument("--passages", type=int, default=24, help="passages a fresh run samples")
    parser.add_argument("--from-meta", default=None, help="record a committed queries file's whole-corpus run")
    parser.add_argument("--store", action="store_true", help="append the row to the results store")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.querygen_throughput " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.from_meta:
        meta = json.loads(Path(args.from_meta + ".meta.json").read_text())
        corpus = meta["settings"]["style"]
        row = row_from(meta["summary"], {**meta["settings"], "generated_on": meta.get("updated")}, corpus,
                       "the whole corpus (the committed queries file)", command)
    else:
        if args.passages < 1:
            parser.error("--passages must be at least 1")
        summary, settings = fresh_run(args.corpus, args.passages)
        row = row_from(summary, settings, args.corpus, f"first {args.passages} passages", command)
    print(json.dumps({"run": row["run"], **{k: v for k, v in row["metrics"].items() if v is not None}}))
    if args.store:
        from unirag.results import append_run

        print(f"recorded in {append_run(row, replace=True)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
