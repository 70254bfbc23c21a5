"""UniRAG Explorer: the joint "retrieval as reasoning" model next to vanilla dense RAG, in one page.

    python app.py [--host 127.0.0.1] [--port 7860] [--precision 4bit|nf4|fp32]
                  [--checkpoint-dir checkpoints]

UI only: loading and answering live in `unirag.pipeline`, figures and HTML in `unirag.viz`.
Environment (for Hugging Face Spaces): UNIRAG_HOST, UNIRAG_PORT, UNIRAG_LLM, UNIRAG_ENCODER, UNIRAG_PRECISION,
UNIRAG_CHECKPOINT_DIR, UNIRAG_DATA, UNIRAG_CONCURRENCY, UNIRAG_THREADS.
"""

from __future__ import annotations

import argparse
import functools
import html
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from unirag.data import MAX_QUESTION_CHARS
from unirag.settings import JOINT_READERS, LIMITS, PRECISIONS, InferenceSettings, RecommendedSettings

try:
    import gradio as gr
    import pandas as pd

    from unirag import results as results_store
    from unirag import studies as studies_store
    from unirag import viz
    from unirag.errors import UniragError
    from unirag.pipeline import (
        BASELINE_SCORES,
        BASELINES,
        CORPUS_LABELS,
        AppConfig,
        Comparison,
        Pipeline,
    )
except ImportError as _exc:  # no page without gradio: say what to install instead of a traceback
    sys.exit(f"error: the package `{_exc.name}` is not installed. Run `make app` (or "
             "`pip install -r requirements.txt`), then `python app.py` again.")

log = logging.getLogger("unirag.app")

TITLE = "UniRAG Explorer"
INTRO = (
    "One LLM **retrieves by generating a document id** — a path down a k-means cluster tree of the corpus — "
    "and then answers from the documents it picked (left). The same LLM with a vanilla dense retriever "
    "(DPR-style bi-encoder, top-k by cosine similarity) answers on the right."
)
ASK_LABEL, LOADING_LABEL = "Ask both systems", "Loading the model…"
READER_LABELS = {"trained": "its stage-2 reader (LoRA + bridge: terse answers)",
                 "base": "the base LLM (the RAG side's reader)"}
JOINT_READER_CHOICES = [(READER_LABELS[reader], reader) for reader in JOINT_READERS]
CSS = """
.gradio-container {max-width: 1500px !important}
#ur-header h1 {margin-bottom: 0}
.ur-banner {display:flex; flex-wrap:wrap; gap:.4rem .9rem; font-size:.88rem; align-items:center}
.ur-pill {background:#f1f5f9; border-radius:999px; padding:.15rem .6rem; border:1px solid #e2e8f0}
.ur-pill b {color:#5b21b6}
.ur-msg {border-radius:8px; padding:.55rem .8rem; margin:.35rem 0; font-size:.9rem}
.ur-msg code {background:rgba(0,0,0,.06); padding:0 .25rem; border-radius:4px}
.ur-msg-warn {background:#fffbeb; border:1px solid #f59e0b; color:#78350f}
.ur-msg-info {background:#eff6ff; border:1px solid #93c5fd; color:#1e3a8a}
.ur-msg-error {background:#fef2f2; border:1px solid #f87171; color:#7f1d1d}
.ur-col-title {font-weight:700; font-size:1.15rem; padding:.2rem 0 .1rem}
.ur-col-joint .ur-col-title {color:#6d28d9}
.ur-col-rag .ur-col-title {color:#0369a1}
.ur-col-help {font-size:.84rem; color:#475569; margin-bottom:.2rem}
.ur-card {border:1px solid #e2e8f0; border-top:4px solid #94a3b8; border-radius:10px; padding:.7rem .9rem;
          background:white}
.ur-card-title {font-size:.8rem; text-transform:uppercase; letter-spacing:.05em; font-weight:700}
.ur-answer {font-size:1.35rem; font-weight:600; margin:.2rem 0 .35rem; color:#0f172a}
.ur-badges {display:flex; flex-wrap:wrap; gap:.35rem; align-items:center; margin-bottom:.3rem}
.ur-badge {border-radius:999px; padding:.1rem .55rem; font-size:.8rem; font-weight:600}
.ur-ok {background:#dcfce7; color:#166534}
.ur-bad {background:#fee2e2; color:#991b1b}
.ur-gold {background:#dcfce7; color:#166534}
.ur-near {background:#fef9c3; color:#854d0e}
.ur-weak {background:transparent; color:#475569; border:1px dashed #94a3b8; font-weight:500}
.ur-stats {display:flex; flex-wrap:wrap; gap:.3rem .9rem; font-size:.82rem; color:#334155}
.ur-muted {color:#64748b; font-size:.85em}
.ur-notice {font-size:.8rem; color:#92400e}
.ur-error {color:#991b1b; font-size:.92rem; white-space:pre-wrap}
.ur-card-error {border-top-color:#f87171}
.ur-cursor {color:#94a3b8; animation:ur-blink 1s steps(2) infinite}
@keyframes ur-blink {50% {opacity:0}}
.ur-question {padding:.45rem .6rem; background:#faf5ff; border-radius:8px; margin-bottom:.5rem; line-height:1.9}
.ur-top {font-weight:700; text-decoration:underline}
.ur-doc {border:1px solid #e2e8f0; border-radius:8px; padding:.5rem .7rem; margin:.4rem 0; background:white}
.ur-doc-gold {border-color:#16a34a; box-shadow:0 0 0 1px #16a34a inset}
.ur-doc-head {margin-bottom:.25rem}
.ur-rank {color:#64748b; font-weight:700}
.ur-docid {font-family:ui-monospace,monospace; font-size:.78rem; background:#ede9fe; color:#5b21b6;
           border-radius:4px; padding:0 .3rem}
.ur-doc-body {font-size:.86rem; line-height:1.55; max-height:15rem; overflow-y:auto; color:#1e293b}
.ur-sent {border-radius:3px}
.ur-tok {font-weight:700; text-decoration:underline; text-decoration-color:#7c3aed; text-decoration-thickness:2px}
.ur-legend {margin:.2rem 0 .3rem}
.ur-gold-info {font-size:.88rem; padding:.35rem .6rem; background:#f0fdf4; border:1px solid #bbf7d0;
               border-radius:8px}
.ur-table {border-collapse:collapse; width:100%; font-size:.84rem}
.ur-table td, .ur-table th {border-bottom:1px solid #e2e8f0; padding:.25rem .4rem; text-align:left;
                            vertical-align:top}
.ur-sub {columns:2; font-size:.85rem; margin:.2rem 0 .6rem}
.ur-empty {color:#64748b; font-style:italic; padding:.4rem}
.ur-counter {font-size:.78rem; color:#64748b; text-align:right; margin-top:-.3rem}
.ur-counter-full {color:#b45309; font-weight:600}
.ur-beam-help {font-size:.78rem; margin:-.2rem 0 .4rem}
.ur-rounds {margin:.2rem 0 .5rem}
.ur-gold-doc {color:#166534; font-weight:600}
#ur-beams table, #ur-beams .virtual-row {font-size:.78rem}
#ur-beams td, #ur-beams .body-cell, #ur-beams .body-cell span {font-family:var(--font);
  font-variant-numeric:tabular-nums}
#ur-beams .cell-wrap {padding:3px 5px !important; min-height:0 !important}
#ur-beams th .cell-wrap, #ur-beams th span {white-space:nowrap !important; word-break:normal !important}
#ur-beams .cell-wrap, #ur-beams .cell-wrap span {word-break:normal !important; overflow-wrap:normal !important}
#ur-beams td:not(:nth-child(2)):not(:nth-child(4)) .cell-wrap,
#ur-beams .body-cell:not(:nth-child(2)):not(:nth-child(4)) span {white-space:nowrap !important}
"""


# --------------------------------------------------------------------------------------------- helpers


TOAST_SECONDS = 8  # how long a message toast stays up (an expected error is fixed by the user, not dismissed)


def _refuse(exc: Exception) -> Any:
    """UniragError (the user's input, e.g. an empty question) → one warning toast that expires, every output left as
    it was (gr.skip: no "Error" pill on each of them), no traceback in the log. Anything else → logged traceback
    + a short gr.Error that expires too (raised)."""
    if isinstance(exc, gr.Error):
        raise exc
    if isinstance(exc, UniragError):
        log.info("request refused: %s", exc)
        gr.Warning(str(exc), duration=TOAST_SECONDS)
        return gr.skip()
    log.error("request failed:\n%s", "".join(traceback.format_exception(exc)))
    raise gr.Error(f"Internal error ({type(exc).__name__}: {exc}). The server is still running.",
                   duration=TOAST_SECONDS) from None


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A handler whose errors become toasts (`_refuse`): the server survives any request."""

    @functools.wraps(fn)  # keeps the signature: the API shows the real parameter names
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - _refuse sorts them
            return _refuse(exc)

    return wrapped


def _guard_stream(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`_guard` for a generator handler (the streamed ask): the same toasts, from the first yield to the last."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            yield from fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - _refuse sorts them
            yield _refuse(exc)

    return wrapped


def banner_html(pipeline: Pipeline) -> str:
    """Precision, models and per-corpus loading state, plus page-level messages (what to run)."""
    status = pipeline.status()
    pills = [
        f'<span class="ur-pill">Precision <b>{html.escape(status["precision"])}</b></span>',
        f'<span class="ur-pill">LLM <b>{html.escape(status["llm"])}</b></span>',
        f'<span class="ur-pill">Encoder <b>{html.escape(status["encoder"])}</b></span>',
    ]
    for name, state in status["corpora"].items():
        icon = {"ready": "●"}.get(state, "◐" if state.startswith("loading") else ("⚠" if "error" in state else "○"))
        color = {"●": "#16a34a", "◐": "#d97706", "⚠": "#dc2626"}.get(icon, "#64748b")
        short = state if len(state) < 90 else state[:87] + "…"
        pills.append(f'<span class="ur-pill"><span style="color:{color}">{icon}</span> '
                     f'{html.escape(CORPUS_LABELS.get(name, name))}: '
                     f'{html.escape(short)}</span>')
    messages = "".join(viz.message_html(m, "warn") for m in status["messages"])
    loading = [(name, state) for name, state in status["corpora"].items() if state.startswith("loading")]
    if loading:  # the page is up before it can answer: say so, with the stage reached
        name, state = loading[0]
        messages = viz.message_html(f"{CORPUS_LABELS.get(name, name)}: {state[0].upper()}{state[1:]} The Ask "
                                    "button turns on once it has loaded.", "info") + messages
    return f'<div class="ur-banner">{"".join(pills)}</div>{messages}'


def _loading(pipeline: Pipeline, corpus: str | None = None) -> bool:
    """Whether a corpus (any corpus when None) is still loading: the Ask button waits for the selected one."""
    states = pipeline.status()["corpora"]
    return any(s.startswith("loading") for name, s in states.items() if corpus in (None, name))


def gold_info_html(comparison: Comparison, bundle) -> str:
    gold = comparison.gold
    if gold is None:
        return ('<div class="ur-muted">Free-form question: not in the dev split, so there is no gold passage or answer '
                'to check against. Pick an example to see the checks.</div>')
    passage = ""
    if gold.doc_id and gold.doc_id in bundle.corpus:
        passage = f" · gold passage <b>{html.escape(bundle.corpus[gold.doc_id].title)}</b> ({html.escape(gold.doc_id)})"
    answers = ", ".join(html.escape(a) for a in gold.answers[:4])
    return (f'<div class="ur-gold-info">From the {html.escape(CORPUS_LABELS[comparison.corpus])} dev split '
            f'({html.escape(gold.id)}) · gold answer <b>{answers}</b>{passage}</div>')


def render(comparison: Comparison, bundle) -> tuple:
    """The answer-dependent outputs of an ask, in the order of `ask_outputs` in `build_demo`."""
    gold_doc = comparison.gold.doc_id if comparison.gold else None
    answers = comparison.gold.answers if comparison.gold else ()
    joint, rag = comparison.joint, comparison.rag
    reader = " · base LLM reads" if comparison.settings.joint_reader == "base" else ""
    joint_card = viz.answer_card_html(joint.answer, f"Joint model · retrieval as reasoning{reader}", viz.JOINT_COLOR,
                                      joint.gold_found, joint.gold_rank, joint.correct, answers, joint.error,
                                      exact=joint.exact, f1=joint.f1)
    rag_card = viz.answer_card_html(rag.answer, comparison.baseline_title, viz.RAG_COLOR,
                                    rag.gold_found, rag.gold_rank, rag.correct, answers, rag.error,
                                    exact=rag.exact, f1=rag.f1)
    if joint.answer is not None:
        path_fig = viz.rounds_path_figure(joint.answer, bundle.tree)  # one round: the docid path figure
        beams = pd.DataFrame(viz.beam_rows(joint.answer, bundle.titles()), columns=viz.BEAM_HEADERS)
        joint_docs = (viz.rounds_html(joint.answer, answers, gold_doc) + viz.question_html(joint.answer)
                      + viz.documents_html(joint.answer, gold_doc, scores_label="score"))
        joint_docs += viz.localization_html(joint.localization, bundle.corpus[gold_doc].title
                                            if gold_doc in bundle.corpus else "")
        joint_heat = viz.attention_heatmap(joint.answer, "Joint: answer tokens × selected documents")
    else:
        short = "The joint model is not loaded (see the message above)." if bundle.joint is None else (
            "The joint model failed on this question (see its card).")
        path_fig = viz.empty_figure(short, "Retrieval path down the docid tree")
        beams = pd.DataFrame([], columns=viz.BEAM_HEADERS)
        joint_docs = ""
        joint_heat = viz.empty_figure("No joint answer.", "Joint: answer tokens × selected documents")
    if rag.answer is not None:
        scored = BASELINE_SCORES[comparison.baseline]
        bars = viz.retrieval_bars_figure(rag.answer, gold_doc, None if comparison.baseline == "rag" else (
            f"Top-k passages by {scored}" + (" (green = gold)" if gold_doc else "")))
        rag_docs = viz.documents_html(rag.answer, gold_doc, rgb=(2, 132, 199),
                                      scores_label=BASELINE_SCORES[comparison.baseline])
        rag_heat = viz.attention_heatmap(rag.answer, "RAG: answer tokens × retrieved passages", colorscale="Blues")
    else:
        bars = viz.empty_figure("The baseline failed on this question (see its card).", "Top-k passages")
        rag_docs = ""
        rag_heat = viz.empty_figure("No RAG answer.", "RAG: answer tokens × retrieved passages")
    return (gold_info_html(comparison, bundle), joint_card, path_fig, beams, joint_docs, joint_heat,
            rag_card, bars, rag_docs, rag_heat)


# --------------------------------------------------------------------------------------------- callbacks


# The page's settings controls, in one order: the ask inputs, select_corpus's outputs and `ask` all follow it.
PAGE_SETTINGS = ("beam_width", "k_docs", "rag_k", "max_new_tokens", "joint_reader", "self_check", "rounds",
                 "evidence_lookahead")


def _changes(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """The page's settings as changes to the corpus's start settings (a value left None keeps the start one)."""
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(PAGE_SETTINGS))
    if unknown:
        raise UniragError(f"Unknown setting(s) {', '.join(unknown)}; the page has {', '.join(PAGE_SETTINGS)}.")
    return {name: (value or None) if name == "joint_reader" else value for name, value in settings.items()}


def ask(pipeline: Pipeline, corpus: str, question: str, settings: Mapping[str, Any] | None = None,
        baseline: str | None = None) -> tuple:
    """Answer with both systems; returns the outputs in `render` order, the banner and the path for the tree tab.
    `settings`: PAGE_SETTINGS values; one left out (or None) is the corpus's start setting, as on the page; the
    baseline (None) is the corpus's start baseline (the store's best, `CorpusBundle.baseline_default`)."""
    comparison = pipeline.ask(corpus, question or "", baseline=baseline or None, **_changes(settings))
    return (*render(comparison, pipeline.bundle(corpus)), banner_html(pipeline), last_docid(comparison), comparison)


STREAM_OUTPUTS = 13  # len(ask_outputs): render's 10, the banner, the tree tab's path, the comparison
TOKEN_REFRESH_S = 0.15  # the fastest a streamed answer card is redrawn (each redraw is a websocket message)


def ask_live(pipeline: Pipeline, corpus: str, question: str, settings: Mapping[str, Any] | None = None,
             baseline: str | None = None):
    """`ask`, streamed: the docid path plot as the search decides each level, both answer cards as their tokens
    come, then every output as `ask` returns them (the last yield is `ask`'s result)."""
    changes = _changes(settings)
    bundle = pipeline.bundle(corpus)
    baseline = baseline or bundle.baseline_default
    reader = " · base LLM reads" if (changes.get("joint_reader") or bundle.settings.joint_reader) == "base" else ""
    titles = {"joint": (f"Joint model · retrieval as reasoning{reader}", viz.JOINT_COLOR),
              "rag": (BASELINES.get(baseline, baseline), viz.RAG_COLOR)}
    drawn: dict[str, float] = {}
    for item in pipeline.ask_stream(corpus, question or "", baseline=baseline, **changes):
        if isinstance(item, Comparison):
            yield (*render(item, bundle), banner_html(pipeline), last_docid(item), item)
            return
        updates: list[Any] = [gr.skip()] * STREAM_OUTPUTS
        if item.kind == "level" and item.side == "joint":
            updates[2] = viz.search_progress_figure(item.data["paths"], bundle.tree, item.data["level"])
        elif item.kind == "token" and item.side in titles:
            now = time.monotonic()
            if now - drawn.get(item.side, 0.0) < TOKEN_REFRESH_S:
                continue
            drawn[item.side] = now
            updates[1 if item.side == "joint" else 6] = viz.streaming_card_html(*titles[item.side], item.data)
        else:
            continue
        yield tuple(updates)


def _answers(comparison: Comparison | None) -> dict:
    """{"joint": Answer | None, "rag": Answer | None} of a comparison (both None before the first question)."""
    if comparison is None:
        return {"joint": None, "rag": None}
    return {"joint": comparison.joint.answer, "rag": comparison.rag.answer}


def explain(comparison: Comparison | None) -> tuple:
    """What follows an answer: the documents to remove (re-ask), citations, attention per document, latency per
    stage, and the answer-token picker with its view (in the order of `explain_outputs` in `build_demo`)."""
    answers = _answers(comparison)
    choices = []
    if comparison is not None:
        seen = set()
        for side, answer in answers.items():
            for i, doc in enumerate(answer.docs if answer is not None else []):
                if doc.doc_id not in seen:
                    seen.add(doc.doc_id)
                    choices.append((f"{viz.SIDE_LABELS[side]} [{i + 1}] {doc.title or doc.doc_id} ({doc.doc_id})",
                                    doc.doc_id))
    tokens = viz.answer_token_choices(answers)
    first = tokens[0][1] if tokens else None
    return (gr.Dropdown(choices=choices, value=choices[0][1] if choices else None),
            viz.citations_html(answers["joint"], viz.JOINT_COLOR), viz.citations_html(answers["rag"], viz.RAG_COLOR),
            viz.document_attention_figure(answers), viz.latency_figure(answers),
            gr.Dropdown(choices=tokens, value=first), viz.token_attention_html(answers, first))


def reask(pipeline: Pipeline, comparison: Comparison | None, remove: str | None = None,
          force: str | None = None) -> tuple:
    """Re-read the last question with one document removed from (or `force`d into) both sides' documents, without
    a new retrieval. Returns the ask outputs (retrieval path, beams and tree highlight left as they were) and a
    note."""
    if comparison is None:
        raise UniragError("Ask a question first; then remove or add one of its documents.")
    answers = _answers(comparison)
    lists = {side: [(d.doc_id, d.score) for d in a.docs] if a is not None else [] for side, a in answers.items()}
    if force:
        doc_id = pipeline.find_document(comparison.corpus, force)
        lists = {side: [doc_id] + [p for p in pairs if p[0] != doc_id] for side, pairs in lists.items()}
        note = f"re-read with {doc_id} added (no new retrieval)"
    elif remove:
        doc_id = remove
        lists = {side: [p for p in pairs if p[0] != doc_id] for side, pairs in lists.items()}
        note = f"re-read without {doc_id} (no new retrieval)"
    else:
        raise UniragError("Pick a document to remove, or type one to add.")
    again = pipeline.reask(comparison.corpus, comparison.question, comparison.settings,
                           joint_docs=lists["joint"] if answers["joint"] is not None else None,
                           rag_docs=lists["rag"] if answers["rag"] is not None else None, note=note,
                           baseline=comparison.baseline)
    outputs = list(render(again, pipeline.bundle(again.corpus)))
    outputs[2:4] = [gr.skip(), gr.skip()]  # the retrieval did not change: keep its path and beams
    title = html.escape(pipeline.bundle(again.corpus).corpus[doc_id].title)
    return (*outputs, banner_html(pipeline), gr.skip(), again,
            viz.message_html(f"{note[0].upper()}{note[1:]}: {title}. The cards, documents and heatmaps below show "
                             "the new answers; ask again for a fresh retrieval.", "info"))


def pick_token(comparison: Comparison | None, choice: str | None) -> str:
    return viz.token_attention_html(_answers(comparison), choice)


def compare_runs(path_a: str | None, path_b: str | None, metric: str = "accuracy") -> tuple:
    """Two uploaded `eval --out` files → (summary HTML, per-question table, [CSV, JSON] downloads)."""
    import tempfile

    from unirag import eval as ev

    if not path_a or not path_b:
        raise UniragError("Upload two `eval --out` files (run A and run B).")
    records = [ev.load_eval_file(path, name)["records"] for path, name in ((path_a, "run A"), (path_b, "run B"))]
    rows = ev.compare_records(*records, metric=metric)
    paired = ev.paired_comparison(*records, metric=metric)
    counts = ev.outcome_counts(rows)
    folder = Path(tempfile.mkdtemp(prefix="unirag-compare-"))
    files = [str(ev.write_comparison(rows, folder / f"per_question.{ext}")) for ext in ("csv", "json")]
    note = (f"{paired['n']} questions, {html.escape(metric)}: A {paired['mean_a']:.3f}, B {paired['mean_b']:.3f} · "
            + " · ".join(f"{html.escape(k)} <b>{v}</b>" for k, v in counts.items())
            + f" · sign test on the discordant questions p = {results_store.format_p(paired['sign_test_p'])}")
    table = pd.DataFrame(rows, columns=list(ev.COMPARE_FIELDS))
    return f'<div class="ur-gold-info">{note}</div>', table, files


def last_docid(comparison: Comparison) -> dict | None:
    """What the corpus-tree tab highlights: the joint model's top document of the last question."""
    answer = comparison.joint.answer
    if answer is None or not answer.docs or not answer.docs[0].docid:
        return None
    return {"corpus": comparison.corpus, "docid": list(answer.docs[0].docid), "title": answer.docs[0].title}


def tree_view(pipeline: Pipeline, corpus: str, last: dict | None) -> tuple:
    """The corpus tree, with the last question's top docid path highlighted, and that document's cluster selected."""
    bundle = pipeline.loaded(corpus)
    if bundle is None:
        return viz.empty_figure("Corpus not loaded yet.", "Corpus tree", 300), gr.Dropdown()
    docid = last["docid"] if last and last.get("corpus") == corpus else None
    fig = viz.corpus_tree_figure(bundle.tree, highlight=docid)
    if not docid:
        return fig, gr.Dropdown()
    return fig, gr.Dropdown(value=viz.docid_str(docid[:-1]) if len(docid) > 1 else "", allow_custom_value=True)


def select_corpus(pipeline: Pipeline, corpus: str) -> tuple:
    """Load a corpus (lazily) and refresh its examples, tree and cluster list; start the baseline on the store's
    best row and every PAGE_SETTINGS control on the corpus's start settings (the checkpoint's recommended ones for
    the app's precision), so the page and the API's None agree. Outputs: examples, tree, cluster list, cluster
    documents, banner, baseline, then one per PAGE_SETTINGS name (`page_settings_of` reads them back)."""
    try:
        bundle = pipeline.bundle(corpus)
    except UniragError:
        empty = viz.empty_figure("Corpus not loaded (see the message above).", "Corpus tree", 300)
        return (gr.Dataset(samples=[]), empty, gr.Dropdown(choices=[], value=None),
                '<div class="ur-empty">Corpus not loaded.</div>', banner_html(pipeline), gr.skip(),
                *(gr.skip() for _ in PAGE_SETTINGS))
    choices = viz.cluster_choices(bundle.tree, max_depth=3)
    start = pipeline.start_settings(corpus)
    return (
        gr.Dataset(samples=[[q] for q in bundle.examples(pipeline.config.n_examples)]),
        viz.corpus_tree_figure(bundle.tree),
        gr.Dropdown(choices=choices, value=""),
        cluster_docs(pipeline, corpus, ""),
        banner_html(pipeline),
        gr.update(value=bundle.baseline_default, info=bundle.baseline_reason or None),
        *((gr.Radio if name == "joint_reader" else gr.Slider)(value=getattr(start, name)) for name in PAGE_SETTINGS),
    )


def page_settings_of(outputs: Sequence[Any]) -> dict[str, Any]:
    """{setting: its control's update} from `select_corpus`'s outputs."""
    return dict(zip(PAGE_SETTINGS, outputs[-len(PAGE_SETTINGS):], strict=True))


def cluster_docs(pipeline: Pipeline, corpus: str, prefix: str | None) -> str:
    """The documents under a cluster (docid prefix like "3-1"; "" = the whole corpus)."""
    bundle = pipeline.loaded(corpus)
    if bundle is None:
        return '<div class="ur-empty">Corpus not loaded yet.</div>'
    try:
        parsed = viz.parse_prefix(prefix)
    except ValueError as exc:
        return viz.message_html(str(exc), "warn")
    return viz.cluster_docs_html(bundle.tree, parsed, bundle.texts(), limit=30 if not parsed else 200)


def evaluation(pipeline: Pipeline, corpus: str | None = None, precision: str | None = None,
               split: str = "dev") -> tuple:
    """The results store's runs for one corpus, precision and split: a note, the table, the chart."""
    corpus = corpus or "nq"
    precision = precision or pipeline.config.precision
    try:
        rows = results_store.load_store()
    except UniragError as exc:  # a hand-edited store with a bad row: say where, keep the page up
        return viz.message_html(str(exc), "warn"), pd.DataFrame([], columns=viz.EVAL_HEADERS), viz.eval_figure([])
    against = page_baseline_run(pipeline, rows, corpus, precision)
    picked = results_store.table(rows, corpus, precision, split, shipped=None, against=against)  # older models last
    if not picked:
        note = viz.message_html(
            f"No runs for {corpus}/{split} in {precision} in `{results_store.default_store()}`. "
            "`python -m unirag eval ... --record \"RUN NAME\"` measures and stores one.", "info")
    else:
        note = (f'<div class="ur-muted">{len(picked)} run(s) of {html.escape(corpus)}/{html.escape(split)} in '
                f"{html.escape(precision)} from the results store (<code>results/{html.escape(corpus)}.jsonl</code>; "
                "docs/RESULTS.md is generated from it). p: the sign test against the page's baseline, "
                f"<b>{html.escape(against or 'none in the store yet')}</b>, where both runs stored their "
                "per-question outcomes.</div>")
    table = pd.DataFrame(viz.eval_rows(picked), columns=viz.EVAL_HEADERS)
    return note, table, viz.eval_figure(picked, f"{corpus}/{split}, {precision}: F1 and R@1")


def page_baseline_run(pipeline: Pipeline, rows: list[dict], corpus: str, precision: str) -> str | None:
    """The store run the page's right-hand side starts from for this corpus and precision (None before the corpus
    is loaded, or when the store has no baseline row for it)."""
    from unirag.pipeline import best_baseline

    bundle = pipeline.loaded(corpus)
    if bundle is None:
        return None
    best = best_baseline([r for r in rows if r["corpus"] == corpus], precision, bundle.corpus.fingerprint)
    return best["run"] if best else None


def split_with_runs(corpus: str | None, precision: str | None, split: str, pipeline: Pipeline) -> str:
    """`split` when the store has runs of it for this corpus and precision, else the split with the most runs:
    each corpus opens on a table, not on "No runs"."""
    try:
        rows = results_store.load_store()
    except UniragError:
        return split
    counts = {s: len(results_store.table(rows, corpus or "nq", precision or pipeline.config.precision, s,
                                         shipped=None)) for s in results_store.SPLITS}
    return split if counts.get(split) or not any(counts.values()) else max(counts, key=counts.get)


def studies() -> tuple:
    """The studies that are not one corpus's runs, from the results store: answer-sentence localization and the
    GR-vs-DR scaling curve (its table, trend and figure), as docs/RESULTS.md shows them."""
    try:
        rows = results_store.load_store()
    except UniragError as exc:
        return viz.message_html(str(exc), "warn"), viz.gr_vs_dr_figure([])
    localization = studies_store.render_localization(rows) or "No localization runs yet (`python -m " \
        "benchmarks.localization --record`)."
    scaling = studies_store.render_gr_vs_dr(rows)
    trend = studies_store.render_gr_vs_dr_trend(rows)
    text = (f"### Localization: is the top-ranked sentence the answer sentence?\n\n{localization}\n\n"
            f"### Generative vs dense retrieval as the corpus grows\n\n{scaling}\n\n{trend}\n\n"
            "How these were measured, and what they say: docs/RESULTS.md.")
    return text, viz.gr_vs_dr_figure(rows)


def about_markdown(pipeline: Pipeline) -> str:
    try:
        cost = studies_store.quantization_cost(results_store.load_store(), recovered_only=True)
    except UniragError:
        cost = []
    cost_text = "\n".join(f"  - {line}" for line in cost) if cost else (
        "  - not measured yet (no run of the results store in both the recovered 4-bit and fp32)")
    sides = ("The two sides answer at the same time, each on its own thread: the latency on each card was measured "
             "while the other side was running." if pipeline.config.parallel_sides else
             "The two sides answer one after the other (`UNIRAG_PARALLEL_SIDES=0`).")
    return f"""
### How the joint model retrieves
1. **Docids.** The corpus is embedded once and split by recursive k-means (k = 10 clusters per split, clusters larger
   than 10 are split again). A document's **docid** is its path of cluster indices, e.g. `3-1-4-2`: documents that share
   a prefix are alike. Each cluster is labelled with its most distinctive keywords (class TF-IDF).
2. **Retrieval as reasoning.** The question is followed by a `<retrieve_token>`; a *docid head* predicts the first
   cluster, the chosen symbol is fed back, and so on down the tree. A beam search keeps the best paths, restricted to
   branches that exist (a trie of the tree), so every finished path is a real document. Extra *retrieval heads* read
   the question next to the normal attention (the **Retrieval heads attended to** line shows their weights). Each
   cluster's score adds a semantic term: the cosine between the model's query vector and that cluster's embedding,
   which starts at the cluster centroid (training also pulls the query vector towards the bi-encoder's embedding of
   the question, so the LLM learns to walk the tree the encoder built).
3. **Answering.** The 1–3 selected documents go into the prompt; a *bridge* lets the answer attend to what the
   retrieval pathway computed. Stage 2 trained a LoRA adapter (QLoRA on a bitsandbytes NF4 base) and the bridge
   on the model's own retrievals, with short gold answers as targets, so the reader answers tersely (higher EM and
   F1, but a gold answer appears in its output less often than in the base LLM's). *Advanced settings → Joint
   reader → the base LLM* has the joint model's documents read by the base LLM instead, the RAG side's reader:
   the two answers then differ only in what was retrieved (`eval --joint-reader base`; docs/RESULTS.md compares both).
   *Self-check* lets the base LLM re-read the search's top N documents and re-rank them by search
   score + how likely the question is after each document (query likelihood): the same LLM judges its own
   candidates, no second model; it costs one pass over N documents (`eval --self-check N`), or only the
   question's tokens when the passages' prompts were precomputed (`python -m unirag index --self-check-cache`).
   The page starts from each checkpoint's recommended setting for the app's precision (listed below, from its
   `recommended_settings.json`, chosen on held-out train questions), with the self-check on only when the passage
   cache for this model and precision exists.
   The heatmaps
   show which context tokens (or sentences) each answer token attended to,
   and the highlighted sentences in the documents are the ones the answer used (GeAR-style localisation).

The dense RAG baseline embeds the question with the same bi-encoder, takes the top-k passages by cosine similarity
and reads them with the same LLM and prompt. The *Baseline* menu swaps it for BM25, for dense and BM25 fused by
reciprocal rank, or for dense + self-check: the dense top N re-ranked by the joint model's own self-check (same N,
weight, passage cache and reader as the joint side), which isolates what the docid search adds.

### This deployment
- Precision: **{pipeline.config.precision_label}** (`--precision fp32` for full precision, `--precision nf4` for
  bitsandbytes NF4 without the recovery).
- LLM: **{pipeline.status()["llm"]}**, encoder: **{pipeline.status()["encoder"]}**.
- {sides}
- Settings the page starts from:
{recommended_markdown(pipeline)}
- Measured accuracy cost of 4-bit after the recovery (HQQ; NF4 without it, for comparison; docs/RESULTS.md,
  "4-bit recovery"):
{cost_text}

### References
- **Retrieval as Reasoning**: one decoder-only LLM that generates docids down a semantic cluster tree and then answers
  from the documents it chose (the design this project implements).
- **NCI**: Wang et al., *A Neural Corpus Indexer for Document Retrieval*, NeurIPS 2022
  ([arXiv:2206.02743](https://arxiv.org/abs/2206.02743)) — hierarchical k-means docids.
- **DSI**: Tay et al., *Transformer Memory as a Differentiable Search Index*, NeurIPS 2022
  ([arXiv:2202.06991](https://arxiv.org/abs/2202.06991)).
- **GeAR**: Liu et al., *GeAR: Generation Augmented Retrieval*, 2025
  ([arXiv:2501.02772](https://arxiv.org/abs/2501.02772)) — localising the relevant sentences inside retrieved
  documents.
- **RetroLLM**: Li et al., *RetroLLM: Empowering Large Language Models to Retrieve Fine-grained Evidence within
  Generation*, ACL 2025 ([arXiv:2412.11919](https://arxiv.org/abs/2412.11919)).
- **UniGen**: Li, Zhou & Dou, *UniGen: A Unified Generative Framework for Retrieval and Question Answering with Large
  Language Models*, AAAI 2024 ([arXiv:2312.11036](https://arxiv.org/abs/2312.11036)).
"""


def recommended_markdown(pipeline: Pipeline) -> str:
    """Each corpus's start setting for the app's precision, read from its checkpoint (never typed in here)."""
    lines = []
    for corpus in pipeline.config.corpora:
        label = CORPUS_LABELS.get(corpus, corpus)
        ckpt = pipeline.config.find_checkpoint(corpus)
        try:
            rec = RecommendedSettings.load(ckpt, pipeline.config.precision) if ckpt else None
        except UniragError as exc:
            lines.append(f"  - {label}: the checkpoint's settings file is invalid ({exc})")
            continue
        if rec is None:
            lines.append(f"  - {label}: no recommended setting shipped; library defaults "
                         f"`{InferenceSettings(precision=pipeline.config.precision).to_dict()}`")
            continue
        values = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.values.items())
        lines.append(f"  - {label}: {values}" + (f" ({rec.reason})" if rec.reason else ""))
        bundle = pipeline.loaded(corpus)
        for notice in bundle.settings.notices if bundle else ():
            lines.append(f"    - {notice}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- layout


# --------------------------------------------------------------------------------------------- your passages
# The "Your passages" tab: UI only; parsing, the session's systems and the build queue are unirag.uploads/build.

BM25_COLOR = "#0f766e"
YOURS_INTRO = ("**Your own passages.** Upload or paste them: dense and BM25 RAG answer at once; the joint model "
               "needs its docid model trained on them first (the recipe of `python -m unirag build`, in the "
               "background, one training at a time on this machine). Your passages stay in this browser session's "
               "own temporary folder, deleted when the session ends.")


def yours_progress_html(status: Mapping[str, Any] | None) -> str:
    from unirag.uploads import describe_build

    if status is None:
        return ""
    line, fraction = describe_build(dict(status))
    bar = (f'<progress value="{fraction:.3f}" max="1" style="width:100%"></progress>'
           if fraction is not None else "")
    kind = {"failed": "error", "cancelled": "warn"}.get(status["state"], "info")
    return f'<div class="ur-msg ur-msg-{kind}" id="ur-yours-progress-line">{html.escape(line)}{bar}</div>'


def yours_cards(answers: Mapping[str, Any]) -> tuple[str, str, str]:
    """Each side's answer card and the passages it read (or why it cannot answer yet)."""
    from unirag.uploads import SIDES

    colors = {"joint": viz.JOINT_COLOR, "rag": viz.RAG_COLOR, "bm25": BM25_COLOR}
    cards = []
    for side in ("joint", "rag", "bm25"):
        found = answers.get(side)
        if isinstance(found, str) or found is None:
            cards.append(viz.answer_card_html(None, SIDES[side], colors[side], error=found))
        else:
            cards.append(viz.answer_card_html(found, SIDES[side], colors[side]) + viz.documents_html(found))
    return tuple(cards)


def yours_use(yours: Any, session: str, path: str | None, text: str | None) -> str:
    """Parse and load the session's passages; the status line (an error box for a bad upload, the page stays)."""
    from unirag.build import default_estimate
    from unirag.uploads import LIMITS, parse_upload, read_upload

    try:
        if path:
            upload = read_upload(path)
        elif text and text.strip():
            upload = parse_upload(text)
        else:
            raise UniragError(f"Upload a file or paste passages first ({LIMITS}).")
        state = yours.use(session, upload)
    except UniragError as exc:
        return viz.message_html(str(exc), "error")
    minutes = max(1, round(default_estimate(len(state.corpus)) / 60))
    notes = " ".join(upload.notices + state.corpus.notices)
    return viz.message_html(f"{len(state.corpus)} passages ready ({upload.format}). Dense and BM25 answer now; "
                            f"training the docid model takes about {minutes} min here. {notes}".strip(), "info")


def your_passages_tab(yours: Any, demo: gr.Blocks) -> None:
    """The tab and its events; `demo.unload` and the state's delete callback end the session's folder and build."""
    from unirag.uploads import LIMITS

    with gr.Tab("Your passages", id="yours"):
        gr.Markdown(YOURS_INTRO + f" Limits: {LIMITS}.")
        session = gr.State(None, delete_callback=lambda key: key and yours.close(key))
        with gr.Row(equal_height=True):
            # Any file type: a PDF or image reaches the validator, which says what it is (not a silent refusal).
            upload = gr.File(label="Upload (JSONL: id, title, text; or plain text)", type="filepath",
                             elem_id="ur-yours-file")
            paste = gr.Textbox(label="…or paste passages (one a paragraph, blank lines between)", lines=6,
                               elem_id="ur-yours-paste")
        use_btn = gr.Button("Use these passages", variant="primary", elem_id="ur-yours-use")
        status = gr.HTML("", elem_id="ur-yours-status")
        with gr.Row(equal_height=True):
            question = gr.Textbox(label="A question on your passages", scale=4, max_length=MAX_QUESTION_CHARS,
                                  elem_id="ur-yours-question")
            ask_btn = gr.Button("Ask", variant="primary", scale=1, elem_id="ur-yours-ask")
        with gr.Row(equal_height=False):
            cards = [gr.HTML("", elem_id=f"ur-yours-{side}") for side in ("joint", "rag", "bm25")]
        with gr.Row(equal_height=True):
            train_btn = gr.Button("Train the docid model", scale=1, elem_id="ur-yours-train")
            progress = gr.HTML("", elem_id="ur-yours-progress")
        download = gr.File(label="Your docid model (zip: checkpoint + corpus; `python -m unirag ask --checkpoint`)",
                           interactive=False, elem_id="ur-yours-download")
        timer = gr.Timer(2.0, active=False)

    def on_use(path, text, request: gr.Request):
        key = request.session_hash
        return key, yours_use(yours, key, path, text), *yours_cards({}), "", None, gr.Timer(active=False)

    def on_ask(key, text):
        try:
            return yours_cards(yours.ask(key, text))
        except UniragError as exc:
            return _refuse(exc)

    def on_train(key):
        try:
            return yours_progress_html(yours.train(key)), gr.Timer(active=True)
        except UniragError as exc:
            return viz.message_html(str(exc), "error"), gr.Timer(active=False)

    def on_tick(key):
        status = yours.queue.status(key) if key else None
        active = status is not None and status["state"] in ("queued", "waiting", "running")
        archive = None
        if status is not None and status["state"] == "done" and yours.joint_ready(key):
            archive = str(yours.archive(key))
        return yours_progress_html(status), gr.Timer(active=active), archive if archive else gr.skip()

    use_btn.click(on_use, [upload, paste], [session, status, *cards, progress, download, timer], api_name=False,
                  concurrency_id="models")
    ask_btn.click(on_ask, [session, question], cards, api_name=False, concurrency_id="models")
    question.submit(on_ask, [session, question], cards, api_name=False, concurrency_id="models")
    train_btn.click(on_train, session, [progress, timer], api_name=False)
    timer.tick(on_tick, session, [progress, timer, download], api_name=False, show_progress="hidden")
    def on_unload(request: gr.Request):  # the tab closed: no 60-minute wait for the state's delete callback
        yours.close(request.session_hash)

    demo.unload(on_unload)


def build_demo(pipeline: Pipeline, default_corpus: str = "nq") -> gr.Blocks:
    corpora = list(pipeline.config.corpora)
    default_corpus = default_corpus if default_corpus in corpora else corpora[0]
    start = pipeline.start_settings(default_corpus)  # updated on load (select_corpus); the API's None = the same
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\n{INTRO}", elem_id="ur-header")
        banner = gr.HTML(banner_html(pipeline), elem_id="ur-banner", label="status")
        timer = gr.Timer(1.5, active=True)
        last = gr.State(None)
        # The /ask API: settings default to None = the corpus's start setting, which is what the page shows once
        # the corpus is loaded (the sliders' build-time values may still be the library defaults).
        with gr.Row(visible=False):
            api_settings = [gr.Number(None, label=name, visible=False) for name in
                            ("beam_width", "k_docs", "rag_k", "max_new_tokens")]
            api_reader = gr.Dropdown(list(JOINT_READERS), value=None, label="joint_reader", visible=False)
            api_self_check = gr.Number(None, label="self_check", visible=False)
            api_baseline = gr.Dropdown(list(BASELINES), value=None, label="baseline", visible=False)
            api_rounds = gr.Number(None, label="rounds", visible=False)
            api_lookahead = gr.Number(None, label="evidence_lookahead", visible=False)
            api_ask = gr.Button("ask", visible=False)
        view = gr.State(None)  # the last Comparison shown: re-ask and the explain panel read it

        with gr.Tabs():
            with gr.Tab("Compare", id="compare"):
                with gr.Row(equal_height=False):
                    corpus = gr.Radio([(CORPUS_LABELS[c], c) for c in corpora], value=default_corpus, label="Corpus",
                                      scale=1, min_width=220)
                    with gr.Column(scale=4, min_width=300):
                        question = gr.Textbox(label="Question", placeholder="Ask something the corpus can answer…",
                                              lines=1, max_length=MAX_QUESTION_CHARS, elem_id="ur-question",
                                              info=f"Up to {MAX_QUESTION_CHARS:,} characters; longer input is cut.")
                        counter = gr.HTML(viz.char_counter_html(0, MAX_QUESTION_CHARS), elem_id="ur-counter")
                    baseline = gr.Dropdown([(label, name) for name, label in BASELINES.items()], value="rag",
                                           label="Baseline (right side)", elem_id="ur-baseline", scale=1,
                                           min_width=200,
                                           info="Dense + self-check needs Self-check ≥ 2 (Advanced settings).")
                    ready = not _loading(pipeline, default_corpus)
                    ask_btn = gr.Button(ASK_LABEL if ready else LOADING_LABEL, variant="primary", scale=1,
                                        min_width=160, elem_id="ur-ask", interactive=ready)
                examples = gr.Dataset(components=[question], samples=[], label="Examples from the dev split "
                                      "(click one: gold passage and answer are then checked)", samples_per_page=4,
                                      elem_id="ur-examples")
                with gr.Accordion("Advanced settings", open=False):
                    with gr.Row():
                        beam_width = gr.Slider(*LIMITS["beam_width"], value=start.beam_width, step=1,
                                               label="Beam width (joint)")
                        k_docs = gr.Slider(*LIMITS["k_docs"], value=start.k_docs, step=1,
                                           label="Documents selected (joint)")
                        rag_k = gr.Slider(*LIMITS["rag_k"], value=start.rag_k, step=1, label="RAG k (top-k passages)")
                        max_new = gr.Slider(*LIMITS["max_new_tokens"], value=start.max_new_tokens, step=1,
                                            label="Max new tokens")
                    joint_reader = gr.Radio(JOINT_READER_CHOICES, value=start.joint_reader,
                                            label="Joint reader",
                                            info="Who reads the joint model's documents. The base LLM is what the RAG "
                                            "side reads with, so the two answers then differ only in retrieval "
                                            "(docs/RESULTS.md: more accurate, less terse).", elem_id="ur-reader")
                    self_check = gr.Slider(*LIMITS["self_check"], value=start.self_check, step=1,
                                           label="Self-check (joint)",
                                           info="0 = off. N ≥ 2: the base LLM re-reads the search's top N documents "
                                           "and ranks them by search score + how likely the question is after each "
                                           "(query likelihood). Better top documents, slower; N above about 5 is "
                                           "quick only with a passage cache (`python -m unirag index "
                                           "--self-check-cache`), and is then the checkpoint's recommended "
                                           "setting.", elem_id="ur-self-check")
                    rounds = gr.Slider(*LIMITS["rounds"], value=start.rounds, step=1, label="Rounds (joint)",
                                       info="1 = one search and one reading. 2-3 (UniGen-style): each later round "
                                       "searches the docids again with the question plus the previous round's answer "
                                       "and reads the question again; the last round answers. The docid path shows "
                                       "every round side by side. Each round costs a search and a reading.",
                                       elem_id="ur-rounds")
                    evidence_lookahead = gr.Slider(*LIMITS["evidence_lookahead"], value=start.evidence_lookahead,
                                                   step=1, label="Evidence lookahead (evidence baseline)",
                                                   info="0 = the LLM picks each evidence token alone. W > 0 "
                                                   "(RetroLLM's forward-looking decoding): each allowed token also "
                                                   "scores W x how close (MiniLM cosine) the text it leads to is to "
                                                   "the question, so the evidence heads for relevant text. Slower.",
                                                   elem_id="ur-lookahead")
                gold_info = gr.HTML("", elem_id="ur-gold", label="gold check")
                with gr.Row(equal_height=False):
                    with gr.Column(elem_classes=["ur-col-joint"]):
                        # Titles above the cards, their explanations below: the answers fit a 1400x900 screen.
                        gr.HTML('<div class="ur-col-title">Retrieval as reasoning (joint model)</div>')
                        joint_card = gr.HTML(viz.answer_card_html(None, "Joint model", viz.JOINT_COLOR),
                                             elem_id="ur-joint-answer", label="joint answer")
                        joint_cite = gr.HTML("", elem_id="ur-joint-cite", label="joint citation")
                        gr.HTML('<div class="ur-col-help">The LLM writes a docid one level at a time: at each level '
                                'of the cluster tree it scores the candidate clusters (circles, size = probability) '
                                'and a beam search keeps the best paths. A finished path scores its log-probability '
                                'plus how well the document itself matches the question; the best documents are '
                                'read.</div>')
                        joint_path = gr.Plot(show_label=False, elem_id="ur-joint-path", label="joint docid path")
                        joint_beams = gr.Dataframe(pd.DataFrame([], columns=viz.BEAM_HEADERS),
                                                   label="Beams: every finished docid path, best first",
                                                   interactive=False, max_height=320, elem_id="ur-beams", wrap=True,
                                                   column_widths=viz.BEAM_WIDTHS)
                        gr.HTML(f'<div class="ur-muted ur-beam-help">{viz.BEAM_HELP}</div>')
                        joint_docs = gr.HTML("", elem_id="ur-joint-docs", label="joint documents")
                        joint_heat = gr.Plot(show_label=False, elem_id="ur-joint-heat", label="joint attention")
                    with gr.Column(elem_classes=["ur-col-rag"]):
                        gr.HTML('<div class="ur-col-title">Baseline RAG</div>')
                        rag_card = gr.HTML(viz.answer_card_html(None, "Dense RAG", viz.RAG_COLOR),
                                           elem_id="ur-rag-answer", label="rag answer")
                        rag_cite = gr.HTML("", elem_id="ur-rag-cite", label="rag citation")
                        gr.HTML('<div class="ur-col-help">Dense RAG: a bi-encoder embeds the question; the k passages '
                                'with the highest cosine similarity are pasted into the prompt of the same LLM. BM25 '
                                'and hybrid (dense and BM25 fused by reciprocal rank) read the same way; dense + '
                                'self-check re-ranks the dense top N with the joint model\'s self-check and reads as '
                                'the joint model does. Evidence (RetroLLM-style): the base LLM writes evidence that '
                                'must be a passage of the joint search\'s documents (an FM-index constrains each '
                                'token), then answers from it alone; its card marks the evidence in its '
                                'document.</div>')
                        rag_bars = gr.Plot(show_label=False, elem_id="ur-rag-bars", label="rag passage scores")
                        rag_docs = gr.HTML("", elem_id="ur-rag-docs", label="rag documents")
                        rag_heat = gr.Plot(show_label=False, elem_id="ur-rag-heat", label="rag attention")

                with gr.Accordion("What if? Re-ask without one of the documents, or with another one", open=False,
                                  elem_id="ur-reask"):
                    with gr.Row(equal_height=True):
                        reask_doc = gr.Dropdown(choices=[], value=None, label="A selected document", scale=3,
                                                elem_id="ur-reask-doc")
                        reask_without = gr.Button("Re-ask without it", scale=1, elem_id="ur-reask-without")
                        reask_force = gr.Textbox(label="…or a document to add (id or title)", scale=2,
                                                 placeholder="e.g. d12 or a title", elem_id="ur-reask-force")
                        reask_with = gr.Button("Re-ask with this document", scale=1, elem_id="ur-reask-with")
                    reask_note = gr.HTML('<div class="ur-muted">Both sides re-read the question from their changed '
                                         'documents, without a new retrieval: how much does the answer depend on '
                                         'one document?</div>', elem_id="ur-reask-note")
                with gr.Accordion("Explain the answers: attention per document and per answer token, latency "
                                  "per stage", open=True, elem_id="ur-explain"):
                    with gr.Row(equal_height=False):
                        doc_attention = gr.Plot(show_label=False, elem_id="ur-doc-attention")
                        latency = gr.Plot(show_label=False, elem_id="ur-latency")
                    token_pick = gr.Dropdown(choices=[], value=None, label="Answer token: what did it attend to?",
                                             elem_id="ur-token-pick")
                    token_view = gr.HTML("", elem_id="ur-token-view")

            with gr.Tab("Corpus tree", id="tree") as tree_tab:
                gr.Markdown("The whole docid tree of the selected corpus. Hover for a cluster's keywords and size; "
                            "click to zoom in. Pick a cluster (or type a docid prefix such as `3-1`) to list its "
                            "documents. After a question, the joint model's top document (★) and its path are yellow "
                            "with a dark outline, everything else is dimmed, and the tree opens at the document's "
                            "cluster (click the centre to go back up); its cluster is selected below.")
                tree_plot = gr.Plot(label="Docid tree", elem_id="ur-tree")
                with gr.Row():
                    cluster = gr.Dropdown(choices=[], value=None, label="Cluster", allow_custom_value=True, scale=3,
                                          elem_id="ur-cluster")
                    prefix_box = gr.Textbox(label="…or a docid prefix", placeholder="e.g. 3-1", scale=1)
                cluster_html = gr.HTML("", elem_id="ur-cluster-docs")

            with gr.Tab("Evaluation", id="eval"):
                with gr.Row():
                    eval_corpus = gr.Dropdown(choices=[(v, k) for k, v in CORPUS_LABELS.items()],
                                              value=default_corpus, label="Corpus", scale=1, elem_id="ur-eval-corpus")
                    eval_precision = gr.Radio(choices=list(PRECISIONS), value=pipeline.config.precision,
                                              label="Precision", scale=1, elem_id="ur-eval-precision")
                    eval_split = gr.Radio(choices=list(results_store.SPLITS), value="dev", scale=1,
                                          label="Questions (dev[:N]: the first N)")
                    refresh = gr.Button("Reload results", size="sm", scale=0)
                eval_note = gr.HTML("")
                eval_table = gr.Dataframe(pd.DataFrame([], columns=viz.EVAL_HEADERS), interactive=False,
                                          label="Runs (results store)", wrap=True)
                gr.Markdown(results_store.METRIC_DEFINITIONS, elem_id="ur-eval-metrics")
                eval_plot = gr.Plot(label="F1 and R@1")
                with gr.Accordion("Localization and scaling (GR vs DR)", open=False, elem_id="ur-studies"):
                    studies_text = gr.Markdown("")
                    studies_plot = gr.Plot(label="R@1 against corpus size")
                with gr.Accordion("Compare two runs question by question", open=False, elem_id="ur-run-compare"):
                    gr.Markdown("Upload two `python -m unirag eval --out` files on the same questions: which "
                                "questions each run got right (the same as `python -m unirag compare A.json B.json "
                                "--per-question out.csv`).")
                    with gr.Row():
                        run_a = gr.File(label="Run A (eval --out JSON)", file_types=[".json"], type="filepath",
                                        elem_id="ur-run-a")
                        run_b = gr.File(label="Run B (eval --out JSON)", file_types=[".json"], type="filepath",
                                        elem_id="ur-run-b")
                        with gr.Column():
                            run_metric = gr.Dropdown(["accuracy", "em", "recall@1", "recall@k"], value="accuracy",
                                                     label="Right/wrong by")
                            run_compare = gr.Button("Compare", variant="primary")
                    run_note = gr.HTML("")
                    run_table = gr.Dataframe(interactive=False, wrap=True, max_height=420, label="Per question")
                    run_files = gr.File(label="Download (CSV, JSON)", file_count="multiple", interactive=False)

            from unirag.uploads import YourPassages

            your_passages_tab(YourPassages(pipeline), demo)

            with gr.Tab("About", id="about"):
                about = gr.Markdown(about_markdown(pipeline))

        ask_outputs = [gold_info, joint_card, joint_path, joint_beams, joint_docs, joint_heat, rag_card, rag_bars,
                       rag_docs, rag_heat, banner, last]
        ask_outputs += [view]
        controls = {"beam_width": beam_width, "k_docs": k_docs, "rag_k": rag_k, "max_new_tokens": max_new,
                    "joint_reader": joint_reader, "self_check": self_check, "rounds": rounds,
                    "evidence_lookahead": evidence_lookahead}
        ask_inputs = [corpus, question, baseline, *(controls[name] for name in PAGE_SETTINGS)]

        def on_ask(corpus: str, question: str, beam_width: float | None = None, k_docs: float | None = None,
                   rag_k: float | None = None, max_new_tokens: float | None = None, joint_reader: str | None = None,
                   self_check: float | None = None, baseline: str | None = None, rounds: float | None = None,
                   evidence_lookahead: float | None = None):
            """Ask both systems one question. A setting left out (None) is the corpus's start setting: the
            checkpoint's recommended value for the app's precision, the value the page starts from. baseline: the
            right-hand system (rag, bm25, hybrid, rag-selfcheck or evidence; None = the corpus's start baseline, the
            results store's best). rounds: the joint model's rounds of retrieval and answering (1-3).
            evidence_lookahead: the evidence baseline's forward-looking weight (0-32)."""
            settings = {"beam_width": beam_width, "k_docs": k_docs, "rag_k": rag_k,
                        "max_new_tokens": max_new_tokens, "joint_reader": joint_reader, "self_check": self_check,
                        "rounds": rounds, "evidence_lookahead": evidence_lookahead}
            return ask(pipeline, corpus, question, settings, baseline)

        def on_ask_live(corpus: str, question: str, baseline: str | None, *values: Any):
            yield from ask_live(pipeline, corpus, question, dict(zip(PAGE_SETTINGS, values, strict=True)), baseline)

        def on_tree_tab(corpus_name, last_path):
            return tree_view(pipeline, corpus_name, last_path)

        def on_corpus(corpus_name):
            return select_corpus(pipeline, corpus_name)

        def on_cluster(corpus_name, value):
            return cluster_docs(pipeline, corpus_name, value)

        def on_tick(corpus_name):
            ready = not _loading(pipeline, corpus_name)
            return (banner_html(pipeline), gr.Timer(active=_loading(pipeline)),
                    gr.Button(ASK_LABEL if ready else LOADING_LABEL, interactive=ready))

        def on_eval(corpus_name, precision, split):
            shown = split_with_runs(corpus_name, precision, split, pipeline)
            # gr.skip() when unchanged: setting the radio would fire its change event again.
            return (*evaluation(pipeline, corpus_name, precision, shown), about_markdown(pipeline), *studies(),
                    gr.skip() if shown == split else gr.update(value=shown))

        def on_example(sample):
            return sample[0] if isinstance(sample, (list, tuple)) else sample

        corpus_outputs = [examples, tree_plot, cluster, cluster_html, banner, baseline,
                          *(controls[name] for name in PAGE_SETTINGS)]
        on_ask_safe = _guard(on_ask)
        # The page streams (the path plot level by level, the answers token by token); the API answers in one call.
        on_ask_live_safe = _guard_stream(on_ask_live)
        # Asks from several users run at once: the pipeline batches them through the models (unirag.batching).
        asks = {"concurrency_id": "ask", "concurrency_limit": pipeline.ask_concurrency}
        ask_btn.click(on_ask_live_safe, ask_inputs, ask_outputs, api_name=False, **asks)
        api_ask.click(on_ask_safe, [corpus, question, *api_settings, api_reader, api_self_check, api_baseline,
                                    api_rounds, api_lookahead],
                      ask_outputs,
                      api_name="ask", **asks)
        # The character counter runs in the browser: no request per keystroke.
        question.change(None, question, counter, js=viz.CHAR_COUNTER_JS.replace("LIMIT", str(MAX_QUESTION_CHARS)),
                        api_name=False, queue=False, show_progress="hidden")
        question.submit(on_ask_live_safe, ask_inputs, ask_outputs, api_name=False, **asks)
        # One click on an example asks it (its gold passage and answer are then checked).
        examples.click(on_example, examples, question, api_name=False, queue=False).then(
            on_ask_live_safe, ask_inputs, ask_outputs, api_name=False, **asks)
        corpus.change(lambda: gr.Timer(active=True), None, timer, api_name=False, queue=False).then(
            _guard(on_corpus), corpus, corpus_outputs, api_name=False, concurrency_id="models")
        demo.load(_guard(on_corpus), corpus, corpus_outputs, api_name=False)
        eval_inputs, eval_outputs = [eval_corpus, eval_precision, eval_split], [eval_note, eval_table, eval_plot, about,
                                                                        studies_text, studies_plot, eval_split]
        demo.load(on_eval, eval_inputs, eval_outputs, api_name=False)
        timer.tick(on_tick, corpus, [banner, timer, ask_btn], api_name=False, queue=False, show_progress="hidden")
        cluster.change(_guard(on_cluster), [corpus, cluster], cluster_html, api_name=False)
        prefix_box.submit(_guard(on_cluster), [corpus, prefix_box], cluster_html, api_name=False)
        tree_tab.select(_guard(on_tree_tab), [corpus, last], [tree_plot, cluster], api_name=False)
        refresh.click(on_eval, eval_inputs, eval_outputs, api_name=False)
        for control in eval_inputs:
            control.change(on_eval, eval_inputs, eval_outputs, api_name=False, queue=False)
        explain_outputs = [reask_doc, joint_cite, rag_cite, doc_attention, latency, token_pick, token_view]
        view.change(explain, view, explain_outputs, api_name=False, queue=False)
        token_pick.change(pick_token, [view, token_pick], token_view, api_name=False, queue=False)

        def on_reask_without(comparison, doc_id):
            return reask(pipeline, comparison, remove=doc_id)

        def on_reask_with(comparison, text):
            return reask(pipeline, comparison, force=text)

        reask_outputs = [*ask_outputs, reask_note]
        reask_without.click(_guard(on_reask_without), [view, reask_doc], reask_outputs, api_name=False,
                            concurrency_id="models")
        reask_with.click(_guard(on_reask_with), [view, reask_force], reask_outputs, api_name=False,
                         concurrency_id="models")
        reask_force.submit(_guard(on_reask_with), [view, reask_force], reask_outputs, api_name=False,
                           concurrency_id="models")
        run_compare.click(_guard(compare_runs), [run_a, run_b, run_metric], [run_note, run_table, run_files],
                          api_name=False)
    return demo


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    env = os.environ.get
    # On a Hugging Face Space (SPACE_ID set) the server must listen on 0.0.0.0; locally only on loopback.
    host = env("UNIRAG_HOST") or env("GRADIO_SERVER_NAME") or ("0.0.0.0" if env("SPACE_ID") else "127.0.0.1")
    parser.add_argument("--host", default=host, help="default: UNIRAG_HOST, else 127.0.0.1 (0.0.0.0 on a Space)")
    parser.add_argument("--port", type=int, default=int(env("UNIRAG_PORT") or env("GRADIO_SERVER_PORT") or "7860"),
                        help="default: UNIRAG_PORT, else 7860")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="base LLM precision (default: UNIRAG_PRECISION or 4bit: HQQ 4-bit, the recovered one)")
    parser.add_argument("--no-recovery", action="store_true", help=argparse.SUPPRESS)  # older: --precision nf4
    parser.add_argument("--llm", default=None,
                        help="hub id or folder of the base LLM (default: UNIRAG_LLM or the embedded SmolLM2)")
    parser.add_argument("--encoder", default=None, help="bi-encoder: hub id, 'dpr' or empty for the embedded MiniLM")
    parser.add_argument("--checkpoint-dir", default=None, help="folder holding <corpus>-<llm>/ joint checkpoints")
    parser.add_argument("--data", default=None, help="QA data folder (default: UNIRAG_DATA, else ../shared/data when "
                        "it exists, else the repo's bundled data/)")
    parser.add_argument("--corpus", default="nq", choices=list(CORPUS_LABELS), help="corpus shown (and loaded) first")
    parser.add_argument("--concurrency", type=int, default=int(os.environ.get("UNIRAG_CONCURRENCY", "0")) or None,
                        help="other model events at once: re-asks, corpus loads, Your passages (default: 1 below 4 "
                        "usable cores, else 2); asks are batched (UNIRAG_MAX_BATCH; see docs/space.md)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("UNIRAG_THREADS", "0")) or None,
                        help="torch CPU threads (default: usable cores from the cgroup CPU quota - 1, leaving one for "
                        "the web server, split between the two sides when they run at once; OMP_NUM_THREADS is "
                        "respected)")
    parser.add_argument("--no-preload", action="store_true", help="load the first corpus on the first request only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from unirag.runtime import on_zero_gpu, question_workers, torch_threads

    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    args = parse_args(argv)
    try:
        if args.no_recovery and args.precision not in (None, "4bit", "nf4"):
            raise UniragError(f"--no-recovery applies to 4-bit weights, not --precision {args.precision}.")
        precision = "nf4" if args.no_recovery else args.precision
        config = AppConfig.from_env(precision=precision, llm=args.llm, encoder=args.encoder,
                                    checkpoint_dir=args.checkpoint_dir, data_dir=args.data)
    except UniragError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    # The cgroup quota, not os.cpu_count() (a 2-vCPU Space reports the host's cores): one core for the web server,
    # the rest split between the two sides when they answer at once.
    threads = args.threads or (None if "OMP_NUM_THREADS" in os.environ else torch_threads(config.parallel_sides))
    if threads:
        import torch

        torch.set_num_threads(threads)
    pipeline = Pipeline(config)
    print(f"[unirag] {TITLE}: precision {config.precision_label} on {config.device}"
          f"{' (ZeroGPU)' if on_zero_gpu() else ''}; checkpoints in {config.checkpoint_dir}; data in "
          f"{config.data_root()}; {threads or 'default'} torch thread(s)", flush=True)
    if not args.no_preload:
        pipeline.preload([args.corpus])
    demo = build_demo(pipeline, args.corpus)
    demo.queue(default_concurrency_limit=max(1, args.concurrency or question_workers()), max_size=64)
    demo.launch(server_name=args.host, server_port=args.port, show_error=True, css=CSS,
                theme=gr.themes.Soft(primary_hue="violet", secondary_hue="sky"), footer_links=["api"])


if __name__ == "__main__":
    main()
