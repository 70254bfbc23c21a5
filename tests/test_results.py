"""The results store (results/*.jsonl), its validation and append, its per-corpus tables, and the reports generated
from it (docs/RESULTS.md and docs/notes/studies.md: benchmarks.report)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks import report
from unirag import results, studies
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
    # The two corpora, plus the gr-vs-dr benchmark's corpus sizes (nq-300, ..., nq+squad), which only it and the
    # build benchmark (a checkpoint built on one of those sizes) write.
    assert {r["corpus"] for r in rows if not r["run"].startswith((studies.GR_VS_DR_PREFIX, results.BUILD_PREFIX))
            } == {"nq", "squad"}
    assert all(r["corpus"].startswith("nq") for r in rows if r["run"].startswith(studies.GR_VS_DR_PREFIX))
    # Every migrated summary file is one row (88), plus the notebook's figures whose records were lost, plus runs
    # recorded by `eval`/`merge --record` since.
    assert sum(r["source"].startswith("eval_") for r in rows) == 88
    assert all(r["source"].startswith(("eval_", "docs/RESULTS.md", "python -m unirag eval", "python -m benchmarks."))
               for r in rows)
    recommended = [(r["corpus"], r["precision"], r["split"]) for r in rows if r["settings"].get("recommended")]
    assert len(recommended) == len(set(recommended))  # one recommended row per corpus, precision and questions
    assert sorted(k[:2] for k in recommended if k[2] == "dev") == [("nq", "4bit")]


def test_report_tables_are_generated_from_the_store():
    rows = results.load_store()
    for path in report.REPORTS:
        text = path.read_text(encoding="utf-8")
        assert text.count("<!-- results:") >= 4
        # If this fails, run `python -m benchmarks.report` and commit the reports.
        assert report.update_report(text, rows) == text, path
        assert report.update_report(report.update_report(text, rows), rows) == text  # idempotent
    assert report.main(["--check"]) == 0


def test_the_report_opens_with_its_summary_and_stays_short():
    text = (REPO / "docs" / "RESULTS.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= 600
    assert lines[0].startswith("# ") and lines.index("## Summary") < 10  # a title, a few lines of intro
    first_table = next(i for i, line in enumerate(lines) if line.startswith("|"))
    assert lines[first_table - 1] == "<!-- results:summary -->" and first_table < 25
    head = lines[first_table].split(" | ")
    assert head[0] == "| system" and [h.split()[-1] for h in head[1:5]] == ["EM", "F1", "accuracy", "R@1"]
    assert "**Targets (4bit).**" in text and "## Ablations" in text
    assert (REPO / "docs" / "notes" / "studies.md").is_file()


def test_regenerating_the_reports_twice_gives_the_same_bytes(tmp_path):
    store = tmp_path / "store"
    for row in results.load_store():
        results.append_run(row, store)
    copies = []
    for path in report.REPORTS:
        copy = tmp_path / path.name
        copy.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
        copies.append(copy)
    args = [*map(str, copies), "--store", str(store)]
    assert report.main(args) == 0
    first = [c.read_bytes() for c in copies]
    assert report.main(args) == 0 and [c.read_bytes() for c in copies] == first
    assert report.main([*args, "--check"]) == 0


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
    assert row["machine"] == results.machine() and len(row["date"]) == 10
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
    # EM and F1 are the headline columns, accuracy ("contains the gold answer") after them
    assert md.splitlines()[0].startswith("| run | n | EM | F1 | accuracy | R@1 | R@3 |")
    assert "| **joint** (recommended) | 266 | – | – | 0.139 |" in md and md.splitlines()[5].endswith("| 0.01 |")
    superseded = _row(run="RAG top-3", settings={"rag_k": 3, "superseded": "checkpoint retrained"})
    assert "| RAG top-3 (superseded) | 266 |" in results.render_table([superseded], "nq", "4bit")
    older = _row(run="4-layer model: joint", system="joint", settings={"k_docs": 1, "shipped": False})
    assert [t["run"] for t in results.table([*rows, older], "nq", "4bit", shipped=False)] == ["4-layer model: joint"]
    assert results.table([*rows, older], "nq", "4bit", shipped=None)[-1]["run"] == "4-layer model: joint"
    assert "4-layer" not in results.render_table([*rows, older], "nq", "4bit")
    assert studies.quantization_cost(rows) == [
        "nq/dev · RAG top-5: accuracy 0.139 4-bit (recovered, HQQ) (-15.8 points) against 0.297 in fp32 (n=266)."]
    nf4 = _row(precision="nf4", metrics={**_row()["metrics"], "accuracy": 0.1})
    assert studies.quantization_cost([*rows, nf4]) == [
        "nq/dev · RAG top-5: accuracy 0.139 4-bit (recovered, HQQ) (-15.8 points) and 0.100 NF4 (no recovery) "
        "(-19.7 points) against 0.297 in fp32 (n=266)."]


def test_generator_rewrites_and_checks(tmp_path):
    store = tmp_path / "store"
    results.append_run(_row(), store)
    path = tmp_path / "R.md"
    path.write_text("# R\n<!-- results:nq:4bit -->\nstale\n<!-- /results -->\ntail\n")
    assert report.main([str(path), "--store", str(store), "--check"]) == 1
    assert report.main([str(path), "--store", str(store)]) == 0
    text = path.read_text()
    assert "| RAG top-5 | 266 | – | – | 0.139 |" in text and "stale" not in text and text.endswith("tail\n")
    assert report.main([str(path), "--store", str(store), "--check"]) == 0
    path.write_text("<!-- results:nq:4bit:dev:other -->\n<!-- /results -->\n")
    assert report.main([str(path), "--store", str(store)]) == 0 and "| RAG top-5 |" not in path.read_text()
    path.write_text("<!-- results:nq:int8 -->\n<!-- /results -->\n")
    assert report.main([str(path), "--store", str(store)]) == 2
    path.write_text("<!-- results:no-such-study -->\n<!-- /results -->\n")
    assert report.main([str(path), "--store", str(store)]) == 2


def test_results_module_prints_the_store_tables_and_points_to_the_report(tmp_path, capsys):
    store = tmp_path / "store"
    results.append_run(_row(), store)
    assert results.main(["--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("### nq/dev, 4bit\n\n| run | n | EM | F1 | accuracy |") and "| RAG top-5 |" in out
    assert results.main(["docs/RESULTS.md"]) == 2 and "python -m benchmarks.report" in capsys.readouterr().err
    # the studies live in unirag.studies (the app's) and benchmarks.report, not in the store module
    for name in ("render_gr_vs_dr", "quantization_cost", "render_baselines"):
        assert not hasattr(results, name)


def test_machine_names_cores_and_memory():
    assert re.fullmatch(r"\d+-core CPU, \d+ GB", results.machine())


def test_the_library_never_imports_the_benchmarks():
    importing = re.compile(r"^\s*(from|import)\s+benchmarks\b", re.M)
    offenders = [p.name for p in (REPO / "unirag").rglob("*.py") if importing.search(p.read_text(encoding="utf-8"))]
    assert offenders == []


def test_recommended_settings_name_their_results_row():
    """Each shipped recommended setting's reason names a store row measured with exactly those values: its own
    precision's, or (the recovered 4-bit, which keeps fp32's setting) the row it was chosen on."""
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
            # A checkpoint measured in the recovered 4-bit only (it reads as fp32) names its 4-bit row everywhere.
            assert run and run[2] == corpus and run[4] in (precision, "fp32", "4bit"), rec.reason
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
                values.pop("self_check_weight", None)  # no self-check: its weight has no effect (null in the row)
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
    text = report.render_baselines(rows)
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
    rows = report.render_training_curves([log]).splitlines()[2:]
    assert rows == ["| nq-tiny | 1 | epoch 1 | 2.000 | 0.20 | 0.40 | 50 |",
                    "| nq-tiny | 2 | step 50 | 0.700 | 0.30 | 0.50 | 50 |"]


def test_rounds_table_reads_the_per_round_metrics():
    m = {k: None for k in results.METRIC_KEYS}
    m.update(accuracy=0.3, **{"round_accuracy": [0.2, 0.3], "round_recall@1": [0.4, 0.5], "round_helped": [12],
                              "round_hurt": [2]})
    text = report.render_rounds([_row(run="joint, 2 rounds", system="joint", metrics=m, n=100), _row()])
    assert text.splitlines()[2:] == ["| nq, dev, 4bit | joint, 2 rounds | 100 | 0.200 → 0.300 | 0.400 → 0.500 | "
                                     "+12 / −2 |"]


def _qa(run, system, acc, em, f1, r1, corpus="nq", split="dev", precision="4bit", **settings):
    m = {k: None for k in results.METRIC_KEYS}
    m.update(accuracy=acc, em=em, f1=f1, **{"recall@1": r1}, k=1)
    return _row(run=run, system=system, corpus=corpus, split=split, precision=precision, settings=settings,
                metrics=m)


def test_summary_picks_one_current_row_a_system_and_judges_the_targets():
    rows = [_qa("RAG top-1", "rag", 0.43, 0.01, 0.13, 0.91, rag_k=1),
            _qa("RAG top-5", "rag", 0.14, 0.00, 0.05, 0.91, rag_k=5),
            _qa("BM25 top-1", "bm25", 0.36, 0.01, 0.10, 0.79, rag_k=1),
            _qa("joint, old recommended", "joint", 0.50, 0.30, 0.40, 0.95, recommended=True, superseded="retrained"),
            _qa("joint, better but not recommended", "joint", 0.30, 0.20, 0.30, 0.80),
            _qa("joint, recommended", "joint", 0.21, 0.15, 0.23, 0.71, recommended=True),
            _qa("4-layer model: joint", "joint", 0.9, 0.9, 0.9, 0.9, shipped=False),
            _qa("gold passage, base reader", "gold", 0.46, 0.01, 0.13, 1.0, precision="fp32")]
    assert report.summary_split(rows, "nq") == "dev" and report.summary_split(rows, "squad") is None
    assert report.summary_row(rows, "joint", "nq", "dev")["run"] == "joint, recommended"
    assert report.summary_row(rows, "rag", "nq", "dev")["run"] == "RAG top-1"
    lines = report.render_summary(rows).splitlines()
    assert lines[0].startswith("| system | nq dev EM | nq dev F1 | nq dev accuracy | nq dev R@1 | squad dev EM |")
    assert "| dense RAG (MiniLM top-k) (`rag`) | 0.010 | 0.130 | 0.430 | 0.910 | – | – | – | – | nq: RAG top-1 |" \
        in lines
    assert "| **joint** (`joint`) | 0.150 | 0.230 | 0.210 | 0.710 | – | – | – | – | nq: joint, recommended |" in lines
    assert "| gold passage, base reader (`gold`) | – | – | – | – | – | – | – | – | – |" in lines  # fp32 only
    assert len([line for line in lines if line.startswith("| ")]) == 1 + len(results.SYSTEMS)  # head + systems
    text = "\n".join(lines)
    assert "- joint R@1 ≥ dense R@1: nq dev 0.710 vs ≥ 0.910 (*RAG top-1*) **missed**" in text
    assert "- joint F1 ≥ the best baseline's: nq dev 0.230 vs ≥ 0.130 (*RAG top-1*) **met**" in text
    assert "superseded" not in text and "4-layer" not in text


def test_search_levers_show_the_stage1_run_and_the_paired_test_against_the_shipped_search():
    def lever(name, r1, precision="fp32", **extra):
        m = {k: None for k in results.METRIC_KEYS}
        m.update({"recall@1": r1, "recall@3": 0.8, "recall@k": 0.9, "k": 10, "heldout_recall@1": 0.7,
                  "heldout_recall@3": 0.83}, **extra.pop("metrics", {}))
        return _row(run=results.SEARCH_LEVER_PREFIX + name, system="joint", precision=precision, metrics=m,
                    settings={"beam_width": 10, "search_only": True, **extra.pop("settings", {})}, **extra)

    rows = [lever("shipped", 0.526, settings={"shipped": True, "stage1_epochs": 3, "superseded": "retrained"},
                  metrics={"heldout_curve_recall@1": [0.23, 0.5, 0.53]}),
            lever("dense distillation, 8 epochs", 0.707,
                  settings={"shipped": False, "stage1_epochs": 8, "stage1_examples": 8735},
                  metrics={"heldout_curve_recall@1": [0.41, 0.7], "stage1_minutes": 96.2},
                  paired=[{"against": "shipped", "metric": "recall@1", "only_a": 64, "only_b": 16, "p": 0.0}]),
            lever("dense distillation, 8 epochs", 0.699, precision="4bit")]
    lines = report.render_search_levers(rows).splitlines()
    assert "stage-1 minutes | held-out R@1 by epoch" in lines[0] and len(lines) == 2 + 3
    assert lines[2].startswith("| nq, 4bit | dense distillation, 8 epochs |")  # the app's precision first
    assert lines[3] == ("| nq, fp32 | shipped (superseded) | 3 | – | – | 0.23 → 0.50 → 0.53 | 0.70 / 0.83 | 0.526 | "
                        "0.800 | 0.900 | – |")
    assert lines[4] == ("| nq, fp32 | dense distillation, 8 epochs | 8 | 8735 | 96 | 0.41 → 0.70 | 0.70 / 0.83 | "
                        "0.707 | 0.800 | 0.900 | 64 / 16 vs *shipped*, p <1e-4 |")
    # the summary's target line reads the best search measured on all of nq dev in the app's precision
    assert report.summary_targets(rows) == ["- docid search alone, R@1 (beam 10), the best search measured on all "
                                            "nq dev questions (*dense distillation, 8 epochs*): nq dev 0.699 vs ≥ "
                                            "0.800 **missed**"]


def test_outcomes_give_a_sign_test_between_any_two_rows_on_the_same_questions():
    from unirag import results

    def records(bits):
        return [{"id": f"q{i}", "accuracy": float(b)} for i, b in enumerate(bits)]

    a, b = results.outcomes_of(records("1101")), results.outcomes_of(records("0100"))
    assert a["ids"] == b["ids"] and a["accuracy"] == "1101"
    # Sorted by id, whatever order the run answered in.
    assert results.outcomes_of(list(reversed(records("1101"))))["accuracy"] == "1101"
    pair = results.paired_p({"run": "A", "outcomes": a}, {"run": "B", "outcomes": b})
    assert pair == {"against": "B", "only_a": 2, "only_b": 0, "p": 0.5}
    other = results.outcomes_of([{"id": f"x{i}", "accuracy": 1.0} for i in range(4)])
    assert results.paired_p({"run": "A", "outcomes": a}, {"run": "C", "outcomes": other}) is None  # other questions
    assert results.paired_p({"run": "A"}, {"run": "B", "outcomes": b}) is None
    with pytest.raises(UniragError, match="0/1"):
        results.outcomes_of([{"id": "q", "accuracy": 0.5}])
    with pytest.raises(UniragError, match="twice"):
        results.outcomes_of(records("11") + records("1"))


def test_a_row_with_malformed_outcomes_is_refused():
    from unirag import results

    row = {"run": "r", "system": "rag", "corpus": "nq", "split": "dev", "precision": "fp32", "n": 3,
           "settings": {}, "metrics": {k: None for k in results.METRIC_KEYS}, "command": "c", "date": "d",
           "machine": "m", "source": "s", "outcomes": {"ids": "x", "accuracy": "10"}}
    with pytest.raises(UniragError, match="outcomes"):
        results.validate_row(row)
    results.validate_row({**row, "outcomes": {"ids": "x", "accuracy": "101"}})


def test_checkpoint_choice_pairs_each_candidate_with_the_shipped_one_of_its_system():
    from benchmarks.report import render_checkpoint_choice

    def row(run, system, outcomes, acc):
        return {"run": f"checkpoint choice: {run}", "system": system, "corpus": "nq", "split": "nq-heldout",
                "n": 4, "precision": "4bit", "metrics": {"em": 0.1, "f1": 0.2, "accuracy": acc, "recall@1": 0.5},
                "outcomes": {"ids": "abc", "accuracy": outcomes}}

    rows = [row("new (shipped)", "joint", "1100", 0.5), row("old", "joint", "1011", 0.75),
            row("old reader", "joint-gold", "1111", 1.0), {**row("elsewhere", "joint", "0000", 0.0), "run": "x"}]
    table = render_checkpoint_choice(rows)
    lines = {line.split(" | ")[1]: line for line in table.splitlines()[2:]}
    assert set(lines) == {"new (shipped)", "old", "old reader"}  # only the choice rows
    assert lines["old"].endswith("| 2 / 1, p 1 |")  # only old right: 3rd and 4th; only new right: 2nd
    assert lines["new (shipped)"].endswith("| – |") and lines["old reader"].endswith("| – |")  # other system
