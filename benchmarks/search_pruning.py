"""Does reading a recorded search at a smaller N give what a live search for N documents gives?

`read_recorded_search.py` takes the top N (by search score) of a search that asked for M > N documents. A live
search that asks for N prunes harder (it stops a beam once it cannot beat the N-th document, not the M-th), which
frees beam slots for other paths, so its top N can differ. This re-runs the live search for each N and counts how
often the documents (in order) and the document sets agree with the recorded top N. The recorded N itself is a
reproducibility check: it must agree on every question.

    python -m benchmarks.search_pruning --checkpoint checkpoints/nq-smollm2 --dataset nq \
        --records runs/dev_nq_fp32_records.json --n 5 10 20 32
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from unirag.cli import add_precision_flags, precision_of


def recorded_top(record: dict, n: int) -> list[str]:
    return [c["doc_id"] for c in sorted(record["candidates"], key=lambda c: c["search_rank"])[:n]]


def agreement(live: dict[int, list[list[str]]], recorded: dict[int, list[list[str]]]) -> dict[int, dict]:
    """Per N: questions whose live top N equals the recorded top N in order, as a set, and whose top 1 agrees."""
    out = {}
    for n, lives in live.items():
        pairs = list(zip(lives, recorded[n], strict=True))
        out[n] = {"questions": len(pairs),
                  "same_order": sum(a == b for a, b in pairs),
                  "same_set": sum(set(a) == set(b) for a, b in pairs),
                  "same_top1": sum(a[:1] == b[:1] for a, b in pairs)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--dataset", default="nq")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--records", required=True, help="a generative_recall.py --records file")
    parser.add_argument("--n", type=int, nargs="+", required=True, help="documents the live search asks for")
    parser.add_argument("--beam-width", type=int, default=None,
                        help="the live search's beam (default: the recorded search's); raised to N as `retrieve` does")
    parser.add_argument("--limit", type=int, default=None, help="the first N recorded questions only")
    add_precision_flags(parser)  # --precision 4bit|nf4|fp32, as `eval` takes it
    args = parser.parse_args(argv)
    args.precision = precision_of(args)

    from tqdm.auto import tqdm

    from benchmarks.generative_recall import load_split
    from unirag.joint import JointSystem
    from unirag.joint.search import search_docids

    blob = json.loads(Path(args.records).read_text())
    recorded_args = blob["args"]
    recorded = recorded_args.get("precision") or ("4bit" if recorded_args.get("load_in_4bit") else "fp32")
    if recorded != args.precision:
        parser.error(f"--precision must match the recorded search's precision ({recorded})")
    recorded_n = recorded_args["self_check"]
    beam = args.beam_width or max(recorded_args["beam_width"], recorded_n)
    if any(n > recorded_n for n in args.n):
        parser.error(f"the records hold the top {recorded_n} documents; ask for at most that many")
    records = blob["records"][: args.limit]
    corpus, questions = load_split(args.dataset, args.split, args.checkpoint)
    by_id = {q.id: q for q in questions}
    missing = [r["id"] for r in records if r["id"] not in by_id]
    if missing:
        parser.error(f"{len(missing)} recorded questions are not in the {args.split} split (first: {missing[0]})")
    system = JointSystem.from_checkpoint(args.checkpoint, corpus, precision=args.precision)
    live: dict[int, list[list[str]]] = {n: [] for n in args.n}
    for record in tqdm(records, desc="live searches", unit="q"):
        for n in args.n:
            search = search_docids(system.model, system.tokenizer, by_id[record["id"]].question, system.tree,
                                   max(beam, n), n, rescore=system.document_match)
            live[n].append([b.doc_id for b in search.beams])
    recorded = {n: [recorded_top(r, n) for r in records] for n in args.n}
    print(json.dumps({"records": args.records, "recorded_n": recorded_n, "beam_width": beam,
                      "precision": args.precision,
                      "agreement": agreement(live, recorded)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
