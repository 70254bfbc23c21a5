"""GeAR-style localization, measured: how often the sentence a method ranks first (or in its top 3) is the one that
holds the answer.

Each question is read with its **gold passage** only, so localization is measured apart from retrieval. The
answer sentence is the one holding the gold answer (located as the first occurrence of the first gold answer
string: our SQuAD files keep no `answer_start`, see `unirag.answer_sentences`); questions whose answer is not in the
passage, or that have no gold passage, are skipped and counted. Methods (`unirag.joint.passage_attention`): the joint
model's retrieval heads, the stage-2 reader (its last layers and its bridge), the RAG reader (the base LLM), each
as the attention of the last prompt position summed over a sentence's tokens; against the first sentence, the
longest sentence (what summing alone favours), the sentence sharing most question words, and a random sentence
(its exact expectation, min(3, n) / n for the top 3).

    OMP_NUM_THREADS=1 python -m benchmarks.localization --checkpoint checkpoints/squad-smollm2 \\
        --split train-held-out --limit 30                  # held-out train questions: never trained on
    OMP_NUM_THREADS=1 python -m benchmarks.localization --checkpoint checkpoints/squad-smollm2 --split dev --record

`--record` appends one row per method to the results store (`results/<corpus>.jsonl`); docs/notes/studies.md's
`<!-- results:localization -->` table is generated from them (`python -m benchmarks.report`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from unirag.answer_sentences import BASELINES, RANDOM, REPORT_ORDER, localize, random_hit_rate
from unirag.data import Passage, Question, load_corpus, load_questions
from unirag.paths import REPO_ROOT, default_data_dir, write_json_atomic
from unirag.results import METRIC_KEYS, append_run, row_from_summary

OUT = REPO_ROOT / "runs" / "localization"
RUN_PREFIX = "localization: "
# Each method's run name in the store, and the named system whose reading it is (the gold passage is forced).
LABELS = {
    "retrieval_heads": ("retrieval heads", "joint-gold"),
    "trained_reader": ("stage-2 reader, answer attention", "joint-gold"),
    "trained_reader_bridge": ("stage-2 reader, bridge attention", "joint-gold"),
    "base_reader": ("RAG reader (base LLM), answer attention", "gold"),
    "lexical_overlap": ("most question words (baseline)", "gold"),
    "first_sentence": ("first sentence (baseline)", "gold"),
    "longest_sentence": ("longest sentence (baseline)", "gold"),
    RANDOM: ("random sentence (baseline, expected)", "gold"),
}
assert tuple(LABELS) == REPORT_ORDER, "the report's order names every method"
TOP = (1, 3)


def measure(model, tokenizer, corpus: Mapping[str, Passage], questions: Sequence[Question],
            progress: bool = True) -> dict[str, Any]:
    """Localize every question on its gold passage; per-question records and each method's top-1 / top-3."""
    from tqdm.auto import tqdm

    from unirag.joint.passage_attention import passage_attention

    records: list[dict[str, Any]] = []
    skipped = {"no_gold_passage": 0, "answer_not_in_passage": 0}
    started = time.perf_counter()
    for q in tqdm(questions, desc="localization", unit="q", disable=not progress, file=sys.stderr):
        if not q.doc_id or q.doc_id not in corpus:
            skipped["no_gold_passage"] += 1
            continue
        passage = corpus[q.doc_id]
        found = localize(passage.text, q.question, q.answers, {})
        if found.answer is None:  # no model pass for a question that cannot be scored
            skipped["answer_not_in_passage"] += 1
            continue
        attention = passage_attention(model, tokenizer, q.question, passage)
        result = localize(passage.text, q.question, q.answers,
                          {m: (a.offsets, a.weights) for m, a in attention.items()})
        n = len(result.sentences)
        records.append({
            "id": q.id, "doc_id": q.doc_id, "sentences": n, "answer_sentence": result.answer,
            "answer_repeated": result.repeated,
            "top3": {name: ranking[:3] for name, ranking in result.rankings.items()},
            "hits@1": {**result.hits(1), RANDOM: random_hit_rate(n, 1)},
            "hits@3": {**result.hits(3), RANDOM: random_hit_rate(n, 3)},
        })
    methods: dict[str, dict[str, float]] = {}
    for name in REPORT_ORDER:
        scored = [r for r in records if name in r["hits@1"]]
        if scored:
            methods[name] = {f"top{k}": round(sum(float(r[f"hits@{k}"][name]) for r in scored) / len(scored), 4)
                             for k in TOP}
            methods[name]["n"] = len(scored)
    return {
        "n": len(records), "skipped": skipped,
        "answer_repeated": sum(r["answer_repeated"] for r in records),
        "sentences_mean": round(sum(r["sentences"] for r in records) / max(1, len(records)), 3),
        "seconds_per_question": round((time.perf_counter() - started) / max(1, len(records)), 3),
        "methods": methods, "records": records,
    }


def rows(result: Mapping[str, Any], *, checkpoint: str, corpus: str, split: str, precision: str,
         command: str) -> list[dict[str, Any]]:
    """One results-store row per method: `localization@1` / `localization@3` in its metrics, the rest null (the
    gold passage is forced, so R@1 = 1)."""
    out = []
    for name, figures in result["methods"].items():
        label, system = LABELS[name]
        summary: dict[str, Any] = {key: None for key in METRIC_KEYS}
        summary.update({"n": figures["n"], "recall@1": 1.0, "recall@k": 1.0, "k": 1})
        row = row_from_summary(
            summary, run=RUN_PREFIX + label, system=system, corpus=corpus, split=split, precision=precision,
            settings={"localization": name, "checkpoint": checkpoint, "gold_passage": True,
                      "query": "the last prompt position", "sentence_score": "attention mass summed over tokens",
                      "sentences": "pySBD", "answer_sentence": "first occurrence of the first gold answer found"},
            command=command)
        row["metrics"].update({"localization@1": figures["top1"], "localization@3": figures["top3"],
                               "sentences_mean": result["sentences_mean"],
                               "answer_repeated": result["answer_repeated"],
                               "skipped": sum(result["skipped"].values())})
        row["source"] = "python -m benchmarks.localization"
        out.append(row)
    return out


def _questions(args, corpus) -> list[Question]:
    data = default_data_dir()
    if args.split == "train-held-out":
        from unirag.joint.training import held_out_split

        path = Path(args.questions or data / args.corpus_name / "train.jsonl")
        state = json.loads((Path(args.checkpoint) / "trainer_state.json").read_text())
        questions, _ = held_out_split(load_questions(path, corpus), state["config"]["seed"],
                                      state["config"]["validation_questions"])
    else:
        questions = load_questions(args.questions or data / args.corpus_name / f"{args.split}.jsonl", corpus)
    return questions[: args.limit] if args.limit else questions


def main(argv: list[str] | None = None) -> int:
    from unirag.cli import add_precision_flags, precision_of

    parser = argparse.ArgumentParser(prog="python -m benchmarks.localization", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="joint checkpoint folder")
    parser.add_argument("--corpus-name", default="squad", help="shared dataset (its corpus and question files)")
    parser.add_argument("--corpus", default=None, help="corpus JSONL (default: the shared dataset's)")
    parser.add_argument("--questions", default=None,
                        help="questions JSONL (default: the dataset's train.jsonl, or SPLIT.jsonl for dev)")
    parser.add_argument("--split", default="train-held-out", choices=("train-held-out", "dev"),
                        help="train-held-out: the questions the checkpoint's training set aside (trainer_state.json)")
    parser.add_argument("--limit", type=int, default=0, help="the first N questions only")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default runs/localization/...)")
    parser.add_argument("--record", action="store_true", help="append one row per method to the results store")
    add_precision_flags(parser)
    args = parser.parse_args(argv)
    import torch

    from unirag.joint.modeling import JointModel

    torch.set_num_threads(max(1, torch.get_num_threads()))
    precision = precision_of(args)
    corpus = load_corpus(args.corpus or default_data_dir() / args.corpus_name / "corpus.jsonl")
    questions = _questions(args, corpus)
    # SDPA for the layers nobody reads; the pathway and the chosen layers' weights are computed in eager form.
    model = JointModel.from_pretrained(args.checkpoint, precision=precision, attn_implementation="sdpa").eval()
    result = measure(model, model.tokenizer, {p.id: p for p in corpus}, questions)
    split = args.split + (f"[:{args.limit}]" if args.limit else "")
    command = " ".join(["python -m benchmarks.localization", *(argv if argv is not None else sys.argv[1:])])
    result.update({"checkpoint": args.checkpoint, "corpus": args.corpus_name, "split": split,
                   "precision": precision, "command": command})
    out = args.out or OUT / f"{args.corpus_name}-{split.replace('[:', '-').rstrip(']')}-{precision}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "records"}, indent=1))
    print(f"[localization] {result['n']} questions ({sum(result['skipped'].values())} skipped) → {out}",
          file=sys.stderr)
    if args.record:
        for row in rows(result, checkpoint=args.checkpoint, corpus=args.corpus_name, split=split,
                        precision=precision, command=command):
            append_run(row, replace=True)
    return 0


__all__ = ["BASELINES", "LABELS", "RUN_PREFIX", "append_run", "measure", "rows"]

if __name__ == "__main__":
    raise SystemExit(main())
