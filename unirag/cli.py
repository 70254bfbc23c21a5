"""`python -m unirag {index,eval,merge,ask,compare,train,build}`: one CLI. User errors print a message and exit 2."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

from unirag.errors import UniragError
from unirag.settings import HELP, PRECISIONS, InferenceSettings, normalize_precision, precision_from_flags
from unirag.systems import SYSTEM_NAMES


def _add_corpus(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", required=True, help="corpus JSONL (or raw SQuAD JSON)")
    parser.add_argument("--encoder", default=None, help="sentence encoder: hub id, 'dpr', or empty for embedded MiniLM")


def _add_system(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """The system, its model, and every inference setting (unset = the checkpoint's recommended, else default)."""
    from unirag.systems import describe

    parser.add_argument("--system", required=default is None, default=default, choices=SYSTEM_NAMES,
                        help="the compared system:\n" + describe())
    parser.add_argument("--checkpoint", default=None,
                        help="joint checkpoint folder (the joint* systems, rag-joint-reader and rag-selfcheck)")
    parser.add_argument("--llm", default=None, help="LLM hub id or local folder; empty = embedded SmolLM2-135M")
    add_precision_flags(parser)
    settings = parser.add_argument_group("inference settings (unset: the checkpoint's recommended setting for the "
                                         "precision, else the library default)")
    defaults = InferenceSettings()
    for name in InferenceSettings.names():
        if name == "precision":
            continue
        kind = type(getattr(defaults, name))  # int, float or str, as the settings object declares it
        settings.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=HELP[name])
    settings.add_argument("--self-check-cache", action="store_true",
                          help="build the self-check passage cache first when it is missing (a resumable pass over "
                               "every passage; see `index --self-check-cache`); an existing one is always used")


def add_precision_flags(parser: argparse.ArgumentParser, default: str = "fp32") -> None:
    """`--precision 4bit|nf4|fp32`, the app's vocabulary; the older `--load-in-4bit [--no-recovery]` still parse
    (hidden) and mean 4bit [nf4]. Read the value with `precision_of(args)`."""
    parser.add_argument("--precision", type=normalize_precision, choices=PRECISIONS, default=None,
                        help=f"LLM weights: {HELP['precision']} (default {default})")
    parser.add_argument("--load-in-4bit", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-recovery", action="store_true", help=argparse.SUPPRESS)
    parser.set_defaults(precision_default=default)


def precision_of(args: argparse.Namespace) -> str:
    """The precision `add_precision_flags` parsed: --precision, else the older flags' meaning, else the default."""
    legacy = getattr(args, "load_in_4bit", False) or getattr(args, "no_recovery", False)
    if args.precision is not None:
        if legacy and args.precision != precision_from_flags(args.load_in_4bit, args.no_recovery):
            raise UniragError(f"--precision {args.precision} contradicts --load-in-4bit/--no-recovery; use "
                              "--precision alone.")
        return args.precision
    if legacy:
        precision = precision_from_flags(args.load_in_4bit, args.no_recovery)
        print(f"note: --load-in-4bit/--no-recovery are spelled --precision {precision} now.", file=sys.stderr)
        return precision
    return getattr(args, "precision_default", "fp32")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m unirag", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    index = sub.add_parser("index", help="embed the corpus and build the docid tree (cached)")
    _add_corpus(index)
    # --tree-k/--tree-c, as `train` names them; the older --k/--c still parse (hidden).
    index.add_argument("--tree-k", dest="k", type=int, default=10, help="k-means branching factor per level")
    index.add_argument("--tree-c", dest="c", type=int, default=10,
                       help="a cluster with more than c documents is split again")
    index.add_argument("--k", dest="k", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    index.add_argument("--c", dest="c", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    index.add_argument("--seed", type=int, default=0)
    index.add_argument("--out", default=None, help="also write the tree JSON here")
    index.add_argument("--self-check-cache", action="store_true",
                       help="also build the self-check passage cache for --checkpoint's base LLM (in 4 bits with "
                            "--precision): a one-off pass over every passage, with progress, resumable")
    index.add_argument("--checkpoint", default=None, help="with --self-check-cache: a joint checkpoint folder")
    add_precision_flags(index)

    ev = sub.add_parser("eval", help="evaluate a system; stdout is one JSON summary",
                        formatter_class=argparse.RawTextHelpFormatter)
    _add_corpus(ev)
    ev.add_argument("--questions", required=True, help="questions JSONL (or raw SQuAD JSON)")
    _add_system(ev)
    ev.add_argument("--limit", type=int, default=None, help="evaluate the first N questions only (after --offset)")
    ev.add_argument("--offset", type=int, default=0,
                    help="skip the first N questions: shards of a long run, joined by `python -m unirag merge`")
    ev.add_argument("--out", default=None, help="per-question records (JSON), written as each question finishes")
    ev.add_argument("--resume", action="store_true", help="continue an interrupted run of the same --out")
    ev.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ev.add_argument("--record", default=None, metavar="RUN",
                    help="append the run, named in plain words, to the results store (results/<corpus>.jsonl)")
    ev.add_argument("--batch-size", type=int, default=8, help="questions per generation batch (base-LLM systems)")

    ask = sub.add_parser("ask", help="answer one question with a system; stdout is one JSON record",
                         formatter_class=argparse.RawTextHelpFormatter)
    _add_corpus(ask)
    ask.add_argument("question")
    _add_system(ask, default="rag")

    merge = sub.add_parser("merge", help="join the eval --out files of question shards into one run")
    merge.add_argument("out", help="merged records file to write (as eval --out)")
    merge.add_argument("shards", nargs="+", help="eval --out files of the shards (same system and setting)")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    merge.add_argument("--record", default=None, metavar="RUN",
                       help="append the merged run, named in plain words, to the results store")

    compare = sub.add_parser("compare", help="paired comparison of two eval runs on the same questions")
    compare.add_argument("a", help="eval --out file (records) of system A")
    compare.add_argument("b", help="eval --out file (records) of system B")
    compare.add_argument("--metric", default="accuracy", choices=["accuracy", "em", "recall@1", "recall@k"])
    compare.add_argument("--per-question", default=None, metavar="OUT",
                         help="also write which questions each run got right: OUT.csv (a table) or OUT.json")
    compare.add_argument("--overwrite", action="store_true", help="replace an existing --per-question file")

    # `train` owns its flags (TrainConfig); main() hands them over untouched.
    sub.add_parser("train", help="train the joint model (stage 1 then 2); see `python -m unirag train --help`",
                   add_help=False)
    sub.add_parser("build", help="docid tree + stage 1 (and 2) for any corpus, resumable; see `python -m unirag "
                   "build --help`", add_help=False)
    sub.add_parser("querygen", help="train the passage -> question generator and generate indexing queries; see "
                   "`python -m unirag querygen --help`", add_help=False)
    return parser


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UniragError(f"--{name} must be at least 1 (got {value}).")


def refuse_existing(name: str, path: str | Path | None, overwrite: bool) -> None:
    """An existing output file is replaced only with --overwrite (as eval's --out)."""
    if path and Path(path).exists() and not overwrite:
        raise UniragError(f"{name} {path} exists; pass --overwrite to replace it, or give another name.")


def cmd_index(args: argparse.Namespace) -> int:
    from unirag.data import load_corpus
    from unirag.docids import TreeConfig, load_or_build_tree, tree_path
    from unirag.eval import check_output_paths

    if args.seed < 0:
        raise UniragError(f"--seed must be 0 or more (got {args.seed}).")
    # Before reading anything: --out == the corpus would replace the corpus with the tree.
    check_output_paths({"--out": args.out}, [args.corpus], what="inputs (the corpus)")
    corpus = load_corpus(args.corpus)
    config = TreeConfig(k=args.k, c=args.c, seed=args.seed, encoder=args.encoder or TreeConfig.encoder)
    precision = precision_of(args)
    if (args.checkpoint or precision != "fp32") and not args.self_check_cache:
        raise UniragError("--checkpoint and --precision go with --self-check-cache.")
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

        model = JointModel.from_pretrained(args.checkpoint, precision=precision)
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


def _explicit_settings(args: argparse.Namespace) -> dict:
    """The settings flags given, but `--precision`: every system loads in some precision (`precision_of`)."""
    return {name: getattr(args, name) for name in InferenceSettings.names()
            if name != "precision" and getattr(args, name, None) is not None}


def _resolve(args: argparse.Namespace, corpus, *, attn_implementation: str, traces: bool):
    """(system spec, loaded system, settings): the layered settings, validated once, for the loaded system."""
    from unirag.systems import load_system, spec

    s = spec(args.system)
    explicit = _explicit_settings(args)
    unused = sorted(set(explicit) - set(s.settings_used))
    if unused:
        flags = ", ".join("--" + n.replace("_", "-") for n in unused)
        raise UniragError(f"{flags} do(es) not apply to --system {args.system}; it reads: "
                          f"{', '.join(s.settings_used)}.")
    if args.self_check_cache and "self_check" not in s.settings_used:
        raise UniragError(f"--self-check-cache applies to the joint search systems, not {args.system}.")
    precision = precision_of(args)
    InferenceSettings(precision=precision, **explicit)  # bad values fail here, before any model loads
    system, joint = load_system(args.system, corpus, checkpoint=args.checkpoint, llm=args.llm, encoder=args.encoder,
                                precision=precision, passage_cache=args.self_check_cache,
                                attn_implementation=attn_implementation, traces=traces)
    settings = InferenceSettings.from_existing(
        args.checkpoint if s.needs_checkpoint else None, precision,
        passage_cache=joint is not None and joint.passage_cache is not None, **explicit)
    s.check(settings)  # e.g. rag-selfcheck with the self-check off: refused before any question
    for notice in settings.notices:
        print(f"note: {notice}", file=sys.stderr)
    return s, system, settings


def cmd_eval(args: argparse.Namespace) -> int:
    from unirag.data import load_corpus, load_questions
    from unirag.eval import check_existing_out, check_output_paths, load_eval_file, partial_path, run_eval

    for name in ("limit", "batch_size"):
        _positive(name.replace("_", "-"), getattr(args, name))
    if args.offset < 0:
        raise UniragError(f"--offset must be at least 0 (got {args.offset}).")
    # The sidecar of an interrupted run is written and deleted too: it may not be an input either.
    check_output_paths({"--out": args.out, "--out's partial file": partial_path(args.out) if args.out else None},
                       [args.corpus, args.questions])
    if args.resume and not args.out:
        raise UniragError("--resume continues an --out file; give --out.")
    if args.out:
        check_existing_out(args.out, args.resume, args.overwrite)  # before seconds of model loading
    corpus = load_corpus(args.corpus)
    questions = load_questions(args.questions, corpus)
    if args.offset >= len(questions):
        raise UniragError(f"--offset {args.offset} skips all {len(questions)} questions.")
    questions = questions[args.offset :][: args.limit]
    s, system, settings = _resolve(args, corpus, attn_implementation="sdpa", traces=False)
    k = s.documents_read(settings)
    labels = {
        "corpus": Path(args.corpus).resolve().parent.name,
        "split": Path(args.questions).stem,
        "corpus_fingerprint": corpus.fingerprint,
        "precision": settings.precision,
        "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "llm": args.llm or "embedded SmolLM2-135M-Instruct",
        # rounds 1 and free answers are what every run before those settings existed did: left out, so their
        # partial files still resume and their shards still merge with new ones.
        "settings": {name: getattr(settings, name) for name in s.settings_used
                     if not (name == "rounds" and settings.rounds == 1)
                     and not (name == "answer_mode" and settings.answer_mode == "free")
                     and not (name == "reader_prompt" and settings.reader_prompt == "plain")},
    }
    if args.self_check_cache or "self_check" in s.settings_used:
        labels["passage_cache"] = bool(getattr(getattr(system, "joint", None), "passage_cache", None))
    batch = args.batch_size if s.reader == "base" else 1
    with tempfile.TemporaryDirectory() as scratch:
        # A recorded run keeps its per-question outcomes in the store row: without --out they pass through scratch.
        out = args.out or (str(Path(scratch) / "records.json") if args.record else None)
        summary = run_eval(lambda qs: system.answer_many(qs, settings), args.system, questions, k, batch_size=batch,
                           out=out, labels=labels, resume=args.resume, overwrite=args.overwrite)
        if args.record:
            # Python's slice notation, as the store writes it: dev[:300] for the first 300, dev[300:600] after them.
            split = labels["split"] + (f"[{args.offset or ''}:{args.offset + len(questions)}]"
                                       if args.offset or args.limit else "")
            _record(summary, args.record, split, args.command_line, load_eval_file(out)["records"])
    print(json.dumps(summary), flush=True)
    return 0


def _record(summary: dict, run: str, split: str, command: str, records: list[dict] | None = None) -> None:
    """Append a run to the results store (results/<corpus>.jsonl, or UNIRAG_RESULTS), its settings from the labels
    and, given its per-question records, their right/wrong outcomes (for sign tests against any other row)."""
    from unirag.results import append_run, outcomes_of, row_from_summary

    settings = {k: summary[k] for k in ("checkpoint", "llm", "corpus_fingerprint", "passage_cache") if k in summary}
    row = row_from_summary(summary, run=run, system=summary["system"], corpus=summary["corpus"], split=split,
                           precision=summary["precision"], settings={**settings, **summary.get("settings", {})},
                           command=command)
    if records and all(r.get("accuracy") in (0, 1) for r in records):
        row["outcomes"] = outcomes_of(records)
    print(f"recorded in {append_run(row)}", file=sys.stderr)


def cmd_ask(args: argparse.Namespace) -> int:
    from unirag.data import Question, load_corpus, prepare_question

    text, _ = prepare_question(args.question)  # an empty question fails before any model loads
    corpus = load_corpus(args.corpus)
    _, system, settings = _resolve(args, corpus, attn_implementation="eager", traces=True)
    answer = system.answer_many([Question("ask", args.question, ())], settings)[0]
    for notice in answer.notices:
        print(f"note: {notice}", file=sys.stderr)
    for doc in answer.docs:
        print(f"[{doc.score:.3f}] {doc.doc_id} {doc.title}", file=sys.stderr)
    print(json.dumps({**answer.to_record(), "settings": settings.to_dict()}, ensure_ascii=False))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from unirag.eval import check_output_paths, load_eval_file, merge_runs
    from unirag.paths import write_json_atomic

    # Before reading anything: OUT == a shard would lose that shard's records.
    check_output_paths({"OUT": args.out}, args.shards, what="shards")
    refuse_existing("OUT", args.out, args.overwrite)
    merged = merge_runs([load_eval_file(path) for path in args.shards], names=args.shards)
    write_json_atomic(args.out, merged, indent=1)
    if args.record:
        summary = merged["summary"]
        if "system" not in summary or "corpus" not in summary:
            raise UniragError("The shards' summaries do not name their system and corpus (written by an older "
                              "eval); they cannot be recorded.")
        _record(summary, args.record, summary.get("split", "dev"), args.command_line, merged["records"])
    print(json.dumps(merged["summary"]), flush=True)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from unirag.eval import check_output_paths, compare_records, load_eval_file, paired_comparison, write_comparison

    out = getattr(args, "per_question", None)
    check_output_paths({"--per-question": out}, [args.a, args.b], what="runs")
    refuse_existing("--per-question", out, getattr(args, "overwrite", False))
    records = [load_eval_file(path)["records"] for path in (args.a, args.b)]
    result = {"run_a": str(args.a), "run_b": str(args.b), **paired_comparison(*records, metric=args.metric)}
    if out:
        result["per_question"] = str(write_comparison(compare_records(*records, metric=args.metric), out))
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["train"]:
            from unirag.joint.training import main as train_main

            return train_main(argv[1:])
        if argv[:1] == ["build"]:
            from unirag.build import main as build_main

            return build_main(argv[1:])
        if argv[:1] == ["querygen"]:
            from unirag.querygen import main as querygen_main

            return querygen_main(argv[1:])
        args = build_parser().parse_args(argv)
        args.command_line = "python -m unirag " + shlex.join(argv)  # what a results row records
        handlers = {"index": cmd_index, "eval": cmd_eval, "ask": cmd_ask, "merge": cmd_merge, "compare": cmd_compare}
        return handlers[args.command](args)
    except UniragError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
