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
    assert summary["recall@3"] is None and records[0]["recall@3"] is None  # only two documents were ranked


def test_recall_at_3_reads_the_ranking_beyond_the_documents_read(tmp_path):
    """A system that reads one document but ranked more: R@1 and R@k from what it read, R@3 from its ranking."""
    def one_read(questions):
        return [Answer("joint", q.question, "x", [RetrievedDoc("d1", "", "", 0.0)],
                       ranked_doc_ids=["d1", "d2", "d3", "d4"]) for q in questions]

    questions = [Question("a", "q", ("y",), "d1"), Question("b", "q", ("y",), "d3"), Question("c", "q", ("y",), "d4")]
    summary = run_eval(one_read, "joint", questions, k=1, progress=False)
    assert (summary["recall@1"], summary["recall@k"], summary["recall@3"]) == (0.3333, 0.3333, 0.6667)
    questions.append(Question("d", "q", ("y",)))  # no gold document: counts for no recall
    assert run_eval(one_read, "joint", questions, k=1, progress=False)["recall@3"] == 0.6667


def test_run_eval_rejects_missing_output_folder(tmp_path):
    with pytest.raises(UniragError, match="does not exist"):
        run_eval(fake_batch, "rag", [Question("a", "q", ("x",))], 1, out=tmp_path / "no" / "o.json")


def test_paired_comparison_counts_and_exact_sign_test():
    from math import comb

    from unirag.eval import paired_comparison

    # 6 questions: A alone right on q1-q4, B alone on q5, both right on q6.
    a = [{"id": f"q{i}", "accuracy": float(i in (1, 2, 3, 4, 6))} for i in range(1, 7)]
    b = [{"id": f"q{i}", "accuracy": float(i in (5, 6))} for i in reversed(range(1, 7))]  # order must not matter
    result = paired_comparison(a, b)
    assert (result["only_a"], result["only_b"], result["n"]) == (4, 1, 6)
    assert result["mean_a"] == round(5 / 6, 4) and result["mean_b"] == round(2 / 6, 4)
    assert result["sign_test_p"] == round(2 * (comb(5, 0) + comb(5, 1)) / 2**5, 4)  # 0.375
    assert paired_comparison(a, a)["sign_test_p"] == 1.0
    strong = [{"id": f"x{i}", "accuracy": 1.0} for i in range(10)]
    weak = [{"id": f"x{i}", "accuracy": 0.0} for i in range(10)]
    assert paired_comparison(strong, weak)["sign_test_p"] == round(2 / 2**10, 4)
    with pytest.raises(UniragError, match="different questions"):
        paired_comparison(a, b[:-1])
    with pytest.raises(UniragError, match="0/1"):
        paired_comparison([{"id": "q", "f1": 0.5}], [{"id": "q", "f1": 1.0}], metric="f1")
    with pytest.raises(UniragError, match="twice"):
        paired_comparison(a + a[:1], b)


def test_candidate_recall_reads_the_generators_order_before_the_self_check():
    """With a self-check, the record keeps the candidate generator's own top-1 and whether the gold was among
    the N candidates, apart from the re-ranked R@1."""
    from unirag.answer import SelfCheckRow, Trace
    from unirag.eval import score, summarize

    rows = [SelfCheckRow("d2", 2, -1.0, -0.5, 3.0), SelfCheckRow("d1", 1, -0.5, -2.0, 1.0)]  # re-ranked: d2 first
    answer = Answer("joint", "q?", "Paris", [RetrievedDoc("d2", "", "", 3.0)], trace=Trace(self_check=rows))
    answer.ranked_doc_ids = ["d2", "d1"]
    on_d1 = score(answer, Question("a", "q?", ("Paris",), "d1"), k=1)
    assert (on_d1["recall@1"], on_d1["candidate_recall@1"], on_d1["candidate_recall@n"]) == (0.0, 1.0, 1.0)
    on_d3 = score(answer, Question("b", "q?", ("Paris",), "d3"), k=1)
    assert (on_d3["candidate_recall@1"], on_d3["candidate_recall@n"]) == (0.0, 0.0)
    for record in (on_d1, on_d3):
        record["latency_ms"] = 1.0
    summary = summarize("joint", [on_d1, on_d3], k=1)
    assert (summary["candidate_recall@1"], summary["candidate_recall@n"]) == (0.5, 0.5)
    plain = score(Answer("rag", "q?", "x", [RetrievedDoc("d1", "", "", 1.0)]), Question("c", "q?", ("y",), "d1"), 1)
    assert "candidate_recall@1" not in plain
