"""Generative retrieval alone: R@1/3/10 of a joint checkpoint's constrained beam search on a dev set.

With --self-check N the search's top N documents are re-ranked by the question's likelihood; --sweep then also
prints R@1 for every smaller N and several weights from the same run (choose them on --split heldout, never dev):

    python -m benchmarks.generative_recall --checkpoint checkpoints/squad-smollm2 --dataset squad \
        --split heldout --self-check 20 --self-check-cache --sweep

Runs only the docid search (no answer generation), so a stage-1 model or a training lever can be compared
on the real dev questions in minutes. The documents are the model's own distinct finished beams, ranked by
score (path log-probability plus the document-level match), exactly as the app and
`python -m unirag eval --system joint` retrieve them.

    python -m benchmarks.generative_recall --checkpoint checkpoints/nq-smollm2 --dataset nq [--precision 4bit]

A training lever's dev row goes to the results store with `--store "NAME"` (the run "docid search lever: NAME",
with the checkpoint's training settings, stage-1 wall time, examples and held-out curve); `--records F` keeps each
question's ranking, and `--against F RUN` adds the paired sign test on R@1 against another run's records:

    python -m benchmarks.generative_recall --checkpoint runs/ckpt/nq-kl --dataset nq --records runs/kl.json \
        --store "dense distillation at every level, 8 epochs" --against runs/shipped.json "shipped nq-smollm2"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from unirag.cli import add_precision_flags, precision_of
from unirag.joint.selfcheck import rerank

SWEEP_WEIGHTS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 1e6)  # 0: the search's order; 1e6: the likelihood alone


def self_checked_recall(system, questions, settings) -> tuple[dict[str, float], list[dict]]:
    """Recall@1/3/n of the search's top n documents after the self-check re-ranking, and per-question records
    (gold and every candidate's search rank, search score and question log-likelihood) for `rerank_recall`."""
    from tqdm.auto import tqdm

    n = settings.self_check
    ks = sorted({k for k in (1, 3, n) if k <= n})
    hits = dict.fromkeys(ks, 0)
    records = []
    for q in tqdm(questions, desc="self-checked recall", unit="q"):
        retrieval = system.retrieve(q.question, settings)
        ranked = retrieval.ranking  # every self-checked document, best first
        for k in ks:
            hits[k] += q.doc_id in ranked[:k]
        candidates = sorted(retrieval.self_check, key=lambda t: t.search_rank)
        records.append({"id": q.id, "gold": q.doc_id, "candidates": [
            {"doc_id": t.doc_id, "search_rank": t.search_rank, "search_score": t.search_score,
             "question_logprob": t.question_logprob} for t in candidates]})
    return {**{f"recall@{k}": round(hits[k] / max(len(questions), 1), 4) for k in ks}, "n": len(questions)}, records


def searched_recall(model, tokenizer, tree, questions, beam_width: int, rescore: bool,
                    ks: tuple[int, ...] = (1, 3, 10)) -> tuple[dict, list[dict]]:
    """R@k of the docid search alone, and each question's record: id, gold, the documents found (best first)."""
    from tqdm.auto import tqdm

    from unirag.joint.search import search_docids

    records = []
    model.eval()
    for q in tqdm(questions, desc="docid search", unit="q"):
        beams = search_docids(model, tokenizer, q.question, tree, beam_width, max(ks), pathway=True,
                              bridge=model.reader_trained, rescore=rescore).beams
        records.append({"id": q.id, "gold": q.doc_id, "found": [b.doc_id for b in beams]})
    n = max(len(questions), 1)
    recall = {f"recall@{k}": round(sum(r["gold"] in r["found"][:k] for r in records) / n, 4) for k in ks}
    return {**recall, "n": len(questions)}, records


def hits_at_1(records: list[dict]) -> list[dict]:
    """Per question {"id", "recall@1"} (0/1) from `searched_recall` records, for `unirag.eval.paired_comparison`."""
    if any("found" not in r for r in records):
        from unirag.errors import UniragError

        raise UniragError("--against needs the records of a search-only run (no --self-check).")
    return [{"id": r["id"], "recall@1": float(r["found"][:1] == [r["gold"]])} for r in records]


def lever_row(result: dict, checkpoint: str, run: str, command: str, paired: list[dict]) -> dict:
    """The store row of a training lever's dev search: its training settings, held-out curve, wall time."""
    import datetime as dt

    from unirag.results import MACHINE, METRIC_KEYS, SEARCH_LEVER_PREFIX, validate_row

    state_path = Path(checkpoint) / "trainer_state.json"
    config = json.loads(state_path.read_text()).get("config", {}) if state_path.is_file() else {}
    log_path = Path(checkpoint) / "loss_log.jsonl"
    log = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.is_file() else []
    stage1 = [entry for entry in log if entry.get("stage") == 1 and entry.get("valid")]
    keys = ("stage1_epochs", "stage1_lr", "batch_size", "pathway_layers", "pseudo_queries", "distill_weight",
            "level_distill_weight", "document_distill_weight", "distill_temperature", "generated_queries",
            "generated_per_passage", "stage1_lora", "doc_contrast_weight", "bm25_teacher_weight",
            "bm25_temperature", "stage2_steps", "load_in_4bit", "seed")
    settings = {"checkpoint": checkpoint, "shipped": checkpoint.startswith("checkpoints/") and
                "candidates" not in checkpoint, "stage": 2 if config.get("stage2_steps") else 1,
                "beam_width": result["beam_width"], "search_only": True,
                **{k: config[k] for k in keys if k in config}}
    if "precision" in config:  # the weights it trained on (the row's own precision is the search's)
        settings["train_precision"] = config["precision"]
    if stage1 and "examples" in stage1[-1]:
        settings["stage1_examples"] = stage1[-1]["examples"]
    metrics = {k: None for k in METRIC_KEYS}
    metrics.update({"recall@1": result["recall@1"], "recall@3": result["recall@3"], "recall@k": result["recall@10"],
                    "k": 10, "search_s_mean": result["mean_search_s"]})
    if stage1:
        metrics["heldout_recall@1"] = stage1[-1]["valid"]["recall@1"]
        metrics["heldout_recall@3"] = stage1[-1]["valid"]["recall@3"]
        metrics["heldout_curve_recall@1"] = [entry["valid"]["recall@1"] for entry in stage1]
        if all("minutes" in entry for entry in stage1):
            metrics["stage1_minutes"] = round(sum(entry["minutes"] for entry in stage1), 1)
    row = {"run": SEARCH_LEVER_PREFIX + run, "system": "joint", "corpus": result["dataset"], "split": result["split"],
           "precision": result["precision"], "n": result["n"], "settings": settings, "metrics": metrics,
           "command": command, "date": dt.datetime.now(dt.timezone.utc).date().isoformat(), "machine": MACHINE,
           "source": "python -m benchmarks.generative_recall"}
    if paired:
        row["paired"] = paired
    return validate_row(row, f"lever row {run!r}")


def ranked_candidates(record: dict, n: int, weight: float) -> list[tuple[str, float]]:
    """(doc_id, score) of a record's top-n search candidates re-ranked as `JointSystem` does with that self-check
    after that search (`unirag.joint.selfcheck.rerank`)."""
    pool = sorted((c for c in record["candidates"] if c["search_rank"] <= n), key=lambda c: c["search_rank"])
    rows = rerank([(c["doc_id"], c["search_score"]) for c in pool], [c["question_logprob"] for c in pool], weight)
    return [(row.doc_id, row.score) for row in rows]


def rerank_recall(records: list[dict], n: int, weight: float, k: int = 1) -> float:
    """R@k when only the search's top n candidates are re-read and re-ranked (weight 0: the search's own order).
    Offline, from `self_checked_recall`'s records."""
    if not records:
        return 0.0
    hits = sum(record["gold"] in [d for d, _ in ranked_candidates(record, n, weight)[:k]] for record in records)
    return round(hits / len(records), 4)


def sweep(records: list[dict], n: int) -> dict[str, dict[str, float]]:
    """R@1 for every n' ≤ n (2, 3, 5, 10, 20, n) and weight in SWEEP_WEIGHTS: {"N=n'": {"w=weight": R@1}}."""
    sizes = sorted({m for m in (2, 3, 5, 10, 20, n) if m <= n})
    return {f"N={m}": {f"w={w:g}": rerank_recall(records, m, w) for w in SWEEP_WEIGHTS} for m in sizes}


def load_split(dataset: str, split: str, checkpoint: str):
    """(corpus, questions with a gold document). split "heldout": the train questions the checkpoint's training
    run held out (seed and count from its trainer_state.json), for choosing settings without touching dev."""
    from unirag.data import dataset_paths, load_corpus, load_questions
    from unirag.joint.training import held_out_split

    corpus_path, questions_path = dataset_paths(dataset, "train" if split == "heldout" else split)
    corpus = load_corpus(corpus_path)
    questions = load_questions(questions_path, corpus)
    if split == "heldout":
        state_path = Path(checkpoint) / "trainer_state.json"
        config = json.loads(state_path.read_text())["config"] if state_path.is_file() else {}
        questions, _ = held_out_split(questions, config.get("seed", 0), config.get("validation_questions", 100))
    return corpus, [q for q in questions if q.doc_id]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="joint checkpoint folder")
    parser.add_argument("--dataset", default="nq", help="nq or squad (under UNIRAG_DATA)")
    parser.add_argument("--split", default="dev",
                        help="dev, train, or heldout (the train questions the checkpoint's training held out)")
    parser.add_argument("--limit", type=int, default=None, help="the first N questions only (after --offset)")
    parser.add_argument("--offset", type=int, default=0,
                        help="skip the first N questions: shards of a long run (e.g. one per core)")
    parser.add_argument("--beam-width", type=int, default=10)
    add_precision_flags(parser)  # --precision 4bit|nf4|fp32, as `eval` takes it
    parser.add_argument("--path-logprob-only", action="store_true",
                        help="rank by the path's log-probability alone (no document-level rescoring)")
    parser.add_argument("--self-check", type=int, default=0, metavar="N",
                        help="re-rank the top N documents by search score + question likelihood (0 = off); "
                             "recall is then counted within those N")
    parser.add_argument("--self-check-weight", type=float, default=None, metavar="W",
                        help="weight of the question log-likelihood (default: the library's, 4)")
    parser.add_argument("--self-check-cache", action="store_true",
                        help="with --self-check: read the precomputed passage cache (built first if missing)")
    parser.add_argument("--sweep", action="store_true",
                        help="with --self-check N: also print R@1 for every smaller N and weight (from the same run)")
    parser.add_argument("--records", default=None, metavar="FILE",
                        help="write each question's ranking (with --self-check: candidates and scores) to this file")
    parser.add_argument("--store", default=None, metavar="NAME",
                        help='append the row "docid search lever: NAME" to the results store (replaces its own)')
    parser.add_argument("--against", nargs=2, default=None, metavar=("RECORDS", "RUN"),
                        help="with --store: the paired sign test on R@1 against another run's --records file")
    args = parser.parse_args(argv)
    args.precision = precision_of(args)
    if args.sweep and not args.self_check:
        parser.error("--sweep needs --self-check N")
    if args.against and not args.store:
        parser.error("--against needs --store NAME")
    if args.store and args.self_check:
        parser.error("--store records the docid search alone: leave out --self-check")
    if args.against and not Path(args.against[0]).is_file():
        parser.error(f"--against: no records file {args.against[0]}")
    if args.records and Path(args.records).exists() and Path(args.records).resolve() in {
            Path(args.checkpoint).resolve(), *(Path(a).resolve() for a in (args.against or [])[:1])}:
        parser.error("--records must not overwrite the checkpoint or the --against records")
    if args.offset < 0 or (args.limit is not None and args.limit < 1):
        parser.error("--offset must be >= 0 and --limit >= 1")

    from unirag.joint import JointSystem
    from unirag.joint.search import ranking_name
    from unirag.settings import InferenceSettings

    corpus, with_gold = load_split(args.dataset, args.split, args.checkpoint)
    end = None if args.limit is None else args.offset + args.limit
    questions = with_gold[args.offset : end]
    if not questions:
        parser.error(f"no questions left after --offset {args.offset} (the split has {len(with_gold)} with a gold doc)")
    if args.self_check_cache and not args.self_check:
        parser.error("--self-check-cache needs --self-check N")
    # k_docs 1: the recall counts the whole self-checked ranking (Retrieval.ranking), not the documents read.
    weight = {} if args.self_check_weight is None else {"self_check_weight": args.self_check_weight}
    settings = InferenceSettings(k_docs=1, beam_width=args.beam_width, self_check=args.self_check, **weight)
    system = JointSystem.from_checkpoint(args.checkpoint, corpus, precision=args.precision,
                                         document_match=not args.path_logprob_only,
                                         passage_cache=args.self_check_cache)  # checks the tree
    start = time.perf_counter()
    extra = {}
    if args.self_check:
        recall, records = self_checked_recall(system, questions, settings)
        extra = {"sweep_recall@1": sweep(records, args.self_check)} if args.sweep else {}
        if args.records:
            Path(args.records).write_text(json.dumps({"args": vars(args), "records": records}))
    else:
        recall, records = searched_recall(system.model, system.tokenizer, system.tree, questions, args.beam_width,
                                          rescore=not args.path_logprob_only)
        if args.records:
            Path(args.records).write_text(json.dumps({"args": vars(args), "records": records}))
    seconds = (time.perf_counter() - start) / max(len(questions), 1)
    result = {"checkpoint": args.checkpoint, "dataset": args.dataset, "split": args.split, "offset": args.offset,
              "precision": args.precision, "ranking": ranking_name(not args.path_logprob_only),
              "self_check": args.self_check,
              **({"self_check_weight": settings.self_check_weight} if args.self_check else {}),
              **recall, "beam_width": args.beam_width, "mean_search_s": round(seconds, 3), **extra}
    print(json.dumps(result))
    if args.store:
        from unirag.eval import paired_comparison
        from unirag.results import append_run

        paired = []
        if args.against:
            other = json.loads(Path(args.against[0]).read_text())["records"]
            test = paired_comparison(hits_at_1(records), hits_at_1(other), metric="recall@1")
            paired.append({"against": args.against[1], "metric": "recall@1", "only_a": test["only_a"],
                           "only_b": test["only_b"], "p": test["sign_test_p"]})
        split = args.split if args.offset == 0 and args.limit is None else f"{args.split}[{args.offset}:{end or ''}]"
        result["split"] = split
        command = "python -m benchmarks.generative_recall " + " ".join(argv if argv is not None else sys.argv[1:])
        row = lever_row(result, args.checkpoint, args.store, command, paired)
        print(f"recorded in {append_run(row, replace=True)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
