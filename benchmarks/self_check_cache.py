"""The self-check with and without the passage cache: time per question and agreement of the scores.

For each question the joint search's top N documents are scored twice, by re-reading the N passages
(`question_likelihood`) and from the cache (`PassageCache.question_likelihood`, float16 states); prints the
median time of each, the largest difference of a question log-likelihood and how often the top document agrees.
The cache must exist (`python -m unirag index --corpus C --self-check-cache --checkpoint DIR`).

    python -m benchmarks.self_check_cache --checkpoint checkpoints/nq-smollm2 --dataset nq --questions 20 --n 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from unirag.cli import add_precision_flags, precision_of


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--dataset", default="nq")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--questions", type=int, default=20, help="the first N questions of the split")
    parser.add_argument("--n", type=int, default=10, help="documents the self-check reads")
    add_precision_flags(parser)  # --precision 4bit|nf4|fp32, as `eval` takes it
    args = parser.parse_args(argv)
    args.precision = precision_of(args)

    from unirag.data import dataset_paths, load_corpus, load_questions
    from unirag.joint import JointSystem
    from unirag.joint.passage_cache import PassageCache
    from unirag.joint.search import search_docids
    from unirag.joint.selfcheck import question_likelihood
    from unirag.settings import InferenceSettings

    corpus_path, questions_path = dataset_paths(args.dataset, args.split)
    corpus = load_corpus(corpus_path)
    questions = load_questions(questions_path, corpus)[: args.questions]
    system = JointSystem.from_checkpoint(args.checkpoint, corpus, precision=args.precision)
    cache = PassageCache.open(system.model, corpus)
    settings = InferenceSettings(k_docs=1, self_check=args.n)  # the search a self-check of N runs (not the check)
    full_s, cached_s, diffs, same_top = [], [], [], 0
    for q in questions:
        search = search_docids(system.model, system.tokenizer, q.question, system.tree, settings.search_width,
                               settings.documents_searched)
        docs = [b.doc_id for b in search.beams[: args.n]]
        start = time.perf_counter()
        full = question_likelihood(system.model, system.tokenizer, q.question,
                                   [(d, corpus[d].title, corpus[d].text) for d in docs])
        full_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        cached = cache.question_likelihood(system.model, q.question, docs)
        cached_s.append(time.perf_counter() - start)
        diffs.append(max(abs(a - b) for a, b in zip(full, cached, strict=True)))
        same_top += max(range(len(docs)), key=full.__getitem__) == max(range(len(docs)), key=cached.__getitem__)
    print(json.dumps({
        "checkpoint": args.checkpoint, "dataset": args.dataset, "questions": len(questions), "n": args.n,
        "precision": args.precision, "cache_gb": round(cache.nbytes / 2**30, 2),
        "full_read_s_median": round(statistics.median(full_s), 3),
        "cached_s_median": round(statistics.median(cached_s), 3),
        "max_abs_logprob_diff": round(max(diffs), 5), "same_top_document": same_top / len(questions),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
