"""The app benchmark's store row: valid, named by its cache state, and kept out of the QA tables."""

from benchmarks import app_performance
from unirag import results


def test_app_performance_row_is_valid_and_stays_out_of_the_qa_tables(tmp_path):
    summary = {"precision": "4bit", "corpus": "nq", "fresh_cache": True, "app_args": [], "server_up_s": 20.0,
               "start_to_first_answer_s": 55.0, "n": 5, "latency_median_s": 5.0, "latency_p90_s": 6.0,
               "latency_max_s": 7.0, "concurrent": 4, "concurrent_last_s": 9.0, "concurrent_ratio": 1.8,
               "rss_mb_after_warmup": 900.0, "peak_rss_mb": 1000.0, "timeline": [[3.2, "nq: ready in 3.0 s"]]}
    row = app_performance.store_row(summary, "python -m benchmarks.app_performance --fresh-cache")
    assert row["run"] == "app performance: fresh cache, 4bit, nq"
    assert row["metrics"]["start_to_first_answer_s"] == 55.0 and row["labels"]["timeline"][0][0] == 3.2
    results.append_run(row, tmp_path)
    store = results.load_store(tmp_path)
    assert len(store) == 1 and results.table(store, "nq", "4bit", "dev") == []


def test_a_fresh_environment_points_every_cache_at_empty_folders(tmp_path):
    env = app_performance.fresh_environment(tmp_path)
    for name in ("HOME", "UNIRAG_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        assert env[name].startswith(str(tmp_path)) and not any((tmp_path / env[name]).iterdir())


def test_an_unbatched_control_is_its_own_row_and_the_report_states_the_targets(tmp_path, monkeypatch):
    from benchmarks.report import render_app_performance

    base = {"precision": "4bit", "corpus": "nq", "app_args": [], "server_up_s": 5.0, "n": 5, "latency_median_s": 3.0,
            "latency_p90_s": 3.5, "latency_max_s": 4.0, "concurrent": 4, "rss_mb_after_warmup": 900.0,
            "peak_rss_mb": 1000.0, "timeline": []}
    fresh = app_performance.store_row({**base, "fresh_cache": True, "max_batch": 4, "start_to_first_answer_s": 58.0,
                                       "concurrent_last_s": 9.0, "concurrent_ratio": 3.0}, "cmd")
    monkeypatch.setenv("UNIRAG_MAX_BATCH", "1")
    alone = app_performance.store_row({**base, "fresh_cache": False, "max_batch": app_performance.max_batch(),
                                       "start_to_first_answer_s": 40.0, "concurrent_last_s": 12.0,
                                       "concurrent_ratio": 4.0}, "cmd")
    assert alone["run"].endswith(", max batch 1") and fresh["run"] == "app performance: fresh cache, 4bit, nq"
    for row in (fresh, alone):
        results.append_run(row, tmp_path, replace=True)
    table = render_app_performance(results.load_store(tmp_path))
    assert "| fresh cache, 4bit, nq | 4 | 58.0 |" in table and "| warm cache, 4bit, nq, max batch 1 | 1 |" in table
    # The targets read the fresh, batched row only: 58 s meets 60 s, 3.0x misses 2x.
    assert "58.0 s **met**" in table and "3.00x **missed**" in table
