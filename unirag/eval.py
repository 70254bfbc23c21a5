"""Metrics and the evaluation loop behind `python -m unirag eval`.

accuracy = a normalised gold answer occurs in the normalised output (the paper's metric);
em / f1 are SQuAD-style; recall uses the gold `doc_id` where present.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import mean, median

from unirag.answer import Answer
from unirag.data import Question
from unirag.errors import UniragError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 when the whole normalised prediction equals a normalised gold (best gold wins). A gold or a prediction
    that normalises to empty ("The", ".") never matches: "" == "" is not an answer."""
    pred = normalize_answer(prediction)
    return float(bool(pred) and any(pred == normalize_answer(g) for g in golds))


def contains_answer(prediction: str, golds: Sequence[str]) -> float:
    """The paper's (DPR-style) "answer contained" accuracy: a normalised gold occurs as a substring of the
    normalised prediction, even inside a word (`"1" in "1991"` counts). Every measured number uses it as is,
    so it stays a plain substring test; EM and F1 are the whole-string and whole-token metrics."""
    pred = normalize_answer(prediction)
    return float(any(normalize_answer(g) and normalize_answer(g) in pred for g in golds))


def token_f1(prediction: str, golds: Sequence[str]) -> float:
    """SQuAD token F1 against the best gold; repeated tokens count as often as both sides have them."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for gold in golds:
        ref = normalize_answer(gold).split()
        common = sum((Counter(pred) & Counter(ref)).values())
        if common:  # an empty gold or prediction has nothing in common, so never matches
            precision, recall = common / len(pred), common / len(ref)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def score(answer: Answer, question: Question, k: int) -> dict:
    record = answer.to_record()
    record.update(
        id=question.id,
        gold_answers=list(question.answers),
        gold_doc_id=question.doc_id,
        accuracy=contains_answer(answer.text, question.answers),
        em=exact_match(answer.text, question.answers),
        f1=token_f1(answer.text, question.answers),
    )
    if question.doc_id is not None and answer.system != "norag":
        ranked = answer.ranking
        record["recall@1"] = float(question.doc_id in ranked[:1])
        record["recall@k"] = float(question.doc_id in answer.doc_ids[:k])
        # Only when the system ranked at least 3 documents (joint: its search or self-check returned 3).
        record["recall@3"] = float(question.doc_id in ranked[:3]) if len(ranked) >= 3 else None
    return record


def summarize(system: str, records: list[dict], k: int) -> dict:
    def avg(key: str) -> float | None:
        values = [r[key] for r in records if r.get(key) is not None]
        return round(mean(values), 4) if values else None

    with_gold = [r for r in records if "recall@1" in r]
    # R@3 over the same questions as R@1, or not at all (a ranking shorter than 3 somewhere).
    ranked_three = bool(with_gold) and all(r.get("recall@3") is not None for r in with_gold)
    return {
        "system": system,
        "n": len(records),
        "accuracy": avg("accuracy"),
        "em": avg("em"),
        "f1": avg("f1"),
        "recall@1": avg("recall@1"),
        "recall@k": avg("recall@k"),
        "k": k,
        "recall@3": avg("recall@3") if ranked_three else None,
        "context_tokens_mean": avg("context_tokens"),
        "latency_ms_median": round(median(r["latency_ms"] for r in records), 1) if records else None,
    }


def run_eval(
    answer_batch: Callable[[list[Question]], list[Answer]],
    system: str,
    questions: list[Question],
    k: int,
    batch_size: int = 8,
    out: str | Path | None = None,
    progress: bool = True,
    labels: dict | None = None,
) -> dict:
    """Answer every question, write per-question records to `out` (atomically) and return the summary
    (with `labels`, e.g. corpus and precision, merged in)."""
    from tqdm.auto import tqdm

    if not questions:
        raise UniragError("No questions to evaluate.")
    out_path = Path(out) if out else None
    if out_path is not None and out_path.parent and not out_path.parent.exists():
        raise UniragError(f"Output folder {out_path.parent} does not exist.")
    records: list[dict] = []
    start = time.perf_counter()
    with tqdm(total=len(questions), desc=f"eval {system}", unit="q", disable=not progress) as bar:
        for i in range(0, len(questions), batch_size):
            chunk = questions[i : i + batch_size]
            answers = answer_batch(chunk)
            records.extend(score(a, q, k) for a, q in zip(answers, chunk, strict=True))
            bar.update(len(chunk))
    summary = summarize(system, records, k)
    summary["wall_time_s"] = round(time.perf_counter() - start, 1)
    summary.update(labels or {})
    if out_path is not None:
        write_json_atomic(out_path, {"summary": summary, "records": records})
    return summary


# Summary keys computed from the records and timing (`summarize`, `run_eval`, `merge_runs`); the rest are labels.
_COMPUTED = (*summarize("", [], 1), "wall_time_s", "shard_wall_time_s")


def merge_runs(blobs: Sequence[dict], names: Sequence[str] | None = None) -> dict:
    """One run from the `eval --out` files of question shards (`--offset`/`--limit`): records concatenated,
    the summary recomputed. The shards must be the same system and setting (equal labels) on disjoint questions.
    `wall_time_s` is the shards' sum; `shard_wall_time_s` keeps each (shards run side by side overlap in time)."""
    names = list(names) if names is not None else [f"shard {i + 1}" for i in range(len(blobs))]
    if len(blobs) < 2:
        raise UniragError("Merging needs at least two shard files.")
    summaries = []
    for blob, name in zip(blobs, names, strict=True):
        if not isinstance(blob, dict) or not isinstance(blob.get("records"), list) or "summary" not in blob:
            raise UniragError(f"{name} has no per-question records: pass `eval --out` files, not summaries.")
        summaries.append(blob["summary"])
    first = summaries[0]
    for summary, name in zip(summaries[1:], names[1:], strict=True):
        for key in ("system", "k"):
            if summary.get(key) != first.get(key):
                raise UniragError(f"{name} has {key} {summary.get(key)!r}, {names[0]} {first.get(key)!r}: "
                                  "merge shards of one run only.")
        labels = {key for key in (*summary, *first) if key not in _COMPUTED and key != "retrieval"}
        differing = sorted(key for key in labels if summary.get(key) != first.get(key))
        if differing:
            raise UniragError(f"{name} and {names[0]} differ in {', '.join(differing)}: merge shards of one run only.")
    records, seen = [], {}
    for blob, name in zip(blobs, names, strict=True):
        for record in blob["records"]:
            if record["id"] in seen:
                raise UniragError(f"Question {record['id']!r} is in both {seen[record['id']]} and {name}: "
                                  "shards must not overlap.")
            seen[record["id"]] = name
            records.append(record)
    summary = summarize(first["system"], records, first["k"])
    walls = [s.get("wall_time_s") for s in summaries]
    summary["wall_time_s"] = round(sum(walls), 1) if None not in walls else None
    summary["shard_wall_time_s"] = walls
    summary.update({key: value for key, value in first.items() if key not in _COMPUTED and key != "retrieval"})
    retrievals = list(dict.fromkeys(s["retrieval"] for s in summaries if s.get("retrieval")))
    if retrievals:
        summary["retrieval"] = "; ".join(retrievals)
    return {"summary": summary, "records": records}


def paired_comparison(records_a: list[dict], records_b: list[dict], metric: str = "accuracy") -> dict:
    """Two systems on the same questions (matched by id): how many only A / only B gets right, and the exact
    two-sided sign test on those discordant questions (the McNemar exact test). `metric` is a 0/1 record field."""
    def by_id(records: list[dict], side: str) -> dict[str, float]:
        values = {}
        for r in records:
            if r.get(metric) is None:
                raise UniragError(f"A record of {side} has no {metric!r}.")
            if r["id"] in values:
                raise UniragError(f"Question {r['id']!r} occurs twice in {side}.")
            values[r["id"]] = float(r[metric])
        return values

    a, b = by_id(records_a, "A"), by_id(records_b, "B")
    if set(a) != set(b):
        raise UniragError(f"The two runs cover different questions ({len(set(a) - set(b))} only in A, "
                          f"{len(set(b) - set(a))} only in B); compare runs on the same questions.")
    if any(v not in (0.0, 1.0) for v in (*a.values(), *b.values())):
        raise UniragError(f"{metric!r} is not 0/1 per question; the sign test needs a right/wrong metric.")
    only_a = sum(a[i] == 1.0 and b[i] == 0.0 for i in a)
    only_b = sum(b[i] == 1.0 and a[i] == 0.0 for i in a)
    n = len(a)
    return {"metric": metric, "n": n, "mean_a": round(sum(a.values()) / n, 4), "mean_b": round(sum(b.values()) / n, 4),
            "only_a": only_a, "only_b": only_b, "sign_test_p": round(sign_test_p(only_a, only_b), 4)}


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided sign test of `wins` against `losses` (ties left out): 1.0 when there is neither."""
    n, low = wins + losses, min(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(low + 1)) / 2**n) if n else 1.0


def write_json_atomic(path: str | Path, blob: dict) -> None:
    """Write JSON through a temporary sibling, so a crash never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(blob, ensure_ascii=False, indent=1))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def run_name(path: str | Path) -> str:
    """The run of a summary file `eval_<run>_<precision>.json` (what the app pairs 4-bit and fp32 by)."""
    return re.sub(r"_(4bit|fp32)$", "", Path(path).stem).removeprefix("eval_")
