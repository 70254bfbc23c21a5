"""`python -m unirag {index,eval,merge,ask,compare,train}`: one CLI. User errors print a message and exit 2."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from unirag.errors import UniragError

SYSTEMS = ("norag", "rag", "joint")


def _add_corpus(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", required=True, help="corpus JSONL (or raw SQuAD JSON)")
    parser.add_argument("--encoder", default=None, help="sentence encoder: hub id, 'dpr', or empty for embedded MiniLM")


def _add_llm(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--llm", default=None, help="LLM hub id or local folder; empty = embedded SmolLM2-135M")
    parser.add_argument("--load-in-4bit", action="store_true", help="load the LLM in bitsandbytes NF4")


SELF_CHECK_HELP = ("joint: re-rank the search's top N documents (N >= 2) by search score + how likely the question "
                   "is after each document under the base LLM (query likelihood); 0 = off")
SELF_CHECK_WEIGHT_HELP = ("joint, with --self-check: the weight of the question's mean log-probability against the "
                          "search score (default 4, chosen on held-out nq train questions; large = likelihood alone)")


SELF_CHECK_CACHE_HELP = ("joint, with --self-check: read the passages' precomputed self-check prompts (KV states "
                         "of the base LLM, built once per corpus, base and precision, resumable; see `index "
                         "--self-check-cache`) instead of re-reading N passages per question: same scores up to "
                         "float16 rounding, far faster")


def _add_self_check(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--self-check", type=int, default=0, metavar="N", help=SELF_CHECK_HELP)
    parser.add_argument("--self-check-weight", type=float, default=None, metavar="W", help=SELF_CHECK_WEIGHT_HELP)
    parser.add_argument("--self-check-cache", action="store_true", help=SELF_CHECK_CACHE_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m unirag", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    index = sub.add_parser("index", help="embed the corpus and build the docid tree (cached)")
    _add_corpus(index)
    index.add_argument("--k", type=int, default=10, help="k-means branching factor")
    index.add_argument("--c", type=int, default=10, help="split clusters larger than c")
    index.add_argument("--seed", type=int, default=0)
    index.add_argument("--out", default=None, help="also write the tree JSON here")
    index.add_argument("--self-check-cache", action="store_true",
                       help="also build the self-check passage cache for --checkpoint's base LLM (in NF4 with "
                            "--load-in-4bit): a one-off pass over every passage, with progress, resumable")
    index.add_argument("--checkpoint", default=None, help="with --self-check-cache: a joint checkpoint folder")
    index.add_argument("--load-in-4bit", action="store_true", help="with --self-check-cache: the NF4 base")

    ev = sub.add_parser("eval", help="evaluate a system; the last stdout line is a JSON summary")
    _add_corpus(ev)
    _add_llm(ev)
    ev.add_argument("--questions", required=True, help="questions JSONL (or raw SQuAD JSON)")
    ev.add_argument("--system", required=True, choices=SYSTEMS)
    ev.add_argument("--k", type=int, default=5, help="documents in the context (rag: top-k; joint: docs selected)")
    ev.add_argument("--checkpoint", default=None,
                    help="joint checkpoint folder; with --system rag, its reader reads the dense top-k")
    ev.add_argument("--limit", type=int, default=None, help="evaluate the first N questions only (after --offset)")
    ev.add_argument("--offset", type=int, default=0,
                    help="skip the first N questions: shards of a long run, joined by `python -m unirag merge`")
    ev.add_argument("--out", default=None, help="write per-question records to this JSON file")
    ev.add_argument("--summary-out", default=None,
                    help="write the summary only, labelled with corpus, precision and run name, to this JSON file "
                         "(the app's Evaluation tab reads checkpoints/*/eval_<run>_<precision>.json)")
    ev.add_argument("--batch-size", type=int, default=8, help="questions per generation batch")
    ev.add_argument("--max-new-tokens", type=int, default=32)
    ev.add_argument("--gold", action="store_true", help="read the gold passage only (reader upper bound)")
    ev.add_argument("--beam-width", type=int, default=10, help="joint: constrained beam width")
    ev.add_argument("--path-logprob-only", action="store_true",
                    help="joint: rank documents by the docid path's log-probability alone, without the "
                         "document-level match (the ranking before 2026-11-25)")
    ev.add_argument("--base-reader", action="store_true",
                    help="joint: the base LLM reads the retrieved documents (stage-2 LoRA adapter, pathway and "
                         "bridge off), the weights --system rag reads with: isolates the retrieval effect")
    _add_self_check(ev)

    ask = sub.add_parser("ask", help="answer one question with a system")
    _add_corpus(ask)
    _add_llm(ask)
    ask.add_argument("question")
    ask.add_argument("--system", default="rag", choices=SYSTEMS)
    ask.add_argument("--k", type=int, default=5)
    ask.add_argument("--checkpoint", default=None)
    ask.add_argument("--beam-width", type=int, default=10)
    _add_self_check(ask)

    merge = sub.add_parser("merge", help="join the eval --out files of question shards into one run")
    merge.add_argument("out", help="merged records file to write (as eval --out)")
    merge.add_argument("shards", nargs="+", help="eval --out files of the shards (same system and setting)")
    merge.add_argument("--summary-out", default=None, help="also write the summary alone (eval_<run>_<precision>.json)")

    compare = sub.add_parser("compare", help="paired comparison of two eval runs on the same questions")
    compare.add_argument("a", help="eval --out file (records) of system A")
    compare.add_argument("b", help="eval --out file (records) of system B")
    compare.add_argument("--metric", default="accuracy", choices=["accuracy", "em", "recall@1", "recall@k"])

    # `train` owns its flags (TrainConfig); main() hands them over untouched.
    sub.add_parser("train", help="train the joint model (stage 1 then 2); see `python -m unirag train --help`",
                   add_help=False)
    return parser


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UniragError(f"--{name} must be at least 1 (got {value}).")


def cmd_index(args: argparse.Namespace) -> int:
    from unirag.data import load_corpus
    from unirag.docids import TreeConfig, load_or_build_tree, tree_path

    corpus = load_corpus(args.corpus)
    config = TreeConfig(k=args.k, c=args.c, seed=args.seed, encoder=args.encoder or TreeConfig.encoder)
    if (args.checkpoint or args.load_in_4bit) and not args.self_check_cache:
        raise UniragError("--checkpoint and --load-in-4bit go with --self-check-cache.")
    if args.self_check_cache and not args.checkpoint:
        raise UniragError("--self-check-cache needs --checkpoint DIR: the cache is built with that checkpoint's "
                          "base LLM.")
    start = time.perf_counter()
    tree = load_or_build_tree(corpus, config)
    elapsed = time.perf_counter() - start
    if args.out:
        tree.save(args.out)
    extra = {}
    if args.self_check_cache:
        from unirag.joint.modeling import JointModel
        from unirag.joint.passage_cache import PassageCache

        model = JointModel.from_pretrained(args.checkpoint, load_in_4bit=args.load_in_4bit)
        cache_start = time.perf_counter()
        cache = PassageCache.build(model, corpus)
        extra = {"self_check_cache": str(cache.path), "self_check_cache_mb": round(cache.nbytes / 2**20, 1),
                 "self_check_cache_seconds": round(time.perf_counter() - cache_start, 1)}
    print(
        json.dumps(
            {
                "corpus": str(args.corpus),
                "fingerprint": corpus.fingerprint,
                "tree": str(tree_path(corpus, config)),
                "seconds": round(elapsed, 1),
                **tree.shape(),
                **extra,
            }
        )
    )
    return 0


def _make_answerer(args: argparse.Namespace, corpus, attn_implementation: str = "eager", traces: bool = True):
    """Return (system object, batch answer function over Question lists).

    Models load with `attn_implementation`; eval passes "sdpa" and skips attention traces (no heatmaps
    needed; 1.7x faster for RAG k=5 on squad on the 2-core CPU), the same greedy answers up to float rounding.
    """
    from unirag.backbones import load_llm
    from unirag.rag import RANKED_AT_LEAST, DenseRagSystem, DenseRetriever, NoRagSystem, Reader

    gold = getattr(args, "gold", False)
    if args.system == "joint" or (args.system == "rag" and args.checkpoint):
        from unirag.joint.decoding import JointSystem

        if not args.checkpoint:
            raise UniragError("--system joint needs --checkpoint DIR (e.g. checkpoints/nq-smollm2).")
        system = JointSystem.from_checkpoint(args.checkpoint, corpus, load_in_4bit=args.load_in_4bit,
                                             attn_implementation=attn_implementation,
                                             traces=traces,
                                             rescore=not getattr(args, "path_logprob_only", False),
                                             base_reader=getattr(args, "base_reader", False),
                                             self_check=getattr(args, "self_check", 0),
                                             passage_cache=getattr(args, "self_check_cache", False),
                                             **_self_check_weight(args))
        retriever = DenseRetriever.from_corpus(corpus, args.encoder) if args.system == "rag" else None

        def answer_joint(questions):
            answers = []
            for q in questions:
                kwargs = {"gold_doc_id": q.doc_id} if gold else {}
                ranked: list[str] = []
                if retriever is not None and not gold:  # dense top-k read by the joint model's reader
                    hits = retriever.search(q.question, max(args.k, RANKED_AT_LEAST))
                    ranked = [h[0] for h in hits] if len(hits) > args.k else []  # for R@3, as dense RAG ranks
                    hits = hits[: args.k]
                    kwargs = {"doc_ids": [h[0] for h in hits], "doc_scores": [h[1] for h in hits]}
                answer = system.answer(q.question, k_docs=args.k, beam_width=args.beam_width,
                                       max_new_tokens=getattr(args, "max_new_tokens", 32), **kwargs)
                answer.system = args.system
                answer.ranked_doc_ids = ranked or answer.ranked_doc_ids
                answers.append(answer)
            return answers

        return system, answer_joint

    model, tokenizer = load_llm(args.llm, load_in_4bit=args.load_in_4bit, attn_implementation=attn_implementation)
    reader = Reader(model, tokenizer, max_new_tokens=getattr(args, "max_new_tokens", 32))
    if args.system == "norag":
        system = NoRagSystem(reader)
        return system, lambda questions: system.answer_many([q.question for q in questions])
    system = DenseRagSystem(DenseRetriever.from_corpus(corpus, args.encoder), reader, k=args.k)

    def answer_rag(questions):
        golds = [q.doc_id for q in questions] if gold else None
        return system.answer_many([q.question for q in questions], k=args.k, gold_doc_ids=golds)

    return system, answer_rag


def _self_check_weight(args: argparse.Namespace) -> dict[str, float]:
    weight = getattr(args, "self_check_weight", None)
    return {} if weight is None else {"self_check_weight": weight}


def _check_self_check(args: argparse.Namespace) -> None:
    from unirag.joint.decoding import check_self_check, check_self_check_weight

    if args.self_check and args.system != "joint":
        raise UniragError("--self-check applies to --system joint (it re-ranks the joint model's own documents).")
    check_self_check(args.self_check)
    if args.self_check_weight is not None:
        if not args.self_check:
            raise UniragError("--self-check-weight needs --self-check N (N >= 2).")
        check_self_check_weight(args.self_check_weight)
    if args.self_check_cache and not args.self_check:
        raise UniragError("--self-check-cache needs --self-check N (N >= 2).")


def cmd_eval(args: argparse.Namespace) -> int:
    from unirag.data import load_corpus, load_questions
    from unirag.eval import run_eval, run_name, write_json_atomic
    from unirag.joint.decoding import ranking_name

    for name in ("k", "limit", "batch_size", "max_new_tokens", "beam_width"):
        _positive(name.replace("_", "-"), getattr(args, name))
    for flag in ("out", "summary_out"):
        target = getattr(args, flag)
        if target and Path(target).is_dir():
            raise UniragError(f"--{flag.replace('_', '-')} {target} is a folder; give a file name.")
        if target and not Path(target).resolve().parent.is_dir():
            raise UniragError(f"--{flag.replace('_', '-')}: the folder of {target} does not exist.")
    if args.base_reader and args.system != "joint":
        raise UniragError("--base-reader applies to --system joint (the rag system always reads with the base LLM).")
    _check_self_check(args)
    if args.self_check and args.gold:
        raise UniragError("--self-check re-ranks retrieved documents; --gold reads the gold passage without retrieval.")
    corpus = load_corpus(args.corpus)
    if args.offset < 0:
        raise UniragError(f"--offset must be at least 0 (got {args.offset}).")
    questions = load_questions(args.questions, corpus)
    if args.offset >= len(questions):
        raise UniragError(f"--offset {args.offset} skips all {len(questions)} questions.")
    questions = questions[args.offset :][: args.limit]
    if args.gold and any(q.doc_id is None for q in questions):
        raise UniragError("--gold needs a doc_id on every question.")
    system, answer_batch = _make_answerer(args, corpus, attn_implementation="sdpa", traces=False)
    batch = 1 if (args.system == "joint" or args.checkpoint) else args.batch_size
    summary = run_eval(
        answer_batch, args.system + ("-gold" if args.gold else ""), questions, args.k, batch_size=batch, out=args.out,
        labels={"corpus": Path(args.corpus).resolve().parent.name,
                "precision": "4bit" if args.load_in_4bit else "fp32",
                **({"ranking": ranking_name(not args.path_logprob_only)}
                   if args.system == "joint" and not args.gold else {}),
                **({"reader": "base LLM"} if args.base_reader else {}),
                **({"self_check": args.self_check, "self_check_weight": system.self_check_weight}
                   if args.self_check else {}),
                **({"self_check_cache": True} if args.self_check_cache else {})},
    )
    if args.summary_out:
        write_json_atomic(args.summary_out, {"summary": {**summary, "run": run_name(args.summary_out)}})
    print(json.dumps(summary), flush=True)
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from unirag.data import load_corpus

    _check_self_check(args)
    corpus = load_corpus(args.corpus)
    system, _ = _make_answerer(args, corpus)
    answer = (
        system.answer(args.question)
        if args.system != "joint"
        else system.answer(args.question, k_docs=args.k, beam_width=args.beam_width)
    )
    for notice in answer.notices:
        print(f"note: {notice}", file=sys.stderr)
    for doc in answer.docs:
        print(f"[{doc.score:.3f}] {doc.doc_id} {doc.title}", file=sys.stderr)
    print(json.dumps(answer.to_record(), ensure_ascii=False))
    return 0


def _read_records_file(path: str) -> dict:
    from unirag.eval import check_record_ids

    try:
        blob = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UniragError(f"{path} is not a readable JSON file ({exc}).") from None
    if not isinstance(blob, dict) or not isinstance(blob.get("records"), list):
        raise UniragError(f"{path} has no per-question records: pass an `eval --out` file, not a summary.")
    check_record_ids(blob["records"], path)
    return blob


def cmd_merge(args: argparse.Namespace) -> int:
    from unirag.eval import check_output_paths, merge_runs, run_name, write_json_atomic

    # Before reading anything: OUT == --summary-out would keep the summary alone, OUT == a shard loses it.
    check_output_paths({"OUT": args.out, "--summary-out": args.summary_out}, args.shards, what="shards")
    merged = merge_runs([_read_records_file(path) for path in args.shards], names=args.shards)
    write_json_atomic(args.out, merged)
    if args.summary_out:
        write_json_atomic(args.summary_out, {"summary": {**merged["summary"], "run": run_name(args.summary_out)}})
    print(json.dumps(merged["summary"]), flush=True)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from unirag.eval import paired_comparison

    records = [_read_records_file(path)["records"] for path in (args.a, args.b)]
    print(json.dumps({"run_a": str(args.a), "run_b": str(args.b), **paired_comparison(*records, metric=args.metric)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["train"]:
            from unirag.joint.training import main as train_main

            return train_main(argv[1:])
        args = build_parser().parse_args(argv)
        handlers = {"index": cmd_index, "eval": cmd_eval, "ask": cmd_ask, "merge": cmd_merge, "compare": cmd_compare}
        return handlers[args.command](args)
    except UniragError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
