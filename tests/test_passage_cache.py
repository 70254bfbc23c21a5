"""The self-check's passage cache: precomputed prompt KV states give the same question likelihood (tiny models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_joint_decoding import CORPUS, DOCIDS, FakeTrie, _build

from unirag.data import Corpus, Passage
from unirag.errors import UniragError
from unirag.joint.joint_system import JointSystem
from unirag.joint.passage_cache import PassageCache
from unirag.joint.selfcheck import question_likelihood
from unirag.settings import InferenceSettings

PASSAGES = Corpus(
    [
        Passage("a", "Short", "tiny."),
        Passage("b", "", "a much longer passage about the river and its many bridges " * 3),
        Passage("c", "Mid", "mid length text about a king."),
        Passage("d", "Other", "the author wrote it in the winter of that year."),
    ],
    source="fake",
)


def _with_trained_adapter(model):
    model.enable_lora(r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_cached_likelihood_equals_reading_the_passages(tiny_llm_dirs, tmp_path, kind):
    """float32 storage: the cached self-check equals the full read (left padding, positions, adapter off)."""
    model = _with_trained_adapter(_build(tiny_llm_dirs[kind], seed=5))
    cache = PassageCache.build(model, PASSAGES, tmp_path / "kv", batch_size=3, storage_dtype="float32",
                               progress=False)
    assert cache.complete and cache.doc_ids == ["a", "b", "c", "d"]
    passages = [(p.id, p.title, p.text) for p in PASSAGES]
    for question in ("who wrote it?", "x"):  # "x": one question token, no forward over the cache at all
        expected = question_likelihood(model, model.tokenizer, question, passages)
        got = cache.question_likelihood(model, question, ["a", "b", "c", "d"])
        assert got == pytest.approx(expected, abs=1e-4)
    # Any subset and order, as the search's candidates come.
    expected = question_likelihood(model, model.tokenizer, "who?", [passages[3], passages[1]])
    assert cache.question_likelihood(model, "who?", ["d", "b"]) == pytest.approx(expected, abs=1e-4)
    assert cache.question_likelihood(model, "who?", []) == []


def test_float16_storage_is_close_and_reopens(tiny_llm_dirs, tmp_path):
    model = _build(tiny_llm_dirs["llama"], seed=5)
    cache = PassageCache.build(model, PASSAGES, tmp_path / "kv", progress=False)
    passages = [(p.id, p.title, p.text) for p in PASSAGES]
    expected = question_likelihood(model, model.tokenizer, "who wrote it?", passages)
    assert cache.question_likelihood(model, "who wrote it?", cache.doc_ids) == pytest.approx(expected, abs=2e-2)
    again = PassageCache.build(model, PASSAGES, tmp_path / "kv", progress=False)  # complete: opened, not rebuilt
    assert np.array_equal(np.asarray(again.kv), np.asarray(cache.kv))
    # The size benchmark's formula (RESULTS' figure and its growth to 1M passages) is what a build stores.
    from benchmarks.passage_cache_size import cache_bytes

    assert cache.nbytes == cache_bytes(model.base_config, int(cache.lengths.sum()), len(PASSAGES))
    with pytest.raises(UniragError, match="another model, corpus or storage dtype"):
        PassageCache.build(model, PASSAGES, tmp_path / "kv", storage_dtype="float32", progress=False)


def test_interrupted_build_resumes(tiny_llm_dirs, tmp_path, monkeypatch):
    model = _build(tiny_llm_dirs["llama"], seed=5)
    reference = PassageCache.build(model, PASSAGES, tmp_path / "ref", batch_size=1, storage_dtype="float32",
                                   progress=False)
    calls = {"n": 0}
    forward = type(model).forward

    def failing_forward(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the machine stops mid-build
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", failing_forward)
    with pytest.raises(KeyboardInterrupt):
        PassageCache.build(model, PASSAGES, tmp_path / "kv", batch_size=1, storage_dtype="float32", progress=False)
    with pytest.raises(UniragError, match="incomplete"):
        PassageCache.open(model, PASSAGES, tmp_path / "kv")
    monkeypatch.setattr(type(model), "forward", forward)
    done = np.load(tmp_path / "kv" / "done.npy")
    assert done.sum() == 2  # two batches written before the stop
    calls["n"] = 0
    resumed = PassageCache.build(model, PASSAGES, tmp_path / "kv", batch_size=1, storage_dtype="float32",
                                 progress=False)
    assert np.array_equal(np.asarray(resumed.kv), np.asarray(reference.kv))
    assert np.array_equal(np.asarray(resumed.last_hidden), np.asarray(reference.last_hidden))


def test_bad_caches_are_refused(tiny_llm_dirs, tmp_path):
    model = _build(tiny_llm_dirs["llama"], seed=5)
    with pytest.raises(UniragError, match="No self-check cache"):
        PassageCache.open(model, PASSAGES, tmp_path / "missing")
    cache = PassageCache.build(model, PASSAGES, tmp_path / "kv", progress=False)
    other = Corpus([*PASSAGES, Passage("e", "New", "another passage.")], source="fake")
    with pytest.raises(UniragError, match="another corpus"):
        PassageCache.open(model, other, tmp_path / "kv")
    other_model = _build(tiny_llm_dirs["qwen2"], seed=5)
    with pytest.raises(UniragError, match="another base"):
        PassageCache.open(other_model, PASSAGES, tmp_path / "kv")
    with pytest.raises(UniragError, match="not in the self-check cache"):
        cache.question_likelihood(model, "who?", ["zzz"])
    del cache
    kv = tmp_path / "kv" / "kv.bin"
    kv.write_bytes(kv.read_bytes()[:100])  # truncated
    with pytest.raises(UniragError, match="wrong size"):
        PassageCache.open(model, PASSAGES, tmp_path / "kv")
    with pytest.raises(UniragError, match="storage_dtype"):
        PassageCache.build(model, PASSAGES, tmp_path / "x", storage_dtype="int8", progress=False)


def test_joint_system_self_check_with_the_cache_ranks_as_without(tiny_llm_dirs, tmp_path):
    model = _build(tiny_llm_dirs["llama"], seed=5)
    cache = PassageCache.build(model, CORPUS, tmp_path / "kv", storage_dtype="float32", progress=False)
    plain = JointSystem(model, model.tokenizer, CORPUS, FakeTrie(DOCIDS))
    cached = JointSystem(model, model.tokenizer, CORPUS, FakeTrie(DOCIDS), passage_cache=cache)
    settings = InferenceSettings(k_docs=3, beam_width=6, max_new_tokens=2, self_check=5)
    a = plain.answer("who wrote it?", settings)
    b = cached.answer("who wrote it?", settings)
    assert b.doc_ids == a.doc_ids
    assert any("cached reading" in n for n in b.notices) and not any("cached reading" in n for n in a.notices)
    got = [t.question_logprob for t in b.trace.self_check]
    assert got == pytest.approx([t.question_logprob for t in a.trace.self_check], abs=1e-4)


def test_find_uses_the_default_path_and_never_builds(tiny_llm_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("UNIRAG_CACHE", str(tmp_path / "cache"))
    model = _build(tiny_llm_dirs["llama"], seed=5)
    assert PassageCache.find(model, PASSAGES) is None and not (tmp_path / "cache" / "passage_kv").exists()
    built = PassageCache.build(model, PASSAGES, progress=False)
    assert built.path.parent == tmp_path / "cache" / "passage_kv"
    assert PassageCache.find(model, PASSAGES).path == built.path
    assert PassageCache.find(_build(tiny_llm_dirs["qwen2"], seed=5), PASSAGES) is None  # another base


def test_a_second_builder_is_refused_while_one_builds(tiny_llm_dirs, tmp_path):
    import fcntl

    model = _build(tiny_llm_dirs["llama"], seed=5)
    (tmp_path / "kv").mkdir()
    with (tmp_path / "kv" / ".lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process's build
        with pytest.raises(UniragError, match="Another process is building"):
            PassageCache.build(model, PASSAGES, tmp_path / "kv", progress=False)
        fcntl.flock(held, fcntl.LOCK_UN)
    assert PassageCache.build(model, PASSAGES, tmp_path / "kv", progress=False).complete
