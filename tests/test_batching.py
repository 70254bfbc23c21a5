"""Several users at once: the batcher (fake work, fast) and the pipeline's batched asks on the tiny app models."""

from __future__ import annotations

import contextvars
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_app import pipeline, tiny  # noqa: F401  (module fixtures: tiny corpus, tiny Llama, joint checkpoint)

from unirag.batching import Batcher, concurrent_requests

CALLER = contextvars.ContextVar("caller", default=None)


class Work:
    """run_many / run_one that record their calls; a question containing "bad" fails."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.alone: list[tuple[str, str | None]] = []  # (item, the caller's context variable seen)
        self.entered = threading.Event()  # a call is running alone
        self.release = threading.Event()
        self.release.set()

    def run_many(self, key, items):
        self.batches.append(list(items))
        if any("bad" in item for item in items):
            raise RuntimeError("a bad question in the batch")
        return [f"{key}:{item}!" for item in items]

    def run_one(self, key, item):
        self.entered.set()
        self.release.wait(10)
        self.alone.append((item, CALLER.get()))
        if "bad" in item:
            raise ValueError(f"cannot answer {item}")
        return f"{key}:{item}."


def submit_at_once(batcher: Batcher, calls: list[tuple[str, str]]) -> list:
    """Each (key, item) from its own thread, all released together; results (or exceptions) in call order."""
    barrier = threading.Barrier(len(calls))

    def one(call):
        CALLER.set(call[1])
        barrier.wait()
        try:
            return batcher.submit(*call)
        except Exception as exc:  # noqa: BLE001 - returned for the test to inspect
            return exc

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(one, calls))


def test_concurrent_calls_are_answered_as_one_batch_each_caller_its_own_answer():
    work = Work()
    batcher = Batcher(work.run_many, work.run_one, max_batch=4, window_s=0.5)
    results = submit_at_once(batcher, [("k", f"q{i}") for i in range(4)])
    assert results == [f"k:q{i}!" for i in range(4)]
    assert len(work.batches) == 1 and sorted(work.batches[0]) == ["q0", "q1", "q2", "q3"] and not work.alone


def test_batches_hold_one_key_and_at_most_max_batch_calls():
    work = Work()
    batcher = Batcher(work.run_many, work.run_one, max_batch=3, window_s=0.5)
    calls = [("a", f"q{i}") for i in range(4)] + [("b", "q4"), ("b", "q5")]
    results = submit_at_once(batcher, calls)
    assert [r[:-1] for r in results] == [f"{k}:{q}" for k, q in calls]  # each caller its own answer
    # Key a: a full batch of 3, then its fourth call alone; key b: a batch of its own.
    assert sorted(len(b) for b in work.batches) == [2, 3]
    assert [sorted(b) for b in work.batches if "q4" in b] == [["q4", "q5"]]
    assert len(work.alone) == 1 and work.alone[0][0] in {"q0", "q1", "q2", "q3"}


def test_a_failing_question_fails_only_its_caller():
    work = Work()
    batcher = Batcher(work.run_many, work.run_one, max_batch=4, window_s=0.5)
    results = submit_at_once(batcher, [("k", "q0"), ("k", "bad1"), ("k", "q2")])
    assert results[0] == "k:q0." and results[2] == "k:q2."  # answered again alone after the batch failed
    assert isinstance(results[1], ValueError) and "bad1" in str(results[1])
    assert len(work.batches) == 1 and sorted(item for item, _ in work.alone) == ["bad1", "q0", "q2"]


def test_run_many_may_fail_one_call_with_an_exception_instance():
    def run_many(key, items):
        return [ValueError(item) if item == "bad" else item.upper() for item in items]

    batcher = Batcher(run_many, lambda key, item: pytest.fail("no call runs alone"), max_batch=4, window_s=0.5)
    results = submit_at_once(batcher, [("k", "a"), ("k", "bad"), ("k", "c")])
    assert results[0] == "A" and results[2] == "C" and isinstance(results[1], ValueError)


def test_a_lone_call_runs_alone_in_the_callers_context():
    work = Work()
    batcher = Batcher(work.run_many, work.run_one, max_batch=4, window_s=0.01)
    CALLER.set("me")
    try:
        assert batcher.submit("k", "q") == "k:q."
    finally:
        CALLER.set(None)
    assert work.alone == [("q", "me")] and not work.batches


def test_calls_arriving_while_the_model_is_busy_form_the_next_batch():
    work = Work()
    work.release.clear()  # the first call holds the model until released
    batcher = Batcher(work.run_many, work.run_one, max_batch=4, window_s=0.01)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(batcher.submit, "k", "first")
        assert work.entered.wait(10)  # the first call is running alone now
        later = [pool.submit(batcher.submit, "k", f"q{i}") for i in range(3)]
        while batcher.waiting < 3:
            time.sleep(0.01)
        work.release.set()
        assert first.result(10) == "k:first."
        assert [f.result(10) for f in later] == ["k:q0!", "k:q1!", "k:q2!"]
    assert work.batches == [["q0", "q1", "q2"]]


def test_the_server_lets_in_a_batch_and_the_next_one():
    assert concurrent_requests(4) == 8 and concurrent_requests(0) == 2


# --------------------------------------------------------------------------------------------- the pipeline


@pytest.fixture
def counted(pipeline, monkeypatch):  # noqa: F811
    """The pipeline with a wide batching window, and the sizes of the model calls made."""
    from unirag.joint import joint_system
    from unirag.rag import Reader

    calls: dict[str, list[int]] = {"search": [], "read": [], "rag": []}
    search, read, rag_read = joint_system.search_docids_many, joint_system.answer_many_with_docs, Reader.read_many

    def counted_search(model, tokenizer, questions, *args, **kwargs):
        calls["search"].append(len(questions))
        return search(model, tokenizer, questions, *args, **kwargs)

    def counted_read(model, tokenizer, questions, *args, **kwargs):
        calls["read"].append(len(questions))
        return read(model, tokenizer, questions, *args, **kwargs)

    def counted_rag(self, questions, *args, **kwargs):
        calls["rag"].append(len(questions))
        return rag_read(self, questions, *args, **kwargs)

    monkeypatch.setattr(joint_system, "search_docids_many", counted_search)
    monkeypatch.setattr(joint_system, "answer_many_with_docs", counted_read)
    monkeypatch.setattr(Reader, "read_many", counted_rag)
    monkeypatch.setattr(pipeline.batcher, "window_s", 1.0)  # the test's threads all join the first batch
    pipeline.bundle("nq")
    return pipeline, calls


QUESTIONS = ["when was the eiffel tower completed", "who created the python programming language",
             "which planet is called the red planet", "what is the longest river in london"]


def ask_at_once(pipeline, questions):  # noqa: F811
    barrier = threading.Barrier(len(questions))

    def one(question):
        barrier.wait()
        return pipeline.ask("nq", question, beam_width=4, k_docs=2, rag_k=2, max_new_tokens=4)

    with ThreadPoolExecutor(len(questions)) as pool:
        return list(pool.map(one, questions))


def test_pipeline_answers_concurrent_asks_as_one_batch(counted):
    pipe, calls = counted
    together = ask_at_once(pipe, QUESTIONS)
    assert calls == {"search": [4], "read": [4], "rag": [4]}  # one batched call per model stage
    pipe.batcher.window_s = 0.01
    alone = [pipe.ask("nq", q, beam_width=4, k_docs=2, rag_k=2, max_new_tokens=4) for q in QUESTIONS]
    # One at a time: the joint side's single (streaming) path, the baseline's reader on one question each.
    assert calls == {"search": [4], "read": [4], "rag": [4, 1, 1, 1, 1]}
    for question, got, want in zip(QUESTIONS, together, alone, strict=True):
        assert got.question == question and got.joint.error is None and got.rag.error is None
        assert got.joint.answer.text == want.joint.answer.text and got.joint.answer.doc_ids == want.joint.answer.doc_ids
        assert got.rag.answer.text == want.rag.answer.text and got.rag.answer.doc_ids == want.rag.answer.doc_ids
        assert (got.gold and got.gold.question) == (want.gold and want.gold.question)
        assert got.joint.gold_found == want.joint.gold_found and got.rag.correct == want.rag.correct
    assert [c.gold is not None for c in together] == [True, True, True, False]  # the last is not a dev question


def test_pipeline_different_settings_run_as_separate_batches(counted):
    pipe, calls = counted
    barrier = threading.Barrier(4)

    def one(i):
        barrier.wait()
        return pipe.ask("nq", QUESTIONS[i], beam_width=4, k_docs=2, rag_k=2, max_new_tokens=3 + i % 2)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    assert [r.question for r in results] == QUESTIONS and all(r.settings.max_new_tokens == 3 + i % 2
                                                               for i, r in enumerate(results))
    assert sorted(calls["search"]) == [2, 2] and sorted(calls["rag"]) == [2, 2]


def test_pipeline_a_failing_question_fails_only_its_card(counted, monkeypatch):
    pipe, calls = counted
    system = pipe.bundle("nq").joint_system
    batch, one = system.answer_batch, system.answer

    def failing_batch(texts, settings, with_attention=False):
        if any("planet" in t for t in texts):
            raise RuntimeError("the model broke on a planet")
        return batch(texts, settings, with_attention)

    def failing_one(text, settings, with_attention=False):
        if "planet" in text:
            raise RuntimeError("the model broke on a planet")
        return one(text, settings, with_attention)

    monkeypatch.setattr(system, "answer_batch", failing_batch)
    monkeypatch.setattr(system, "answer", failing_one)
    results = ask_at_once(pipe, QUESTIONS)
    for question, result in zip(QUESTIONS, results, strict=True):
        assert result.rag.answer is not None  # the other side answered in its batch
        if "planet" in question:
            assert result.joint.answer is None and "planet" in result.joint.error
        else:
            assert result.joint.error is None and result.joint.answer.question == question
    assert calls["rag"] == [4]


def test_pipeline_a_lone_ask_still_streams_and_a_batched_one_comes_whole(counted):
    from unirag.pipeline import Comparison

    pipe, _ = counted
    pipe.batcher.window_s = 0.01
    items = list(pipe.ask_stream("nq", QUESTIONS[0], beam_width=4, k_docs=2, rag_k=2, max_new_tokens=4))
    assert isinstance(items[-1], Comparison)
    events = {(e.side, e.kind) for e in items[:-1]}
    assert {("joint", "level"), ("joint", "token"), ("rag", "token")} <= events

    pipe.batcher.window_s = 1.0
    barrier = threading.Barrier(2)

    def streamed(question):
        barrier.wait()
        return list(pipe.ask_stream("nq", question, beam_width=4, k_docs=2, rag_k=2, max_new_tokens=4))

    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(streamed, QUESTIONS[:2]))
    for question, items in zip(QUESTIONS[:2], both, strict=True):
        assert len(items) == 1 and isinstance(items[0], Comparison) and items[0].question == question


def test_the_page_lets_concurrent_asks_reach_the_batcher(pipeline):  # noqa: F811
    import app

    demo = app.build_demo(pipeline)
    asks = [d for d in demo.fns.values() if d.concurrency_id == "ask"]
    assert any(getattr(d, "api_name", None) == "ask" for d in asks) and len(asks) >= 4  # API, button, enter, example
    assert {d.concurrency_limit for d in asks} == {pipeline.ask_concurrency} and pipeline.ask_concurrency > 1
    reask = [d for d in demo.fns.values() if d.concurrency_id == "models"]
    assert reask and all(d.concurrency_limit in ("default", None, 1) for d in reask)


def test_concurrent_api_asks_reach_the_batcher_together(counted):
    """The page's /ask API, as `benchmarks.app_performance --concurrent` calls it: four clients at once are answered
    in one batch (the web server lets them in together; the batcher gathers them)."""
    from gradio_client import Client

    import app
    from benchmarks.app_performance import answered, free_port

    pipe, calls = counted
    demo = app.build_demo(pipe)
    demo.queue(default_concurrency_limit=1, max_size=64)  # as app.main on 2 cores
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
    try:
        clients = [Client(f"http://127.0.0.1:{port}/", verbose=False) for _ in QUESTIONS]
        with ThreadPoolExecutor(len(QUESTIONS)) as pool:
            results = list(pool.map(lambda i: clients[i].predict("nq", QUESTIONS[i], api_name="/ask"),
                                    range(len(QUESTIONS))))
    finally:
        demo.close()
    assert all(answered(r) for r in results)
    assert calls["search"] == [4] and calls["rag"] == [4]
