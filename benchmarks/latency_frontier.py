"""Per-question latency of several joint settings against dense RAG at several k, one question at a time.

Both sides load as `python -m unirag eval` loads them (SDPA attention, no attention traces) and answer a
question alone (batch 1), alternating per question, so machine noise hits every setting alike. The joint
side reads with the base LLM (`--base-reader`), as the RAG side does, or with `--joint-reader trained` with the
checkpoint's stage-2 reader. Run it with nothing else on the cores, and on many questions: the first 10 nq
questions made RAG top-5 look 15% faster, relative to the joint side, than all 265 did (docs/RESULTS.md). After
one line per setting come the pairs: on how many questions the joint side was faster and slower, the median
per-question difference and the sign test's p.

    python -m benchmarks.latency_frontier --checkpoint checkpoints/nq-smollm2 --dataset nq --questions 265 \\
        --joint 10:5:16 32:20:16 --rag-k 1 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from unirag.cli import add_precision_flags, precision_of
from unirag.eval import sign_test_p


def parse_joint_setting(text: str) -> tuple[int, int, float | None]:
    """`BEAM:N[:WEIGHT]` → (beam width, self-check N, weight or None for the library default)."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"joint setting must be BEAM:N[:WEIGHT], got {text!r}")
    try:
        beam, n = int(parts[0]), int(parts[1])
        weight = float(parts[2]) if len(parts) == 3 else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"joint setting must be BEAM:N[:WEIGHT], got {text!r}") from None
    if beam < 1 or n < 0 or n == 1:
        raise argparse.ArgumentTypeError(f"beam must be >= 1 and N 0 or >= 2, got {text!r}")
    return beam, n, weight


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--dataset", default="nq")
    parser.add_argument("--questions", type=int, default=10, help="dev questions timed after one warm-up")
    parser.add_argument("--joint", nargs="+", type=parse_joint_setting, default=[(10, 0, None)],
                        metavar="BEAM:N[:WEIGHT]", help="joint settings: beam width, self-check N (0 = off), weight")
    parser.add_argument("--rag-k", nargs="+", type=int, default=[5])
    parser.add_argument("--k-docs", type=int, default=1, help="documents the joint side reads")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--joint-reader", choices=["base", "trained"], default="base",
                        help="who reads the joint side's documents: the base LLM or the stage-2 reader")
    add_precision_flags(parser)  # --precision 4bit|nf4|fp32, as `eval` takes it
    parser.add_argument("--self-check-cache", action="store_true",
                        help="self-check from the passage cache (it must exist for this precision)")
    args = parser.parse_args(argv)
    args.precision = precision_of(args)

    from unirag.backbones import load_llm
    from unirag.data import dataset_paths, load_corpus, load_questions
    from unirag.joint import JointSystem
    from unirag.joint.passage_cache import PassageCache
    from unirag.rag import DenseRetriever, RagSystem, Reader
    from unirag.settings import InferenceSettings

    corpus_path, questions_path = dataset_paths(args.dataset, "dev")
    corpus = load_corpus(corpus_path)
    questions = load_questions(questions_path, corpus)[: args.questions + 1]
    joint = JointSystem.from_checkpoint(args.checkpoint, corpus, precision=args.precision,
                                        attn_implementation="sdpa", traces=False)
    if args.self_check_cache:
        joint.passage_cache = PassageCache.open(joint.model, corpus)  # never builds: a missing cache is an error
    model, tokenizer = load_llm(joint.model.config.base_model, precision=args.precision,
                                attn_implementation="sdpa")
    rag = RagSystem(DenseRetriever.from_corpus(corpus), Reader(model, tokenizer))

    settings = {(beam, n, weight): InferenceSettings(k_docs=args.k_docs, beam_width=beam, self_check=n,
                                                     max_new_tokens=args.max_new_tokens, joint_reader=args.joint_reader,
                                                     **({} if weight is None else {"self_check_weight": weight}))
                for beam, n, weight in args.joint}
    rag_settings = {k: InferenceSettings(rag_k=k, max_new_tokens=args.max_new_tokens) for k in args.rag_k}
    times: dict[str, dict[str, list[float]]] = {}
    for index, q in enumerate(questions):
        for beam, n, weight in args.joint:
            start = time.perf_counter()
            answer = joint.answer(q.question, settings[beam, n, weight])
            total = time.perf_counter() - start
            if index:  # the first question warms up every setting
                row = times.setdefault(f"joint beam {beam} self-check {n}", {})
                row.setdefault("total_s", []).append(total)
                row.setdefault("answer_tokens", []).append(answer.answer_tokens)
                for stage, ms in answer.timings_ms.items():
                    row.setdefault(f"{stage}_s", []).append(ms / 1000)
        for k in args.rag_k:
            start = time.perf_counter()
            answer = rag.answer(q.question, rag_settings[k])
            total = time.perf_counter() - start
            if index:
                row = times.setdefault(f"rag k {k}", {})
                row.setdefault("total_s", []).append(total)
                row.setdefault("answer_tokens", []).append(answer.answer_tokens)
                row.setdefault("context_tokens", []).append(answer.context_tokens)
    precision = args.precision
    for name, row in times.items():
        print(json.dumps({"setting": name, "dataset": args.dataset, "n": len(questions) - 1,
                          "joint_reader": args.joint_reader if name.startswith("joint") else "base",
                          "precision": precision,
                          # 0.1 ms resolution: tiny test models on a fast CPU finish in a few milliseconds
                          **{f"{key}_median": round(statistics.median(values), 4) for key, values in row.items()},
                          "total_s_mean": round(statistics.fmean(row["total_s"]), 4)}))
    for name, row in times.items():
        if name.startswith("joint"):
            for k in args.rag_k:
                print(json.dumps({"pair": f"{name} vs rag k {k}", "dataset": args.dataset, "precision": precision,
                                  **paired_latency(row["total_s"], times[f"rag k {k}"]["total_s"])}))
    return 0


def paired_latency(joint: list[float], rag: list[float]) -> dict[str, float | int]:
    """The same questions timed on both sides: how often the joint side is faster, the median of the per-question
    differences (joint − RAG), and the exact two-sided sign-test p of "faster as often as slower"."""
    diffs = [j - r for j, r in zip(joint, rag, strict=True)]
    faster, slower = sum(d < 0 for d in diffs), sum(d > 0 for d in diffs)
    return {"n": len(diffs), "joint_faster": faster, "joint_slower": slower,
            "median_diff_s": round(statistics.median(diffs), 4), "sign_test_p": round(sign_test_p(faster, slower), 4)}


if __name__ == "__main__":
    raise SystemExit(main())
