"""Batched joint inference on tiny random models: several questions through one set of forwards give what each
gives alone (docid search, reading, the whole JointSystem answer)."""

from __future__ import annotations

import pytest
import torch
from test_joint_decoding import CORPUS, DOCIDS, FakeTrie, _build

from unirag import streaming
from unirag.joint.joint_system import JointSystem
from unirag.joint.modeling import tree_prefixes
from unirag.joint.padding import left_pad
from unirag.joint.reader import answer_many_with_docs, answer_with_docs
from unirag.joint.search import search_docids, search_docids_many
from unirag.settings import InferenceSettings

# Different lengths on purpose: the short ones are left-padded by many positions.
QUESTIONS = ["who?", "which river is the longest in europe?", "what year was it built", "x"]
PASSAGES = [
    [("d1", "T1", "alpha beta gamma")],
    [("d1", "T1", "alpha beta"), ("d2", "T2", "the river is long and wide")],
    [],  # no documents: the prompt has no context and the answer no span to keep to
    [("d3", "", "zanzibar cloves")],
]
TOL = 1e-4


@pytest.fixture(scope="module")
def plain(tiny_llm_dirs):
    return _build(tiny_llm_dirs["llama"])


@pytest.fixture(scope="module")
def semantic(tiny_llm_dirs):
    return _build(tiny_llm_dirs["llama"], seed=1, semantic_dim=6,
                  semantic_nodes=len(tree_prefixes(FakeTrie(DOCIDS))))


def test_left_pad_masks_and_positions_count_each_rows_own_tokens():
    batch = left_pad([[5, 6, 7], [8]], pad_id=0, device="cpu")
    assert batch.ids.tolist() == [[5, 6, 7], [0, 0, 8]] and batch.pads == [0, 2]
    assert batch.mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch.positions[:, -1].tolist() == [2, 0]
    mask, positions = batch.step([1, 1, 0], fed=2)  # two beams of row 1 and one of row 0, two tokens fed
    assert mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert positions.tolist() == [[2], [2], [4]]
    alone = left_pad([[1, 2], [3, 4]], pad_id=0, device="cpu")
    assert alone.mask is None and alone.positions is None and alone.step([0, 1], 1) == (None, None)


@pytest.mark.parametrize("model_name", ["plain", "semantic"])
def test_batched_docid_search_equals_one_question_at_a_time(model_name, request):
    model = request.getfixturevalue(model_name)
    trie = FakeTrie(DOCIDS)
    batched = search_docids_many(model, model.tokenizer, QUESTIONS, trie, beam_width=4, num_return=3)
    for question, got in zip(QUESTIONS, batched, strict=True):
        alone = search_docids(model, model.tokenizer, question, trie, beam_width=4, num_return=3)
        assert [b.doc_id for b in got.beams] == [b.doc_id for b in alone.beams]
        assert [b.docid for b in got.finished] == [b.docid for b in alone.finished]
        for a, b in zip(got.finished, alone.finished, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=TOL)
            assert a.document_match == pytest.approx(b.document_match, abs=TOL)
            for la, lb in zip(a.levels, b.levels, strict=True):
                assert la["children"] == lb["children"] and la["probs"] == pytest.approx(lb["probs"], abs=TOL)
        assert got.prompt_tokens == alone.prompt_tokens
        assert got.attention.tokens == alone.attention.tokens
        assert got.attention.weights == pytest.approx(alone.attention.weights, abs=TOL)
    if model_name == "semantic":
        assert any(b.document_match != 0.0 for s in batched for b in s.finished)


@pytest.mark.parametrize("answer_mode", ["free", "span"])
@pytest.mark.parametrize("pathway,bridge", [(True, True), (True, False), (False, False)])
def test_batched_reading_equals_one_question_at_a_time(semantic, answer_mode, pathway, bridge):
    model = semantic
    kwargs = {"max_new_tokens": 8, "pathway": pathway, "bridge": bridge, "answer_mode": answer_mode}
    batched = answer_many_with_docs(model, model.tokenizer, QUESTIONS, PASSAGES, **kwargs)
    stops = set()
    for question, passages, got in zip(QUESTIONS, PASSAGES, batched, strict=True):
        alone = answer_with_docs(model, model.tokenizer, question, passages, **kwargs)
        assert got.token_ids == alone.token_ids and got.text == alone.text
        assert got.stop_reason == alone.stop_reason and got.span == alone.span
        assert (got.prompt_tokens, got.context_tokens) == (alone.prompt_tokens, alone.context_tokens)
        assert got.attention.source == alone.attention.source
        assert got.attention.context_tokens == alone.attention.context_tokens
        assert len(got.attention.weights) == len(alone.attention.weights)
        for row_got, row_alone in zip(got.attention.weights, alone.attention.weights, strict=True):
            assert len(row_got) == got.context_tokens and row_got == pytest.approx(row_alone, abs=TOL)
        stops.add(got.stop_reason)
    if answer_mode == "span":  # rows end at different steps: finished rows leave the batch mid-way
        assert len(stops) > 1 and any(g.span is not None for g in batched)


def test_only_a_single_question_streams(semantic):
    model, trie = semantic, FakeTrie(DOCIDS)
    stream = streaming.Stream()
    with stream.side("joint"):
        search_docids_many(model, model.tokenizer, QUESTIONS[:2], trie, beam_width=3, num_return=2)
        answer_many_with_docs(model, model.tokenizer, QUESTIONS[:2], PASSAGES[:2], max_new_tokens=3)
        assert stream.drain() == []
        search_docids(model, model.tokenizer, QUESTIONS[1], trie, beam_width=3, num_return=2)
        answer_with_docs(model, model.tokenizer, QUESTIONS[1], PASSAGES[1], max_new_tokens=3)
    kinds = {event.kind for event in stream.drain()}
    assert kinds == {"level", "token"}


@pytest.mark.parametrize("settings", [
    InferenceSettings(k_docs=2, beam_width=4, max_new_tokens=5),
    InferenceSettings(k_docs=1, beam_width=3, max_new_tokens=5, rounds=2, answer_mode="span"),
])
def test_joint_system_answer_many_equals_answer(semantic, settings):
    system = JointSystem(semantic, semantic.tokenizer, CORPUS, FakeTrie(DOCIDS))
    questions = ["  who   wrote it? ", *QUESTIONS[1:]]
    batched = system.answer_many(questions, settings)
    for question, got in zip(questions, batched, strict=True):
        alone = system.answer(question, settings)
        assert got.question == alone.question and got.text == alone.text
        assert got.doc_ids == alone.doc_ids
        assert [d.score for d in got.docs] == pytest.approx([d.score for d in alone.docs], abs=TOL)
        assert got.notices == alone.notices and set(got.timings_ms) == set(alone.timings_ms)
        assert [b["doc_id"] for b in got.trace.beams] == [b["doc_id"] for b in alone.trace.beams]
        assert len(got.trace.rounds) == len(alone.trace.rounds) == (settings.rounds if settings.rounds > 1 else 0)
        for a, b in zip(got.trace.rounds, alone.trace.rounds, strict=True):
            assert (a.query, a.answer) == (b.query, b.answer)


def test_query_vectors_ignore_the_cached_part_of_a_decoding_mask(semantic):
    """A decoding step's 2-D mask covers the cache too; the semantic scorer pools this pass's positions only."""
    ids = torch.tensor([[5, 6, 7, 8]])
    out = semantic(ids, attention_mask=torch.ones(1, 4, dtype=torch.long), use_cache=True)
    step = semantic(torch.tensor([[9]]), attention_mask=torch.ones(1, 5, dtype=torch.long),
                    past_key_values=out.past_key_values, use_cache=True)
    assert step.query_vectors.shape[:2] == (1, 1)
