"""What users of RAG explorers ask for: re-ask without (or with) a document, citations, attention per document,
latency per stage, and a per-question comparison of two evaluation runs. Fast: tiny offline models (test_app's)."""

from __future__ import annotations

import csv
import json

import pytest
from test_app import pipeline, tiny  # noqa: F401  (module fixtures: tiny corpus, tiny Llama, joint checkpoint)

QUESTION = "When was the Eiffel Tower completed?"
SETTINGS = {"beam_width": 4, "k_docs": 2, "rag_k": 3, "max_new_tokens": 4}


# --------------------------------------------------------------------------------------------- 1. re-ask


def test_reask_without_the_top_document(pipeline):  # noqa: F811
    first = pipeline.ask("nq", QUESTION, **SETTINGS)
    joint_ids, rag_ids = first.joint.answer.doc_ids, first.rag.answer.doc_ids
    top = joint_ids[0]
    again = pipeline.reask("nq", QUESTION, first.settings, joint_docs=[d for d in joint_ids if d != top],
                           rag_docs=[d for d in rag_ids if d != top], note=f"re-read without {top}")
    joint, rag = again.joint.answer, again.rag.answer
    assert joint.doc_ids == joint_ids[1:] and top not in rag.doc_ids
    assert joint.notices[0] == f"re-read without {top}" and rag.notices[0] == f"re-read without {top}"
    # The answer was read from the remaining document only: one passage span in its context.
    assert len(joint.trace.answer_attention.doc_spans) == 1
    assert joint.timings_ms["retrieve"] == 0.0 and "generate" in joint.timings_ms
    assert again.gold is not None and again.joint.gold_found == ("d00" in joint.doc_ids)


def test_reask_with_a_forced_document(pipeline):  # noqa: F811
    forced = pipeline.find_document("nq", "jupiter")  # a title, case-insensitive
    assert forced == "d15" and pipeline.find_document("nq", "d15") == "d15"
    again = pipeline.reask("nq", QUESTION, joint_docs=[forced], rag_docs=[(forced, 0.5), "d00"], **SETTINGS)
    assert again.joint.answer.doc_ids == [forced] and again.rag.answer.doc_ids == [forced, "d00"]
    assert again.rag.answer.docs[0].score == 0.5
    assert again.rag.answer.context_tokens > 0 and "Jupiter" in again.rag.answer.docs[0].text
    assert again.joint.answer.docs[0].docid == tuple(pipeline.bundle("nq").tree.docid(forced))


def test_reask_unknown_document_is_a_clear_error(pipeline):  # noqa: F811
    from unirag.errors import UniragError

    with pytest.raises(UniragError, match="d99"):
        pipeline.reask("nq", QUESTION, joint_docs=["d99"], rag_docs=[], **SETTINGS)
    with pytest.raises(UniragError, match="No document"):
        pipeline.find_document("nq", "Atlantis")
    with pytest.raises(UniragError, match="titles contain"):
        pipeline.find_document("nq", "t")  # many titles contain a "t"


# --------------------------------------------------------------------------------------------- 5. run comparison


def _records(rights: list[int], answers: list[str]) -> list[dict]:
    return [{"id": f"q{i}", "question": f"question {i}", "gold_answers": ["x", "y"], "text": text, "accuracy": right}
            for i, (right, text) in enumerate(zip(rights, answers, strict=True))]


A = _records([1, 1, 0, 0, 1], ["a0", "a1", "a2", "a3", "a4"])
B = list(reversed(_records([1, 0, 1, 0, 0], ["b0", "b1", "b2", "b3", "b4"])))  # another order: matched by id


def test_compare_records_per_question(tmp_path):
    from unirag.errors import UniragError
    from unirag.eval import compare_records, outcome_counts, paired_comparison, write_comparison

    rows = compare_records(A, B)
    assert [r["id"] for r in rows] == ["q0", "q1", "q2", "q3", "q4"]
    assert [r["outcome"] for r in rows] == ["both", "only A", "only B", "neither", "only A"]
    assert rows[1] == {"id": "q1", "question": "question 1", "gold": "x; y", "answer_a": "a1", "answer_b": "b1",
                       "right_a": True, "right_b": False, "outcome": "only A"}
    counts = outcome_counts(rows)
    paired = paired_comparison(A, B)
    assert counts == {"both": 1, "only A": 2, "only B": 1, "neither": 1}
    assert (counts["only A"], counts["only B"]) == (paired["only_a"], paired["only_b"])
    with open(write_comparison(rows, tmp_path / "c.csv"), newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 5 and table[2]["outcome"] == "only B" and table[2]["answer_b"] == "b2"
    blob = json.loads(write_comparison(rows, tmp_path / "c.json").read_text())
    assert blob["counts"] == counts and blob["questions"] == rows
    with pytest.raises(UniragError, match="different questions"):
        compare_records(A, B[1:])


def test_cli_compare_per_question(tmp_path, capsys):
    from unirag.cli import main

    for name, records in (("a.json", A), ("b.json", B)):
        (tmp_path / name).write_text(json.dumps({"summary": {}, "records": records}))
    out = tmp_path / "per.csv"
    assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--per-question", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["only_a"], result["only_b"], result["per_question"]) == (2, 1, str(out))
    assert out.read_text().splitlines()[0] == "id,question,gold,answer_a,answer_b,right_a,right_b,outcome"
    # Writing over one of the runs is refused before anything is read.
    assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--per-question",
                 str(tmp_path / "a.json")]) == 2
    assert "would overwrite" in capsys.readouterr().err
