"""The app's callbacks and pipeline on tiny offline models (fast), and the real app end to end (slow).

Fast tests build a 24-passage corpus, a tiny random Llama (conftest) and an untrained joint checkpoint around it.
Slow tests launch `python app.py` in a subprocess on a free port with the embedded SmolLM2 and talk to it with
gradio_client; without a trained `checkpoints/nq-smollm2` they build an untrained joint checkpoint in a tmp dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from benchmarks.app_performance import free_port, stop_server, wait_for_server

REPO = Path(__file__).resolve().parent.parent  # on sys.path via conftest.py

SCRIPT = '<script>alert("x")</script>'

PASSAGES = [
    ("Eiffel Tower", "The Eiffel Tower is a wrought-iron tower in Paris. It was completed in 1889."),
    ("Louvre", "The Louvre is the world's most-visited museum in Paris. It houses the Mona Lisa."),
    ("Seine", "The Seine is a river that flows through Paris. It is 777 kilometres long."),
    ("Big Ben", "Big Ben is the nickname for the Great Bell of the clock in London. It was cast in 1858."),
    ("Thames", "The Thames is a river that flows through London. It is 346 kilometres long."),
    ("Tower Bridge", "Tower Bridge is a bridge in London built between 1886 and 1894."),
    ("Colosseum", "The Colosseum is an amphitheatre in Rome. It could hold 50,000 spectators."),
    ("Tiber", "The Tiber is the river of Rome. It is 406 kilometres long."),
    ("Pantheon", "The Pantheon is a former Roman temple in Rome, now a church."),
    ("Python", "Python is a programming language created by Guido van Rossum in 1991."),
    ("Rust", "Rust is a programming language focused on memory safety, first released in 2015."),
    ("Haskell", "Haskell is a purely functional programming language named after Haskell Curry."),
    ("Photosynthesis", "Photosynthesis converts light energy into chemical energy in plants."),
    ("Mitochondria", "The mitochondrion is the powerhouse of the cell. It makes ATP."),
    ("DNA", "DNA is a molecule that carries genetic instructions. Its structure is a double helix."),
    ("Jupiter", "Jupiter is the largest planet in the Solar System. It has 95 known moons."),
    ("Mars", "Mars is the fourth planet from the Sun. It is called the Red Planet."),
    ("Saturn", "Saturn is the sixth planet from the Sun. It has prominent rings."),
    ("Mozart", "Wolfgang Amadeus Mozart was a composer born in Salzburg in 1756."),
    ("Beethoven", "Ludwig van Beethoven was a composer born in Bonn in 1770."),
    ("Bach", "Johann Sebastian Bach was a composer born in Eisenach in 1685."),
    ("Script test", f"This passage contains markup {SCRIPT} that must render as text. It is about HTML escaping."),
    ("Chess", "Chess is a board game for two players. Each player starts with sixteen pieces."),
    ("Go", "Go is an abstract strategy board game for two players, invented in China."),
]
QUESTIONS = [
    ("q1", "when was the eiffel tower completed", ["1889"], "d00"),
    ("q2", "who created the python programming language", ["Guido van Rossum"], "d09"),
    ("q3", "which planet is called the red planet", ["Mars"], "d16"),
    ("q4", "what does the passage about html escaping contain", ["markup"], "d21"),
]


def write_dataset(root: Path, name: str = "nq") -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "corpus.jsonl").open("w") as f:
        for i, (title, text) in enumerate(PASSAGES):
            f.write(json.dumps({"id": f"d{i:02d}", "title": title, "text": text}) + "\n")
    for split in ("dev", "train"):
        with (folder / f"{split}.jsonl").open("w") as f:
            for qid, question, answers, doc_id in QUESTIONS:
                f.write(json.dumps({"id": qid, "question": question, "answers": answers, "doc_id": doc_id}) + "\n")
    return root


def build_joint_checkpoint(llm: str | None, corpus, out: Path, tree=None, **config) -> Path:
    """An untrained joint checkpoint (fresh JointModel + the corpus' docid tree) saved to `out`."""
    from unirag.backbones import load_llm
    from unirag.docids import load_or_build_tree
    from unirag.joint.modeling import JointConfig, JointModel

    tree = tree or load_or_build_tree(corpus, progress=False)
    base, tokenizer = load_llm(llm)
    joint = JointModel(base, JointConfig(docid_levels=tree.depth, docid_branching=tree.branching, base_model=llm,
                                         **config), tokenizer=tokenizer)
    joint.save_pretrained(out, tree=tree)
    return out


def talkative_tiny_llm(path: Path) -> str:
    """The conftest tiny Llama with the stop tokens' (tied) embeddings zeroed, so greedy decoding emits text."""
    import torch
    from conftest import build_tiny_llm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build_tiny_llm(path, "llama", seed=5)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    stops = {tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id,
             *tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "\n"])}
    with torch.no_grad():
        for i in stops:
            model.get_input_embeddings().weight[i] = 0.0
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(AppConfig, data root) for a tiny corpus with an untrained joint checkpoint on the tiny Llama."""
    from unirag.data import load_corpus
    from unirag.docids import TreeConfig, build_tree, corpus_embeddings
    from unirag.pipeline import AppConfig

    root = tmp_path_factory.mktemp("app")
    mp = pytest.MonkeyPatch()
    mp.setenv("UNIRAG_CACHE", str(root / "cache"))
    data = write_dataset(root / "data")
    corpus = load_corpus(data / "nq" / "corpus.jsonl")
    tree = build_tree(corpus, corpus_embeddings(corpus, progress=False), TreeConfig(k=3, c=4))
    llm = talkative_tiny_llm(root / "llama")
    ckpts = root / "checkpoints"
    build_joint_checkpoint(llm, corpus, ckpts / "nq-llama", tree=tree, pathway_layers=2, retrieval_heads=2,
                           retrieval_mlp_dim=32)
    config = AppConfig(llm=llm, precision="fp32", checkpoint_dir=ckpts, data_dir=data)
    yield config, data
    mp.undo()


@pytest.fixture(scope="module")
def pipeline(tiny):
    from unirag.pipeline import Pipeline

    return Pipeline(tiny[0])


# --------------------------------------------------------------------------------------------- fast: pipeline


def test_app_config_from_env(monkeypatch, tmp_path):
    from unirag.errors import UniragError
    from unirag.pipeline import AppConfig, llm_tag

    monkeypatch.setenv("UNIRAG_LLM", "Qwen/Qwen3-4B-Instruct-2507")
    monkeypatch.setenv("UNIRAG_ENCODER", "dpr")
    monkeypatch.setenv("UNIRAG_PRECISION", "fp32")
    monkeypatch.setenv("UNIRAG_CHECKPOINT_DIR", str(tmp_path))
    s = AppConfig.from_env()
    assert (s.llm, s.encoder, s.precision, s.checkpoint_dir) == ("Qwen/Qwen3-4B-Instruct-2507", "dpr", "fp32", tmp_path)
    assert s.checkpoint_candidates("nq")[0] == tmp_path / "nq-qwen3-4b-instruct-2507"
    assert "--base-model Qwen/Qwen3-4B-Instruct-2507" in s.train_command("nq")
    assert AppConfig.from_env(precision="nf4").precision_label.startswith("4-bit NF4")
    assert AppConfig().precision == "4bit"  # the recovered 4-bit by default
    assert llm_tag(None) == "smollm2"
    with pytest.raises(UniragError):
        AppConfig(precision="int3")


def test_pipeline_answers_both_sides_and_marks_gold(pipeline):
    bundle = pipeline.bundle("nq")
    assert bundle.joint is not None, bundle.joint_message
    assert bundle.tree is not None and len(bundle.tree) == len(PASSAGES)
    assert bundle.examples(3) and all(isinstance(q, str) for q in bundle.examples(3))
    result = pipeline.ask("nq", "When was the Eiffel Tower completed?", beam_width=4, k_docs=2, rag_k=3,
                          max_new_tokens=4)
    assert result.gold is not None and result.gold.id == "q1"
    assert result.joint.error is None and result.rag.error is None
    assert len(result.joint.answer.docs) == 2 and len(result.rag.answer.docs) == 3
    assert result.rag.gold_found is True and result.rag.gold_rank == 1  # MiniLM finds the Eiffel passage
    from unirag.eval import contains_answer

    assert result.joint.gold_found == ("d00" in result.joint.answer.doc_ids)
    assert result.joint.correct == bool(contains_answer(result.joint.answer.text, ["1889"]))
    assert result.rag.answer.trace.answer_attention.weights
    free = pipeline.ask("nq", "tell me about rivers", beam_width=3, k_docs=1, rag_k=2, max_new_tokens=2)
    assert free.gold is None and free.rag.gold_found is None and free.rag.correct is None


def test_sides_in_parallel_equal_sides_in_turn(tiny, pipeline, monkeypatch):
    """Both sides at once (the default: each on its own thread) give what one after the other gives, and a side
    that raises in the worker thread is reported on its card without taking the other side down."""
    from dataclasses import replace

    from unirag.pipeline import Pipeline

    assert pipeline.config.parallel_sides
    in_turn = Pipeline(replace(tiny[0], parallel_sides=False))
    args = ("nq", "When was the Eiffel Tower completed?")
    kwargs = {"beam_width": 4, "k_docs": 2, "rag_k": 3, "max_new_tokens": 4}
    a, b = pipeline.ask(*args, **kwargs), in_turn.ask(*args, **kwargs)
    for side in ("joint", "rag"):
        x, y = getattr(a, side).answer, getattr(b, side).answer
        assert (x.text, x.doc_ids, x.context_tokens) == (y.text, y.doc_ids, y.context_tokens)
    monkeypatch.setattr(pipeline.bundle("nq").joint, "answer", lambda *a, **k: 1 / 0)
    broken = pipeline.ask(*args, **kwargs)
    assert "ZeroDivisionError" in broken.joint.error and broken.rag.answer.text == a.rag.answer.text
    monkeypatch.setenv("UNIRAG_PARALLEL_SIDES", "0")
    from unirag.pipeline import AppConfig

    assert not AppConfig.from_env().parallel_sides


def test_pipeline_rejects_bad_input(pipeline):
    from unirag.errors import UniragError

    for kwargs in ({"question": "   "}, {"question": "q", "k_docs": 4}, {"question": "q", "rag_k": 0},
                   {"question": "q", "beam_width": "many"}):
        with pytest.raises(UniragError):
            pipeline.ask("nq", **kwargs)
    with pytest.raises(UniragError):
        pipeline.ask("trec", "q")


def test_missing_checkpoint_keeps_rag_and_says_what_to_run(tiny, tmp_path):
    from unirag.pipeline import AppConfig, Pipeline

    config, data = tiny
    empty = Pipeline(AppConfig(llm=config.llm, precision="fp32", checkpoint_dir=tmp_path / "none", data_dir=data))
    result = empty.ask("nq", "who created the python programming language", beam_width=3, k_docs=1, rag_k=2,
                       max_new_tokens=3)
    assert result.rag.answer is not None and result.rag.answer.docs
    assert result.joint.answer is None and "python -m unirag train" in result.joint.error
    assert any("python -m unirag train" in m for m in empty.messages())
    # SQuAD data is absent in the tiny data dir: a page-level message, not a traceback.
    from unirag.errors import UniragError

    with pytest.raises(UniragError, match="UNIRAG_DATA"):
        empty.bundle("squad")
    assert empty.status()["corpora"]["squad"].startswith("error")


def test_broken_checkpoint_is_reported_not_raised(tiny, tmp_path):
    from unirag.pipeline import AppConfig, Pipeline

    config, data = tiny
    broken = tmp_path / "nq-llama"
    broken.mkdir()
    (broken / "joint_config.json").write_text("{not json")
    pipe = Pipeline(AppConfig(llm=config.llm, precision="fp32", checkpoint_dir=tmp_path, data_dir=data))
    bundle = pipe.bundle("nq")
    assert bundle.joint is None and "could not be loaded" in bundle.joint_message
    assert bundle.tree is not None  # the tab still gets the cached k-means tree


def test_recommended_settings_start_the_page_and_weight_the_self_check(tiny, tmp_path):
    import shutil

    import app
    from unirag.joint.passage_cache import PassageCache
    from unirag.pipeline import AppConfig, Pipeline
    from unirag.settings import RECOMMENDED_FILE, InferenceSettings, RecommendedSettings

    config, data = tiny
    shutil.copytree(config.checkpoint_dir / "nq-llama", tmp_path / "nq-llama")
    RecommendedSettings({"k_docs": 1, "beam_width": 8, "self_check": 4, "self_check_weight": 16.0}, "test").save(
        tmp_path / "nq-llama", "fp32")
    pipe = Pipeline(AppConfig(llm=config.llm, precision="fp32", checkpoint_dir=tmp_path, data_dir=data))
    said = []
    pipe._say = lambda name, text: said.append(text)
    bundle = pipe.bundle("nq")
    assert bundle.settings.self_check_weight == 16.0  # the checkpoint's weight, not the library default
    assert "'k_docs': 1, 'beam_width': 8" in " ".join(said) and "'self_check': 0" in " ".join(said)
    start = pipe.start_settings("nq")
    assert (start.k_docs, start.beam_width, start.self_check, start.self_check_weight, start.joint_reader) == (
        1, 8, 0, 16.0, "trained")
    PassageCache.build(bundle.joint.model, bundle.corpus, tmp_path / "kv", storage_dtype="float32", progress=False)
    bundle.joint.passage_cache = PassageCache.open(bundle.joint.model, bundle.corpus, tmp_path / "kv")
    pipe._apply_recommended(bundle, tmp_path / "nq-llama")  # with a cache the full recommended setting applies
    page = app.page_settings_of(app.select_corpus(pipe, "nq"))
    beam, k_docs, self_check, reader, rounds, lookahead = (page[n] for n in (
        "beam_width", "k_docs", "self_check", "joint_reader", "rounds", "evidence_lookahead"))
    assert (beam.value, k_docs.value, self_check.value, reader.value, rounds.value) == (8, 1, 4, "trained", 1)
    assert lookahead.value == InferenceSettings().evidence_lookahead
    result = pipe.ask("nq", "which planet is called the red planet", rag_k=2, max_new_tokens=3)
    assert result.settings.self_check == 4 and result.settings.self_check_weight == 16.0
    assert result.joint.error is None and len(result.joint.answer.doc_ids) == 1
    # One setting per precision: this fp32 page takes the fp32 one (the base LLM reads).
    (tmp_path / "nq-llama" / RECOMMENDED_FILE).write_text(json.dumps({
        "4bit": {"beam_width": 8, "self_check": 4, "reason": "test"},
        "fp32": {"beam_width": 6, "self_check": 3, "self_check_weight": 2.0, "joint_reader": "base", "rounds": 2,
                 "evidence_lookahead": 8, "reason": "test"}}))
    pipe = Pipeline(AppConfig(llm=config.llm, precision="fp32", checkpoint_dir=tmp_path, data_dir=data))
    pipe._say = lambda name, text: None
    fresh = pipe.bundle("nq")
    fresh.joint.passage_cache = bundle.joint.passage_cache
    pipe._apply_recommended(fresh, tmp_path / "nq-llama")
    page = app.page_settings_of(app.select_corpus(pipe, "nq"))
    beam, self_check, reader, rounds, lookahead = (page[n] for n in (
        "beam_width", "self_check", "joint_reader", "rounds", "evidence_lookahead"))
    assert (beam.value, self_check.value, reader.value, rounds.value, lookahead.value) == (6, 3, "base", 2, 8)
    assert pipe.start_settings("nq").self_check_weight == 2.0
    # A malformed settings file is reported and ignored; the joint model still loads with the library defaults.
    (tmp_path / "nq-llama" / RECOMMENDED_FILE).write_text('{"self_check": 1}')
    messages = []
    pipe = Pipeline(AppConfig(llm=config.llm, precision="fp32", checkpoint_dir=tmp_path, data_dir=data))
    pipe._say = lambda name, text: messages.append(text)
    bundle = pipe.bundle("nq")
    assert bundle.joint is not None and bundle.settings == InferenceSettings(precision="fp32")
    assert bundle.settings.self_check_weight == InferenceSettings().self_check_weight
    assert any("ignoring the checkpoint's recommended settings" in m for m in messages)


def test_quantization_cost_from_the_store():
    from unirag import results, studies

    rows = results.load_store()
    cost = studies.quantization_cost(rows)
    # One sentence a run measured in both precisions, paired by corpus, split and run name (k=2 and k=3 apart).
    assert any(c.startswith("nq/dev · RAG top-5: accuracy 0.139 NF4 (no recovery) (-15.8 points) against 0.297 "
                            "in fp32") for c in cost)
    assert sum("joint, 2 docs, beam 10, stage-2 reader" in c for c in cost) == 2  # nq dev and squad dev[:300]
    assert studies.quantization_cost([r for r in rows if r["precision"] != "fp32"]) == []


# --------------------------------------------------------------------------------------------- fast: callbacks


FOUR_SETTINGS = {"beam_width": 4, "k_docs": 2, "rag_k": 5, "max_new_tokens": 4}


def test_ask_callback_outputs(pipeline):
    import plotly.graph_objects as go

    import app

    out = app.ask(pipeline, "nq", "what does the passage about html escaping contain", FOUR_SETTINGS)
    gold_info, joint_card, path_fig, beams, joint_docs, joint_heat, rag_card, bars, rag_docs, rag_heat = out[:10]
    banner = out[10]
    last = out[11]
    assert last["corpus"] == "nq" and tuple(last["docid"]) in pipeline.bundle("nq").tree.docids
    fig, dropdown = app.tree_view(pipeline, "nq", last)
    assert viz_green(fig) and dropdown.value == "-".join(map(str, last["docid"][:-1]))
    assert "q4" in gold_info and "gold answer" in gold_info
    for fig in (path_fig, joint_heat, bars, rag_heat):
        assert isinstance(fig, go.Figure) and fig.data
    from unirag import viz

    assert len(beams) >= 2 and list(beams.columns) == viz.BEAM_HEADERS and "score" in beams.columns
    assert list(beams["score"]) == sorted(beams["score"], reverse=True)
    assert "Joint model" in joint_card and "Dense RAG" in rag_card
    assert "Precision" in banner and "fp32" in banner
    # The <script> passage is retrieved by RAG (its gold) and must be escaped wherever it appears.
    assert "Script test" in rag_docs
    for html_out in (joint_docs, rag_docs, joint_card, rag_card, gold_info):
        assert "<script>" not in html_out
    assert "&lt;script&gt;alert(&quot;x&quot;)" in re.sub(r"<[^>]+>", "", rag_docs)  # escaped, and not split up


def test_ask_streams_the_search_and_the_answers(pipeline):
    """The streamed ask draws the path plot level by level while the search decides, both cards while their
    answers grow, and ends with exactly what `ask` returns."""
    import gradio as gr
    import plotly.graph_objects as go

    import app

    question = "what does the passage about html escaping contain"
    yields = list(app.ask_live(pipeline, "nq", question, FOUR_SETTINGS))
    final, partial = yields[-1], yields[:-1]
    assert len(final) == app.STREAM_OUTPUTS and all(len(y) == app.STREAM_OUTPUTS for y in partial)
    paths = [y[2] for y in partial if isinstance(y[2], go.Figure)]
    assert len(paths) >= 2  # the tree is 2 levels deep: one plot per level decided
    assert "level 0 decided" in paths[0].layout.title.text
    assert any(t.meta and t.meta.get("kind") == "path" for t in paths[-1].data)
    cards = {side: [y[i] for y in partial if isinstance(y[i], str)] for side, i in (("joint", 1), ("rag", 6))}
    assert cards["joint"] and cards["rag"] and all("answering…" in c for c in cards["joint"] + cards["rag"])
    assert all(y[0] is gr.skip() or isinstance(y[0], type(gr.skip())) for y in partial)  # the rest waits
    expected = app.ask(pipeline, "nq", question, FOUR_SETTINGS)
    def timeless(card: str) -> str:  # the latencies differ run to run
        return re.sub(r"\d+ ms", "", card)

    assert timeless(final[1]) == timeless(expected[1]) and timeless(final[6]) == timeless(expected[6])
    assert final[11] == expected[11]
    # Bad input is raised as `ask` raises it (the page's guard turns it into a toast).
    from unirag.errors import UniragError

    with pytest.raises(UniragError):
        list(app.ask_live(pipeline, "nq", "   "))


def test_streams_keep_each_sides_events_apart():
    import threading

    from unirag import streaming

    stream = streaming.Stream()
    assert not streaming.listening()
    streaming.emit("token", "nobody listens")  # a no-op outside a stream

    def side(name):
        with stream.side(name):
            assert streaming.listening() and streaming.current() is stream
            for i in range(3):
                streaming.emit("token", f"{name}{i}")

    threads = [threading.Thread(target=side, args=(n,)) for n in ("joint", "rag")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stream.close()
    events = list(stream.events())
    for name in ("joint", "rag"):
        assert [e.data for e in events if e.side == name] == [f"{name}{i}" for i in range(3)]
    assert not streaming.listening()


def viz_green(fig) -> bool:
    from unirag.viz import HIGHLIGHT_COLOR

    return HIGHLIGHT_COLOR in list(fig.data[0].marker.colors)


def test_ask_callback_errors_become_gr_error(pipeline, caplog):
    import gradio as gr

    import app

    # An expected error (the user's input): one expiring warning toast, every output left as it was, no traceback.
    with pytest.warns(UserWarning, match="empty"), caplog.at_level("INFO", logger="unirag.app"):
        assert app._guard(app.ask)(pipeline, "nq", "", FOUR_SETTINGS) == gr.skip()
    with pytest.warns(UserWarning, match="empty"):  # the streamed ask: the same toast
        assert list(app._guard_stream(app.ask_live)(pipeline, "nq", "")) == [gr.skip()]
    with pytest.warns(UserWarning, match="Unknown setting"):
        assert app._guard(app.ask)(pipeline, "nq", "a question", {"beam": 4}) == gr.skip()
    assert "Traceback" not in caplog.text

    def boom(*_):
        raise RuntimeError("kaput")

    with pytest.raises(gr.Error, match="still running") as raised:
        app._guard(boom)()
    assert raised.value.duration == app.TOAST_SECONDS  # the toast goes away by itself
    assert "Traceback" in caplog.text  # only the unexpected error is logged with its traceback


def test_joint_reader_choice(pipeline):
    """The "Joint reader" setting reaches the joint side: the base LLM reads the same documents and says so."""
    import app
    from unirag.errors import UniragError

    args = ("nq", "which planet is called the red planet", 3, 1, 2, 3)
    kwargs = dict(zip(("beam_width", "k_docs", "rag_k", "max_new_tokens"), args[2:], strict=True))
    own, base = pipeline.ask(*args[:2], **kwargs), pipeline.ask(*args[:2], **kwargs, joint_reader="base")
    assert own.settings.joint_reader == "trained" and base.settings.joint_reader == "base"
    assert base.joint.answer.doc_ids == own.joint.answer.doc_ids  # retrieval does not depend on the reader
    # This checkpoint has no stage 2, so its own reader is the base LLM already: the same answer.
    assert base.joint.answer.text == own.joint.answer.text
    assert any("base LLM" in n for n in base.joint.answer.notices)
    assert not any("base LLM" in n for n in own.joint.answer.notices)
    card = app.ask(pipeline, *args[:2], {**kwargs, "joint_reader": "base"})[1]
    assert "base LLM reads" in card and "base LLM reads" not in app.ask(pipeline, *args[:2], kwargs)[1]
    with pytest.raises(UniragError, match="joint.reader"):
        pipeline.ask(*args[:2], **kwargs, joint_reader="lora")


def test_self_check_setting(pipeline):
    """The "Self-check" setting reaches the joint side: it re-reads its top N documents and shows the trace."""
    import app
    from unirag.errors import UniragError

    args = ("nq", "which planet is called the red planet", 4, 1, 2, 3)
    kwargs = dict(zip(("beam_width", "k_docs", "rag_k", "max_new_tokens"), args[2:], strict=True))
    plain, checked = pipeline.ask(*args[:2], **kwargs), pipeline.ask(*args[:2], **kwargs, self_check=3)
    assert plain.settings.self_check == 0 and checked.settings.self_check == 3
    trace = checked.joint.answer.trace.self_check
    assert len(trace) == 3 and sorted(t.search_rank for t in trace) == [1, 2, 3]
    assert checked.joint.answer.doc_ids == [trace[0].doc_id]
    assert "self_check" in checked.joint.answer.timings_ms and "self_check" not in plain.joint.answer.timings_ms
    assert any("Self-check" in n for n in checked.joint.answer.notices)
    card = app.ask(pipeline, *args[:2], {**kwargs, "joint_reader": "trained", "self_check": 3})[1]
    assert "Self-check" in card
    # A passage cache built for this base and corpus is picked up on load and gives the same documents.
    from unirag.joint.passage_cache import PassageCache

    bundle = pipeline.bundle("nq")
    assert bundle.joint.passage_cache is None  # none built: the app never builds one itself
    PassageCache.build(bundle.joint.model, bundle.corpus, storage_dtype="float32", progress=False)
    pipeline._attach_passage_cache(bundle)
    try:
        cached = pipeline.ask(*args[:2], **kwargs, self_check=3)
        assert cached.joint.answer.doc_ids == checked.joint.answer.doc_ids
        assert any("cached reading" in n for n in cached.joint.answer.notices)
    finally:
        bundle.joint.passage_cache = None
    for bad in (1, 33, "x"):
        with pytest.raises(UniragError, match="self"):
            pipeline.ask(*args[:2], **kwargs, self_check=bad)


def test_side_error_does_not_kill_the_other_side(pipeline, monkeypatch):
    bundle = pipeline.bundle("nq")

    def broken(*args, **kwargs):
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(bundle.joint, "answer", broken)
    result = pipeline.ask("nq", "which planet is called the red planet", beam_width=3, k_docs=1, rag_k=2,
                          max_new_tokens=3)
    assert "decoder exploded" in result.joint.error and result.rag.answer is not None
    import app

    rendered = app.render(result, bundle)
    assert "decoder exploded" in rendered[1]


def test_select_corpus_and_cluster_callbacks(pipeline):
    import app

    outputs = app.select_corpus(pipeline, "nq")
    dataset, tree_fig, dropdown, docs_html, banner, baseline = outputs[:6]
    page = app.page_settings_of(outputs)
    beam, k_docs, self_check, reader, rag_k, max_new, rounds, lookahead = (page[n] for n in (
        "beam_width", "k_docs", "self_check", "joint_reader", "rag_k", "max_new_tokens", "rounds",
        "evidence_lookahead"))
    assert baseline["value"] == "rag"  # the store has no row for this tiny corpus: dense RAG
    assert dataset.samples and tree_fig.data[0].type == "sunburst"
    # No recommended_settings.json in this checkpoint: the controls start from the library defaults.
    from unirag.settings import InferenceSettings

    default = InferenceSettings()
    assert (beam.value, k_docs.value, self_check.value, reader.value, rag_k.value, max_new.value, rounds.value) == (
        default.beam_width, default.k_docs, default.self_check, default.joint_reader, default.rag_k,
        default.max_new_tokens, default.rounds)
    assert lookahead.value == default.evidence_lookahead
    assert dropdown.choices
    assert "whole corpus" in docs_html and "&lt;script&gt;" in docs_html
    first = pipeline.bundle("nq").tree.allowed(())[0]
    assert "Cluster" in app.cluster_docs(pipeline, "nq", str(first))
    assert "not a docid prefix" in app.cluster_docs(pipeline, "nq", "abc")
    assert "No cluster" in app.cluster_docs(pipeline, "nq", "99-99")
    # SQuAD is missing from the tiny data: an empty view and a banner message, no exception.
    dataset, tree_fig, dropdown, docs_html, banner, *sliders = app.select_corpus(pipeline, "squad")  # + baseline
    assert dataset.samples == [] and "UNIRAG_DATA" in banner
    assert all(s is not None and not hasattr(s, "value") for s in sliders)  # gr.skip(): left as they are


def test_evaluation_and_about(pipeline, tmp_path, monkeypatch):
    import app
    from unirag import results, viz

    note, table, fig = app.evaluation(pipeline, "nq", "nf4")
    # The store's nq NF4 runs, in plain words, No RAG first; the chart has one bar pair a run.
    assert len(table) == sum(r["corpus"] == "nq" and r["precision"] == "nf4" and r["split"] == "dev"
                             for r in results.load_store())
    assert list(table["run"][:4]) == ["No RAG", "RAG top-1", "RAG top-3", "RAG top-5"]
    # The recommended row is the shipped checkpoint's: measured in the recovered 4-bit (the NF4 rows are superseded).
    assert not any(run.endswith("(recommended)") for run in table["run"])
    assert any(run.endswith("(recommended)") for run in app.evaluation(pipeline, "nq", "4bit")[1]["run"])
    assert len(fig.data) == 2 and len(fig.data[0].y) == len(table) and fig.layout.height <= viz.EVAL_MAX_HEIGHT
    assert "results store" in note
    monkeypatch.setenv("UNIRAG_RESULTS", str(tmp_path))
    note, table, fig = app.evaluation(pipeline, "nq", "fp32")
    assert "No runs" in note and table.empty
    about = app.about_markdown(pipeline)
    assert "not measured yet" in about
    (tmp_path / "nq.jsonl").write_text("{\n")
    note, table, _ = app.evaluation(pipeline, "nq", "fp32")
    assert "nq.jsonl:1" in note and table.empty
    for ref in ("Retrieval as Reasoning", "NCI", "DSI", "GeAR", "RetroLLM", "UniGen"):
        assert ref in about


def test_studies_show_localization_and_the_scaling_curve_from_the_store(tmp_path, monkeypatch):
    import app
    from unirag import results, studies

    text, fig = app.studies()  # the repository's store: its localization and gr-vs-dr rows
    store = results.load_store()
    assert "Localization" in text and studies.render_gr_vs_dr(store) in text
    dev_sizes = {r["settings"]["passages"] for r in store if r["run"].startswith(studies.GR_VS_DR_PREFIX)
                 and r["split"] == "dev" and r["settings"]["gr_vs_dr"] == "dense"}
    dense = next(t for t in fig.data if t.name == "dense MiniLM (dev)")
    assert sorted(dense.x) == sorted(dev_sizes) and fig.layout.xaxis.type == "log"
    monkeypatch.setenv("UNIRAG_RESULTS", str(tmp_path))  # an empty store: says so, no crash
    text, fig = app.studies()
    assert "No localization runs" in text and not fig.data


def test_build_demo_has_ask_api(pipeline):
    import app

    demo = app.build_demo(pipeline)
    api = [d for d in demo.fns.values() if getattr(d, "api_name", None) == "ask"]
    assert len(api) == 1
    info = demo.get_api_info()["named_endpoints"]["/ask"]
    names = [r["label"] for r in info["returns"]]
    assert names and not any(re.fullmatch(r"value_\d+", n or "") for n in names), names
    assert {"joint answer", "rag answer", "status"} <= set(names)
    params = {p["parameter_name"]: p for p in info["parameters"]}
    assert params["corpus"]["parameter_default"] == "nq"
    for name in ("beam_width", "k_docs", "rag_k", "max_new_tokens", "joint_reader", "self_check", "baseline",
                 "rounds", "evidence_lookahead"):
        # None = the corpus's start setting (`app.ask`), i.e. what the page starts from
        assert params[name]["parameter_has_default"] and params[name]["parameter_default"] is None, params[name]


def test_banner_and_ask_button_while_loading(tiny):
    import app
    from unirag.pipeline import Pipeline

    fresh = Pipeline(tiny[0])
    assert not app._loading(fresh, "nq")
    fresh._say("nq", "reading the corpus and dev questions…")
    fresh._say("nq", "loading the LLM (tiny)…")
    state = fresh.status()["corpora"]["nq"]
    assert re.match(r"loading the model \(\d+%\): loading the LLM", state), state
    assert app._loading(fresh, "nq") and app._loading(fresh) and not app._loading(fresh, "squad")
    banner = app.banner_html(fresh)
    assert "Loading the model (" in banner and "Ask button" in banner
    demo = app.build_demo(fresh)
    button = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "ur-ask")
    assert button.interactive is False and button.value == app.LOADING_LABEL


def test_cli_flags_and_env(monkeypatch):
    import app

    monkeypatch.setenv("UNIRAG_HOST", "0.0.0.0")
    monkeypatch.setenv("UNIRAG_PORT", "7999")
    args = app.parse_args([])
    assert (args.host, args.port) == ("0.0.0.0", 7999)
    args = app.parse_args(["--host", "127.0.0.2", "--port", "8001", "--precision", "fp32"])
    assert (args.host, args.port, args.precision) == ("127.0.0.2", 8001, "fp32")
    monkeypatch.delenv("UNIRAG_HOST")
    monkeypatch.delenv("UNIRAG_PORT")
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert (app.parse_args([]).host, app.parse_args([]).port) == ("127.0.0.1", 7860)
    monkeypatch.setenv("SPACE_ID", "someone/unirag")
    assert app.parse_args([]).host == "0.0.0.0"


# --------------------------------------------------------------------------------------------- slow: end to end


def _data_available() -> bool:
    from unirag.paths import default_data_dir

    return (default_data_dir() / "nq" / "corpus.jsonl").is_file()


@contextlib.contextmanager
def running_app(args: list[str], log_path: Path, env: dict[str, str] | None = None):
    """`python app.py ARGS` on a free port; yields (url, process). Stops it (by its pid) afterwards."""
    port = free_port()
    full_env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
    with log_path.open("w") as log:
        command = [sys.executable, str(REPO / "app.py"), "--host", "127.0.0.1", "--port", str(port), *args]
        proc = subprocess.Popen(command, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_server(url, proc, log_path)
        yield url, proc
    finally:
        stop_server(proc, timeout=20)


@pytest.fixture(scope="module")
def live_app(tmp_path_factory):
    """The real app (embedded SmolLM2, NQ, default 4-bit) in a subprocess; yields (url, log path, process)."""
    if not _data_available():
        if os.environ.get("CI"):
            pytest.fail("shared data missing in CI")
        pytest.skip("shared data not available")
    from unirag.data import dataset_paths, load_corpus
    from unirag.pipeline import AppConfig

    ckpt_root = REPO / "checkpoints"
    if AppConfig(checkpoint_dir=ckpt_root).find_checkpoint("nq") is None:
        ckpt_root = tmp_path_factory.mktemp("ckpts")
        corpus = load_corpus(dataset_paths("nq", "dev")[0])
        build_joint_checkpoint(None, corpus, ckpt_root / "nq-smollm2")
    log_path = tmp_path_factory.mktemp("applog") / "app.log"
    with running_app(["--checkpoint-dir", str(ckpt_root)], log_path) as (url, proc):
        yield url, log_path, proc


def _check_ask_result(result) -> None:
    gold_info, joint_card, path_fig, beams, joint_docs, joint_heat, rag_card, bars, rag_docs, rag_heat, banner = result
    assert "ur-answer" in joint_card and "ur-answer" in rag_card, (joint_card, rag_card)
    assert "(no answer: empty output)" not in joint_card and "(no answer: empty output)" not in rag_card
    for fig in (path_fig, joint_heat, bars, rag_heat):
        blob = json.loads(fig["plot"]) if isinstance(fig, dict) and "plot" in fig else fig
        assert blob and blob.get("data"), fig
    assert beams["data"], beams
    assert "4-bit (HQQ, recovered)" in banner  # the default precision


@pytest.mark.slow
def test_end_to_end_one_question(live_app):
    from gradio_client import Client

    url, _, _ = live_app
    client = Client(url, verbose=False)
    start = time.perf_counter()
    result = client.predict("nq", "who sang the song i wanna be sedated", 10, 2, 5, 24, api_name="/ask")
    elapsed = time.perf_counter() - start
    _check_ask_result(result)
    # The recovered 4-bit starts from the checkpoint's recommended reader for it; the other reader is one choice away.
    recommended = json.loads((REPO / "checkpoints" / "nq-smollm2" / "recommended_settings.json").read_text())
    start_reader = recommended["4bit"]["joint_reader"]
    assert "gold answer" in result[0]
    assert ("base LLM reads" in result[1]) == (start_reader == "base"), (start_reader, result[1])
    other = "trained" if start_reader == "base" else "base"
    switched = client.predict("nq", "who sang the song i wanna be sedated", 10, 2, 5, 24, other, api_name="/ask")
    _check_ask_result(switched)
    assert ("base LLM reads" in switched[1]) == (other == "base"), (other, switched[1])
    print(f"one question, cold: {elapsed:.1f} s")


@pytest.mark.slow
def test_load_ten_concurrent_questions(live_app):
    from gradio_client import Client

    from unirag.data import dataset_paths, load_questions

    url, log_path, proc = live_app
    questions = [q.question for q in load_questions(dataset_paths("nq", "dev")[1])[:10]]

    def one(question: str):
        client = Client(url, verbose=False)
        return client.predict("nq", question, 6, 2, 3, 12, api_name="/ask")

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=10) as pool:
        results = list(pool.map(one, questions))
    elapsed = time.perf_counter() - start
    assert len(results) == 10
    for result in results:
        _check_ask_result(result)
    assert proc.poll() is None, "server died"
    assert "Traceback" not in log_path.read_text()
    print(f"10 concurrent questions: {elapsed:.1f} s total")


def test_ask_command_reproduces_the_app_answer(tiny, tmp_path, capsys):
    """`python -m unirag ask --system joint --checkpoint C` with no setting flag runs what the app runs: the
    checkpoint's recommended setting for the precision, the same documents and the same answer."""
    import shutil

    from unirag.cli import main
    from unirag.pipeline import AppConfig, Pipeline
    from unirag.settings import RecommendedSettings

    config, data = tiny
    ckpt = tmp_path / "nq-llama"
    shutil.copytree(config.checkpoint_dir / "nq-llama", ckpt)
    RecommendedSettings({"k_docs": 2, "beam_width": 6, "joint_reader": "base", "max_new_tokens": 5}, "test").save(
        ckpt, "fp32")
    pipe = Pipeline(AppConfig(llm=config.llm, precision="fp32", checkpoint_dir=tmp_path, data_dir=data))
    question = "which planet is called the red planet"
    app_answer = pipe.ask("nq", question).joint.answer
    capsys.readouterr()
    code = main(["ask", "--system", "joint", "--checkpoint", str(ckpt), "--corpus", str(data / "nq" / "corpus.jsonl"),
                 "--llm", config.llm, question])
    out, err = capsys.readouterr()
    assert code == 0, err
    record = json.loads(out.strip().splitlines()[-1])
    assert record["settings"] == pipe.start_settings("nq").to_dict()
    assert (record["settings"]["k_docs"], record["settings"]["beam_width"]) == (2, 6)
    assert [d["doc_id"] for d in record["docs"]] == app_answer.doc_ids
    assert record["text"] == app_answer.text


def test_evaluation_opens_on_a_split_with_runs_and_tests_against_the_page_baseline(pipeline, tmp_path, monkeypatch):
    import app
    from unirag import results

    def row(run, system, bits, split="dev[:300]"):
        return {"run": run, "system": system, "corpus": "nq", "split": split, "precision": "fp32", "n": len(bits),
                "settings": {"rag_k": 1, "corpus_fingerprint": pipeline.bundle("nq").corpus.fingerprint},
                "metrics": {**{k: None for k in results.METRIC_KEYS}, "f1": 0.2, "accuracy": bits.count("1") / 8},
                "command": "test", "date": "2026-12-07", "machine": "test", "source": "test",
                "outcomes": {"ids": "abc", "accuracy": bits}}

    monkeypatch.setenv("UNIRAG_RESULTS", str(tmp_path))
    rows = [row("RAG top-1", "rag", "11110000"), row("joint", "joint", "11111111")]
    (tmp_path / "nq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # dev has no runs here: the tab moves to the split that has them.
    assert app.split_with_runs("nq", "fp32", "dev", pipeline) == "dev[:300]"
    assert app.split_with_runs("nq", "fp32", "dev[:300]", pipeline) == "dev[:300]"
    note, table, _ = app.evaluation(pipeline, "nq", "fp32", "dev[:300]")
    assert "RAG top-1" in note
    p = dict(zip(table["run"], table["p vs page baseline"], strict=True))
    assert p["RAG top-1"] == "" and p["joint"] == results.format_p(round(2 / 2**4, 4))  # 4 wins, 0 losses
