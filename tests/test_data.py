import json

import pytest

from unirag.data import load_corpus, load_questions, load_squad_json, prepare_question
from unirag.errors import DataError, UniragError


def write_lines(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


def corpus_lines(n=3):
    return [json.dumps({"id": f"d{i}", "title": f"T{i}", "text": f"text {i}"}) for i in range(n)]


def test_loads_corpus_and_questions(tmp_path):
    corpus = load_corpus(write_lines(tmp_path / "c.jsonl", corpus_lines()))
    assert corpus.ids == ["d0", "d1", "d2"] and corpus["d1"].title == "T1"
    qs = load_questions(
        write_lines(
            tmp_path / "q.jsonl",
            [
                json.dumps({"id": "q1", "question": " who? ", "answers": ["x"], "doc_id": "d2"}),
                json.dumps({"id": "q2", "question": "what?", "answers": ["y"]}),
            ],
        ),
        corpus,
    )
    assert qs[0].question == "who?" and qs[0].doc_id == "d2" and qs[1].doc_id is None


def test_duplicate_corpus_id_names_both_lines(tmp_path):
    lines = corpus_lines(2) + [json.dumps({"id": "d0", "title": "", "text": "again"})]
    with pytest.raises(DataError, match=r"c.jsonl:3: duplicate id 'd0' \(first seen on line 1\)"):
        load_corpus(write_lines(tmp_path / "c.jsonl", lines))


def test_corrupted_jsonl_line_is_reported_with_line_number(tmp_path):
    lines = corpus_lines(2) + ['{"id": "d9", "title": "x", "te']
    with pytest.raises(DataError, match=r"c.jsonl:3: invalid JSON"):
        load_corpus(write_lines(tmp_path / "c.jsonl", lines))


def test_bad_utf8_is_reported_with_line_number(tmp_path):
    lines = corpus_lines(1) + [b'{"id": "d1", "title": "x", "text": "\xff\xfe"}']
    with pytest.raises(DataError, match=r"c.jsonl:2: invalid UTF-8"):
        load_corpus(write_lines(tmp_path / "c.jsonl", lines))


def test_empty_text_and_missing_fields(tmp_path):
    with pytest.raises(DataError, match=r":1: field 'text' is empty"):
        load_corpus(write_lines(tmp_path / "c.jsonl", [json.dumps({"id": "a", "title": "", "text": "  "})]))
    corpus = load_corpus(write_lines(tmp_path / "c2.jsonl", corpus_lines()))
    with pytest.raises(DataError, match=r"q.jsonl:1: missing field 'answers'"):
        load_questions(write_lines(tmp_path / "q.jsonl", [json.dumps({"id": "q", "question": "x"})]), corpus)
    with pytest.raises(DataError, match=r"doc_id 'nope' of question 'q' is not in the corpus"):
        load_questions(
            write_lines(
                tmp_path / "q2.jsonl", [json.dumps({"id": "q", "question": "x", "answers": ["a"], "doc_id": "nope"})]
            ),
            corpus,
        )


def test_missing_file_and_empty_corpus(tmp_path):
    with pytest.raises(DataError, match="File not found"):
        load_corpus(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="empty"):
        load_corpus(write_lines(tmp_path / "e.jsonl", [""]))


def test_raw_squad_json(tmp_path):
    blob = {
        "data": [
            {
                "title": "Super_Bowl",
                "paragraphs": [
                    {
                        "context": "Denver won.",
                        "qas": [
                            {"id": "a1", "question": "Who won?", "answers": [{"text": "Denver"}, {"text": "Denver"}]}
                        ],
                    }
                ],
            }
        ]
    }
    path = tmp_path / "dev-v1.1.json"
    path.write_text(json.dumps(blob))
    corpus, questions = load_squad_json(path)
    assert corpus.ids == ["sq00-000"] and corpus["sq00-000"].title == "Super Bowl"
    assert questions[0].answers == ("Denver",) and questions[0].doc_id == "sq00-000"
    assert load_corpus(path).ids == corpus.ids and load_questions(path)[0].id == "a1"
    path.write_text(json.dumps(blob)[:-5])
    with pytest.raises(DataError, match="invalid JSON"):
        load_corpus(path)


def test_fingerprint_changes_with_content(tmp_path):
    a = load_corpus(write_lines(tmp_path / "a.jsonl", corpus_lines()))
    lines = corpus_lines()
    lines[1] = json.dumps({"id": "d1", "title": "T1", "text": "other"})
    b = load_corpus(write_lines(tmp_path / "b.jsonl", lines))
    assert a.fingerprint != b.fingerprint and a.fingerprint == load_corpus(tmp_path / "a.jsonl").fingerprint


@pytest.mark.parametrize("text", ["", "   \n\t "])
def test_empty_question_is_an_error(text):
    with pytest.raises(UniragError, match="empty"):
        prepare_question(text)


def test_long_question_is_truncated_with_notice():
    text, notices = prepare_question("why " * 5000)
    assert len(text) == 2000 and len(notices) == 1 and "truncated" in notices[0]


def test_non_english_and_emoji_pass_through():
    text, notices = prepare_question("  Qui a écrit « Les Misérables » ? 📚  東京はどこ ")
    assert text == "Qui a écrit « Les Misérables » ? 📚 東京はどこ" and notices == []


def test_a_question_in_another_script_gets_a_notice():
    from unirag.data import NOT_ENGLISH_NOTICE, prepare_question

    for question in ("Кто написал роман «Война и мир»?", "東京タワーは何年に完成しましたか"):
        assert NOT_ENGLISH_NOTICE in prepare_question(question)[1]
    for question in ("Who wrote War and Peace?", "Où est la tour Eiffel ?", "1776?", "Café in São Paulo"):
        assert NOT_ENGLISH_NOTICE not in prepare_question(question)[1]
