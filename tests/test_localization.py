"""Sentence localization: splitting, the answer sentence, attention → sentence ranking, baselines, and the
benchmark end to end on a tiny random joint model (offline, seconds)."""

from __future__ import annotations

import json

import pytest
import torch

from unirag.answer_sentences import (
    answer_sentence,
    answer_span,
    first_sentence_ranking,
    hit,
    lexical_ranking,
    localize,
    longest_sentence_ranking,
    occurrences,
    random_hit_rate,
    rank,
    sentence_scores,
    split_sentences,
    token_sentences,
)
from unirag.data import Passage, Question

PARAGRAPH = ("The U.S. Army was founded in 1775 in Boston. It fought in St. Louis later. "
             "Dr. Smith, its first general, was 3.5 m tall! The army moved to Washington in 1800.")


def test_split_keeps_abbreviations_and_tiles_the_text():
    sentences = split_sentences(PARAGRAPH)
    assert [s.text for s in sentences] == [
        "The U.S. Army was founded in 1775 in Boston.", "It fought in St. Louis later.",
        "Dr. Smith, its first general, was 3.5 m tall!", "The army moved to Washington in 1800."]
    assert sentences[0].start == 0 and sentences[-1].end == len(PARAGRAPH)
    assert all(a.end == b.start for a, b in zip(sentences, sentences[1:], strict=False))
    for s in sentences:
        assert PARAGRAPH[s.start:s.end].strip() == s.text
    assert split_sentences("   ") == []


def test_answer_sentence_is_located_from_the_answer_string():
    sentences = split_sentences(PARAGRAPH)
    assert answer_sentence(PARAGRAPH, ["3.5 m"], sentences) == 2
    assert answer_sentence(PARAGRAPH, ["nowhere", "Washington"], sentences) == 3  # first answer that occurs
    assert answer_sentence(PARAGRAPH, ["boston"], sentences) == 0  # case-insensitive when no exact match
    assert answer_span(PARAGRAPH, ["Boston"]) == (PARAGRAPH.index("Boston"), PARAGRAPH.index("Boston") + 6)
    assert answer_sentence(PARAGRAPH, ["Paris"], sentences) is None
    # "army" occurs in two sentences (case-insensitively): the first occurrence wins, and it is flagged
    assert answer_sentence(PARAGRAPH, ["army"], sentences) == 3 and occurrences(PARAGRAPH, ["army"], sentences) == 2


def test_tokens_map_to_sentences_by_offsets():
    text = "Ab cd. Ef gh."
    sentences = split_sentences(text)
    # "Ab", " cd", ".", " Ef" (leading space: belongs to the second sentence), " gh", "."; a title token before
    # the text (negative offsets) and a special token (empty span) belong to none
    offsets = [(-5, -1), (0, 2), (2, 5), (5, 6), (6, 9), (9, 12), (12, 13), (0, 0)]
    assert token_sentences(offsets, sentences, text) == [-1, 0, 0, 0, 1, 1, 1, -1]


def test_attention_mass_ranks_the_sentence_it_is_put_on():
    text = PARAGRAPH
    sentences = split_sentences(text)
    # one token per word, with offsets; every token gets a little attention, the third sentence's tokens more
    offsets = [(m.start(), m.end()) for m in __import__("re").finditer(r"\S+", text)]
    token_sentence = token_sentences(offsets, sentences, text)
    weights = torch.full((len(offsets),), 0.01)
    weights[[i for i, s in enumerate(token_sentence) if s == 2]] = 0.2
    scores = sentence_scores(weights.tolist(), token_sentence, len(sentences))
    assert rank(scores)[0] == 2
    result = localize(text, "How tall was Dr. Smith?", ["3.5 m"], {"probe": (offsets, weights.tolist())})
    assert result.answer == 2 and result.rankings["probe"][0] == 2 and result.hits(1)["probe"]
    # the same mass moved to the last sentence moves the ranking: the test can fail
    moved = torch.full((len(offsets),), 0.01)
    moved[[i for i, s in enumerate(token_sentence) if s == 3]] = 0.2
    result = localize(text, "How tall was Dr. Smith?", ["3.5 m"], {"probe": (offsets, moved.tolist())})
    assert not result.hits(1)["probe"] and result.rankings["probe"][0] == 3
    with pytest.raises(ValueError):
        sentence_scores([1.0], [0, 1], 2)


def test_position_and_lexical_baselines():
    sentences = split_sentences(PARAGRAPH)
    assert first_sentence_ranking(4) == [0, 1, 2, 3]
    assert longest_sentence_ranking(sentences)[0] == 2  # "Dr. Smith, its first general, was 3.5 m tall!"
    assert lexical_ranking("When did the army move to Washington?", sentences)[0] == 3
    assert lexical_ranking("zzz?", sentences) == [0, 1, 2, 3]  # no overlap: ties keep passage order
    assert hit([2, 0, 1], 0, 1) is False and hit([2, 0, 1], 0, 2) is True
    assert random_hit_rate(4, 1) == 0.25 and random_hit_rate(2, 3) == 1.0 and random_hit_rate(0, 1) == 0.0
    result = localize(PARAGRAPH, "Where was the U.S. Army founded?", ["Boston"], {})
    assert result.hits(1)["first_sentence"] and result.hits(1)["lexical_overlap"]
    assert result.rankings["longest_sentence"] == [2, 0, 3, 1]  # 45, 44, 37, 29 characters
    assert not result.hits(1)["longest_sentence"] and result.hits(2)["longest_sentence"]


# ------------------------------------------------------------------------------------ tiny joint model


CORPUS_PASSAGES = [
    Passage("d0", "Rivers", "The Nile is long. It flows north. The Amazon carries the most water."),
    Passage("d1", "Cities", "Paris is in France. Rome is in Italy. Cairo is on the Nile."),
]


def _tiny_joint(tiny_llm_dirs, lora: bool):
    from tests.test_joint_modeling import make_joint, randomise

    model = make_joint(tiny_llm_dirs["llama"])
    randomise(model)
    if lora:
        model.enable_lora(r=4, alpha=8, dropout=0.0)
        model.config.adapter_in_reading = True
    return model.eval()


@pytest.mark.parametrize("lora", [False, True])
def test_passage_attention_on_a_tiny_joint_model(tiny_llm_dirs, lora):
    from unirag.joint.passage_attention import passage_attention

    model = _tiny_joint(tiny_llm_dirs, lora)
    passage = CORPUS_PASSAGES[0]
    got = passage_attention(model, model.tokenizer, "Which river carries the most water?", passage)
    expected = {"retrieval_heads", "base_reader"} | ({"trained_reader", "trained_reader_bridge"} if lora else set())
    assert set(got) == expected
    for attention in got.values():
        # the tiny tokenizer is one token per character: every character of the text is a token
        assert len(attention.offsets) == len(passage.text) == len(attention.weights)
        assert attention.offsets[0] == (0, 1) and attention.offsets[-1] == (len(passage.text) - 1, len(passage.text))
        assert all(w >= 0 for w in attention.weights) and 0 < sum(attention.weights) <= 1.0 + 1e-5
    if lora:  # the trained reader reads with other weights than the base reader
        assert got["trained_reader"].weights != got["base_reader"].weights


def test_benchmark_runs_end_to_end_and_records_valid_rows(tiny_llm_dirs, tmp_path, monkeypatch):
    from benchmarks import localization as bench
    from unirag.results import load_store, validate_row

    model = _tiny_joint(tiny_llm_dirs, lora=True)
    questions = [Question("q0", "Which river carries the most water?", ("Amazon",), "d0"),
                 Question("q1", "Where is Rome?", ("Italy",), "d1"),
                 Question("q2", "Who is here?", ("nobody",), "d1")]  # the answer is not in its passage: skipped
    corpus = {p.id: p for p in CORPUS_PASSAGES}
    result = bench.measure(model, model.tokenizer, corpus, questions, progress=False)
    assert result["n"] == 2 and result["skipped"] == {"answer_not_in_passage": 1, "no_gold_passage": 0}
    methods = result["methods"]
    assert set(methods) >= {"retrieval_heads", "trained_reader", "trained_reader_bridge", "base_reader",
                            "first_sentence", "longest_sentence", "lexical_overlap", "random_sentence"}
    for figures in methods.values():
        assert 0.0 <= figures["top1"] <= figures["top3"] <= 1.0
    # "Amazon" is in the third of three sentences, "Italy" in the second of three: the first sentence never wins
    assert methods["first_sentence"]["top1"] == 0.0
    assert methods["random_sentence"]["top1"] == pytest.approx(1 / 3, abs=1e-4)
    assert [r["answer_sentence"] for r in result["records"]] == [2, 1]
    rows = bench.rows(result, checkpoint="ckpt", corpus="squad", split="train-held-out", precision="fp32",
                      command="python -m benchmarks.localization --limit 2")
    for row in rows:
        validate_row(row)
    monkeypatch.setenv("UNIRAG_RESULTS", str(tmp_path / "store"))
    for row in rows:
        bench.append_run(row, replace=True)
    stored = load_store(tmp_path / "store")
    assert {r["run"] for r in stored} == {r["run"] for r in rows}
    # the JSON output is JSON
    json.dumps(result)


def test_benchmark_main_from_a_checkpoint_writes_json_and_records(tiny_llm_dirs, tmp_path, monkeypatch):
    from benchmarks import localization as bench
    from unirag.results import load_store

    ckpt = _tiny_joint(tiny_llm_dirs, lora=True).save_pretrained(tmp_path / "ckpt")
    corpus, questions = tmp_path / "corpus.jsonl", tmp_path / "dev.jsonl"
    corpus.write_text("".join(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n"
                              for p in CORPUS_PASSAGES))
    questions.write_text(json.dumps({"id": "q0", "question": "Which river carries the most water?",
                                     "answers": ["Amazon"], "doc_id": "d0"}) + "\n"
                         + json.dumps({"id": "q1", "question": "Where is Rome?", "answers": ["Italy"],
                                       "doc_id": "d1"}) + "\n")
    monkeypatch.setenv("UNIRAG_RESULTS", str(tmp_path / "store"))
    out = tmp_path / "out.json"
    assert bench.main(["--checkpoint", str(ckpt), "--corpus", str(corpus), "--questions", str(questions),
                       "--split", "dev", "--limit", "2", "--out", str(out), "--record"]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 2 and result["split"] == "dev[:2]" and len(result["records"]) == 2
    stored = load_store(tmp_path / "store")
    assert len(stored) == len(result["methods"]) == 8
    assert {r["split"] for r in stored} == {"dev[:2]"} and {r["corpus"] for r in stored} == {"squad"}


def test_localization_rows_render_their_own_table_and_stay_out_of_the_qa_tables(tmp_path):
    from benchmarks import localization as bench
    from benchmarks.report import update_report
    from unirag import results, studies

    result = {"n": 4, "skipped": {"no_gold_passage": 0, "answer_not_in_passage": 1}, "answer_repeated": 1,
              "sentences_mean": 5.25,
              "methods": {"first_sentence": {"top1": 0.25, "top3": 0.75, "n": 4},
                          "retrieval_heads": {"top1": 0.5, "top3": 1.0, "n": 4},
                          "random_sentence": {"top1": 0.2, "top3": 0.6, "n": 4}}}
    rows = bench.rows(result, checkpoint="ckpt", corpus="squad", split="dev", precision="fp32",
                      command="python -m benchmarks.localization --split dev")
    qa = {"run": "RAG top-5", "system": "rag", "corpus": "squad", "split": "dev", "precision": "fp32", "n": 9,
          "settings": {"rag_k": 5}, "command": "x", "metrics": {k: None for k in results.METRIC_KEYS},
          "date": "2026-12-01", "machine": results.MACHINE, "source": "test"}
    for row in [*rows, qa]:
        results.append_run(row, store_dir=tmp_path)
    stored = results.load_store(tmp_path)
    assert [t["run"] for t in results.table(stored, "squad", "fp32")] == ["RAG top-5"]
    table = studies.render_localization(stored)
    lines = table.splitlines()
    assert lines[0].startswith("**squad, dev, fp32** (n=4; 5.2 sentences a passage")  # :.1f of 5.25
    # methods in the report's order, whatever order they were stored in
    assert lines[-3:] == ["| retrieval heads | 0.500 | 1.000 |", "| first sentence (baseline) | 0.250 | 0.750 |",
                          "| random sentence (baseline, expected) | 0.200 | 0.600 |"]
    report = "# R\n\n## Localization\n\n<!-- results:localization -->\nstale\n<!-- /results -->\n"
    assert update_report(report, stored) == report.replace("stale", table)
    assert studies.render_localization([qa]) == ""  # no localization rows: no table


# ------------------------------------------------------------------------------------ the app


def test_localization_html_marks_the_answer_sentence_and_the_heads_first():
    from unirag.answer_sentences import SentenceLocalization
    from unirag.viz import localization_html

    sentences = split_sentences("Alpha is <b>first</b>. Beta is second. Gamma is third.")
    found = SentenceLocalization(sentences, answer=1, scores={"retrieval_heads": [0.1, 0.7, 0.2]},
                                 rankings={"retrieval_heads": [1, 2, 0]})
    page = localization_html(found, "Greek")
    assert "the answer sentence</b>" in page and "Greek" in page and "&lt;b&gt;first" in page
    assert page.count("outline:2px solid #16a34a; outline-offset") == 1  # one sentence boxed: the answer's
    missed = SentenceLocalization(sentences, answer=0, scores={"retrieval_heads": [0.1, 0.7, 0.2]},
                                  rankings={"retrieval_heads": [1, 2, 0]})
    assert "sentence 2; the answer sentence (1) comes 3rd" in localization_html(missed)
    assert localization_html(None) == "" and localization_html(SentenceLocalization([], None)) == ""


from test_app import pipeline, tiny  # noqa: E402, F401  (module fixtures: tiny corpus, tiny Llama, joint checkpoint)


def test_the_app_localizes_a_dev_question_on_its_gold_passage(pipeline):  # noqa: F811
    import app

    result = pipeline.ask("nq", "When was the Eiffel Tower completed?", beam_width=4, k_docs=1, rag_k=2,
                          max_new_tokens=2)
    found = result.joint.localization
    assert found is not None and found.answer == 1  # "It was completed in 1889."
    assert [s.text for s in found.sentences] == ["The Eiffel Tower is a wrought-iron tower in Paris.",
                                                 "It was completed in 1889."]
    assert sorted(found.rankings["retrieval_heads"]) == [0, 1] and len(found.scores["retrieval_heads"]) == 2
    assert result.rag.localization is None  # the retrieval heads are the joint model's
    free = pipeline.ask("nq", "tell me about rivers", beam_width=3, k_docs=1, rag_k=2, max_new_tokens=2)
    assert free.joint.localization is None
    out = app.ask(pipeline, "nq", "what does the passage about html escaping contain",
                  {"beam_width": 4, "k_docs": 2, "rag_k": 5, "max_new_tokens": 4})
    joint_docs = out[4]
    assert "Gold passage: Script test" in joint_docs and "<script>" not in joint_docs
