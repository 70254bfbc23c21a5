"""Generative retrieval alone: R@1/3/10 of a joint checkpoint's constrained beam search on a dev set.

Runs only the docid search (no answer generation), so a stage-1 model or a training lever can be compared
on the real dev questions in minutes. The documents are the model's own distinct finished beams, ranked by
score (path log-probability plus the document-level match), exactly as the app and
`python -m unirag eval --system joint` retrieve them.

    python benchmarks/generative_recall.py --checkpoint checkpoints/nq-smollm2 --dataset nq [--load-in-4bit]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def self_checked_recall(system, questions, beam_width: int, n: int) -> dict[str, float]:
    """Recall@1/3/n of the search's top n documents after the self-check re-ranking."""
    from tqdm.auto import tqdm

    ks = sorted({k for k in (1, 3, n) if k <= n})
    hits = dict.fromkeys(ks, 0)
    for q in tqdm(questions, desc="self-checked recall", unit="q"):
        chosen, _ = system.retrieve(q.question, k_docs=n, beam_width=beam_width, self_check=n)
        ranked = [beam.doc_id for beam, _ in chosen]
        for k in ks:
            hits[k] += q.doc_id in ranked[:k]
    return {**{f"recall@{k}": round(hits[k] / max(len(questions), 1), 4) for k in ks}, "n": len(questions)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="joint checkpoint folder")
    parser.add_argument("--dataset", default="nq", help="nq or squad (under UNIRAG_DATA)")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--limit", type=int, default=None, help="the first N questions only (after --offset)")
    parser.add_argument("--offset", type=int, default=0,
                        help="skip the first N questions: shards of a long run (e.g. one per core)")
    parser.add_argument("--beam-width", type=int, default=10)
    parser.add_argument("--load-in-4bit", action="store_true", help="NF4 base, as the app loads it")
    parser.add_argument("--path-logprob-only", action="store_true",
                        help="rank by the path's log-probability alone (no document-level rescoring)")
    parser.add_argument("--self-check", type=int, default=0, metavar="N",
                        help="re-rank the top N documents by search score + question likelihood (0 = off); "
                             "recall is then counted within those N")
    parser.add_argument("--self-check-weight", type=float, default=None, metavar="W",
                        help="weight of the question log-likelihood (default: the library's, 4)")
    args = parser.parse_args(argv)
    if args.offset < 0 or (args.limit is not None and args.limit < 1):
        parser.error("--offset must be >= 0 and --limit >= 1")

    from unirag.data import dataset_paths, load_corpus, load_questions
    from unirag.joint import JointSystem
    from unirag.joint.decoding import ranking_name
    from unirag.joint.training import retrieval_recall

    corpus_path, questions_path = dataset_paths(args.dataset, args.split)
    corpus = load_corpus(corpus_path)
    with_gold = [q for q in load_questions(questions_path, corpus) if q.doc_id]
    end = None if args.limit is None else args.offset + args.limit
    questions = with_gold[args.offset : end]
    if not questions:
        parser.error(f"no questions left after --offset {args.offset} (the split has {len(with_gold)} with a gold doc)")
    weight = {} if args.self_check_weight is None else {"self_check_weight": args.self_check_weight}
    system = JointSystem.from_checkpoint(args.checkpoint, corpus, load_in_4bit=args.load_in_4bit,
                                         rescore=not args.path_logprob_only, **weight)  # checks the tree
    start = time.perf_counter()
    if args.self_check:
        recall = self_checked_recall(system, questions, args.beam_width, args.self_check)
    else:
        recall = retrieval_recall(system.model, system.tokenizer, system.trie, questions, args.beam_width,
                                  ks=(1, 3, 10), progress=True,
                                  rescore=not args.path_logprob_only)
    seconds = (time.perf_counter() - start) / max(len(questions), 1)
    print(json.dumps({"checkpoint": args.checkpoint, "dataset": args.dataset, "split": args.split,
                      "offset": args.offset,
                      "precision": "4bit" if args.load_in_4bit else "fp32",
                      "ranking": ranking_name(not args.path_logprob_only),
                      "self_check": args.self_check,
                      **({"self_check_weight": system.self_check_weight} if args.self_check else {}),
                      **recall,
                      "mean_search_s": round(seconds, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
