"""What users of RAG explorers ask for: re-ask without (or with) a document, citations, attention per document,
latency per stage, and a per-question comparison of two evaluation runs. Fast: tiny offline models (test_app's)."""

from __future__ import annotations

import csv
import html
import json

import pytest
from test_app import pipeline, tiny  # noqa: F401  (module fixtures: tiny corpus, tiny Llama, joint checkpoint)

QUESTION = "When was the Eiffel Tower completed?"
SETTINGS = {"beam_width": 4, "k_docs": 2, "rag_k": 3, "max_new_tokens": 4}


# --------------------------------------------------------------------------------------------- 1. re-ask


def test_reask_without_the_top_document(pipeline):  # noqa: F811
    first = pipeline.ask("nq", QUESTION, **SETTINGS)
    joint_ids, rag_ids = first.joint.answer.doc_ids, first.rag.answer.doc_ids
    top = joint_ids[0]
    again = pipeline.reask("nq", QUESTION, first.settings, joint_docs=[d for d in joint_ids if d != top],
                           rag_docs=[d for d in rag_ids if d != top], note=f"re-read without {top}")
    joint, rag = again.joint.answer, again.rag.answer
    assert joint.doc_ids == joint_ids[1:] and top not in rag.doc_ids
    assert joint.notices[0] == f"re-read without {top}" and rag.notices[0] == f"re-read without {top}"
    # The answer was read from the remaining document only: one passage span in its context.
    assert len(joint.trace.answer_attention.doc_spans) == 1
    assert joint.timings_ms["retrieve"] == 0.0 and "generate" in joint.timings_ms
    assert again.gold is not None and again.joint.gold_found == ("d00" in joint.doc_ids)


def test_reask_with_a_forced_document(pipeline):  # noqa: F811
    forced = pipeline.find_document("nq", "jupiter")  # a title, case-insensitive
    assert forced == "d15" and pipeline.find_document("nq", "d15") == "d15"
    again = pipeline.reask("nq", QUESTION, joint_docs=[forced], rag_docs=[(forced, 0.5), "d00"], **SETTINGS)
    assert again.joint.answer.doc_ids == [forced] and again.rag.answer.doc_ids == [forced, "d00"]
    assert again.rag.answer.docs[0].score == 0.5
    # A passage given without a score gets its cosine similarity, as if the dense retriever had found it.
    cosine = dict(pipeline.bundle("nq").rag.retriever.search(QUESTION, 24))["d00"]
    assert again.rag.answer.docs[1].score == pytest.approx(cosine, abs=1e-5)
    assert again.rag.answer.context_tokens > 0 and "Jupiter" in again.rag.answer.docs[0].text
    assert again.joint.answer.docs[0].docid == tuple(pipeline.bundle("nq").tree.docid_of(forced))


def test_reask_unknown_document_is_a_clear_error(pipeline):  # noqa: F811
    from unirag.errors import UniragError

    with pytest.raises(UniragError, match="d99"):
        pipeline.reask("nq", QUESTION, joint_docs=["d99"], rag_docs=[], **SETTINGS)
    with pytest.raises(UniragError, match="No document"):
        pipeline.find_document("nq", "Atlantis")
    with pytest.raises(UniragError, match="titles contain"):
        pipeline.find_document("nq", "t")  # many titles contain a "t"


# --------------------------------------------------------------------------------------------- 2. baselines


def test_the_baseline_choice_reaches_the_right_hand_side(pipeline):  # noqa: F811
    import app
    from unirag.errors import UniragError

    bundle = pipeline.bundle("nq")
    for name in ("bm25", "hybrid"):
        result = pipeline.ask("nq", QUESTION, baseline=name, **SETTINGS)
        assert result.baseline == name and result.rag.error is None, result.rag.error
        assert result.rag.answer.system == name and len(result.rag.answer.docs) == 3
        assert result.joint.answer is not None  # the joint side answers as ever
    bm25 = pipeline.ask("nq", QUESTION, baseline="bm25", **SETTINGS).rag.answer
    assert bm25.doc_ids == [d for d, _ in bundle.baselines["bm25"].retriever.search(QUESTION, 3)]
    assert bm25.doc_ids[0] == "d00"  # "Eiffel Tower" and "completed" are in that passage only
    # rag-selfcheck re-ranks with the joint model already loaded (no second LLM) and its settings.
    selfcheck = bundle.baselines["rag-selfcheck"]
    assert selfcheck.joint is bundle.joint and selfcheck.retriever is bundle.rag.retriever
    checked = pipeline.ask("nq", QUESTION, baseline="rag-selfcheck", self_check=3, **SETTINGS)
    answer = checked.rag.answer
    assert answer.system == "rag-selfcheck" and len(answer.trace.self_check) == 3 and len(answer.docs) == 2
    assert answer.ranked_doc_ids == [row.doc_id for row in answer.trace.self_check]
    assert checked.baseline_title == "Dense + self-check · top-2 of 3"
    off = pipeline.ask("nq", QUESTION, baseline="rag-selfcheck", self_check=0, **SETTINGS)
    assert "self_check 0" in off.rag.error and off.joint.answer is not None  # reported on its card
    again = pipeline.reask("nq", QUESTION, checked.settings, rag_docs=["d15"], baseline="rag-selfcheck")
    assert again.baseline == "rag-selfcheck" and again.rag.answer.doc_ids == ["d15"]
    with pytest.raises(UniragError, match="Unknown baseline"):
        pipeline.ask("nq", QUESTION, baseline="splade")
    # The page: the dropdown's value goes through `app.ask`, and the card names the baseline.
    outputs = app.ask(pipeline, "nq", QUESTION, SETTINGS, "bm25")
    assert "BM25 · top-3" in outputs[6] and outputs[-1].baseline == "bm25"
    assert "by BM25" in outputs[7].layout.title.text  # the score bars name the baseline's score
    assert "Dense RAG · top-3" in app.ask(pipeline, "nq", QUESTION, SETTINGS)[6]
    redo = app.reask(pipeline, outputs[-1], remove=outputs[-1].rag.answer.doc_ids[0])
    assert redo[-2].baseline == "bm25" and redo[-2].rag.answer.system == "bm25"


def test_the_evidence_baseline_shows_its_evidence_in_its_document(pipeline):  # noqa: F811
    import app

    bundle = pipeline.bundle("nq")
    assert bundle.baselines["evidence"].joint is bundle.joint  # the joint model's base LLM writes it: no second LLM
    result = pipeline.ask("nq", QUESTION, baseline="evidence", evidence_docs=2, evidence_tokens=8, **SETTINGS)
    answer = result.rag.answer
    assert result.rag.error is None and answer.system == "evidence" and len(answer.docs) == 2
    evidence = answer.trace.evidence
    source = bundle.corpus[evidence.doc_id].text
    assert evidence.text == source[evidence.start:evidence.end] and evidence.doc_id in answer.doc_ids
    assert result.baseline_title == "Evidence (RetroLLM-style) · from top-2"
    # The page: its card marks the evidence inside its document and gives the docid path.
    outputs = app.ask(pipeline, "nq", QUESTION, SETTINGS, "evidence")
    card = outputs[6]
    shown = outputs[-1].rag.answer.trace.evidence
    assert f'<mark class="ur-evidence-mark">{html.escape(shown.text)}</mark>' in card and "docid path" in card
    assert "Evidence (RetroLLM-style)" in card and "<mark" not in outputs[1]  # the joint card has none
    explained = app.explain(outputs[-1])  # Explain the answers: no answer attention on the evidence side, no error
    assert "evidence" in str(explained[4].to_dict())  # its latency figure has the evidence stage
    # What if? without the evidence's document: the evidence is written from the others, no new search.
    redo = app.reask(pipeline, outputs[-1], remove=shown.doc_id)
    again = redo[-2].rag.answer
    assert again.system == "evidence" and shown.doc_id not in again.doc_ids
    assert again.trace.evidence is None or again.trace.evidence.doc_id != shown.doc_id


# --------------------------------------------------------------------------------------------- 5. run comparison


def _records(rights: list[int], answers: list[str]) -> list[dict]:
    return [{"id": f"q{i}", "question": f"question {i}", "gold_answers": ["x", "y"], "text": text, "accuracy": right}
            for i, (right, text) in enumerate(zip(rights, answers, strict=True))]


A = _records([1, 1, 0, 0, 1], ["a0", "a1", "a2", "a3", "a4"])
B = list(reversed(_records([1, 0, 1, 0, 0], ["b0", "b1", "b2", "b3", "b4"])))  # another order: matched by id


def test_compare_records_per_question(tmp_path):
    from unirag.errors import UniragError
    from unirag.eval import compare_records, outcome_counts, paired_comparison, write_comparison

    rows = compare_records(A, B)
    assert [r["id"] for r in rows] == ["q0", "q1", "q2", "q3", "q4"]
    assert [r["outcome"] for r in rows] == ["both", "only A", "only B", "neither", "only A"]
    assert rows[1] == {"id": "q1", "question": "question 1", "gold": "x; y", "answer_a": "a1", "answer_b": "b1",
                       "right_a": True, "right_b": False, "outcome": "only A"}
    counts = outcome_counts(rows)
    paired = paired_comparison(A, B)
    assert counts == {"both": 1, "only A": 2, "only B": 1, "neither": 1}
    assert (counts["only A"], counts["only B"]) == (paired["only_a"], paired["only_b"])
    with open(write_comparison(rows, tmp_path / "c.csv"), newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 5 and table[2]["outcome"] == "only B" and table[2]["answer_b"] == "b2"
    blob = json.loads(write_comparison(rows, tmp_path / "c.json").read_text())
    assert blob["counts"] == counts and blob["questions"] == rows
    with pytest.raises(UniragError, match="different questions"):
        compare_records(A, B[1:])


def test_cli_compare_per_question(tmp_path, capsys):
    from unirag.cli import main

    for name, records in (("a.json", A), ("b.json", B)):
        (tmp_path / name).write_text(json.dumps({"summary": {}, "records": records}))
    out = tmp_path / "per.csv"
    assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--per-question", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["only_a"], result["only_b"], result["per_question"]) == (2, 1, str(out))
    assert out.read_text().splitlines()[0] == "id,question,gold,answer_a,answer_b,right_a,right_b,outcome"
    # Writing over one of the runs is refused before anything is read.
    assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--per-question",
                 str(tmp_path / "a.json")]) == 2
    assert "would overwrite" in capsys.readouterr().err


def test_compare_runs_callback(tmp_path):
    import app
    from unirag.errors import UniragError

    paths = []
    for name, records in (("a.json", A), ("b.json", B)):
        (tmp_path / name).write_text(json.dumps({"summary": {}, "records": records}))
        paths.append(str(tmp_path / name))
    note, table, files = app.compare_runs(*paths)
    assert "only A <b>2</b>" in note and "only B <b>1</b>" in note and "p =" in note
    assert list(table["outcome"]) == ["both", "only A", "only B", "neither", "only A"]
    assert [f.rsplit(".", 1)[1] for f in files] == ["csv", "json"]
    assert json.loads(open(files[1]).read())["counts"]["neither"] == 1
    # User errors are UniragErrors (what `_guard` shows on the page).
    with pytest.raises(UniragError, match="Upload two"):
        app.compare_runs(paths[0], None)
    (tmp_path / "summary.json").write_text(json.dumps({"accuracy": 0.5}))
    with pytest.raises(UniragError, match="no per-question records"):
        app.compare_runs(paths[0], str(tmp_path / "summary.json"))


# --------------------------------------------------------------------------------------------- 2-4. explain


def _answer(system: str, weights, spans, timings):
    from unirag.answer import Answer, AnswerAttention, RetrievedDoc, Trace

    docs = [RetrievedDoc(f"d{i}", f"Title {i}", "text", 0.5) for i in range(len(spans))]
    n = max(b for _, b in spans)
    attention = AnswerAttention(["Ġan", "Ġanswer"][: len(weights)], [f"Ġt{i}" for i in range(n)], weights, spans)
    return Answer(system, "q?", "an answer", docs, timings_ms=timings, trace=Trace(answer_attention=attention))


def test_document_attention_citation_latency_and_token_view():
    from unirag import viz

    joint = _answer("joint", [[0.1, 0.1, 0.6, 0.2], [0.0, 0.2, 0.7, 0.1]], [[0, 2], [2, 4]],
                    {"retrieve": 30.0, "self_check": 20.0, "generate": 50.0})
    assert viz.document_attention(joint) == pytest.approx([0.2, 0.8])
    assert viz.citation(joint) == 1
    cite = viz.citations_html(joint)
    assert 'href="#ur-doc-joint-2"' in cite and "[2]" in cite and "Title 1" in cite
    assert 'id="ur-doc-joint-2"' in viz.documents_html(joint)  # the card the citation links to
    assert viz.citations_html(_answer("rag", [], [[0, 1]], {})) == ""  # no trace: no citation
    rag = _answer("rag", [[0.5, 0.5]], [[0, 1], [1, 2]], {"retrieve": 5.0, "generate": 40.0})
    fig = viz.document_attention_figure({"joint": joint, "rag": rag})
    assert [t.meta["side"] for t in fig.data] == ["joint", "rag"] and list(fig.data[0].x) == pytest.approx([0.2, 0.8])
    fig = viz.latency_figure({"joint": joint, "rag": rag})
    assert [t.meta["stage"] for t in fig.data] == ["retrieve", "self_check", "generate"]
    assert list(fig.data[1].x) == [20.0, 0.0] and fig.layout.barmode == "stack"
    assert viz.latency_figure({"joint": None, "rag": None}).layout.annotations  # the empty message
    choices = viz.answer_token_choices({"joint": joint, "rag": rag})
    assert [v for _, v in choices] == ["joint:0", "joint:1", "rag:0"] and choices[1][0].endswith("answer")
    view = viz.token_attention_html({"joint": joint, "rag": rag}, "joint:1")
    assert "answer token 2" in view and 'title="0.700"' in view
    assert "No attention row" in viz.token_attention_html({"joint": joint}, "joint:7")


def test_explain_and_reask_callbacks(pipeline):  # noqa: F811
    import app
    from unirag.errors import UniragError

    out = app.ask(pipeline, "nq", QUESTION, SETTINGS)
    comparison = out[-1]
    assert len(out) == 13 and comparison.joint.answer is not None
    docs, joint_cite, rag_cite, attn_fig, latency_fig, tokens, token_view = app.explain(comparison)
    joint_ids = comparison.joint.answer.doc_ids
    assert [v for _, v in docs.choices][: len(joint_ids)] == joint_ids and docs.value == joint_ids[0]
    index = app.viz.citation(comparison.joint.answer)
    assert f'href="#ur-doc-joint-{index + 1}"' in joint_cite and f'id="ur-doc-joint-{index + 1}"' in out[4]
    assert {t.meta["side"] for t in attn_fig.data} == {"joint", "rag"}
    assert {t.meta["stage"] for t in latency_fig.data} >= {"retrieve", "generate"}
    assert tokens.value == "joint:0" and "answer token 1" in token_view
    assert "answer token 1" in app.pick_token(comparison, [v for _, v in tokens.choices if v.startswith("rag")][0])
    assert app.explain(None)[0].choices == []

    top = joint_ids[0]
    again = app.reask(pipeline, comparison, remove=top)
    assert len(again) == 14 and "Re-read without" in again[-1] and top in again[-1]
    new = again[-2]
    assert new.joint.answer.doc_ids == joint_ids[1:] and top not in new.rag.answer.doc_ids
    assert isinstance(again[2], dict) and again[2].get("__type__") == "update"  # path and beams kept (gr.skip)
    assert "re-read without" in again[1]  # the note is on the re-read card
    forced = app.reask(pipeline, new, force="Jupiter")[-2]
    assert forced.joint.answer.doc_ids[0] == "d15" and forced.rag.answer.doc_ids[0] == "d15"
    with pytest.raises(UniragError, match="Ask a question first"):
        app.reask(pipeline, None, remove="d00")
    with pytest.raises(UniragError, match="No document"):
        app.reask(pipeline, comparison, force="Atlantis")


def test_build_demo_wires_the_features(pipeline):  # noqa: F811
    import app

    demo = app.build_demo(pipeline)
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    assert {"ur-reask-doc", "ur-joint-cite", "ur-rag-cite", "ur-doc-attention", "ur-latency", "ur-token-pick",
            "ur-run-a", "ur-run-b"} <= ids
    assert len([d for d in demo.fns.values() if getattr(d, "api_name", None) == "ask"]) == 1


# --------------------------------------------------------------------------------------------- slow: in a browser


@pytest.mark.slow
def test_features_in_a_browser(pipeline, tmp_path):  # noqa: F811
    """The tiny pipeline served in-process, driven by Debian's chromium: citation link, explain panel, re-ask without
    and with a document, and the two-run comparison upload."""
    from test_browser import ARGS, CHROMIUM, _missing

    from benchmarks.app_performance import free_port

    reason = _missing()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    import app

    demo = app.build_demo(pipeline)
    demo.queue()
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, css=app.CSS)
    for name, records in (("a.json", A), ("b.json", B)):
        (tmp_path / name).write_text(json.dumps({"summary": {}, "records": records}))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#ur-question textarea, #ur-question input").first.fill(QUESTION)
            page.locator("#ur-ask").click()
            page.wait_for_selector("#ur-joint-cite a", timeout=120_000)
            href = page.get_attribute("#ur-joint-cite a", "href")
            assert href.startswith("#ur-doc-joint-") and page.locator(href).count() == 1
            page.wait_for_selector("#ur-latency .trace", timeout=30_000)
            assert "answer token 1" in page.inner_text("#ur-token-view")
            page.locator("#ur-reask button").first.click()  # open the accordion
            page.locator("#ur-reask-without").click()
            page.wait_for_function("() => document.querySelector('#ur-reask-note').innerText.includes('Re-read')",
                                   timeout=120_000)
            assert "re-read without" in page.inner_text("#ur-joint-answer")
            page.locator("#ur-reask-force textarea, #ur-reask-force input").first.fill("Jupiter")
            page.locator("#ur-reask-with").click()
            page.wait_for_function("() => document.querySelector('#ur-reask-note').innerText.includes('d15 added')",
                                   timeout=120_000)
            assert "Jupiter" in page.inner_text("#ur-joint-docs")
            page.get_by_role("tab", name="Evaluation").click()
            page.locator("#ur-run-compare button").first.click()
            page.locator("#ur-run-a input[type=file]").set_input_files(str(tmp_path / "a.json"))
            page.locator("#ur-run-b input[type=file]").set_input_files(str(tmp_path / "b.json"))
            page.wait_for_timeout(1500)  # the uploads finish
            page.get_by_role("button", name="Compare", exact=True).click()
            page.wait_for_function("() => document.querySelector('#ur-run-compare').innerText.includes('only A')",
                                   timeout=60_000)
            assert errors == []
            browser.close()
    finally:
        demo.close()


def test_the_right_side_starts_on_the_stores_best_baseline_row():
    """The page's default baseline and its k come from the results store: the best F1 among the base-reader
    baselines measured on this corpus (fingerprint) and precision, on the largest question set they share."""
    from unirag.pipeline import best_baseline

    def row(system, k, f1, n=266, precision="4bit", fingerprint="fp", **settings):
        return {"run": f"{system} top-{k}", "system": system, "precision": precision, "split": "dev", "n": n,
                "settings": {"rag_k": k, "corpus_fingerprint": fingerprint, **settings},
                "metrics": {"f1": f1, "accuracy": 0.3}}

    rows = [row("rag", 5, 0.10), row("rag", 1, 0.13), row("bm25", 1, 0.11),
            row("hybrid", 1, 0.50, n=100),  # a smaller question set: not compared with the others
            row("bm25", 3, 0.90, precision="fp32"), row("bm25", 2, 0.95, fingerprint="other corpus"),
            row("bm25", 4, 0.99, superseded=True), row("joint", 1, 0.99)]
    assert best_baseline(rows, "4bit", "fp") == {"system": "rag", "rag_k": 1, "split": "dev", "f1": 0.13,
                                                 "run": "rag top-1"}
    assert best_baseline(rows, "fp32", "fp")["system"] == "bm25"
    assert best_baseline(rows, "nf4", "fp") is None  # nothing measured: the page keeps dense RAG
