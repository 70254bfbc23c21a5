"""Per-system latency inside the app's pipeline: the joint model vs dense RAG, one question at a time.

Both sides answer exactly as in the app (same settings, attention traces on, batch 1), so the medians
compare like with like; `python -m unirag eval` batches the baselines and is not meant for this.

    python -m benchmarks.side_latency --precision 4bit --questions 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from unirag.settings import JOINT_READERS, PRECISIONS


def median_of(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", choices=PRECISIONS, default="4bit")
    parser.add_argument("--corpus", default="nq")
    parser.add_argument("--questions", type=int, default=20, help="nq/dev questions timed after one warm-up")
    parser.add_argument("--k-docs", type=int, default=2)
    parser.add_argument("--rag-k", type=int, default=5)
    parser.add_argument("--joint-reader", choices=JOINT_READERS, default="trained",
                        help="who reads the joint model's documents (the app's 'Joint reader' setting)")
    parser.add_argument("--self-check", type=int, default=0,
                        help="the joint side re-reads its top N documents (the app's 'Self-check'; 0 = off)")
    args = parser.parse_args(argv)

    from unirag.data import dataset_paths, load_questions
    from unirag.pipeline import AppConfig, Pipeline

    questions = load_questions(dataset_paths(args.corpus, "dev")[1])[: args.questions + 1]
    # One side after the other: each side's latency without the other competing for the cores.
    pipeline = Pipeline(AppConfig.from_env(precision=args.precision, parallel_sides=False))
    pipeline.bundle(args.corpus)  # load models, index and tree before timing
    options = {"k_docs": args.k_docs, "rag_k": args.rag_k, "joint_reader": args.joint_reader,
               "self_check": args.self_check}
    pipeline.ask(args.corpus, questions[0].question, **options)  # warm-up
    sides: dict[str, dict[str, list[float]]] = {"joint": {}, "rag": {}}
    for q in questions[1:]:
        start = time.perf_counter()
        comparison = pipeline.ask(args.corpus, q.question, **options)
        sides.setdefault("both", {}).setdefault("wall", []).append((time.perf_counter() - start) * 1000)
        for name, side in (("joint", comparison.joint), ("rag", comparison.rag)):
            if side.answer is None:
                raise SystemExit(f"{name} failed on {q.id}: {side.error}")
            stats = sides[name]
            stats.setdefault("total", []).append(side.answer.latency_ms)
            stats.setdefault("context_tokens", []).append(side.answer.context_tokens)
            for stage, ms in side.answer.timings_ms.items():
                stats.setdefault(stage, []).append(ms)
    summary = {"precision": args.precision, "corpus": args.corpus, "n": len(questions) - 1,
               "k_docs": args.k_docs, "rag_k": args.rag_k, "joint_reader": args.joint_reader,
               "self_check": args.self_check,
               **{f"{name}_{key}_median": median_of(values) for name, stats in sides.items()
                  for key, values in stats.items()},
               "date": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
