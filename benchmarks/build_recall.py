"""What `python -m unirag build` gives on a corpus: its docid search against dense MiniLM on questions it never
trained on, and the build's minutes per 100 passages (from the checkpoint's build.json).

    python -m unirag build --corpus runs/build/gr/300/corpus.jsonl --out runs/build/nq300
    python -m benchmarks.build_recall --checkpoint runs/build/nq300 --corpus runs/build/gr/300/corpus.jsonl \
        --questions runs/build/gr/300/dev.jsonl --name nq-300 --store "nq-300, no questions (shipped recipe)"

Prints one JSON line a question file; `--store` appends a row "build: NAME" per file (kept out of the QA tables).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from unirag.cli import add_precision_flags, precision_of
from unirag.errors import UniragError
from unirag.results import BUILD_PREFIX


def dense_recall(corpus, questions) -> dict[str, float]:
    from unirag.rag import DenseRetriever

    hits = DenseRetriever.from_corpus(corpus, progress=False).search_many([q.question for q in questions], 3)
    n = len(questions)
    return {"recall@1": round(sum(q.doc_id == h[0][0] for q, h in zip(questions, hits, strict=True)) / n, 4),
            "recall@3": round(sum(q.doc_id in [d for d, _ in h] for q, h in zip(questions, hits, strict=True)) / n, 4)}


def build_row(name: str, corpus_name: str, split: str, precision: str, summary: dict, build: dict,
              command: str) -> dict:
    from unirag.results import METRIC_KEYS, machine, validate_row

    metrics = {k: None for k in METRIC_KEYS}
    metrics.update({"recall@1": summary["joint"]["recall@1"], "recall@3": summary["joint"]["recall@3"],
                    "dense_recall@1": summary["dense"]["recall@1"], "dense_recall@3": summary["dense"]["recall@3"],
                    "search_s_mean": summary["joint_seconds_per_q"]})
    minutes = build.get("minutes") or {}
    if build.get("stage1_minutes_per_100_passages") is not None:
        metrics["stage1_minutes_per_100_passages"] = build["stage1_minutes_per_100_passages"]
    if minutes:
        metrics["build_minutes"] = round(sum(minutes.values()), 2)
    settings = {"checkpoint": build.get("checkpoint"), "corpus_fingerprint": build.get("corpus_fingerprint"),
                "passages": build.get("passages"), "stage1_examples": build.get("stage1_examples"),
                "stage1_epochs": build.get("stage1_epochs"), "generated_queries": build.get("generated_queries"),
                "questions_trained": build.get("questions_trained"), "search_only": True, "shipped": False}
    row = {"run": BUILD_PREFIX + name, "system": "joint", "corpus": corpus_name, "split": split,
           "precision": precision, "n": summary["n"], "settings": settings, "metrics": metrics, "command": command,
           "date": time.strftime("%Y-%m-%d"), "machine": machine(), "source": "python -m benchmarks.build_recall"}
    return validate_row(row, f"build row {name!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a `python -m unirag build` output folder")
    parser.add_argument("--corpus", required=True, help="the corpus it was built on")
    parser.add_argument("--questions", nargs="+", required=True, help="question files it never trained on")
    parser.add_argument("--name", default=None, help="the corpus's name in the store (default: the folder's)")
    parser.add_argument("--beam-width", type=int, default=10)
    add_precision_flags(parser)
    parser.add_argument("--store", default=None, metavar="RUN", help='append rows "build: RUN" to the results store')
    args = parser.parse_args(argv)
    precision = precision_of(args)

    from unirag.data import load_corpus, load_questions
    from unirag.joint import JointSystem
    from unirag.joint.training import retrieval_recall

    build_file = Path(args.checkpoint) / "build.json"
    if not build_file.is_file():
        raise UniragError(f"{build_file} is missing: pass a `python -m unirag build` output folder.")
    build = json.loads(build_file.read_text())
    corpus = load_corpus(args.corpus)
    if build.get("corpus_fingerprint") not in (None, corpus.fingerprint):
        raise UniragError(f"{args.checkpoint} was built on another corpus than {args.corpus}.")
    system = JointSystem.from_checkpoint(args.checkpoint, corpus, precision=precision, attn_implementation="sdpa",
                                         traces=False)
    corpus_name = args.name or Path(args.corpus).resolve().parent.name
    for path in args.questions:
        questions = [q for q in load_questions(path, corpus) if q.doc_id]
        if not questions:
            raise UniragError(f"{path} has no question with a gold passage in the corpus.")
        start = time.perf_counter()
        joint = retrieval_recall(system.model, system.tokenizer, system.tree, questions, beam_width=args.beam_width)
        seconds = (time.perf_counter() - start) / len(questions)
        summary = {"questions": path, "n": len(questions), "joint": joint, "dense": dense_recall(corpus, questions),
                   "joint_seconds_per_q": round(seconds, 2)}
        print(json.dumps(summary), flush=True)
        if args.store:
            from unirag.results import append_run

            command = "python -m benchmarks.build_recall " + " ".join(argv if argv is not None else sys.argv[1:])
            row = build_row(args.store, corpus_name, Path(path).stem, precision, summary, build, command)
            print(f"recorded in {append_run(row, replace=True)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
