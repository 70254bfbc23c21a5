"""Answers from a recorded self-checked search: the reading half of `eval --system joint --self-check N`.

`generative_recall.py --self-check N --records FILE` records, for every question, the search's top N documents
with their search scores and question log-likelihoods. This script re-ranks them with a given (n, weight), as
`JointSystem` would with `--self-check n --self-check-weight weight` after the same search, and has the joint
checkpoint's reader (or, with --base-reader, the base LLM) answer from the top k documents. The search is not
run again, so a setting chosen on held-out questions costs only the reading on dev. Several --n values share
one reading of every distinct context (the answer is greedy, so it depends only on the question and the
documents read). Writes the same summary and per-question records as `python -m unirag eval` (`--out`, for
`python -m unirag compare`; with several --n, one file per N: `answers-n20.json`, ...).

    python -m benchmarks.read_recorded_search --checkpoint checkpoints/nq-smollm2 --dataset nq \\
        --records runs/dev_nq_records.json --n 32 --weight 16 --k 1 --base-reader --out runs/nq_answers.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from unirag.cli import add_precision_flags, precision_of


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--dataset", default="nq")
    parser.add_argument("--split", default="dev", help="dev, train, or heldout (as generative_recall.py)")
    parser.add_argument("--records", required=True, help="generative_recall.py --records file(s), comma-separated")
    parser.add_argument("--n", type=int, nargs="+", required=True,
                        help="candidates re-ranked (at most the recorded N); several values share the reading")
    parser.add_argument("--weight", type=float, required=True, help="weight of the question log-likelihood")
    parser.add_argument("--k", type=int, default=1, help="documents read")
    parser.add_argument("--base-reader", action="store_true", help="the base LLM reads (adapter, pathway off)")
    add_precision_flags(parser)  # --precision 4bit|nf4|fp32, as `eval` takes it
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", default=None, help="per-question records, as `eval --out`")
    args = parser.parse_args(argv)
    args.precision = precision_of(args)
    if args.k < 1 or any(args.k > n for n in args.n):
        parser.error("need 1 <= --k <= every --n")
    if len(set(args.n)) != len(args.n):
        parser.error("--n values repeat")

    from benchmarks.generative_recall import load_split, ranked_candidates
    from unirag.data import prepare_question
    from unirag.eval import run_eval
    from unirag.joint import JointSystem
    from unirag.settings import InferenceSettings

    records: dict[str, dict] = {}
    for path in args.records.split(","):
        blob = json.loads(Path(path).read_text())
        recorded_n = blob.get("args", {}).get("self_check")
        if recorded_n is not None and max(args.n) > recorded_n:
            parser.error(f"{path} recorded only the top {recorded_n} candidates; --n {max(args.n)} is more")
        records.update({r["id"]: r for r in blob["records"]})
    corpus, questions = load_split(args.dataset, args.split, args.checkpoint)
    questions = [q for q in questions if q.id in records]
    if not questions:
        parser.error("no question of the split is in the records")
    system = JointSystem.from_checkpoint(args.checkpoint, corpus, precision=args.precision,
                                         attn_implementation="sdpa", traces=False)
    settings = InferenceSettings(max_new_tokens=args.max_new_tokens,
                                 joint_reader="base" if args.base_reader else "trained")

    read: dict[tuple[str, tuple[str, ...]], object] = {}  # (question id, documents) → answer

    def answer_batch(batch, n):
        answers = []
        for q in batch:
            ranked = ranked_candidates(records[q.id], n, args.weight)
            top = ranked[: args.k]
            key = (q.id, tuple(d for d, _ in top))
            if key not in read:
                text, notices = prepare_question(q.question)
                answer = system.read(text, system.documents([d for d, _ in top], [s for _, s in top]), settings)
                answer.notices[:0] = notices
                read[key] = answer
            # The re-ranked search (R@3 as eval reports it) differs per N even when the documents read do not.
            answers.append(dataclasses.replace(read[key], ranked_doc_ids=[d for d, _ in ranked]))
        return answers

    for n in args.n:
        out = args.out
        if out is not None and len(args.n) > 1:
            out = str(Path(out).with_name(f"{Path(out).stem}-n{n}{Path(out).suffix}"))
        summary = run_eval(lambda batch, n=n: answer_batch(batch, n), "joint", questions, args.k, batch_size=1,
                           out=out, labels={
            "corpus": args.dataset, "precision": args.precision,
            "reader": "base LLM" if args.base_reader else "stage-2", "self_check": n,
            "self_check_weight": args.weight, "retrieval": f"recorded search ({args.records})"})
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
