import json

import pytest

from unirag.answer import Answer, RetrievedDoc
from unirag.data import Question
from unirag.errors import UniragError
from unirag.eval import contains_answer, exact_match, normalize_answer, run_eval, token_f1


def test_normalisation_and_metrics():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert exact_match("the eiffel tower.", ["Eiffel Tower"]) == 1.0
    assert exact_match("It is the Eiffel Tower", ["Eiffel Tower"]) == 0.0
    assert contains_answer("It is the Eiffel Tower", ["Eiffel Tower", "x"]) == 1.0
    assert contains_answer("anything", [""]) == 0.0  # an empty gold never matches
    assert token_f1("eiffel tower paris", ["Eiffel Tower"]) == pytest.approx(0.8)
    assert token_f1("louvre", ["Eiffel Tower"]) == 0.0


def fake_batch(questions):
    return [
        Answer(
            "rag",
            q.question,
            "Paris" if i % 2 == 0 else "London",
            [RetrievedDoc("d1", "", "", 0.9), RetrievedDoc("d2", "", "", 0.5)],
            context_tokens=100 + i,
            timings_ms={"retrieve": 1.0, "generate": 10.0 * (i + 1)},
        )
        for i, q in enumerate(questions)
    ]


def test_run_eval_summary_and_records(tmp_path):
    questions = [
        Question("a", "capital of France?", ("Paris",), "d1"),
        Question("b", "capital of France?", ("Paris",), "d2"),
    ]
    out = tmp_path / "out.json"
    summary = run_eval(fake_batch, "rag", questions, k=2, batch_size=2, out=out, progress=False)
    assert summary["n"] == 2 and summary["accuracy"] == 0.5 and summary["em"] == 0.5
    assert summary["recall@1"] == 0.5 and summary["recall@k"] == 1.0
    assert summary["context_tokens_mean"] == 100.5 and summary["latency_ms_median"] == 16.0
    records = json.loads(out.read_text())["records"]
    assert [r["id"] for r in records] == ["a", "b"] and records[1]["recall@1"] == 0.0
    assert list(tmp_path.iterdir()) == [out]  # no temp file left behind


def test_run_eval_rejects_missing_output_folder(tmp_path):
    with pytest.raises(UniragError, match="does not exist"):
        run_eval(fake_batch, "rag", [Question("a", "q", ("x",))], 1, out=tmp_path / "no" / "o.json")
