"""Span answers on tiny models: never outside the documents read, never ending mid-word, citing their source."""

from __future__ import annotations

import pytest

from unirag.backbones import load_llm
from unirag.data import Corpus, Passage
from unirag.rag import GoldPassageSystem, RagSystem, Reader
from unirag.settings import InferenceSettings
from unirag.spans import SpanConstraint, finish_span, word_ends
from unirag.substring_index import doc_tokens

# Two documents with no character in common (the tiny tokenizer is one token a character): any span of one of
# them can only come from that one, so its citation is known.
DOCS = [Passage("a", "Alpha", "abc abd, bead cab."), Passage("x", "Xray", "xyz wuv zyx-uvw")]


@pytest.fixture(scope="module")
def tiny(tiny_llm_dirs):
    return load_llm(str(tiny_llm_dirs["llama"]))


def _is_word_bounded_span(answer: str, text: str, start: int, end: int) -> bool:
    inside = text[start:end] == answer
    before_ok = start == 0 or not (text[start - 1].isalnum() and text[start].isalnum())
    after_ok = end == len(text) or not (text[end - 1].isalnum() and text[end].isalnum())
    return inside and before_ok and after_ok


def test_word_ends_and_starts_on_a_crafted_text(tiny):
    _, tok = tiny
    text = "ab cd-ef"
    doc = doc_tokens(tok, text)  # " ab cd-ef": one token a character
    assert len(doc.ids) == 9
    assert doc.starts == {0, 1, 3, 4}  # the spaces and the first letter of each word
    # a span may end after "ab" (3), after the space (4: not mid-word), after "cd" (6), "-" (7) and at the end
    assert word_ends(tok, doc, text) == {1, 3, 4, 6, 7, 9}
    constraint = SpanConstraint(tok, [text], end_ids={tok.eos_token_id})
    a, b = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")
    assert tok.eos_token_id not in constraint.allowed([a])  # "a" is mid-word
    assert tok.eos_token_id in constraint.allowed([a, b])  # "ab" ends a word
    space, c = tok.convert_tokens_to_ids(" "), tok.convert_tokens_to_ids("c")
    assert constraint.trim([a, b, space, c]) == [a, b, space]
    tokens, source = finish_span(constraint, [a], stopped=False)
    assert tokens == [] and source is None


@pytest.mark.parametrize("budget", [1, 2, 3, 5, 9, 16])
def test_rag_span_answers_stay_inside_and_cite_their_document(tiny, budget):
    model, tok = tiny
    corpus = Corpus(list(DOCS), source="spans")
    gold = GoldPassageSystem(Reader(model, tok), corpus)
    settings = InferenceSettings(max_new_tokens=budget, answer_mode="span")
    questions = ["what is it?", "where?", "name the thing", "zz?"]
    spans = 0
    for doc in DOCS:
        for answer in gold.answer_many(questions, [doc.id] * len(questions), settings):
            span = answer.trace.answer_span
            if not answer.text:
                assert span is None
                continue
            spans += 1
            assert span is not None and span.doc_id == doc.id
            assert _is_word_bounded_span(answer.text, doc.text, span.start, span.end), (answer.text, span)
            assert answer.answer_tokens <= budget
    assert spans or budget < 5  # the tiny model's words are short: from 5 tokens on it always finds one


class FixedRetriever:
    """Both documents, in a given order, for every question (a stand-in dense retriever)."""

    def __init__(self, corpus, order):
        self.corpus, self.order = corpus, order

    def search_many(self, questions, k):
        return [[(d, 1.0 - i / 10) for i, d in enumerate(self.order)][:k] for _ in questions]


def test_two_documents_the_citation_is_the_span_source_not_the_last_read(tiny):
    model, tok = tiny
    corpus = Corpus(list(DOCS), source="spans")
    for order in (["a", "x"], ["x", "a"]):
        rag = RagSystem(FixedRetriever(corpus, order), Reader(model, tok))
        for question in ["what?", "who is abc?", "xyz wuv?", "tell me"]:
            answer = rag.answer(question, InferenceSettings(rag_k=2, max_new_tokens=8, answer_mode="span"))
            if not answer.text:
                continue
            span = answer.trace.answer_span
            source = corpus[span.doc_id]
            assert _is_word_bounded_span(answer.text, source.text, span.start, span.end)
            other = next(d for d in DOCS if d.id != span.doc_id)
            assert answer.text not in other.text  # the disjoint alphabets: only the cited one holds it


def test_free_mode_is_the_unconstrained_reader(tiny):
    model, tok = tiny
    corpus = Corpus(list(DOCS), source="spans")
    gold = GoldPassageSystem(Reader(model, tok), corpus)
    free = gold.answer_many(["what?"], ["a"], InferenceSettings(max_new_tokens=6))[0]
    plain = Reader(model, tok).read("what?", [DOCS[0]], max_new_tokens=6)
    assert free.trace.answer_span is None and free.text == plain.text


def test_joint_reader_span_answers(tiny_llm_dirs):
    from tests.test_joint_decoding import _build
    from unirag.joint.reader import answer_with_docs

    model = _build(tiny_llm_dirs["llama"])
    passages = [(d.id, d.title, d.text) for d in DOCS]
    found = 0
    for question in ["what?", "abc?", "xyz?"]:
        for budget in (2, 5, 12):
            gen = answer_with_docs(model, model.tokenizer, question, passages, max_new_tokens=budget,
                                   answer_mode="span")
            if not gen.text:
                continue
            source = DOCS[gen.span.doc_index]
            assert _is_word_bounded_span(gen.text, source.text, gen.span.start, gen.span.end), gen.text
            assert len(gen.attention.weights) == len(gen.token_ids)
            found += 1
    assert found
