"""The results store (results/*.jsonl), its validation and append, and docs/RESULTS.md generated from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unirag import results
from unirag.errors import UniragError

REPO = Path(__file__).resolve().parents[1]


def _row(**over):
    row = {"run": "RAG top-5", "system": "rag", "corpus": "nq", "split": "dev", "precision": "4bit", "n": 266,
           "settings": {"rag_k": 5, "max_new_tokens": 32}, "command": "python -m unirag eval --system rag --k 5",
           "metrics": {k: None for k in results.METRIC_KEYS}, "date": "2026-12-01", "machine": results.MACHINE,
           "source": "test"}
    row["metrics"].update(accuracy=0.139, k=5)
    row.update(over)
    return row


def test_the_shipped_store_is_valid_and_complete():
    rows = results.load_store()
    # The two corpora, plus the gr-vs-dr benchmark's corpus sizes (nq-300, ..., nq+squad), which only it writes.
    assert {r["corpus"] for r in rows if not r["run"].startswith(results.GR_VS_DR_PREFIX)} == {"nq", "squad"}
    assert all(r["corpus"].startswith("nq") for r in rows if r["run"].startswith(results.GR_VS_DR_PREFIX))
    # Every migrated summary file is one row (88), plus the notebook's figures whose records were lost, plus runs
    # recorded by `eval`/`merge --record` since.
    assert sum(r["source"].startswith("eval_") for r in rows) == 88
    assert all(r["source"].startswith(("eval_", "docs/RESULTS.md", "python -m unirag eval", "python -m benchmarks."))
               for r in rows)
    recommended = [(r["corpus"], r["precision"], r["split"]) for r in rows if r["settings"].get("recommended")]
    assert len(recommended) == len(set(recommended))  # one recommended row per corpus, precision and questions
    assert sorted(k[:2] for k in recommended if k[2] == "dev") == [("nq", "fp32"), ("nq", "nf4"), ("squad", "fp32"),
                                                                  ("squad", "nf4")]


def test_report_tables_are_generated_from_the_store():
    report = REPO / "docs" / "RESULTS.md"
    text = report.read_text(encoding="utf-8")
    assert text.count("<!-- results:") >= 4
    # If this fails, run `python -m unirag.results docs/RESULTS.md` and commit the report.
    assert results.update_report(text, results.load_store()) == text
    assert results.main([str(report), "--check"]) == 0


def test_load_names_file_and_line_of_a_bad_row(tmp_path):
    good = json.dumps(_row())
    (tmp_path / "nq.jsonl").write_text(good + "\n\n" + json.dumps(_row(run="x", system="dense")) + "\n")
    with pytest.raises(UniragError, match=r"nq.jsonl:3: unknown system 'dense'"):
        results.load_store(tmp_path)
    (tmp_path / "nq.jsonl").write_text(good + "\n{oops\n")
    with pytest.raises(UniragError, match=r"nq.jsonl:2: not valid JSON"):
        results.load_store(tmp_path)
    (tmp_path / "nq.jsonl").write_text(good + "\n" + good + "\n")
    with pytest.raises(UniragError, match=r"nq.jsonl:2: run 'RAG top-5' .* already in .*nq.jsonl:1"):
        results.load_store(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"precision": "int3"}, "precision 'int3'"),
    ({"split": "dev;rm"}, "split 'dev;rm'"),
    ({"n": "266"}, "`n` must be int"),
    ({"extra": 1}, "unknown field"),
    ({"metrics": {"accuracy": 0.1}}, "metrics lack"),
    ({"paired": [{"against": "RAG top-5"}]}, "paired"),
])
def test_validation_messages(change, message):
    with pytest.raises(UniragError, match=message):
        results.validate_row(_row(**change))
    row = _row()
    del row["command"]
    with pytest.raises(UniragError, match="missing field.*command"):
        results.validate_row(row)


def test_append_run_is_atomic_and_refuses_duplicates(tmp_path):
    path = results.append_run(_row(), tmp_path)
    assert path == tmp_path / "nq.jsonl" and results.load_store(tmp_path)[0]["metrics"]["accuracy"] == 0.139
    results.append_run(_row(precision="fp32"), tmp_path)
    results.append_run(_row(corpus="squad"), tmp_path)
    with pytest.raises(UniragError, match="already stored.*replace=True"):
        results.append_run(_row(), tmp_path)
    with pytest.raises(UniragError, match="unknown system"):
        results.append_run(_row(system="bm25x"), tmp_path)
    results.append_run(_row(metrics={**_row()["metrics"], "accuracy": 0.2}), tmp_path, replace=True)
    rows = results.load_store(tmp_path, "nq")
    assert [(r["precision"], r["metrics"]["accuracy"]) for r in rows] == [("4bit", 0.2), ("fp32", 0.139)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nq.jsonl", "squad.jsonl"]  # no temp file left


def test_row_from_summary_keeps_every_value(tmp_path):
    summary = {"system": "joint", "n": 3, "accuracy": 0.3333, "em": 0.0, "f1": 0.1, "recall@1": 0.6667,
               "recall@k": 0.6667, "k": 1, "recall@3": None, "context_tokens_mean": 118.2,
               "latency_ms_median": 812.5, "wall_time_s": 4.1, "reader": "stage-2"}
    row = results.row_from_summary({"summary": summary}, run="joint, 1 doc, beam 32", system="joint", corpus="nq",
                                   split="dev", precision="4bit", settings={"k_docs": 1, "beam_width": 32},
                                   command="python -m unirag eval ...")
    assert row["machine"] == results.MACHINE and len(row["date"]) == 10
    assert {k: row["metrics"][k] for k in results.METRIC_KEYS} == {k: summary.get(k) for k in results.METRIC_KEYS}
    assert row["labels"] == {"system": "joint", "reader": "stage-2"}
    results.append_run(row, tmp_path)


def test_table_order_render_and_quantization_cost():
    rows = [_row(run="joint", system="joint", settings={"k_docs": 1, "recommended": True},
                 paired=[{"against": "RAG top-5 (NF4)", "only_a": 40, "only_b": 20, "p": 0.01}]),
            _row(run="gold passage, base reader", system="gold"), _row(run="No RAG", system="norag"),
            _row(run="RAG top-1", settings={"rag_k": 1}), _row(),
            _row(precision="fp32", metrics={**_row()["metrics"], "accuracy": 0.297})]
    assert [t["run"] for t in results.table(rows, "nq", "4bit")] == [
        "No RAG", "RAG top-1", "RAG top-5", "joint", "gold passage, base reader"]
    md = results.render_table(rows, "nq", "4bit")
    assert "| **joint** (recommended) | 266 | 0.139 |" in md and md.splitlines()[5].endswith("| 0.01 |")
    older = _row(run="4-layer model: joint", system="joint", settings={"k_docs": 1, "shipped": False})
    assert [t["run"] for t in results.table([*rows, older], "nq", "4bit", shipped=False)] == ["4-layer model: joint"]
    assert results.table([*rows, older], "nq", "4bit", shipped=None)[-1]["run"] == "4-layer model: joint"
    assert "4-layer" not in results.render_table([*rows, older], "nq", "4bit")
    assert results.quantization_cost(rows) == [
        "nq/dev · RAG top-5: accuracy 0.139 4-bit (recovered, HQQ) (-15.8 points) against 0.297 in fp32 (n=266)."]
    nf4 = _row(precision="nf4", metrics={**_row()["metrics"], "accuracy": 0.1})
    assert results.quantization_cost([*rows, nf4]) == [
        "nq/dev · RAG top-5: accuracy 0.139 4-bit (recovered, HQQ) (-15.8 points) and 0.100 NF4 (no recovery) "
        "(-19.7 points) against 0.297 in fp32 (n=266)."]


def test_generator_rewrites_and_checks(tmp_path):
    store = tmp_path / "store"
    results.append_run(_row(), store)
    report = tmp_path / "R.md"
    report.write_text("# R\n<!-- results:nq:4bit -->\nstale\n<!-- /results -->\ntail\n")
    assert results.main([str(report), "--store", str(store), "--check"]) == 1
    assert results.main([str(report), "--store", str(store)]) == 0
    text = report.read_text()
    assert "| RAG top-5 | 266 | 0.139 |" in text and "stale" not in text and text.endswith("tail\n")
    assert results.main([str(report), "--store", str(store), "--check"]) == 0
    report.write_text("<!-- results:nq:4bit:dev:other -->\n<!-- /results -->\n")
    assert results.main([str(report), "--store", str(store)]) == 0 and "| RAG top-5 |" not in report.read_text()
    report.write_text("<!-- results:nq:int8 -->\n<!-- /results -->\n")
    assert results.main([str(report), "--store", str(store)]) == 2


def test_recommended_settings_name_their_results_row():
    """Each shipped recommended setting's reason names a store row measured with exactly those values: its own
    precision's, or (the recovered 4-bit, which keeps fp32's setting) the row it was chosen on."""
    import re

    from unirag.paths import REPO_ROOT
    from unirag.settings import PRECISIONS, RecommendedSettings

    rows = results.load_store()
    for ckpt in sorted((REPO_ROOT / "checkpoints").glob("*-smollm2")):
        corpus = ckpt.name.split("-")[0]
        for precision in PRECISIONS:
            rec = RecommendedSettings.load(ckpt, precision)
            assert rec is not None and "\n" not in rec.reason
            named = re.compile(r"results row '([^']+)' \((\w+) (dev(?:\[:\d+\])?), (\w+)\)")
            run = named.match(rec.reason)
            assert run and run[2] == corpus and run[4] in (precision, "fp32"), rec.reason
            (row,) = [r for r in rows if (r["run"], r["corpus"], r["precision"], r["split"]) == (
                run[1], corpus, run[4], run[3])]
            assert {k: row["settings"][k] for k in rec.values} == rec.values and row["settings"]["recommended"]
            # What a fresh machine serves (no passage cache) is measured too: in this precision, or (the recovered
            # 4-bit where not measured yet) the precision its recommended setting comes from.
            fresh = named.match(rec.without_cache.reason)
            assert fresh and fresh[4] in (precision, run[4]), rec.without_cache.reason
            (row,) = [r for r in rows if (r["run"], r["corpus"], r["precision"], r["split"]) == (
                fresh[1], corpus, fresh[4], fresh[3])]
            values = {**rec.values, **rec.without_cache.values}
            if not values["self_check"]:
                values.pop("self_check_weight")  # no self-check: its weight has no effect (null in the row)
            assert {k: row["settings"][k] for k in values} == values and row["settings"]["fresh_machine"]


def test_baselines_table_pairs_each_baseline_with_the_joint_row_and_judges_the_targets():
    def metrics(acc, r1, **extra):
        m = {k: None for k in results.METRIC_KEYS}
        m.update(accuracy=acc, **{"recall@1": r1}, k=1, **extra)
        return m

    joint_run = "joint, 1 doc, beam 32, self-check 10 (likelihood alone), base reader"
    common = {"corpus": "squad", "split": "dev[:100]", "precision": "fp32", "n": 100}
    rows = [
        _row(run="RAG top-1", system="rag", settings={"rag_k": 1}, metrics=metrics(0.23, 0.60), **common),
        _row(run="dense top-10", system="rag-selfcheck", settings={"self_check": 10}, **common,
             metrics=metrics(0.26, 0.78, **{"candidate_recall@1": 0.60, "candidate_recall@n": 0.94}),
             paired=[{"against": joint_run, "metric": "accuracy", "only_a": 9, "only_b": 3, "p": 0.146},
                     {"against": joint_run, "metric": "recall@1", "only_a": 30, "only_b": 5, "p": 0.00002}]),
        _row(run="joint, 1 doc, beam 10, base reader", system="joint", **common, metrics=metrics(0.15, 0.40),
             settings={"beam_width": 10, "k_docs": 1, "self_check": 0, "joint_reader": "base"}),
        _row(run=joint_run, system="joint", **common, metrics=metrics(0.24, 0.71, **{"candidate_recall@1": 0.45}),
             settings={"beam_width": 32, "k_docs": 1, "self_check": 10, "recommended": True}),
    ]
    text = results.render_baselines(rows)
    assert ("| squad, dev[:100], fp32 | dense + self-check (dense top-10) | 0.260 | 0.780 | 0.600 | 0.940 | 0.15 "
            "| 2e-05 |") in text
    assert "| squad, dev[:100], fp32 | docid search alone, R@1 (beam 10) ≥ 0.600 | 0.400 | **missed** |" in text
    assert "joint R@1 vs dense + self-check ≥ 0.780 | 0.710 | **missed** |" in text
    assert "joint accuracy vs dense top-1 (RAG top-1) ≥ 0.230 | 0.240 | **met** |" in text
    assert "nq" not in text  # no nq rows: no nq lines


def test_training_curves_read_the_validation_points_of_a_loss_log(tmp_path):
    log = tmp_path / "nq-tiny" / "loss_log.jsonl"
    log.parent.mkdir()
    log.write_text("\n".join(json.dumps(e) for e in (
        {"stage": 1, "epoch": 1, "loss": 2.0, "valid": {"recall@1": 0.2, "recall@3": 0.4, "n": 50}},
        {"stage": 2, "step": 25, "loss_docid": 0.9},  # no validation: not a row
        {"stage": 2, "step": 50, "loss_docid": 0.7, "valid": {"recall@1": 0.3, "recall@3": 0.5, "n": 50}},
    )))
    rows = results.render_training_curves([log]).splitlines()[2:]
    assert rows == ["| nq-tiny | 1 | epoch 1 | 2.000 | 0.20 | 0.40 | 50 |",
                    "| nq-tiny | 2 | step 50 | 0.700 | 0.30 | 0.50 | 50 |"]


def test_rounds_table_reads_the_per_round_metrics():
    m = {k: None for k in results.METRIC_KEYS}
    m.update(accuracy=0.3, **{"round_accuracy": [0.2, 0.3], "round_recall@1": [0.4, 0.5], "round_helped": [12],
                              "round_hurt": [2]})
    text = results.render_rounds([_row(run="joint, 2 rounds", system="joint", metrics=m, n=100), _row()])
    assert text.splitlines()[2:] == ["| nq, dev, 4bit | joint, 2 rounds | 100 | 0.200 → 0.300 | 0.400 → 0.500 | "
                                     "+12 / −2 |"]
