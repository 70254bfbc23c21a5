"""Contracts that lose nothing: resumable eval, safe outputs, strict merges, metric edge cases, long passages,
corrupt caches and trees for another corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unirag.data import load_questions
from unirag.errors import DataError
from unirag.eval import contains_answer, exact_match, token_f1


def shared_data() -> Path | None:
    """The shared data folder: UNIRAG_DATA / ../shared/data, or `shared/data` above a git worktree."""
    from unirag.paths import default_data_dir

    for root in (default_data_dir(), *(p / "shared" / "data" for p in Path(__file__).resolve().parents)):
        if (root / "nq" / "corpus.jsonl").is_file():
            return root
    return None


# --- metrics ------------------------------------------------------------------------------------------------------
def test_golds_or_predictions_that_normalise_to_empty_never_match():
    for gold in ("The", ".", "", "  a  "):
        assert exact_match("", [gold]) == 0.0
        assert exact_match("the", [gold]) == 0.0
        assert token_f1("", [gold]) == 0.0
        assert contains_answer("anything at all", [gold]) == 0.0
    assert exact_match("", ["Paris"]) == 0.0 and token_f1("", ["Paris"]) == 0.0
    assert contains_answer("", ["Paris"]) == 0.0
    assert exact_match("Paris", ["The", "paris"]) == 1.0  # an empty gold beside a real one does not hide it


def test_best_gold_wins_for_em_and_f1():
    golds = ["London", "the city of Paris", "Paris"]
    assert exact_match("Paris.", golds) == 1.0
    assert token_f1("Paris", golds) == 1.0
    assert token_f1("city of Paris", ["London", "Paris"]) == pytest.approx(0.5)
    assert token_f1("city of Paris", ["London", "Paris", "city Paris"]) == pytest.approx(0.8)


def test_f1_counts_repeated_tokens_once_per_occurrence():
    # prediction "paris paris" vs gold "paris": 1 common token; precision 1/2, recall 1/1 → F1 2/3
    assert token_f1("Paris Paris", ["Paris"]) == pytest.approx(2 / 3)
    # both sides repeat: min(2, 3) = 2 common tokens of 3 and 2 → precision 2/3, recall 1
    assert token_f1("new new new", ["new new"]) == pytest.approx(0.8)


def test_accuracy_is_the_answer_contained_substring_metric_even_inside_words():
    """The paper's (DPR-style) accuracy counts a gold inside a word; every measured number uses it, so it stays."""
    assert contains_answer("1991", ["1"]) == 1.0
    assert contains_answer("the Beatles' drummer", ["beat"]) == 1.0
    # EM and F1 compare whole strings and whole tokens: no match inside a word
    assert exact_match("1991", ["1"]) == 0.0
    assert token_f1("1991", ["1"]) == 0.0
    assert token_f1("in 1991", ["1"]) == 0.0


def test_questions_without_gold_answers_are_refused_with_file_and_line(tmp_path):
    path = tmp_path / "q.jsonl"
    for answers in ([], ["", "  "]):
        path.write_text(json.dumps({"id": "q1", "question": "who?", "answers": ["x"]}) + "\n"
                        + json.dumps({"id": "q2", "question": "what?", "answers": answers}) + "\n")
        with pytest.raises(DataError, match=r"q.jsonl:2: question 'q2' has no gold answer"):
            load_questions(path)


@pytest.mark.parametrize("name", ["nq", "squad"])
@pytest.mark.parametrize("split", ["dev", "train"])
def test_shipped_question_files_all_have_gold_answers(name, split):
    root = shared_data()
    if root is None or not (root / name / f"{split}.jsonl").is_file():
        pytest.skip("the shared data is not present")
    path = root / name / f"{split}.jsonl"
    assert all(q.answers for q in load_questions(path))
