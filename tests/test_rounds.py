"""`rounds`: UniGen-style iterative retrieval and answering of the joint system, on tiny random models (seconds)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from test_app import pipeline, tiny  # noqa: F401  (module fixtures: tiny corpus, tiny Llama, joint checkpoint)
from test_cli import _joint_checkpoint, run
from test_joint_decoding import CORPUS, DOCIDS, FakeTrie, _build

from unirag.answer import Answer, display_answer
from unirag.cli import build_parser
from unirag.data import Question, prepare_question
from unirag.errors import UniragError
from unirag.eval import ROUND_KEYS, merge_runs, score, summarize
from unirag.joint import joint_system as system_module
from unirag.joint.joint_system import JointSystem, round_query
from unirag.joint.reader import AnswerGeneration
from unirag.settings import InferenceSettings, RecommendedSettings
from unirag.systems import SPECS

QUESTION = "  who wrote   it? "
SETTINGS = InferenceSettings(k_docs=2, beam_width=4, max_new_tokens=4)


@pytest.fixture(scope="module")
def joint(tiny_llm_dirs) -> JointSystem:
    model = _build(tiny_llm_dirs["llama"], seed=3)
    return JointSystem(model, model.tokenizer, CORPUS, FakeTrie(DOCIDS))


def _spy_searches(monkeypatch) -> list[str]:
    """The query of every docid search the joint system runs, in order."""
    queries: list[str] = []
    real = system_module.search_docids

    def spy(model, tokenizer, query, *args, **kwargs):
        queries.append(query)
        return real(model, tokenizer, query, *args, **kwargs)

    monkeypatch.setattr(system_module, "search_docids", spy)
    return queries


def _scripted_reader(monkeypatch, texts: list[str]) -> list[str]:
    """Replace the reader's generation by `texts`, one per call; returns the questions it was asked."""
    asked: list[str] = []
    answers = iter(texts)

    def fake(model, tokenizer, question, passages, **kwargs):
        asked.append(question)
        text = next(answers)
        return AnswerGeneration(text, [], 10, 5, 1, "eos", system_module.Trace().answer_attention)

    monkeypatch.setattr(system_module, "answer_with_docs", fake)
    return asked


# --------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize("bad", [0, 4, -1, 2.5, "two", True])
def test_rounds_outside_one_to_three_are_refused_with_the_limits(bad):
    with pytest.raises(UniragError, match="rounds must be"):
        InferenceSettings(rounds=bad)


def test_rounds_is_a_setting_like_the_others(tmp_path):
    assert InferenceSettings().rounds == 1  # the default: one pass
    assert InferenceSettings(rounds="3").rounds == 3 and InferenceSettings(rounds=2.0).rounds == 2
    assert InferenceSettings().replace(rounds=2).to_dict()["rounds"] == 2
    assert "rounds" in SPECS["joint"].settings_used and "rounds" not in SPECS["rag"].settings_used
    with pytest.raises(UniragError, match="rounds must be between 1 and 3, got 4"):
        InferenceSettings.from_existing(rounds=4)
    # A checkpoint may recommend it; explicit values still win.
    RecommendedSettings({"rounds": 2, "k_docs": 1}, "measured").save(tmp_path, "fp32")
    assert InferenceSettings.from_existing(tmp_path, "fp32").rounds == 2
    assert InferenceSettings.from_existing(tmp_path, "fp32", rounds=1).rounds == 1
    RecommendedSettings({"rounds": 5}).save(tmp_path, "fp32")
    with pytest.raises(UniragError, match="rounds must be between 1 and 3"):
        InferenceSettings.from_existing(tmp_path, "fp32")


def test_cli_rounds_flag_is_parsed_into_the_settings():
    args = build_parser().parse_args(["eval", "--corpus", "c", "--questions", "q", "--system", "joint",
                                      "--rounds", "2"])
    from unirag.cli import _explicit_settings

    assert _explicit_settings(args) == {"rounds": 2}
    assert InferenceSettings(**_explicit_settings(args)).rounds == 2
    args = build_parser().parse_args(["eval", "--corpus", "c", "--questions", "q", "--system", "joint"])
    assert "rounds" not in _explicit_settings(args)  # unset: the checkpoint's, else the default


# --------------------------------------------------------------------------------------------- the joint system


def _without_timings(answer: Answer) -> Answer:
    return replace(answer, timings_ms={})


def test_one_round_is_exactly_the_single_pass(joint, monkeypatch):
    """rounds=1 answers as retrieve + read did before the setting existed: one search, the same Answer."""
    queries = _spy_searches(monkeypatch)
    text, notices = prepare_question(QUESTION)
    retrieval = joint.retrieve(text, SETTINGS)
    before = joint.read(text, retrieval.docs, SETTINGS, retrieval)
    before.notices[:0] = notices
    queries.clear()
    for settings in (SETTINGS, SETTINGS.replace(rounds=1)):
        answer = joint.answer(QUESTION, settings)
        assert _without_timings(answer) == _without_timings(before)
        assert set(answer.timings_ms) == set(before.timings_ms)
        assert answer.trace.rounds == []
    assert queries == [text, text]  # one search per answer, with the question alone


def test_two_rounds_search_again_with_the_first_answer(joint, monkeypatch):
    queries = _spy_searches(monkeypatch)
    asked = _scripted_reader(monkeypatch, ["Homer\nmore text", "Virgil"])
    answer = joint.answer(QUESTION, SETTINGS.replace(rounds=2))
    text = prepare_question(QUESTION)[0]
    assert queries == [text, f"{text} Homer"]  # round 2's query: the question plus round 1's answer span
    assert asked == [text, text]  # both rounds read the question itself (the same reader prompt)
    first, second = answer.trace.rounds
    assert (first.round, first.query, first.answer) == (1, text, "Homer\nmore text")
    assert (second.round, second.query, second.answer) == (2, f"{text} Homer", "Virgil")
    assert answer.text == "Virgil" and answer.question == text  # the last round's answer is final
    assert answer.docs == second.docs and answer.trace.paths == second.paths and answer.trace.beams == second.beams
    assert first.paths and first.beams and first.ranked_doc_ids[: len(first.docs)] == first.doc_ids
    assert answer.timings_ms["retrieve"] == pytest.approx(first.timings_ms["retrieve"] + second.timings_ms["retrieve"])
    assert any("2 rounds" in n for n in answer.notices)


def test_rounds_on_the_real_tiny_reader(joint, monkeypatch):
    queries = _spy_searches(monkeypatch)
    answer = joint.answer(QUESTION, SETTINGS.replace(rounds=3))
    rounds = answer.trace.rounds
    assert [r.round for r in rounds] == [1, 2, 3] and len(queries) == 3
    for before, after, query in zip(rounds[:-1], rounds[1:], queries[1:], strict=True):
        assert after.query == query == round_query(answer.question, Answer("joint", answer.question, before.answer))
    assert answer.text == rounds[-1].answer and answer.doc_ids == rounds[-1].doc_ids
    # Round 1 of a multi-round answer is the single-pass answer.
    single = joint.answer(QUESTION, SETTINGS)
    assert rounds[0].answer == single.text and rounds[0].doc_ids == single.doc_ids
    assert rounds[0].paths == single.trace.paths


def test_round_query_uses_the_displayed_span():
    question = "who wrote the iliad"
    assert round_query(question, Answer("joint", question, " A: Homer\nQ: next")) == "who wrote the iliad Homer"
    assert display_answer("Q: who wrote the iliad", question) == ""
    assert round_query(question, Answer("joint", question, "Q: who wrote the iliad")) == question  # no span


# --------------------------------------------------------------------------------------------- eval


def _round_record(answers: list[str], ranks: list[list[str]], gold: str = "Homer", doc: str = "d1") -> dict:
    from unirag.answer import RetrievedDoc, RoundTrace, Trace

    steps = [RoundTrace(i + 1, "q", [RetrievedDoc(r[0], "", "", 0.0)], r, answer=a)
             for i, (a, r) in enumerate(zip(answers, ranks, strict=True))]
    answer = Answer("joint", "q", answers[-1], list(steps[-1].docs), trace=Trace(rounds=steps),
                    ranked_doc_ids=ranks[-1])
    return score(answer, Question(f"q{len(answers)}{answers[0]}", "q", (gold,), doc), 1)


def test_eval_records_and_summary_per_round():
    helped = _round_record(["Virgil", "Homer"], [["d0", "d1"], ["d1", "d0"]])
    assert helped["round_answers"] == ["Virgil", "Homer"] and helped["round_doc_ids"] == [["d0"], ["d1"]]
    assert helped["round_accuracy"] == [0.0, 1.0] and helped["round_recall@1"] == [0.0, 1.0]
    assert helped["accuracy"] == 1.0 and helped["recall@1"] == 1.0  # the final round's, as ever
    hurt = _round_record(["Homer", "Virgil"], [["d1"], ["d2"]])
    same = _round_record(["Homer!", "Homer"], [["d1"], ["d1"]])
    summary = summarize("joint", [helped, hurt, same], 1)
    assert summary["round_accuracy"] == [pytest.approx(0.6667), pytest.approx(0.6667)]
    assert summary["round_recall@1"] == [pytest.approx(0.6667), pytest.approx(0.6667)]
    assert summary["round_helped"] == [1] and summary["round_hurt"] == [1]
    assert summary["accuracy"] == pytest.approx(0.6667)
    # A single-round run has none of these: records and summaries as before.
    plain = score(Answer("joint", "q", "Homer", ranked_doc_ids=["d1"]), Question("p", "q", ("Homer",), "d1"), 1)
    assert not any(key.startswith("round_") for key in plain)
    assert not set(ROUND_KEYS) & set(summarize("joint", [plain], 1))
    with pytest.raises(UniragError, match="numbers of rounds"):
        summarize("joint", [helped, plain], 1)
    # Shards merge: the per-round means are recomputed, not compared as labels.
    blobs = [{"summary": {**summarize("joint", recs, 1), "wall_time_s": 1.0, "corpus": "nq"}, "records": recs}
             for recs in ([helped], [hurt, same])]
    merged = merge_runs(blobs)
    assert merged["summary"]["round_helped"] == [1] and merged["summary"]["round_hurt"] == [1]


def test_eval_joint_with_two_rounds_end_to_end(tmp_path, capsys, tiny_llm_dirs):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "title": f"T{i}", "text": f"city {i} facts"}) + "\n"
                              for i in range(4)))
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"id": f"q{i}", "question": f"city {i}?", "answers": [str(i)],
                                             "doc_id": f"d{i}"}) + "\n" for i in range(2)))
    ckpt = _joint_checkpoint(tmp_path, tiny_llm_dirs["llama"], corpus)
    out = tmp_path / "two.json"
    base = ("eval", "--corpus", corpus, "--questions", questions, "--system", "joint", "--checkpoint", ckpt,
            "--max-new-tokens", 2)
    code, stdout, err = run(capsys, *base, "--rounds", 2, "--out", out)
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["settings"]["rounds"] == 2
    assert len(summary["round_accuracy"]) == 2 and len(summary["round_recall@1"]) == 2
    assert len(summary["round_helped"]) == len(summary["round_hurt"]) == 1
    records = json.loads(out.read_text())["records"]
    assert all(len(r["round_answers"]) == 2 and r["round_answers"][-1] == r["text"] for r in records)
    code, stdout, err = run(capsys, *base)  # one round: no per-round fields, and settings as before the setting
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert "rounds" not in summary["settings"] and "round_accuracy" not in summary
    code, stdout, err = run(capsys, *base, "--rounds", 4)
    assert code == 2 and "rounds must be between 1 and 3, got 4" in err
    code, stdout, err = run(capsys, "eval", "--corpus", corpus, "--questions", questions, "--system", "norag",
                            "--rounds", 2)
    assert code == 2 and "--rounds do(es) not apply to --system norag" in err


# --------------------------------------------------------------------------------------------- the page's views


def _two_round_answer(tree) -> Answer:
    from test_viz import joint_answer, level

    from unirag.answer import RetrievedDoc, RoundTrace

    final = joint_answer(tree)  # round 2: d1, d2
    path = [level((), [0, 1, 2], [0.1, 0.1, 0.8], 2), level((2,), [0, 1], [0.3, 0.7], 1), level((2, 1), [0], [1.0], 0)]
    first = RoundTrace(1, final.question, [RetrievedDoc("d7", "Title 7", "text", -0.6, (2, 1, 0))], ["d7", "d1"],
                       [{"docid": [2, 1, 0], "doc_id": "d7", "logprob": -0.6}], [path], "Mars <i>")
    second = RoundTrace(2, f"{final.question} Mars <i>", list(final.docs), final.doc_ids, final.trace.beams,
                        final.trace.paths, final.text)
    final.trace.rounds = [first, second]
    return final


def test_rounds_figure_draws_each_rounds_path_side_by_side():
    from test_viz import joint_answer

    from unirag import viz

    small = _tree()
    single = joint_answer(small)
    assert viz.rounds_path_figure(single, small).to_dict() == viz.docid_path_figure(single, small).to_dict()
    answer = _two_round_answer(small)
    fig = viz.rounds_path_figure(answer, small)
    paths = [(t.meta["round"], t.meta["docid"], t.xaxis) for t in fig.data if t.meta and t.meta["kind"] == "path"]
    assert paths == [(1, [2, 1, 0], "x"), (2, [0, 0, 1], "x2"), (2, [0, 1, 0], "x2")]  # round 2 next to round 1
    assert {t.meta["round"] for t in fig.data} == {1, 2}
    assert [a.text for a in fig.layout.annotations][:2] == ["Round 1", "Round 2 (answer)"]
    assert viz.rounds_path_figure(None).layout.annotations  # the empty message


def test_rounds_table_names_each_rounds_query_documents_and_answer():
    from unirag import viz

    answer = _two_round_answer(_tree())
    table = viz.rounds_html(answer, ["a <script> tag"], "d2")
    rows = table.split("<tr>")[2:]
    assert len(rows) == 2 and "2-1-0" in rows[0] and "Title 7" in rows[0] and "Mars &lt;i&gt;</td>" in rows[0]
    assert "<b> Mars &lt;i&gt;</b>" in rows[1]  # what round 2 added to the question, escaped
    assert "✓" in rows[1] and "✓" not in rows[0] and "ur-gold-doc" in rows[1]
    assert "<script>" not in table
    assert viz.rounds_html(Answer("joint", "q", "a")) == "" and viz.rounds_html(None) == ""


def _tree():
    from test_viz import DOC_IDS, DOCIDS

    from unirag.docids import DocidTree, TreeConfig

    return DocidTree(DOC_IDS, DOCIDS, TreeConfig(k=3, c=2), "fp", {(2, 1): "mars"})


def test_the_page_asks_with_rounds_and_shows_each_round(pipeline):  # noqa: F811
    import app

    question, settings = "When was the Eiffel Tower completed?", {"beam_width": 4, "k_docs": 2, "rag_k": 3,
                                                                  "max_new_tokens": 4}
    one = app.ask(pipeline, "nq", question, settings)
    assert one[-1].settings.rounds == 1 and one[-1].joint.answer.trace.rounds == []
    assert "ur-rounds" not in one[4]  # one round: no rounds table
    two = app.ask(pipeline, "nq", question, {**settings, "rounds": 2})
    assert len(two) == len(one)  # the same outputs: the path plot and the documents carry the rounds
    comparison = two[-1]
    joint = comparison.joint.answer
    assert comparison.settings.rounds == 2 and [r.round for r in joint.trace.rounds] == [1, 2]
    assert joint.trace.rounds[1].query == round_query(joint.question, Answer("joint", joint.question,
                                                                             joint.trace.rounds[0].answer))
    assert {t.meta["round"] for t in two[2].data if t.meta and "round" in t.meta} == {1, 2}
    assert "ur-rounds" in two[4] and two[4].count("<tr>") == 3
    assert comparison.rag.answer is not None and comparison.rag.answer.trace.rounds == []  # the baseline: one pass
    with pytest.raises(UniragError, match="rounds must be between 1 and 3"):
        pipeline.ask("nq", question, rounds=0)
    # The corpus's start settings include rounds, so page and API agree.
    assert app.page_settings_of(app.select_corpus(pipeline, "nq"))["rounds"].value == 1
