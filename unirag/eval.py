"""Metrics and the evaluation loop behind `python -m unirag eval`.

accuracy = a normalised gold answer occurs in the normalised output (the paper's metric);
em / f1 are SQuAD-style; recall uses the gold `doc_id` where present; evidence_has_answer (the `evidence` system):
a normalised gold answer occurs in the evidence it wrote (0 when it wrote none).
"""

from __future__ import annotations

import json
import math
import os
import re
import string
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from statistics import mean, median

from unirag.answer import Answer
from unirag.data import Question
from unirag.errors import UniragError
from unirag.paths import write_json_atomic

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
    # An evidence system that wrote no evidence (no candidate document) scores 0, not "not measured".
    if answer.trace.evidence is not None or answer.system == "evidence":
        evidence = answer.trace.evidence.text if answer.trace.evidence is not None else ""
        record["evidence_has_answer"] = contains_answer(evidence, question.answers)
        record["evidence"] = evidence  # what the answer was read from, to inspect beside the answer
        record["evidence_doc_id"] = answer.trace.evidence.doc_id if answer.trace.evidence is not None else None
    if question.doc_id is not None and answer.system != "norag":
        ranked = answer.ranking
        record["recall@1"] = float(question.doc_id in ranked[:1])
        record["recall@k"] = float(question.doc_id in answer.doc_ids[:k])
        # Only when the system ranked at least 3 documents (joint: its search or self-check returned 3).
        record["recall@3"] = float(question.doc_id in ranked[:3]) if len(ranked) >= 3 else None
        if answer.trace.self_check:  # the candidate generator (docid search or dense) before the self-check
            first = min(answer.trace.self_check, key=lambda row: row.search_rank)
            record["candidate_recall@1"] = float(first.doc_id == question.doc_id)
            record["candidate_recall@n"] = float(any(r.doc_id == question.doc_id for r in answer.trace.self_check))
    if answer.trace.rounds:  # a multi-round answer: the metrics above are its last round's; these are per round
        record["round_answers"] = [step.answer for step in answer.trace.rounds]
        record["round_doc_ids"] = [step.doc_ids for step in answer.trace.rounds]  # what each round read
        record["round_accuracy"] = [contains_answer(step.answer, question.answers) for step in answer.trace.rounds]
        if question.doc_id is not None:
            record["round_recall@1"] = [float(question.doc_id in (step.ranked_doc_ids or step.doc_ids)[:1])
                                        for step in answer.trace.rounds]
    return record


# Summary keys of multi-round runs (`summarize`): per round, the mean of the records' per-round field; and per
# round after the first, how many questions it got right that the round before got wrong (helped) and the reverse
# (hurt). Absent from single-round summaries.
ROUND_KEYS = ("round_accuracy", "round_recall@1", "round_helped", "round_hurt")


def _round_summary(records: list[dict]) -> dict:
    """The `ROUND_KEYS` of records that carry per-round fields ({} when none do)."""
    per_round = [r["round_accuracy"] for r in records if r.get("round_accuracy")]
    if not per_round:
        return {}
    if len(per_round) != len(records) or len({len(a) for a in per_round}) != 1:
        raise UniragError("Records mix different numbers of rounds: summarise one setting's run at a time.")
    n = len(per_round[0])
    recalls = [r["round_recall@1"] for r in records if r.get("round_recall@1")]
    return {
        "round_accuracy": [round(mean(a[i] for a in per_round), 4) for i in range(n)],
        "round_recall@1": [round(mean(x[i] for x in recalls), 4) for i in range(n)] if recalls else None,
        "round_helped": [sum(a[i] == 1.0 and a[i - 1] == 0.0 for a in per_round) for i in range(1, n)],
        "round_hurt": [sum(a[i] == 0.0 and a[i - 1] == 1.0 for a in per_round) for i in range(1, n)],
    }


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
        **({"candidate_recall@1": avg("candidate_recall@1"), "candidate_recall@n": avg("candidate_recall@n")}
           if any("candidate_recall@1" in r for r in records) else {}),
        "context_tokens_mean": avg("context_tokens"),
        "evidence_has_answer": avg("evidence_has_answer"),  # None: no record has evidence (every other system)
        "latency_ms_median": round(median(r["latency_ms"] for r in records), 1) if records else None,
        **_round_summary(records),
    }


PARTIAL_FORMAT = 1


def partial_path(out: str | Path) -> Path:
    """The sidecar where `run_eval` appends each record as it finishes: `<out>.partial.jsonl`."""
    out = Path(out)
    return out.with_name(out.name + ".partial.jsonl")


def check_existing_out(out: str | Path, resume: bool, overwrite: bool) -> None:
    """Refuse an existing --out, or its interrupted-run sidecar, unless the run resumes or overwrites (callers
    check this before loading any model)."""
    out_path, sidecar = Path(out), partial_path(out)
    if overwrite or resume:
        return
    if out_path.exists():
        raise UniragError(f"{out_path} already exists: pass --resume to keep it or --overwrite to replace it.")
    if sidecar.exists():
        raise UniragError(f"{sidecar} holds an interrupted run of {out_path}: pass --resume to continue it "
                          "or --overwrite to start over.")


def _jsonable(value):
    # Labels compared after a JSON round trip, as they come back from disk (tuples become lists).
    return json.loads(json.dumps(value))


def _read_partial(path: Path, header: dict) -> tuple[list[dict], float]:
    """(records, wall time so far) of a sidecar, refusing one written by another run (labels, system, k)."""
    lines = path.read_bytes().split(b"\n")
    try:
        found = json.loads(lines[0])
    except ValueError:
        raise UniragError(f"{path}:1: not a partial eval file (bad header); delete it or pass --overwrite.") from None
    if not isinstance(found, dict) or found.get("partial_eval") != PARTIAL_FORMAT:
        raise UniragError(f"{path}:1: not a partial eval file; delete it or pass --overwrite.")
    differing = sorted(key for key in ("system", "k", "labels") if found.get(key) != header[key])
    if differing:
        details = "; ".join(f"{key}: {found.get(key)!r} there, {header[key]!r} now" for key in differing)
        raise UniragError(f"{path} was written by another run ({details}). Resume with the same settings, or pass "
                          "--overwrite to start over.")
    records, wall = [], 0.0
    last = max((i for i, line in enumerate(lines) if line.strip()), default=0)
    for lineno, raw in enumerate(lines[1:], start=2):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError:
            if lineno - 1 == last:  # the line being written when the process was killed: redo that question
                break
            raise UniragError(f"{path}:{lineno}: corrupt line; delete the file or pass --overwrite.") from None
        if "batch_wall_time_s" in obj:
            wall += float(obj["batch_wall_time_s"])
        elif isinstance(obj.get("id"), str):
            records.append(obj)
        else:
            raise UniragError(f"{path}:{lineno}: a record without an id; delete the file or pass --overwrite.")
    return records, wall


def run_eval(
    answer_batch: Callable[[list[Question]], list[Answer]],
    system: str,
    questions: list[Question],
    k: int,
    batch_size: int = 8,
    out: str | Path | None = None,
    progress: bool = True,
    labels: dict | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict:
    """Answer every question, write per-question records to `out` and return the summary (with `labels`, e.g.
    corpus and precision, merged in).

    Nothing is lost on an interrupt: each batch's records are appended (and flushed) to `partial_path(out)`,
    whose first line records system, k and labels; `out` is written atomically at the end and the sidecar removed.
    `resume=True` continues a sidecar of the same run (refusing another run's), answering only the questions it
    lacks; the final records keep the order of `questions`. An existing `out` is refused unless `resume` (nothing
    to do: its summary is returned) or `overwrite` (start over, also discarding a sidecar)."""
    from tqdm.auto import tqdm

    if not questions:
        raise UniragError("No questions to evaluate.")
    out_path = Path(out) if out else None
    if out_path is None and resume:
        raise UniragError("Resuming needs the output file (--out) of the interrupted run.")
    if out_path is not None and out_path.parent and not out_path.parent.exists():
        raise UniragError(f"Output folder {out_path.parent} does not exist.")
    header = {"partial_eval": PARTIAL_FORMAT, "system": system, "k": k, "labels": _jsonable(labels or {})}
    done: dict[str, dict] = {}
    wall_before = 0.0
    sidecar = partial_path(out_path) if out_path is not None else None
    if out_path is not None and sidecar is not None:  # (both or neither; spelled out for the type checker)
        check_existing_out(out_path, resume, overwrite)
        if out_path.exists() and not overwrite:
            return _finished_summary(out_path, header, questions)
        if sidecar.exists() and not overwrite:
            records, wall_before = _read_partial(sidecar, header)
            wanted = {q.id for q in questions}
            strays = [r["id"] for r in records if r["id"] not in wanted]
            if strays:
                raise UniragError(f"{sidecar} has questions this run does not ask (e.g. {strays[0]!r}; other "
                                  "--questions, --offset or --limit?). Resume with the same questions, or --overwrite.")
            done = {r["id"]: r for r in records}
        # (Re)write the sidecar cleanly: a line cut by a kill must not sit before the new records.
        tmp = sidecar.with_name(sidecar.name + f".{os.getpid()}.tmp")
        try:
            with tmp.open("w", encoding="utf-8") as handle:
                handle.write(json.dumps(header) + "\n")
                if done:
                    handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done.values()))
                    handle.write(json.dumps({"batch_wall_time_s": wall_before}) + "\n")
            os.replace(tmp, sidecar)
        finally:
            tmp.unlink(missing_ok=True)
    todo = [q for q in questions if q.id not in done]
    fresh: dict[str, dict] = {}
    wall = wall_before
    with (sidecar.open("a", encoding="utf-8") if sidecar is not None else open(os.devnull, "w")) as handle, \
            tqdm(total=len(questions), initial=len(done), desc=f"eval {system}", unit="q", disable=not progress) as bar:
        for i in range(0, len(todo), batch_size):
            start = time.perf_counter()
            chunk = todo[i : i + batch_size]
            answers = answer_batch(chunk)
            batch = [score(a, q, k) for a, q in zip(answers, chunk, strict=True)]
            fresh.update((r["id"], r) for r in batch)
            elapsed = time.perf_counter() - start
            wall += elapsed
            handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in batch)
                         + json.dumps({"batch_wall_time_s": elapsed}) + "\n")
            handle.flush()  # a batch on disk is a batch never answered again
            bar.update(len(chunk))
    records = [done[q.id] if q.id in done else fresh[q.id] for q in questions]
    summary = summarize(system, records, k)
    summary["wall_time_s"] = round(wall, 1)
    summary.update(labels or {})
    if out_path is not None:
        write_json_atomic(out_path, {"summary": summary, "records": records}, indent=1)
        partial_path(out_path).unlink(missing_ok=True)
    return summary


def _finished_summary(out_path: Path, header: dict, questions: list[Question]) -> dict:
    """The summary of a complete `out` that `resume` finds: nothing to do, if it is this run on these questions."""
    try:
        blob = json.loads(out_path.read_text(encoding="utf-8"))
        summary, records = blob["summary"], blob["records"]
        ids = [r["id"] for r in records]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UniragError(f"{out_path} exists but is not an eval --out file ({type(exc).__name__}); "
                          "pass --overwrite to replace it.") from None
    found = {"system": summary.get("system"), "k": summary.get("k"), "labels": _labels_of(summary)}
    differing = sorted(key for key in ("system", "k", "labels") if _jsonable(found[key]) != header[key])
    if differing or set(ids) != {q.id for q in questions}:
        what = ", ".join(differing) if differing else "questions"
        raise UniragError(f"{out_path} is a finished run with other {what}; pass --overwrite to replace it.")
    return summary


def _labels_of(summary: dict) -> dict:
    return {key: value for key, value in summary.items() if key not in _COMPUTED and key not in ("system", "k")}


def check_output_paths(
    outputs: Mapping[str, str | Path | None], inputs: Sequence[str | Path | None], what: str = "inputs"
) -> None:
    """Refuse, before any model loads, outputs that would lose data: two outputs naming one file (`--out X
    --summary-out X`), an output that is one of the input files (`what`: the questions, corpus, shards), an output
    that is a folder or whose folder does not exist. `outputs` maps a name for messages (e.g. "--out") to a path."""
    given = {name: Path(path) for name, path in outputs.items() if path}
    for name, path in given.items():
        if path.is_dir():
            raise UniragError(f"{name} {path} is a folder; give a file name.")
        if not path.resolve().parent.is_dir():
            raise UniragError(f"{name}: the folder of {path} does not exist.")
    names = list(given)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if _same_file(given[a], given[b]):
                raise UniragError(f"{a} and {b} are the same file ({given[a]}): one would overwrite the other; "
                                  "give each its own name.")
    for name, path in given.items():
        for source in inputs:
            if source and _same_file(path, Path(source)):
                raise UniragError(f"{name} {path} would overwrite one of the {what} ({source}); give another name.")


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)  # hard links
    except OSError:
        return False


# Summary keys computed from the records and timing (`summarize`, `run_eval`, `merge_runs`); the rest are labels.
_COMPUTED = (*summarize("", [], 1), *ROUND_KEYS, "wall_time_s", "shard_wall_time_s")


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
        if not isinstance(blob["summary"], dict):
            raise UniragError(f"{name}: its summary is not an object; pass `eval --out` files.")
        for key, kind in (("system", str), ("k", int)):
            if not isinstance(blob["summary"].get(key), kind):
                raise UniragError(f"{name}: its summary has no {kind.__name__} {key!r}; pass `eval --out` files.")
        wall = blob["summary"].get("wall_time_s")
        if wall is not None and (not isinstance(wall, (int, float)) or isinstance(wall, bool)):
            raise UniragError(f"{name}: its summary's 'wall_time_s' must be a number, got {wall!r}.")
        summaries.append(blob["summary"])
    first = summaries[0]
    for summary, name in zip(summaries[1:], names[1:], strict=True):
        for key in ("system", "k"):
            if summary.get(key) != first.get(key):
                raise UniragError(f"{name} has {key} {summary.get(key)!r}, {names[0]} {first.get(key)!r}: "
                                  "merge shards of one run only.")
        # Every label, nested settings included: one differing setting (or corpus fingerprint) is another run.
        differing = _label_differences(
            {key: value for key, value in first.items() if key not in _COMPUTED and key != "retrieval"},
            {key: value for key, value in summary.items() if key not in _COMPUTED and key != "retrieval"},
        )
        if differing:
            raise UniragError(f"{name} and {names[0]} differ in {', '.join(differing)}: merge shards of one run only.")
    for blob, name in zip(blobs, names, strict=True):
        check_records(blob["records"], name)
    records, seen = [], {}
    for blob, name in zip(blobs, names, strict=True):
        for record in blob["records"]:
            if seen.get(record["id"]) == name:
                raise UniragError(f"Question {record['id']!r} occurs twice in {name}.")
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


_MISSING = object()


def _label_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two label dicts, a key missing on one side included
    (`settings.beam_width`, `corpus_fingerprint (missing in one)`)."""
    differing = []
    for key in sorted({*a, *b}, key=str):
        x, y = a.get(key, _MISSING), b.get(key, _MISSING)
        if isinstance(x, dict) and isinstance(y, dict):
            differing.extend(_label_differences(x, y, f"{prefix}{key}."))
        elif x is _MISSING or y is _MISSING:
            differing.append(f"{prefix}{key} (missing in one)")
        elif _jsonable(x) != _jsonable(y):
            differing.append(f"{prefix}{key}")
    return differing


def check_record_ids(records: Sequence, name: str) -> None:
    """Every record is an object with a string `id` (merge and compare match questions by it)."""
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("id"), str) or not record["id"]:
            raise UniragError(f"{name}: record {i} has no question 'id'; pass `eval --out` files, whose every "
                              "record names its question.")


# What `summarize` reads of every record: these must be numbers; the metric fields may also be null (not measured).
RECORD_NUMBERS = ("accuracy", "em", "f1", "latency_ms")
RECORD_OPTIONAL_NUMBERS = ("recall@1", "recall@3", "recall@k", "context_tokens", "evidence_has_answer",
                           "candidate_recall@1", "candidate_recall@n")


def check_records(records: Sequence, name: str) -> None:
    """Records `summarize` can read: ids, and numeric fields of the right type (one clear error, not a
    KeyError or TypeError deep inside a mean)."""
    check_record_ids(records, name)
    for record in records:
        where = f"{name}: record {record['id']!r}"
        for key in RECORD_NUMBERS:
            if key not in record:
                raise UniragError(f"{where} has no {key!r}; pass `eval --out` files.")
        for key in (*RECORD_NUMBERS, *RECORD_OPTIONAL_NUMBERS):
            value = record.get(key)
            optional = key in RECORD_OPTIONAL_NUMBERS or key in ("accuracy", "em", "f1")
            if (value is None and optional) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
                continue
            raise UniragError(f"{where}: {key!r} must be a number, got {value!r}.")


def paired_comparison(records_a: list[dict], records_b: list[dict], metric: str = "accuracy") -> dict:
    """Two systems on the same questions (matched by id): how many only A / only B gets right, and the exact
    two-sided sign test on those discordant questions (the McNemar exact test). `metric` is a 0/1 record field."""
    def by_id(records: list[dict], side: str) -> dict[str, float]:
        check_record_ids(records, side)
        values = {}
        for r in records:
            if r.get(metric) is None:
                raise UniragError(f"A record of {side} has no {metric!r}.")
            if r["id"] in values:
                raise UniragError(f"Question {r['id']!r} occurs twice in {side}.")
            if not isinstance(r[metric], (int, float)) or isinstance(r[metric], bool):
                raise UniragError(f"{side}: record {r['id']!r} has {metric!r} {r[metric]!r}, not a number.")
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


OUTCOMES = ("both", "only A", "only B", "neither")  # per question of two runs: who got it right
COMPARE_FIELDS = ("id", "question", "gold", "answer_a", "answer_b", "right_a", "right_b", "outcome")


def compare_records(records_a: list[dict], records_b: list[dict], metric: str = "accuracy") -> list[dict]:
    """Per question of two runs on the same questions (checked as in `paired_comparison`), in A's order: id,
    question, gold answers ("; "-joined), both answers, whether each is right under `metric` (0/1) and the
    outcome ("both", "only A", "only B", "neither"). The counts of "only A"/"only B" are the sign test's."""
    paired_comparison(records_a, records_b, metric)  # same questions, 0/1 metric, no duplicates: or UniragError
    by_id = {r["id"]: r for r in records_b}
    rows = []
    for a in records_a:
        b = by_id[a["id"]]
        right_a, right_b = float(a[metric]) == 1.0, float(b[metric]) == 1.0
        outcome = OUTCOMES[2 * (not right_a) + (not right_b)]
        rows.append({
            "id": a["id"],
            "question": a.get("question") or b.get("question") or "",
            "gold": "; ".join(str(g) for g in (a.get("gold_answers") or b.get("gold_answers") or [])),
            "answer_a": a.get("text", ""),
            "answer_b": b.get("text", ""),
            "right_a": right_a,
            "right_b": right_b,
            "outcome": outcome,
        })
    return rows


def outcome_counts(rows: Sequence[Mapping]) -> dict[str, int]:
    """How many questions of `compare_records` rows fall in each outcome."""
    counts = Counter(row["outcome"] for row in rows)
    return {outcome: counts.get(outcome, 0) for outcome in OUTCOMES}


def load_eval_file(path: str | Path, name: str | None = None) -> dict:
    """An `eval --out` file: {"summary", "records"} (UniragError when it is not one); `name` for messages."""
    name = name or str(path)
    try:
        blob = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UniragError(f"{name} is not a readable JSON file ({exc}).") from None
    if not isinstance(blob, dict) or not isinstance(blob.get("records"), list):
        raise UniragError(f"{name} has no per-question records: pass an `eval --out` file, not a summary.")
    check_record_ids(blob["records"], name)
    return blob


def write_comparison(rows: Sequence[Mapping], path: str | Path) -> Path:
    """`compare_records` rows to CSV (by the suffix `.csv`) or JSON (anything else: {"counts", "questions"})."""
    import csv

    path = Path(path)
    if path.suffix.lower() == ".csv":
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        try:
            with tmp.open("w", encoding="utf-8", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(COMPARE_FIELDS))
                writer.writeheader()
                writer.writerows({k: row[k] for k in COMPARE_FIELDS} for row in rows)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    else:
        write_json_atomic(path, {"counts": outcome_counts(rows), "questions": [dict(row) for row in rows]}, indent=1)
    return path


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided sign test of `wins` against `losses` (ties left out): 1.0 when there is neither."""
    n, low = wins + losses, min(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(low + 1)) / 2**n) if n else 1.0


