"""The build benchmark's store row: valid, named "build: …", kept out of the QA tables."""

from benchmarks import build_recall
from unirag import results


def test_build_row_is_valid_and_stays_out_of_the_qa_tables(tmp_path):
    summary = {"n": 29, "joint": {"recall@1": 0.62, "recall@3": 0.79}, "dense": {"recall@1": 0.9, "recall@3": 0.97},
               "joint_seconds_per_q": 0.6}
    build = {"checkpoint": "runs/build/x", "corpus_fingerprint": "f", "passages": 300, "stage1_examples": 812,
             "stage1_epochs": 8, "minutes": {"docid tree": 0.3, "stage 1": 11.0},
             "stage1_minutes_per_100_passages": 3.7}
    row = build_recall.build_row("nq-300, no questions", "nq-300", "dev", "fp32", summary, build, "cmd")
    assert row["run"] == "build: nq-300, no questions" and row["metrics"]["build_minutes"] == 11.3
    results.append_run(row, tmp_path)
    store = results.load_store(tmp_path)
    assert len(store) == 1 and results.table(store, "nq-300", "fp32", "dev") == []
