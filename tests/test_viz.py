"""Figure and HTML builders on hand-made Answer traces and a small DocidTree (no models, milliseconds)."""

from __future__ import annotations

import math
import re

import pytest

from unirag import viz
from unirag.answer import Answer, AnswerAttention, RetrievedDoc, SelfCheckRow, TokenWeights, Trace
from unirag.docids import DocidTree, TreeConfig

DOCIDS = [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0), (1, 1), (2, 0, 0), (2, 0, 1), (2, 1, 0)]
DOC_IDS = [f"d{i}" for i in range(len(DOCIDS))]
SCRIPT = "<script>alert('x')</script>"


@pytest.fixture(scope="module")
def tree() -> DocidTree:
    labels = {(): "corpus", (0,): "paris, tower, seine", (0, 0): "tower, iron", (0, 1): "museum",
              (1,): "london, bridge", (2,): "planets, moons", (2, 0): "jupiter", (2, 1): "mars"}
    labels.update({d: f"Title {i}" for i, d in enumerate(DOCIDS)})
    return DocidTree(DOC_IDS, DOCIDS, TreeConfig(k=3, c=2), "fp", labels)


def level(prefix, children, probs, chosen):
    return {"prefix": list(prefix), "children": list(children), "probs": list(probs), "chosen": chosen}


def joint_answer(tree: DocidTree) -> Answer:
    path1 = [level((), [0, 1, 2], [0.7, 0.2, 0.1], 0), level((0,), [0, 1], [0.6, 0.4], 0),
             level((0, 0), [0, 1], [0.55, 0.45], 1)]
    path2 = [level((), [0, 1, 2], [0.7, 0.2, 0.1], 0), level((0,), [0, 1], [0.6, 0.4], 1),
             level((0, 1), [0], [1.0], 0)]
    logp = [sum(math.log(s["probs"][s["children"].index(s["chosen"])]) for s in p) for p in (path1, path2)]
    docs = [RetrievedDoc("d1", "Title 1", f"First doc. It has {SCRIPT} inside.", logp[0], (0, 0, 1)),
            RetrievedDoc("d2", "Title 2", "Second doc text.", logp[1], (0, 1, 0))]
    context = ["Title", " 1", ":", " First", " doc", ".", " It", " has", " <script>", " inside", ".", "\n",
               "Title", " 2", ":", " Second", " doc", " text", "."]
    weights = [[0.02] * 12 + [0.01] * 7, [0.0] * 8 + [0.8] + [0.0] * 10]
    return Answer(
        system="joint", question="what is <b>inside</b>?", text="a <script> tag", docs=docs,
        prompt_tokens=40, context_tokens=len(context), answer_tokens=2,
        timings_ms={"retrieve": 120.0, "generate": 800.0},
        trace=Trace(
            beams=[{"docid": [0, 0, 1], "doc_id": "d1", "logprob": logp[0]},
                   {"docid": [0, 1, 0], "doc_id": "d2", "logprob": logp[1]},
                   {"docid": [0, 0, 0], "doc_id": "d0", "logprob": -2.5}],
            paths=[path1, path2],
            retrieval_attention=TokenWeights(["what", " is", " <b>", "inside", "</b>", "?"],
                                             [0.1, 0.05, 0.3, 0.4, 0.1, 0.05]),
            answer_attention=AnswerAttention(["a", " <script>"], context, weights, doc_spans=[[0, 11], [12, 19]]),
        ),
    )


def rag_answer(n_context: int = 30, n_answer: int = 3) -> Answer:
    docs = [RetrievedDoc(f"d{i}", f"Passage {i}", f"text {i}", s) for i, s in enumerate([0.82, 0.71, 0.55])]
    # Byte-level BPE strings, as transformers' convert_ids_to_tokens gives them for SmolLM2.
    context = (["Pass", "age", "Ġ0", ":", "Ġtext", "Ġ0", "."] + ["Ċ"] + ["Pass", "age", "Ġ1", ":", "Ġtext", "Ġ1", "."]
               + ["Ċ"] + ["Pass", "age", "Ġ2", ":", "ĠcafÃ©", "Ġ2", "."])
    context += ["Ġmore"] * (n_context - len(context))
    weights = [[1.0 / len(context)] * len(context) for _ in range(n_answer)]
    return Answer("rag", "q", "answer", docs, trace=Trace(answer_attention=AnswerAttention(
        answer_tokens=["Ġans"] * n_answer, context_tokens=context, weights=weights)))


# --------------------------------------------------------------------------------------------- docid path


def test_docid_path_probabilities_and_highlighted_path(tree):
    answer = joint_answer(tree)
    fig = viz.docid_path_figure(answer, tree)
    candidates = [t for t in fig.data if t.meta and t.meta["kind"] == "candidates"]
    paths = [t for t in fig.data if t.meta and t.meta["kind"] == "path"]
    # one candidates trace per distinct (level, prefix) visited: (), (0,), (0,0), (0,1)
    assert sorted((t.meta["level"], tuple(t.meta["prefix"])) for t in candidates) == [
        (0, ()), (1, (0,)), (2, (0, 0)), (2, (0, 1))]
    for t in candidates:
        assert sum(t.meta["probs"]) == pytest.approx(1.0, abs=1e-6)
        assert len(t.x) == len(t.meta["children"]) == len(t.marker.color)
    # the highlighted paths are exactly the chosen docids of the selected documents
    assert [p.meta["docid"] for p in paths] == [list(d.docid) for d in answer.docs]
    assert [p.meta["doc_id"] for p in paths] == ["d1", "d2"]
    # chosen nodes are outlined, the others are not
    root = next(t for t in candidates if t.meta["level"] == 0)
    assert list(root.marker.line.width) == [3, 0.5, 0.5]
    # each path line passes through the x position of its chosen candidate at every level
    for p in paths:
        for lv, symbol in enumerate(p.meta["docid"]):
            prefix = tuple(p.meta["docid"][:lv])
            group = next(t for t in candidates if t.meta["level"] == lv and tuple(t.meta["prefix"]) == prefix)
            assert p.x[lv + 1] == group.x[group.meta["children"].index(symbol)]
    # hover carries the tree's keyword label and size
    assert "paris, tower, seine" in root.hovertext[0] and "3 documents" in root.hovertext[0]


def test_docid_path_without_trace_is_a_message():
    fig = viz.docid_path_figure(Answer("joint", "q", "a"), None)
    assert not fig.data and "No docid path" in fig.layout.annotations[0].text
    assert not viz.docid_path_figure(None).data


def test_beam_rows(tree):
    rows = viz.beam_rows(joint_answer(tree), {"d1": "Title 1", "d0": "Title 0"})
    assert [r[1] for r in rows] == ["0-0-1", "0-1-0", "0-0-0"]
    used = viz.BEAM_HEADERS.index("used")
    assert [r[used] for r in rows] == ["✓", "✓", ""] and rows[0][3] == "Title 1"
    assert rows[0][4] == pytest.approx(math.log(0.7 * 0.6 * 0.45), abs=1e-2)
    assert rows[0][5] == 0.0 and rows[0][6] == rows[0][4]  # no document match recorded: score = log-prob
    assert rows[0][7:9] == ["", ""]  # no self-check
    assert all(len(r) == len(viz.BEAM_HEADERS) for r in rows)
    # every column has a width, and no header is long enough to wrap one character a line
    assert len(viz.BEAM_WIDTHS) == len(viz.BEAM_HEADERS) and all(len(h) <= 8 and " " not in h for h in viz.BEAM_HEADERS)
    assert sum(float(w.rstrip("%")) for w in viz.BEAM_WIDTHS) == pytest.approx(100)


def test_beam_rows_with_self_check(tree):
    answer = joint_answer(tree)
    answer.trace.self_check = [SelfCheckRow("d2", search_rank=2, search_score=-1.0, question_logprob=-2.0, score=-9.0),
                               SelfCheckRow("d1", search_rank=1, search_score=-0.5, question_logprob=-3.0, score=-12.5)]
    rows = viz.beam_rows(answer)
    ql, checked = viz.BEAM_HEADERS.index("q-lik"), viz.BEAM_HEADERS.index("checked")
    assert [(r[2], r[ql], r[checked]) for r in rows] == [("d1", -3.0, -12.5), ("d2", -2.0, -9.0), ("d0", "", "")]


# --------------------------------------------------------------------------------------------- bars


def test_retrieval_bars_match_scores():
    answer = rag_answer()
    fig = viz.retrieval_bars_figure(answer, gold_doc_id="d1")
    bar = fig.data[0]
    assert list(bar.x) == [d.score for d in answer.docs]
    assert list(bar.meta["doc_ids"]) == answer.doc_ids
    assert bar.marker.color[1] == viz.GOLD_COLOR and bar.marker.color[0] == viz.RAG_COLOR
    assert not viz.retrieval_bars_figure(Answer("rag", "q", "a")).data


# --------------------------------------------------------------------------------------------- heatmap


def test_heatmap_shape_tokens(tree):
    answer = joint_answer(tree)
    fig = viz.attention_heatmap(answer)
    heat = fig.data[0]
    assert heat.meta["unit"] == "token" and heat.meta["shape"] == [2, 19]
    assert len(heat.z) == 2 and all(len(row) == 19 for row in heat.z)
    assert heat.z[1][8] == pytest.approx(0.8)
    assert all("<script>" not in t for t in fig.layout.xaxis.ticktext)


def test_heatmap_groups_long_context_into_sentences():
    answer = rag_answer(n_context=200, n_answer=4)
    fig = viz.attention_heatmap(answer, max_tokens=80)
    heat = fig.data[0]
    assert heat.meta["unit"] == "sentence"
    rows, cols = heat.meta["shape"]
    assert rows == 4 and 3 <= cols < 200 and len(heat.z[0]) == cols
    # sentence cells sum their tokens' attention: each row keeps its total but the 2 newline separators' share
    for row in heat.z:
        assert sum(row) == pytest.approx(1.0 - 2 / 200, abs=1e-6)
    assert not viz.attention_heatmap(Answer("rag", "q", "")).data


def test_clean_tokens_and_doc_spans():
    assert viz.clean_tokens(["Ġcaf", "Ã©", "Ċ", "Next"]) == [" caf", "é", "\n", "Next"]
    assert viz.clean_tokens(["▁hello", "▁world"]) == [" hello", " world"]
    assert viz.clean_tokens([" plain", " text"]) == [" plain", " text"]
    context = rag_answer().trace.answer_attention.context_tokens
    assert viz.infer_doc_spans(context, 3) == [[0, 7], [8, 15], [16, 30]]
    assert viz.infer_doc_spans(context, 2) == []


# --------------------------------------------------------------------------------------------- HTML


def test_html_escapes_documents_questions_answers(tree):
    answer = joint_answer(tree)
    docs = viz.documents_html(answer, gold_doc_id="d1")
    assert "<script>" not in docs and "&lt;script&gt;" in docs
    assert "gold passage" in docs and "ur-tok" in docs  # the most attended token is marked
    question = viz.question_html(answer)
    assert "<b>inside" not in question and "&lt;b&gt;" in question
    card = viz.answer_card_html(answer, "Joint <i>", viz.JOINT_COLOR, gold_found=True, gold_rank=1, correct=False,
                                gold_answers=["<img src=x onerror=alert(1)>"])
    assert "<script>" not in card and "<img" not in card and "<i>" not in card
    assert "✓ gold passage retrieved (#1)" in card and "no gold in output" in card and "920 ms" in card
    error = viz.answer_card_html(None, "RAG", viz.RAG_COLOR, error=f"bad {SCRIPT}")
    assert "<script>" not in error
    assert "<script>" not in viz.message_html(f"run `make` {SCRIPT}")
    assert "<code>make</code>" in viz.message_html("`make`")
    # Without attention the plain passage is shown, escaped.
    plain = viz.documents_html(Answer("rag", "q", "a", [RetrievedDoc("x", "T<", f"body {SCRIPT}", 0.5)]))
    assert "<script>" not in plain and "T&lt;" in plain


def test_documents_html_rag_uses_inferred_spans():
    html_out = viz.documents_html(rag_answer(), gold_doc_id="d2")
    assert html_out.count("ur-doc-head") == 3 and "café" in html_out and "ur-sent" in html_out


# --------------------------------------------------------------------------------------------- corpus tree


def test_corpus_tree_sunburst(tree):
    fig = viz.corpus_tree_figure(tree)
    sun = fig.data[0]
    assert sun.type == "sunburst" and sun.branchvalues == "total"
    ids = list(sun.ids)
    values = dict(zip(ids, sun.values, strict=True))
    parents = dict(zip(ids, sun.parents, strict=True))
    assert values["root"] == len(DOCIDS) and values["c:0"] == 3 and values["d:1-0"] == 1
    assert parents["c:0-0"] == "c:0" and parents["d:0-0-1"] == "c:0-0"
    for node, value in values.items():  # "total": each parent's value is the sum of its children
        kids = [values[k] for k, p in parents.items() if p == node]
        if kids:
            assert sum(kids) == value
    assert any("paris, tower, seine" in h for h in sun.hovertext)
    assert not sun.marker.colors  # colours come from the colorway, one per top-level cluster
    lit = viz.corpus_tree_figure(tree, highlight=(0, 0, 1)).data[0]
    lit_ids = [i for i, c in zip(lit.ids, lit.marker.colors, strict=True) if c == viz.HIGHLIGHT_COLOR]
    assert lit_ids == ["c:0", "c:0-0", "d:0-0-1"]
    # unmistakable: the path is outlined, everything else is pale; the document is within the visible rings
    outlined = [i for i, w in zip(lit.ids, lit.marker.line.width, strict=True) if w > 1]
    assert outlined == lit_ids and all(c.startswith("rgba") or c == "#f1f5f9" for i, c in
                                       zip(lit.ids, lit.marker.colors, strict=True) if i not in lit_ids)
    assert any(lb.startswith("★") for lb in lit.labels)
    assert lit.level == "c:0" and lit.maxdepth == 3  # centre c:0, then c:0-0, then the document
    deep = viz.corpus_tree_figure(tree, max_depth=2, highlight=(0, 0, 1)).data[0]
    assert deep.level == "c:0-0"  # opened at the path so the document (depth 3) is in view within 2 rings


def test_cluster_browser(tree):
    choices = viz.cluster_choices(tree)
    assert choices[0][1] == "" and ("0-0" in [v for _, v in choices])
    assert viz.parse_prefix("0-1") == (0, 1) and viz.parse_prefix("root") == () and viz.parse_prefix(" 2 0 ") == (2, 0)
    with pytest.raises(ValueError):
        viz.parse_prefix("zero")
    texts = {d: (f"Title {i}", f"text {SCRIPT}") for i, d in enumerate(DOC_IDS)}
    out = viz.cluster_docs_html(tree, (0,), texts)
    assert out.count("<tr>") == 4 and "<script>" not in out and "Sub-clusters" in out  # header + 3 docs
    assert "No cluster" in viz.cluster_docs_html(tree, (7,), texts)


# --------------------------------------------------------------------------------------------- evaluation


def test_eval_rows_and_figure():
    rows = [{"run": "joint, 1 doc", "n": 10, "accuracy": 0.3, "em": 0.1, "f1": 0.2, "recall@1": 0.5,
             "recall@3": None, "context": 120.4, "latency_ms": 900.0, "p": 0.054, "recommended": True},
            {"run": "RAG top-5", "n": 10, "accuracy": 0.4, "em": 0.2, "f1": 0.3, "recall@1": None,
             "recall@3": 0.9, "context": 600.0, "latency_ms": None, "p": None}]
    table = viz.eval_rows(rows)
    assert len(table) == 2 and all(len(r) == len(viz.EVAL_HEADERS) for r in table)
    assert table[0][0] == "joint, 1 doc (recommended)" and table[0][6] == "" and table[1][8] == ""
    assert viz.EVAL_HEADERS[2:5] == ["EM", "F1", "accuracy"] and table[0][2:5] == [0.1, 0.2, 0.3]
    assert table[0][9] == "0.054" and viz.eval_rows([dict(rows[0], p=1e-5)])[0][9] == "1e-05"
    fig = viz.eval_figure(rows, "nq/dev, 4bit")
    # Two traces (F1, R@1), one bar each a run, in the table's order (None drawn as 0, "n/a").
    assert [t.name for t in fig.data] == ["F1", "recall@1"]
    assert list(fig.data[0].x) == [0.2, 0.3] and list(fig.data[1].x) == [0.5, 0] and fig.data[1].text[1] == "n/a"
    assert list(fig.data[0].y) == ["joint, 1 doc", "RAG top-5"]
    # The height follows the number of runs, capped.
    many = [dict(rows[1], run=f"run {i}") for i in range(80)]
    assert fig.layout.height < viz.eval_figure(many).layout.height == viz.EVAL_MAX_HEIGHT
    assert not viz.eval_figure([]).data


# --------------------------------------------------------------------------------------------- non-Latin text

NON_LATIN = ["Кто написал «Войну и мир»?", "東京タワーの高さは？", "Is 🎸 a guitar? Ελληνικά"]


def byte_tokens(text: str, every: int = 3) -> list[str]:
    """SmolLM2-style byte-level token strings: the UTF-8 bytes cut every `every` bytes (mid-character on purpose)
    and mapped through GPT-2's byte table, as `convert_ids_to_tokens` gives them."""
    table = viz._bytes_to_unicode()
    raw = text.encode("utf-8")
    return ["".join(table[b] for b in raw[i : i + every]) for i in range(0, len(raw), every)]


@pytest.mark.parametrize("text", NON_LATIN)
def test_byte_level_tokens_merge_into_whole_characters(text):
    tokens = byte_tokens(text)
    assert viz.is_byte_level(tokens)
    assert "".join(viz.clean_tokens(tokens)) == text
    groups = viz.token_groups(tokens)
    assert "".join(g[2] for g in groups) == text and all("\ufffd" not in g[2] for g in groups)
    assert [g[0] for g in groups][0] == 0 and groups[-1][1] == len(tokens)
    # Highlighting: a character split over tokens is one span weighing the sum of its pieces.
    weights = [1.0 / len(tokens)] * len(tokens)
    shaded = viz.highlight_tokens_html(tokens, weights)
    assert "\ufffd" not in shaded and len(re.findall("<span", shaded)) == len(groups)
    question = viz.question_html(Answer("joint", text, "x", trace=Trace(
        retrieval_attention=TokenWeights(tokens, weights))))
    assert "\ufffd" not in question


def test_non_latin_documents_and_heatmaps_have_no_replacement_character():
    title = "東京タワー"
    passages = [f"{title}: 東京タワーは333メートルです。", "Москва — столица России. 🎸"]
    context = byte_tokens(passages[0]) + ["Ċ"] + byte_tokens(passages[1], every=2)
    answer_tokens = byte_tokens("333メートル🎸", every=2)
    weights = [[(j % 7) / 10 for j in range(len(context))] for _ in answer_tokens]
    docs = [RetrievedDoc("j", title, passages[0], 0.9), RetrievedDoc("r", "Москва", passages[1], 0.8)]
    answer = Answer("rag", "高さは？", "333メートル", docs, trace=Trace(answer_attention=AnswerAttention(
        answer_tokens, context, weights)))
    out = viz.documents_html(answer)
    assert "\ufffd" not in out and "東京タワー" in re.sub(r"<[^>]+>", "", out) and "ur-tok" in out
    for long in (False, True):
        fig = viz.attention_heatmap(answer, max_tokens=10 if long else 1000)
        dumped = fig.to_json()
        assert "\\ufffd" not in dumped.lower() and "\ufffd" not in dumped
        heat = fig.data[0]
        assert len(heat.z) == len(viz.token_groups(answer_tokens))  # one row per whole answer character
    # The raw fallback of the joint side: token strings that do not decode alone become raw byte-level strings.
    from unirag.joint.prompts import token_strings

    class ByteTokenizer:
        def __init__(self, tokens):
            self.tokens = tokens

        def decode(self, ids):
            raw = bytes(viz._BYTE_DECODER[ch] for i in ids for ch in self.tokens[i])
            return raw.decode("utf-8", errors="replace")

        def convert_ids_to_tokens(self, i):
            return self.tokens[i]

    tokens = byte_tokens("Привет 🎸")
    strings = token_strings(ByteTokenizer(tokens), list(range(len(tokens))))
    assert strings == tokens and "".join(viz.clean_tokens(strings)) == "Привет 🎸"
    ascii_tokens = byte_tokens("plain words")
    assert token_strings(ByteTokenizer(ascii_tokens), list(range(len(ascii_tokens)))) == ["pla", "in ", "wor", "ds"]


# --------------------------------------------------------------------------------------------- answers users can trust


@pytest.mark.parametrize(("raw", "shown"), [
    ("The Ramones", "The Ramones"),
    ("A: The Ramones\nQ: who else", "The Ramones"),
    ("  answer: 1889 ", "1889"),
    ("Q: who sang i wanna be sedated? A: The Ramones", "The Ramones"),
    ("Q: who sang i wanna be sedated?\nThe Ramones", "The Ramones"),
    ("Q: who sang i wanna be sedated?", ""),
    ("", ""),
    ("True", "True"),
    ("Q: Who sang  I wanna be sedated? The Ramones", "The Ramones"),
])
def test_display_answer(raw, shown):
    from unirag.answer import display_answer

    assert display_answer(raw, "who sang i wanna be sedated") == shown


def test_card_marks_exact_f1_and_contains_separately():
    from unirag.data import Question
    from unirag.pipeline import mark_gold

    gold = Question("q", "who sang i wanna be sedated", ["the Ramones"], "d1")
    junk = mark_gold(Answer("rag", gold.question, "Q: who sang i wanna be sedated? The Ramones were a band, True"),
                     gold)
    assert junk.correct is True and junk.exact is False and junk.f1 < 0.5  # a substring inside junk is not "correct"
    card = viz.answer_card_html(junk.answer, "RAG", viz.RAG_COLOR, correct=junk.correct, gold_answers=gold.answers,
                                exact=junk.exact, f1=junk.f1)
    assert "✓" not in card.split("ur-badges")[1] and "contains gold" in card and "✗ not the answer" in card
    assert card.split('class="ur-answer">')[1].startswith("The Ramones were a band, True<")  # no echoed "Q: …"
    assert 'title="' in card and "Weaker" in card  # each mark says what it means
    exact = mark_gold(Answer("joint", gold.question, "A: Ramones"), gold)
    assert exact.exact and exact.f1 == 1.0 and exact.correct
    card = viz.answer_card_html(exact.answer, "Joint", viz.JOINT_COLOR, correct=exact.correct,
                                gold_answers=gold.answers, exact=exact.exact, f1=exact.f1)
    assert "✓ exact" in card and ">Ramones<" in card and "contains gold" in card
    near = mark_gold(Answer("joint", gold.question, "Ramones band"), gold)
    assert not near.exact and 0.5 <= near.f1 < 1
    assert "≈ F1 0.67" in viz.answer_card_html(near.answer, "J", viz.JOINT_COLOR, correct=near.correct,
                                               gold_answers=gold.answers, exact=near.exact, f1=near.f1)
    echo = viz.answer_card_html(Answer("rag", "q", "Q: q"), "RAG", viz.RAG_COLOR)
    assert "only echoes the prompt" in echo
