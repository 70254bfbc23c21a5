"""Plotly figures and HTML for the app: pure functions of `Answer`s (with their typed `Trace`) and `DocidTree`s.

Nothing here loads a model or touches the disk, so every figure can be unit-tested on hand-made traces.
All document and user text goes through `html.escape` before it reaches any HTML string.
"""

from __future__ import annotations

import codecs
import html
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go

from unirag.answer import Answer, AnswerAttention, Trace, display_answer
from unirag.results import format_p

# --------------------------------------------------------------------------------------------- palette

JOINT_COLOR = "#7c3aed"  # violet: the joint model everywhere
RAG_COLOR = "#0284c7"  # sky blue: dense RAG everywhere
GOLD_COLOR = "#16a34a"
HIGHLIGHT_COLOR = "#facc15"  # the last question's path in the corpus tree (everything else is dimmed then)
HIGHLIGHT_LINE = "#111827"  # the path's outline: yellow alone can look like a palette colour
TREE_COLORWAY = ("#7c3aed", "#0284c7", "#db2777", "#0f766e", "#ea580c", "#4f46e5", "#a16207", "#be123c", "#0891b2",
                 "#65a30d")
MISS_COLOR = "#dc2626"
PATH_COLORS = ("#7c3aed", "#db2777", "#ea580c")  # one per selected document (1-3)
CANDIDATE_SCALE = "Purples"
FONT = "Inter, ui-sans-serif, system-ui, sans-serif"
LONG_CONTEXT_TOKENS = 80  # above this many context tokens the heatmap groups tokens into sentences


def _layout(fig: go.Figure, title: str, height: int = 360, **kwargs: Any) -> go.Figure:
    fig.update_layout(
        title={"text": title, "x": 0.01, "xanchor": "left", "font": {"size": 14}},
        height=height,
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
        font={"family": FONT, "size": 12},
        paper_bgcolor="rgba(0,0,0,0)",
        plot_bgcolor="rgba(0,0,0,0)",
        **kwargs,
    )
    return fig


def empty_figure(message: str, title: str = "", height: int = 220) -> go.Figure:
    """A blank figure carrying a centred message (used when a side has nothing to draw)."""
    fig = go.Figure()
    fig.add_annotation(text=_p(message), x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font={"size": 13, "color": "#64748b"})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, title, height)


def docid_str(docid: Sequence[int] | None) -> str:
    return "-".join(str(int(s)) for s in docid) if docid else "∅"


def _p(text: str) -> str:
    """Escape text for plotly's pseudo-HTML labels (it decodes &lt; &gt; &amp; but not &quot;)."""
    return html.escape(str(text), quote=False)


def _short(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


# --------------------------------------------------------------------------------------------- tokens


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte ↔ printable-character table used by byte-level BPE tokenizers (SmolLM2, Qwen, Llama-3)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


def is_byte_level(tokens: Sequence[str]) -> bool:
    """Raw byte-level BPE token strings (``Ġword``, ``Ċ``, ``ÐļÑĤÐ¾``) rather than decoded text.

    Every character must be in the byte map and the joined bytes must be valid UTF-8; then either a mapped space or
    newline (``Ġ``/``Ċ``) or a non-ASCII byte shows it is not plain text (a question without spaces, e.g. Japanese)."""
    joined = "".join(tokens)
    if not joined or " " in joined or "\n" in joined or not all(ch in _BYTE_DECODER for ch in joined):
        return False
    raw = bytes(_BYTE_DECODER[ch] for ch in joined)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:  # e.g. decoded Latin-1 text such as "café": not byte-level strings
        return False
    return "Ġ" in joined or "Ċ" in joined or any(b >= 0x80 for b in raw)


_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # sentencepiece byte-fallback pieces (Llama 2, Mistral)


def _token_bytes(tokens: Sequence[str]) -> list[bytes]:
    """The UTF-8 bytes each token stands for (byte-level map, sentencepiece ``▁`` and ``<0xNN>`` pieces)."""
    if is_byte_level(tokens):
        return [bytes(_BYTE_DECODER[ch] for ch in tok) for tok in tokens]
    out = []
    for tok in tokens:
        match = _SP_BYTE.match(tok)
        out.append(bytes([int(match.group(1), 16)]) if match else tok.replace("▁", " ").encode("utf-8"))
    return out


def clean_tokens(tokens: Sequence[str]) -> list[str]:
    """Readable text of each token, such that ``"".join(result)`` reads like the original text.

    Byte-level BPE strings are turned back into bytes and decoded incrementally (a character split over two
    tokens is shown with the token that completes it, the earlier pieces are ""); sentencepiece's ``▁`` becomes a
    space. Never a U+FFFD for a character that is whole over the tokens.
    """
    tokens = [str(t) for t in tokens]
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return [decoder.decode(b) for b in _token_bytes(tokens)]


def token_groups(tokens: Sequence[str]) -> list[tuple[int, int, str]]:
    """Tokens merged into whole characters: (start, end, text) runs of consecutive tokens, each the shortest run
    that ends on a character boundary. A character split over byte-level tokens (Cyrillic, CJK, emoji) is one
    unit, so weights are summed over its pieces instead of drawing each piece as "\ufffd"."""
    tokens = [str(t) for t in tokens]
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    groups, start, text = [], 0, ""
    for i, raw in enumerate(_token_bytes(tokens)):
        text += decoder.decode(raw)
        if not decoder.getstate()[0]:  # no bytes pending: the run ends on a character boundary
            groups.append((start, i + 1, text))
            start, text = i + 1, ""
    if start < len(tokens):  # a truncated character at the very end
        groups.append((start, len(tokens), text + decoder.decode(b"", final=True)))
    return groups


def _group_weights(groups: Sequence[tuple[int, int, str]], weights: Sequence[float]) -> list[float]:
    return [sum(weights[start:end]) for start, end, _ in groups]


# --------------------------------------------------------------------------------------------- context units


@dataclass
class Unit:
    """A run of context tokens (one token, or a sentence) and where it sits."""

    start: int  # token index in the context, inclusive
    end: int  # exclusive
    doc: int  # index of the document (0-based) or -1 when unknown
    text: str


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s*$")


def infer_doc_spans(context_tokens: Sequence[str], n_docs: int) -> list[list[int]]:
    """Split a dense-RAG context ("\\n".join of the passages) into per-document token spans.

    Returns [] when the newline count does not give exactly `n_docs` non-empty pieces (then no per-document view).
    """
    texts = clean_tokens(context_tokens)
    spans, start = [], 0
    for i, text in enumerate(texts):
        if "\n" in text:
            if i > start:
                spans.append([start, i])
            start = i + 1
    if start < len(texts):
        spans.append([start, len(texts)])
    return spans if n_docs and len(spans) == n_docs else []


def context_units(context_tokens: Sequence[str], doc_spans: Sequence[Sequence[int]] | None,
                  sentences: bool, max_sentence_tokens: int = 60) -> list[Unit]:
    """Tokens (or sentences) of the context, each tagged with its document."""
    texts = clean_tokens(context_tokens)
    n = len(texts)
    doc_of = [-1] * n
    for d, (start, end) in enumerate(doc_spans or []):
        for i in range(max(0, int(start)), min(n, int(end))):
            doc_of[i] = d
    if not sentences:  # one unit per whole character run (a split multi-byte character is one column)
        return [Unit(a, b, doc_of[a], text) for a, b, text in token_groups(context_tokens)]
    units: list[Unit] = []
    start = 0
    for i in range(n):
        last = i == n - 1
        boundary = last or doc_of[i + 1] != doc_of[i] or "\n" in texts[i + 1] or "\n" in texts[i]
        if not boundary and _SENTENCE_END.search(texts[i]) and texts[i + 1][:1].isspace():
            boundary = True
        if not boundary and i + 1 - start >= max_sentence_tokens:
            boundary = True
        if boundary:
            text = "".join(texts[start : i + 1])
            if text.strip():
                units.append(Unit(start, i + 1, doc_of[start], text.strip()))
            start = i + 1
    return units


def _matrix(weights: Any) -> list[list[float]]:
    rows = [[float(x) if x is not None and math.isfinite(float(x)) else 0.0 for x in row] for row in weights or []]
    return [r for r in rows if r]


def token_importance(attention: AnswerAttention) -> list[float]:
    """Mean attention of the answer tokens on each context token (0s when there is no trace)."""
    n = len(attention.context_tokens)
    rows = [r for r in _matrix(attention.weights) if len(r) == n]
    if not rows:
        return [0.0] * n
    return [sum(col) / len(rows) for col in zip(*rows, strict=True)]


# --------------------------------------------------------------------------------------------- docid path


def _paths(answer: Answer | None) -> list[list[dict[str, Any]]]:
    if answer is None:
        return []
    return [p for p in answer.trace.paths if p]


def docid_path_figure(answer: Answer | None, tree=None, height: int | None = None) -> go.Figure:
    """The path(s) down the cluster tree: one row per level, the candidate clusters of each visited prefix as
    markers (size and colour = the model's probability), the chosen branch of each selected document joined by
    a line. Hover gives each cluster's keyword label and size from the DocidTree.

    Trace layout (tests rely on it): one "candidates" trace per (level, prefix) with ``meta`` =
    {"kind": "candidates", "level", "prefix", "children", "probs", "chosen"}; one "path" trace per selected
    document with ``meta`` = {"kind": "path", "docid", "doc_id"}.
    """
    paths = _paths(answer)
    if not paths:
        return empty_figure("No docid path: the joint model is not loaded or retrieved nothing.",
                            "Retrieval path down the docid tree")
    fig = go.Figure()
    # x slots per level: groups (distinct prefixes) side by side, in the order the paths visit them.
    groups: dict[tuple[int, tuple[int, ...]], dict[str, Any]] = {}
    for path in paths:
        for level, info in enumerate(path):
            key = (level, tuple(int(s) for s in info.get("prefix", [])))
            groups.setdefault(key, info)
    positions: dict[tuple[int, tuple[int, ...]], float] = {}
    depth = max(len(p) for p in paths)
    width = 1.0
    for level in range(depth):
        cursor = 0.0
        keys = [k for k in groups if k[0] == level]
        for key in keys:
            info = groups[key]
            for child in info.get("children", []):
                positions[(level, key[1] + (int(child),))] = cursor
                cursor += 1.0
            cursor += 0.8  # gap between sibling groups
        width = max(width, cursor - 0.8)
        # centre the row
        offset = -(cursor - 0.8 - 1.0) / 2
        for key in keys:
            for child in groups[key].get("children", []):
                node = key[1] + (int(child),)
                positions[(level, node)] += offset

    chosen_nodes = {tuple(int(s) for s in step.get("prefix", [])) + (int(step["chosen"]),)
                    for path in paths for step in path}
    for (level, prefix), info in groups.items():
        children = [int(c) for c in info.get("children", [])]
        probs = [float(p) for p in info.get("probs", [])]
        xs, ys, sizes, texts, hovers, lines = [], [], [], [], [], []
        for child, prob in zip(children, probs, strict=False):
            node = prefix + (child,)
            xs.append(positions[(level, node)])
            ys.append(-level)
            sizes.append(12 + 38 * math.sqrt(max(prob, 0.0)))
            texts.append(f"{prob:.0%}" if node in chosen_nodes or (prob >= 0.2 and prob == max(probs)) else "")
            label = tree.label(node) if tree is not None else ""
            size = tree.size(node) if tree is not None else None
            kind = "document" if tree is not None and getattr(tree, "is_complete", lambda _: False)(node) else "cluster"
            hovers.append(
                f"<b>{kind} {_p(docid_str(node))}</b><br>p = {prob:.3f}"
                + (f"<br>{_p(_short(label, 80))}" if label else "")
                + (f"<br>{size} document{'s' if size != 1 else ''}" if size is not None else "")
            )
            lines.append(3 if node in chosen_nodes else 0.5)
        fig.add_trace(
            go.Scatter(
                x=xs, y=ys, mode="markers+text", text=texts, textposition="top center",
                textfont={"size": 10, "color": "#475569"},
                marker={"size": sizes, "color": probs, "colorscale": CANDIDATE_SCALE, "cmin": 0, "cmax": 1,
                        "line": {"width": lines, "color": "#1e1b4b"}, "opacity": 0.9},
                hovertext=hovers, hoverinfo="text", showlegend=False,
                name=f"level {level} candidates",
                meta={"kind": "candidates", "level": level, "prefix": list(prefix), "children": children,
                      "probs": probs, "chosen": [int(s["chosen"]) for p in paths for lv, s in enumerate(p)
                                                 if lv == level and tuple(s.get("prefix", [])) == prefix]},
            )
        )
    # Root and one path line per selected document.
    fig.add_trace(go.Scatter(x=[0], y=[1], mode="markers+text", text=["question"], textposition="top center",
                             marker={"size": 16, "color": "#0f172a", "symbol": "diamond"}, hoverinfo="skip",
                             showlegend=False, name="root", meta={"kind": "root"}))
    docs = answer.docs if answer is not None else []
    for i, path in enumerate(paths):
        docid = [int(step["chosen"]) for step in path]
        xs, ys = [0.0], [1.0]
        for level, step in enumerate(path):
            node = tuple(int(s) for s in step.get("prefix", [])) + (int(step["chosen"]),)
            xs.append(positions[(level, node)])
            ys.append(-level)
        doc = docs[i] if i < len(docs) else None
        title = doc.title if doc is not None else ""
        doc_id = doc.doc_id if doc is not None else ""
        color = PATH_COLORS[i % len(PATH_COLORS)]
        leaf_label = _short(title or doc_id, 38)
        fig.add_trace(
            go.Scatter(
                x=xs, y=ys, mode="lines+markers", line={"color": color, "width": 4 - min(i, 2)},
                marker={"size": 7, "color": color}, hoverinfo="skip",
                name=f"doc {i + 1}: {_p(leaf_label)}", legendrank=i,
                meta={"kind": "path", "docid": docid, "doc_id": doc_id},
            )
        )
    # Keyword label of the chosen cluster at each level, on the right of the first path.
    if tree is not None:
        for level, step in enumerate(paths[0]):
            node = tuple(int(s) for s in step.get("prefix", [])) + (int(step["chosen"]),)
            label = tree.label(node)
            if label:
                fig.add_annotation(x=width / 2 + 0.6, y=-level, text=_p(_short(label, 34)), showarrow=False,
                                   xanchor="left", font={"size": 11, "color": PATH_COLORS[0]})
    fig.update_xaxes(visible=False, range=[-width / 2 - 1, width / 2 + 9])
    fig.update_yaxes(tickvals=[1] + [-lv for lv in range(depth)],
                     ticktext=["root"] + [f"level {lv}" for lv in range(depth)],
                     range=[-depth + 0.5, 1.6], showgrid=False, zeroline=False)
    return _layout(fig, "Retrieval path down the docid tree (probability of each candidate cluster)",
                   height or 130 + 75 * depth, showlegend=True,
                   legend={"orientation": "h", "y": -0.02, "yanchor": "top", "x": 0, "font": {"size": 11}})


def search_progress_figure(paths: Sequence[Sequence[Mapping[str, Any]]], tree=None, level: int = 0) -> go.Figure:
    """The docid search while it runs: the best paths so far (each a list of the search's per-level dicts), drawn
    as `docid_path_figure` draws the finished ones, titled with the level just decided."""
    live = Answer("joint", "", "", [], trace=Trace(paths=[list(p) for p in paths if p]))
    fig = docid_path_figure(live, tree)
    if paths:
        fig.update_layout(title={"text": f"Docid search: level {level} decided, best {len(paths)} paths so far…"})
    return fig


def round_answer(answer: Answer, number: int) -> Answer:
    """Round `number` (1-based) of a multi-round joint answer as an `Answer` of its own (question = that round's
    query), so every per-answer view (the docid path, the beams) draws it."""
    step = answer.trace.rounds[number - 1]
    return Answer(answer.system, step.query, step.answer, list(step.docs),
                  trace=Trace(beams=list(step.beams), paths=list(step.paths)), ranked_doc_ids=list(step.ranked_doc_ids))


def rounds_path_figure(answer: Answer | None, tree=None) -> go.Figure:
    """The docid path of each round side by side (one panel per round, round 1 on the left); a single-round answer
    is `docid_path_figure` itself. Each panel's traces are `docid_path_figure`'s with ``meta["round"]`` added."""
    rounds = answer.trace.rounds if answer is not None else []
    if not rounds:
        return docid_path_figure(answer, tree)
    from plotly.subplots import make_subplots

    panels = [docid_path_figure(round_answer(answer, step.round), tree) for step in rounds]
    fig = make_subplots(rows=1, cols=len(rounds), horizontal_spacing=0.03,
                        subplot_titles=[f"Round {step.round}" + (" (answer)" if step is rounds[-1] else "")
                                        for step in rounds])
    for col, (step, panel) in enumerate(zip(rounds, panels, strict=True), start=1):
        for trace in panel.data:
            meta = dict(trace.meta or {})
            trace.meta = {**meta, "round": step.round}
            if meta.get("kind") == "path":  # one legend entry per round's document
                trace.name = f"R{step.round} {trace.name}"
            fig.add_trace(trace, row=1, col=col)
        for note in panel.layout.annotations:
            fig.add_annotation(note, row=1, col=col)
        fig.update_xaxes(panel.layout.xaxis, row=1, col=col)
        fig.update_yaxes(panel.layout.yaxis, row=1, col=col, showticklabels=col == 1)
    height = max(int(panel.layout.height or 0) for panel in panels)
    return _layout(fig, f"Retrieval path of each of the {len(rounds)} rounds (round r > 1 searches with the "
                        "question plus round r-1's answer)", height + 20, showlegend=True,
                   legend={"orientation": "h", "y": -0.02, "yanchor": "top", "x": 0, "font": {"size": 11}})


def rounds_html(answer: Answer | None, gold_answers: Sequence[str] = (), gold_doc_id: str | None = None) -> str:
    """One row per round of a multi-round joint answer: the query it searched with (what it added to the question
    in bold), the documents it read, its answer (✓ when a gold answer is contained). "" for a single round."""
    if answer is None or not answer.trace.rounds:
        return ""
    from unirag.eval import contains_answer

    rows = []
    for step in answer.trace.rounds:
        query = html.escape(step.query)
        if step.round > 1 and step.query.startswith(answer.question):
            added = step.query[len(answer.question):]
            query = f"{html.escape(answer.question)}<b>{html.escape(added)}</b>"
        docs = ", ".join(
            f'<span title="{html.escape(d.doc_id)}"{" class=ur-gold-doc" if d.doc_id == gold_doc_id else ""}>'
            f"{html.escape(docid_str(d.docid))} {html.escape(_short(d.title or d.doc_id, 30))}</span>"
            for d in step.docs)
        shown = display_answer(step.answer, answer.question)
        mark = " ✓" if gold_answers and contains_answer(step.answer, gold_answers) else ""
        rows.append(f"<tr><td>{step.round}</td><td>{query}</td><td>{docs or '–'}</td>"
                    f"<td>{html.escape(shown) or '<i>no answer</i>'}{mark}</td></tr>")
    return ('<div class="ur-rounds"><table class="ur-table"><tr><th>round</th><th>docid search query</th>'
            f'<th>documents read</th><th>answer</th></tr>{"".join(rows)}</table>'
            '<div class="ur-muted">The card shows the last round\'s answer.</div></div>')


# --------------------------------------------------------------------------------------------- tables


# Short headers (one word each, so no header wraps a character a line) and a width for every column.
BEAM_HEADERS = ["#", "docid", "doc", "title", "log-p", "match", "score", "q-lik", "checked", "used"]
BEAM_WIDTHS = ["4.5%", "11%", "11%", "19.5%", "9%", "8.5%", "9%", "9%", "11%", "7.5%"]
BEAM_HELP = ("log-p = the path's log-probability, match = how well the document matches the question, "
             "score = log-p + match; with the self-check on, q-lik = the question's log-likelihood after the "
             "document and checked = the re-ranked score; used = read by the answer.")


def beam_rows(answer: Answer | None, titles: Mapping[str, str] | None = None, limit: int = 10) -> list[list[Any]]:
    """Rows of the beam table: every finished beam, best first (score = path log-prob + document match).

    With the self-check on, the re-read documents also show the question's log-likelihood and their checked
    score (the ranking that chose the documents); the others leave both blank."""
    if answer is None:
        return []
    titles = titles or {}
    selected = set(answer.doc_ids)
    checked = {row.doc_id: row for row in answer.trace.self_check}
    rows = []
    for rank, beam in enumerate(answer.trace.beams[:limit], start=1):
        doc_id = str(beam.get("doc_id", ""))
        logprob = float(beam.get("logprob", float("nan")))
        match = float(beam.get("document_match", 0.0))
        rows.append([rank, docid_str(beam.get("docid")), doc_id, titles.get(doc_id, ""), round(logprob, 2),
                     round(match, 2), round(float(beam.get("score", logprob + match)), 2),  # 2 decimals: no wrap
                     *((round(checked[doc_id].question_logprob, 2), round(checked[doc_id].score, 2))
                       if doc_id in checked else ("", "")),
                     "✓" if doc_id in selected else ""])
    return rows


# --------------------------------------------------------------------------------------------- bars


def retrieval_bars_figure(answer: Answer | None, gold_doc_id: str | None = None, title: str | None = None,
                          color: str = RAG_COLOR) -> go.Figure:
    """Horizontal bars of the retrieved passages' scores (cosine similarity for dense RAG; `title` names another
    score), best on top."""
    if answer is None or not answer.docs:
        return empty_figure("No passages retrieved.", title or "Top-k passages")
    labels = [f"#{i + 1} {_short(d.title or d.doc_id, 40)}" for i, d in enumerate(answer.docs)]
    scores = [float(d.score) for d in answer.docs]
    colors = [GOLD_COLOR if gold_doc_id and d.doc_id == gold_doc_id else color for d in answer.docs]
    hovers = [f"{_p(d.doc_id)}<br>{_p(_short(d.title, 60))}<br>score {d.score:.3f}"
              + ("<br><b>gold passage</b>" if gold_doc_id and d.doc_id == gold_doc_id else "") for d in answer.docs]
    fig = go.Figure(go.Bar(x=scores, y=[_p(lb) for lb in labels], orientation="h", marker={"color": colors},
                           text=[f"{s:.3f}" for s in scores], textposition="auto", hovertext=hovers, hoverinfo="text",
                           meta={"doc_ids": answer.doc_ids}))
    low = min(scores)
    # From 0 either way: re-ranked scores (rag-selfcheck: cosine + weight × log-probability) are negative.
    fig.update_xaxes(range=[min(0.0, low - 0.05), max(0.0, max(scores) * 1.08) + 1e-6], title_text="similarity",
                     gridcolor="#e2e8f0")
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, title or "Top-k passages by dense similarity" + (" (green = gold)" if gold_doc_id else ""),
                   110 + 34 * len(scores))


# --------------------------------------------------------------------------------------------- heatmap


def attention_heatmap(answer: Answer | None, title: str = "Answer tokens × context",
                      max_tokens: int = LONG_CONTEXT_TOKENS,
                      colorscale: str = "Purples") -> go.Figure:
    """Answer tokens (rows) × context tokens, or context sentences when the context is long (columns).

    Sentence cells sum the attention of their tokens. ``meta`` = {"unit": "token"|"sentence", "shape": [rows, cols]}.
    """
    attention = answer.trace.answer_attention if answer is not None else AnswerAttention()
    context = list(attention.context_tokens)
    rows = [r for r in _matrix(attention.weights) if len(r) == len(context)]
    if not context or not rows or len(rows) != len(attention.answer_tokens):
        return empty_figure("No attention trace for this answer.", title)
    # Answer tokens merged into whole characters: a merged row is the mean attention of its pieces.
    answer_groups = token_groups(attention.answer_tokens)
    answer_tokens = [text for _, _, text in answer_groups]
    rows = [[sum(col) / (b - a) for col in zip(*rows[a:b], strict=True)] for a, b, _ in answer_groups]
    spans = attention.doc_spans or infer_doc_spans(context, len(answer.docs) if answer else 0)
    sentences = len(context) > max_tokens
    units = context_units(context, spans, sentences)
    z = [[sum(row[u.start : u.end]) for u in units] for row in rows]
    doc_tag = [f"D{u.doc + 1} " if u.doc >= 0 else "" for u in units]
    if sentences:
        ticks = [f"{doc_tag[i]}S{i + 1}" for i in range(len(units))]
        hover_x = [_p(_short(u.text, 140)) for u in units]
    else:
        ticks = [_p(u.text.replace("\n", "⏎") or "·") for u in units]
        hover_x = ticks
    y_ticks = [_p(t.replace("\n", "⏎").strip() or "·") for t in answer_tokens]
    custom = [[hover_x[j] for j in range(len(units))] for _ in rows]
    fig = go.Figure(
        go.Heatmap(
            z=z, x=list(range(len(units))), y=list(range(len(rows))), colorscale=colorscale, zmin=0,
            customdata=custom, colorbar={"thickness": 10, "title": {"text": "attn", "side": "right"}},
            hovertemplate="answer %{y}: <b>%{text}</b><br>%{customdata}<br>attention %{z:.3f}<extra></extra>",
            text=[[y_ticks[i]] * len(units) for i in range(len(rows))],
            meta={"unit": "sentence" if sentences else "token", "shape": [len(rows), len(units)]},
        )
    )
    step = max(1, math.ceil(len(units) / 40))
    fig.update_xaxes(tickvals=list(range(0, len(units), step)), ticktext=ticks[::step], tickangle=-60,
                     tickfont={"size": 9}, showgrid=False)
    fig.update_yaxes(tickvals=list(range(len(rows))), ticktext=y_ticks, autorange="reversed", showgrid=False,
                     tickfont={"size": 10})
    # Document boundaries.
    for d in range(1, max((u.doc for u in units), default=0) + 1):
        first = next((j for j, u in enumerate(units) if u.doc == d), None)
        if first:
            fig.add_vline(x=first - 0.5, line={"color": "#0f172a", "width": 1, "dash": "dot"})
    unit_name = "sentences" if sentences else "tokens"
    return _layout(fig, f"{title} ({len(rows)} × {len(units)} {unit_name})", 170 + 16 * min(len(rows), 24))


# --------------------------------------------------------------------------------------------- HTML


def _alpha_bg(rgb: tuple[int, int, int], alpha: float) -> str:
    alpha = max(0.0, min(1.0, alpha))
    return f"background-color: rgba({rgb[0]},{rgb[1]},{rgb[2]},{alpha:.2f})"


def highlight_tokens_html(tokens: Sequence[str], weights: Sequence[float], rgb: tuple[int, int, int] = (124, 58, 237),
                          top_k: int = 3) -> str:
    """Tokens shaded by weight (e.g. the retrieval heads' attention over the question); the top_k in bold."""
    groups = token_groups(tokens)  # whole characters: a split multi-byte character weighs the sum of its pieces
    texts = [text for _, _, text in groups]
    flat = [float(x) for x in weights][: len(tokens)] + [0.0] * max(0, len(tokens) - len(weights))
    w = _group_weights(groups, flat)
    peak = max(w, default=0.0) or 1.0
    top = set(sorted(range(len(w)), key=lambda i: -w[i])[:top_k]) if any(w) else set()
    parts = []
    for i, text in enumerate(texts):
        style = _alpha_bg(rgb, 0.85 * w[i] / peak)
        cls = ' class="ur-top"' if i in top else ""
        parts.append(f'<span{cls} style="{style}" title="{w[i]:.3f}">{html.escape(text)}</span>')
    return "".join(parts)


def answer_span_html(answer: Answer, doc, context_chars: int = 90) -> str:
    """For the document a span answer was copied from: the span highlighted where it sits in the text, with the
    words around it; "" for every other document."""
    span = answer.trace.answer_span
    if span is None or span.doc_id != doc.doc_id or not 0 <= span.start < span.end <= len(doc.text):
        return ""
    before = doc.text[max(0, span.start - context_chars) : span.start]
    after = doc.text[span.end : span.end + context_chars]
    return ('<div class="ur-answer-span" style="margin:.2rem 0 .35rem">'
            f'<span class="ur-muted">Answer span: </span>{"…" if span.start > context_chars else ""}'
            f'{html.escape(before)}<mark style="background:#fde68a; font-weight:700">'
            f'{html.escape(doc.text[span.start:span.end])}</mark>{html.escape(after)}'
            f'{"…" if span.end + context_chars < len(doc.text) else ""}</div>')


def documents_html(answer: Answer | None, gold_doc_id: str | None = None, rgb: tuple[int, int, int] = (124, 58, 237),
                   top_tokens: int = 8, top_sentences: int = 2, max_chars: int = 1400,
                   scores_label: str = "score") -> str:
    """Cards of the selected documents with GeAR-style localisation: the sentences and tokens the answer attended to
    are shaded (sentence shading = the sentence's share of attention; the top tokens are bold and underlined)."""
    if answer is None or not answer.docs:
        return '<div class="ur-empty">No documents.</div>'
    attention = answer.trace.answer_attention
    context = list(attention.context_tokens)
    importance = token_importance(attention)
    spans = attention.doc_spans or infer_doc_spans(context, len(answer.docs))
    texts = clean_tokens(context)
    units = context_units(context, spans, sentences=True) if spans and any(importance) else []
    unit_mass = [sum(importance[u.start : u.end]) for u in units]
    peak_unit = max(unit_mass, default=0.0) or 1.0
    top_units = set(sorted(range(len(units)), key=lambda j: -unit_mass[j])[:top_sentences * len(answer.docs)])
    # Top tokens are whole characters (summed pieces), marked on the token that completes the character.
    groups = token_groups(context)
    group_mass = _group_weights(groups, importance)
    ranked = sorted(range(len(groups)), key=lambda g: -group_mass[g])
    top_tok = {groups[g][1] - 1: group_mass[g] for g in ranked[:top_tokens]} if any(importance) else {}
    cards = []
    for d, doc in enumerate(answer.docs):
        is_gold = bool(gold_doc_id) and doc.doc_id == gold_doc_id
        badge = '<span class="ur-badge ur-gold">gold passage</span>' if is_gold else ""
        docid = f'<span class="ur-docid">docid {html.escape(docid_str(doc.docid))}</span>' if doc.docid else ""
        head = (f'<div class="ur-doc-head"><span class="ur-rank">#{d + 1}</span> '
                f'<b>{html.escape(doc.title or doc.doc_id)}</b> <span class="ur-muted">{html.escape(doc.doc_id)} · '
                f'{scores_label} {doc.score:.3f}</span> {docid} {badge}</div>')
        doc_units = [(j, u) for j, u in enumerate(units) if u.doc == d]
        if doc_units:
            body_parts = []
            for j, u in doc_units:
                pieces = []
                for i in range(u.start, u.end):
                    piece = html.escape(texts[i])
                    if i in top_tok and texts[i].strip():
                        piece = f'<span class="ur-tok" title="attention {top_tok[i]:.3f}">{piece}</span>'
                    pieces.append(piece)
                style = _alpha_bg(rgb, 0.55 * unit_mass[j] / peak_unit)
                cls = "ur-sent ur-top-sent" if j in top_units else "ur-sent"
                body_parts.append(f'<span class="{cls}" style="{style}" title="sentence attention {unit_mass[j]:.3f}">'
                                  f'{"".join(pieces)}</span>')  # tokens carry their own spaces
            body = "".join(body_parts)
        else:
            text = doc.text if len(doc.text) <= max_chars else doc.text[:max_chars] + "…"
            body = html.escape(text)
        cls = "ur-doc ur-doc-gold" if is_gold else "ur-doc"
        cards.append(f'<div class="{cls}" id="{doc_anchor(answer.system, d)}">{head}'  # citations link here
                     f'{answer_span_html(answer, doc)}<div class="ur-doc-body">{body}</div></div>')
    legend = ('<div class="ur-muted ur-legend">Shading: share of the answer\'s attention per sentence; '
              '<span class="ur-tok">underlined</span> = most-attended tokens.</div>') if units else ""
    return legend + "".join(cards)


def localization_html(localization: Any, title: str = "", rgb: tuple[int, int, int] = (124, 58, 237),
                      method: str = "retrieval_heads") -> str:
    """The gold passage sentence by sentence (a `unirag.answer_sentences.SentenceLocalization`): the answer sentence
    boxed in green, each sentence shaded by its share of the retrieval heads' attention, the one they rank first
    in bold, and a line saying whether it is the answer sentence. "" without a localization."""
    if localization is None or not localization.sentences or method not in localization.rankings:
        return ""
    scores = list(localization.scores.get(method, []))
    scores += [0.0] * (len(localization.sentences) - len(scores))
    total, peak = sum(scores) or 1.0, max(scores, default=0.0) or 1.0
    ranking = localization.rankings[method]
    top, gold = ranking[0], localization.answer
    parts = []
    for i, sentence in enumerate(localization.sentences):
        share = scores[i] / total
        style = _alpha_bg(rgb, 0.6 * scores[i] / peak)
        if i == gold:
            style += "; outline:2px solid #16a34a; outline-offset:1px"
        weight = "; font-weight:700" if i == top else ""
        tags = (" · answer sentence" if i == gold else "") + (" · retrieval heads' first" if i == top else "")
        parts.append(f'<span class="ur-sent" style="{style}{weight}" title="sentence {i + 1}: {share:.0%} of the '
                     f'retrieval heads\' attention{tags}">{html.escape(sentence.text)}</span> ')
    if gold is None:
        verdict = "the answer is not found in the passage."
    elif top == gold:
        verdict = f"sentence {top + 1}, <b>the answer sentence</b>."
    else:
        verdict = (f"sentence {top + 1}; the answer sentence ({gold + 1}) comes "
                   f"{ranking.index(gold) + 1}{_ordinal(ranking.index(gold) + 1)}.")
    head = (f'<div class="ur-muted ur-legend">Gold passage{": " + html.escape(title) if title else ""} · '
            f"the retrieval heads rank {verdict} Shading: their attention per sentence (last prompt position); "
            '<span style="outline:2px solid #16a34a">green box</span> = the sentence holding the gold answer.</div>')
    return f'<div class="ur-doc ur-localization">{head}<div class="ur-doc-body">{"".join(parts)}</div></div>'


def _ordinal(n: int) -> str:
    return "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


def question_html(answer: Answer | None) -> str:
    """The question with the retrieval heads' attention (joint model) shaded over its tokens."""
    if answer is None:
        return ""
    trace = answer.trace.retrieval_attention
    tokens, weights = trace.tokens, trace.weights
    if not tokens or len(tokens) != len(weights):
        return f'<div class="ur-question">{html.escape(answer.question)}</div>'
    return ('<div class="ur-question"><span class="ur-muted">Retrieval heads attended to:</span> '
            f'{highlight_tokens_html(tokens, weights)}</div>')


def evidence_html(answer: Answer | None, max_chars: int = 700) -> str:
    """The evidence system's evidence marked (<mark>) inside its source document, with the document's docid path
    (each level's chosen branch and its probability); "" for an answer without evidence."""
    evidence = answer.trace.evidence if answer is not None else None
    if evidence is None:
        return ""
    index = next((i for i, d in enumerate(answer.docs) if d.doc_id == evidence.doc_id), None)
    doc = answer.docs[index] if index is not None else None
    text = doc.text if doc is not None else evidence.text
    start, end = (evidence.start, evidence.end) if doc is not None else (0, len(text))
    room = max(max_chars - (end - start), 0) // 2  # context either side, the evidence always whole
    before, after = text[max(start - room, 0):start], text[end:end + room]
    body = (("…" if start - room > 0 else "") + html.escape(before) + f'<mark class="ur-evidence-mark">'
            f"{html.escape(text[start:end])}</mark>" + html.escape(after) + ("…" if end + room < len(text) else ""))
    path = ""
    levels = answer.trace.paths[index] if index is not None and index < len(answer.trace.paths) else []
    if levels:
        steps = []
        for level in levels:
            children, probs = list(level.get("children", [])), list(level.get("probs", []))
            chosen = level.get("chosen")
            p = probs[children.index(chosen)] if chosen in children and len(probs) == len(children) else None
            steps.append(f"{chosen}" + (f" ({p:.2f})" if p is not None else ""))
        path = f'<div class="ur-muted">docid path {html.escape(" → ".join(steps))}</div>'
    elif doc is not None and doc.docid:
        path = f'<div class="ur-muted">docid {html.escape(docid_str(doc.docid))}</div>'
    title = html.escape(doc.title or doc.doc_id) if doc is not None else html.escape(evidence.doc_id)
    return (f'<div class="ur-evidence"><div class="ur-doc-head"><b>Evidence</b> ({evidence.tokens} tokens, stop: '
            f'{html.escape(evidence.stop_reason)}) from <b>{title}</b> <span class="ur-muted">'
            f'{html.escape(evidence.doc_id)}</span></div>{path}<div class="ur-doc-text">{body}</div></div>')


def _ms(value: float) -> str:
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.0f} ms"


def answer_card_html(answer: Answer | None, system_label: str, color: str, gold_found: bool | None = None,
                     gold_rank: int | None = None, correct: bool | None = None, gold_answers: Sequence[str] = (),
                     error: str | None = None, exact: bool | None = None, f1: float | None = None) -> str:
    """The answer span (`display_answer`: the same cleaning on both sides), correctness and gold-passage badges,
    latency per stage and token counts. Correctness: `exact`/`f1` of the shown span (the strong marks) and
    `correct` = a gold answer contained somewhere in the raw output (the weaker badge)."""
    head = f'<div class="ur-card-title" style="color:{color}">{html.escape(system_label)}</div>'
    if error:
        body = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(error))
        return f'<div class="ur-card ur-card-error">{head}<div class="ur-error">{body}</div></div>'
    if answer is None:
        return f'<div class="ur-card">{head}<div class="ur-muted">Ask a question to see this side.</div></div>'
    text = display_answer(answer.text, answer.question)
    raw = answer.text.strip()
    if text:
        shown = html.escape(text)
    else:  # e.g. the reader only echoed the prompt: say so, keep the raw output in the tooltip
        shown = (f'<span class="ur-muted" title="raw output: {html.escape(_short(raw, 300))}">(no answer: '
                 f'{"the output only echoes the prompt" if raw else "empty output"})</span>')
    badges = _correctness_badges(correct, exact, f1, gold_answers)
    if gold_found is not None:
        badges.append(f'<span class="ur-badge ur-ok">✓ gold passage retrieved (#{gold_rank})</span>' if gold_found
                      else '<span class="ur-badge ur-bad">✗ gold passage missed</span>')
    timings = " · ".join(f"{html.escape(k)} {_ms(v)}" for k, v in answer.timings_ms.items())
    stats = (f'<div class="ur-stats"><span><b>latency</b> {_ms(answer.latency_ms)} <span class="ur-muted">({timings})'
             f'</span></span><span><b>tokens</b> prompt {answer.prompt_tokens} · context {answer.context_tokens} · '
             f'answer {answer.answer_tokens}</span></div>')
    notices = "".join(f'<div class="ur-notice">{html.escape(n)}</div>' for n in answer.notices)
    return (f'<div class="ur-card" style="border-top-color:{color}">{head}<div class="ur-answer">{shown}</div>'
            f'<div class="ur-badges">{" ".join(badges)}</div>{stats}{evidence_html(answer)}{notices}</div>')


def streaming_card_html(system_label: str, color: str, text: str) -> str:
    """An answer card while its answer is being written: the text so far and a cursor, no badges yet."""
    head = f'<div class="ur-card-title" style="color:{color}">{html.escape(system_label)}</div>'
    shown = html.escape(text) if text else '<span class="ur-muted">reading the documents…</span>'
    return (f'<div class="ur-card ur-card-live" style="border-top-color:{color}">{head}'
            f'<div class="ur-answer">{shown}<span class="ur-cursor">▍</span></div>'
            '<div class="ur-muted">answering…</div></div>')


MARK_HELP = {
    "exact": "Exact match: the shown answer, normalised (case, punctuation, articles), equals a gold answer.",
    "f1": "Token F1 of the shown answer against the best gold answer (overlap of words); ≈ from 0.5 up.",
    "miss": "The shown answer is neither an exact match nor close (token F1 below 0.5).",
    "contains": "A gold answer occurs somewhere in the model's raw output (the accuracy metric). Weaker: it also "
                "counts a match inside a wrong or rambling output.",
}


def _correctness_badges(correct: bool | None, exact: bool | None, f1: float | None,
                        gold_answers: Sequence[str]) -> list[str]:
    """Strong mark on the shown span (✓ exact, ≈ F1, ✗) plus the weaker "contains gold" badge; tooltips say why."""
    badges = []
    golds = ", ".join(html.escape(_short(g, 40)) for g in gold_answers[:3])
    if exact:
        badges.append(f'<span class="ur-badge ur-ok" title="{html.escape(MARK_HELP["exact"])}">✓ exact</span>')
    elif f1 is not None and f1 >= 0.5:
        badges.append(f'<span class="ur-badge ur-near" title="{html.escape(MARK_HELP["f1"])}">≈ F1 {f1:.2f}</span>')
    elif exact is not None or f1 is not None:
        badges.append(f'<span class="ur-badge ur-bad" title="{html.escape(MARK_HELP["miss"])}">✗ not the answer'
                      f'{f" (F1 {f1:.2f})" if f1 else ""}</span>')
    if correct is not None:
        label = "contains gold" if correct else "no gold in output"
        badges.append(f'<span class="ur-badge ur-weak" title="{html.escape(MARK_HELP["contains"])}">{label}</span>')
    if (correct is not None or exact is not None) and not exact:
        badges.append(f'<span class="ur-muted">gold: {golds}</span>')
    return badges


def char_counter_html(n: int, limit: int) -> str:
    """"n / limit characters" under the question box; at the limit it says the rest is cut (CHAR_COUNTER_JS
    renders the same in the browser while typing)."""
    full = " — the limit: longer input is cut" if n >= limit else ""
    cls = "ur-counter ur-counter-full" if n >= limit else "ur-counter"
    return f'<div class="{cls}">{n:,} / {limit:,} characters{full}</div>'


# Same HTML as char_counter_html, computed in the browser on every change (LIMIT is replaced by the app).
CHAR_COUNTER_JS = """(q) => { const n = (q || "").length, limit = LIMIT, full = n >= limit;
  return `<div class="ur-counter${full ? " ur-counter-full" : ""}">${n.toLocaleString("en-US")} / `
    + `${limit.toLocaleString("en-US")} characters${full ? " — the limit: longer input is cut" : ""}</div>`; }"""


def message_html(text: str, kind: str = "warn") -> str:
    """A page-level message box; `text` is escaped, `code` spans written as `...` become <code>."""
    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return f'<div class="ur-msg ur-msg-{kind}">{escaped}</div>'


# --------------------------------------------------------------------------------------------- corpus tree


def corpus_tree_figure(tree, max_depth: int = 3, include_documents: bool = True, highlight: Sequence[int] | None = None
                       ) -> go.Figure:
    """Sunburst of the whole docid tree: clusters labelled with their keywords and sized by document count.

    ``ids`` are "root", "c:<docid prefix>" for clusters and "d:<docid>" for documents (plotly expands on click).
    With `highlight` (a document's docid) its path is yellow with a dark outline, every other sector is a pale
    version of its colour, and the figure opens at the ancestor from which the document is within `max_depth`.
    """
    if tree is None or len(tree) == 0:
        return empty_figure("No docid tree loaded.", "Corpus tree", 400)
    ids, labels, parents, values, hovers = [], [], [], [], []
    colors: list[str | None] = []

    def node_id(prefix: tuple[int, ...]) -> str:
        if not prefix:
            return "root"
        return ("d:" if tree.is_complete(prefix) else "c:") + docid_str(prefix)

    on_path = {tuple(highlight[:i]) for i in range(1, len(highlight) + 1)} if highlight else set()
    tops = [p for p in tree.nodes() if len(p) == 1]

    def _dim(prefix: tuple[int, ...]) -> str | None:
        """Pale palette colour of the prefix's top-level cluster when a path is highlighted (None: the colorway)."""
        if not on_path or not prefix or prefix[:1] not in tops:
            return "#f1f5f9" if on_path else None
        color = TREE_COLORWAY[tops.index(prefix[:1]) % len(TREE_COLORWAY)]
        r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
        return f"rgba({r},{g},{b},0.22)"

    def short_label(prefix: tuple[int, ...], label: str) -> str:
        words = [w.strip() for w in label.split(",") if w.strip()]
        return ", ".join(words[:2]) if len(prefix) == 1 else (words[0] if words else label)

    for prefix in tree.nodes():
        size = tree.size(prefix)
        label = tree.label(prefix) or docid_str(prefix)
        ids.append(node_id(prefix))
        labels.append(_p("corpus" if not prefix else _short(short_label(prefix, label), 22)))
        parents.append("" if not prefix else node_id(prefix[:-1]))
        values.append(size)
        hovers.append(f"<b>{_p(docid_str(prefix) if prefix else 'root')}</b><br>"
                      f"{_p(_short(label, 90))}<br>{size} documents")
        colors.append(HIGHLIGHT_COLOR if prefix in on_path else _dim(prefix))
    if include_documents:
        for docid in tree.docids:
            ids.append(node_id(docid))
            label = tree.label(docid) or tree.doc_id_at(docid)
            labels.append(("★ " if docid in on_path else "") + _p(_short(label, 22)))
            parents.append(node_id(docid[:-1]))
            values.append(1)
            hovers.append(f"<b>document {_p(docid_str(docid))}</b><br>{_p(_short(label, 90))}<br>"
                          f"{_p(tree.doc_id_at(docid))}")
            colors.append(HIGHLIGHT_COLOR if docid in on_path else _dim(docid))
    # Colours: one per top-level cluster (deeper rings inherit them). A highlighted path is yellow with a dark
    # outline and every other sector is pale, so the path stands out from the palette.
    marker: dict[str, Any] = {"line": {"width": 0.5, "color": "white"}}
    level = None
    if on_path:
        marker["colors"] = colors
        lit = [i in path_ids for i in ids] if (path_ids := {node_id(q) for q in on_path}) else []
        marker["line"] = {"width": [3 if x else 0.5 for x in lit], "color": [HIGHLIGHT_LINE if x else "white"
                                                                             for x in lit]}
        # Open at the deepest ancestor that still shows the document within max_depth rings (the centre counts).
        depth = max(0, len(highlight) - max_depth + 1)
        level = node_id(tuple(highlight[:depth]))
    fig = go.Figure(
        go.Sunburst(ids=ids, labels=labels, parents=parents, values=values, branchvalues="total",
                    hovertext=hovers, hoverinfo="text", maxdepth=max_depth, insidetextorientation="radial",
                    marker=marker, level=level, meta={"nodes": len(ids), "level": level},
                    leaf={"opacity": 1.0 if on_path else 0.7})  # plotly fades leaves: not the highlighted document
    )
    fig.update_layout(sunburstcolorway=list(TREE_COLORWAY), extendsunburstcolors=True)
    shape = tree.shape()
    return _layout(fig, f"Docid tree: {shape['documents']} documents, {shape['clusters']} clusters, depth ≤ "
                        f"{shape['depth_max']} (click a cluster to zoom)", 640)


def cluster_choices(tree, max_depth: int | None = None) -> list[tuple[str, str]]:
    """(label, value) pairs for a cluster dropdown: value is the docid prefix "3-1" ("" for the root)."""
    if tree is None:
        return []
    out = []
    for prefix in tree.nodes():
        if max_depth is not None and len(prefix) > max_depth:
            continue
        label = tree.label(prefix) or ""
        name = docid_str(prefix) if prefix else "root"
        out.append((f"{name} · {_short(label, 50)} ({tree.size(prefix)})", docid_str(prefix) if prefix else ""))
    return out


def parse_prefix(text: str | None) -> tuple[int, ...]:
    """ "3-1-4" / "3 1 4" / "3,1" → (3, 1, 4); "" or "root" → (). Raises ValueError on anything else."""
    text = (text or "").strip().lower()
    if text in ("", "root", "∅"):
        return ()
    parts = [p for p in re.split(r"[\s,\-./]+", text) if p]
    if not all(p.isdigit() for p in parts):
        raise ValueError(f"not a docid prefix: {text!r} (use digits separated by '-', e.g. 3-1)")
    return tuple(int(p) for p in parts)


def cluster_docs_html(tree, prefix: Sequence[int], texts: Mapping[str, tuple[str, str]] | None = None,
                      limit: int = 200) -> str:
    """The documents under a cluster: docid, title and the start of the text (all escaped)."""
    prefix = tuple(prefix)
    if tree is None:
        return '<div class="ur-empty">No docid tree loaded.</div>'
    size = tree.size(prefix)
    if size == 0:
        return message_html(f"No cluster {docid_str(prefix)} in this tree.", "warn")
    texts = texts or {}
    children = tree.allowed(prefix)
    sub = "".join(
        f'<li><code>{html.escape(docid_str(prefix + (c,)))}</code> {html.escape(_short(tree.label(prefix + (c,)), 60))}'
        f' <span class="ur-muted">({tree.size(prefix + (c,))})</span></li>'
        for c in children if not tree.is_complete(prefix + (c,))
    )
    rows = []
    docs = tree.docs_under(prefix)
    for doc_id in docs[:limit]:
        title, text = texts.get(doc_id, ("", ""))
        rows.append(f"<tr><td><code>{html.escape(docid_str(tree.docid_of(doc_id)))}</code></td>"
                    f"<td>{html.escape(doc_id)}</td><td><b>{html.escape(title)}</b></td>"
                    f"<td>{html.escape(_short(text, 160))}</td></tr>")
    more = f'<div class="ur-muted">… and {len(docs) - limit} more.</div>' if len(docs) > limit else ""
    label = tree.label(prefix) if prefix else "whole corpus"
    return (f'<div class="ur-cluster"><h4>Cluster {html.escape(docid_str(prefix) if prefix else "root")}: '
            f'{html.escape(label)} <span class="ur-muted">({size} documents)</span></h4>'
            + (f'<div class="ur-muted">Sub-clusters:</div><ul class="ur-sub">{sub}</ul>' if sub else "")
            + '<table class="ur-table"><thead><tr><th>docid</th><th>id</th><th>title</th><th>text</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>{more}</div>')


# --------------------------------------------------------------------------------------------- evaluation


EVAL_METRICS = ("f1", "recall@1")  # the chart's two bars a run: how well it answered, did it find the passage
# EM and F1 first: accuracy (the gold string anywhere in the answer) rewards long answers that echo the passage.
EVAL_HEADERS = ["run", "n", "EM", "F1", "accuracy", "R@1", "R@3", "context tokens", "latency ms", "p vs page baseline"]
EVAL_MAX_HEIGHT = 900


def eval_rows(rows: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    """Table rows for store rows already filtered to one corpus, precision and split (`unirag.results.table`
    dicts), in the order given."""
    def fmt(v: Any, digits: int = 3) -> Any:
        return round(v, digits) if isinstance(v, float) else ("" if v is None else v)

    return [[f"{r['run']} (recommended)" if r.get("recommended") else r["run"], r["n"], fmt(r["em"]),
             fmt(r["f1"]), fmt(r["accuracy"]), fmt(r["recall@1"]), fmt(r["recall@3"]), fmt(r["context"], 0),
             fmt(r["latency_ms"], 0), "" if r["p"] is None else format_p(r["p"])] for r in rows]


def eval_figure(rows: Sequence[Mapping[str, Any]], title: str = "F1 and R@1") -> go.Figure:
    """Horizontal bars, F1 and R@1, one pair per run of the filtered table; the height follows the number of
    runs (capped) so a long table stays a compact chart."""
    if not rows:
        return empty_figure("No runs for this selection.", "Evaluation", 300)
    labels = [_p(r["run"]) for r in rows]
    fig = go.Figure()
    palette = {"f1": "#7c3aed", "recall@1": "#0284c7"}
    for metric in EVAL_METRICS:
        values = [r.get(metric) for r in rows]
        fig.add_trace(go.Bar(name={"f1": "F1"}.get(metric, metric), y=labels,
                             x=[v if v is not None else 0 for v in values], orientation="h",
                             text=[f"{v:.2f}" if isinstance(v, (int, float)) else "n/a" for v in values],
                             textposition="outside", marker={"color": palette[metric]}))
    fig.update_xaxes(range=[0, 1.1], gridcolor="#e2e8f0")
    fig.update_yaxes(autorange="reversed", automargin=True)
    return _layout(fig, title, min(EVAL_MAX_HEIGHT, 120 + 34 * len(rows)), barmode="group",
                   legend={"orientation": "h", "y": 1.02, "yanchor": "bottom"})


GR_VS_DR_COLORS = {"search": "#f59e0b", "self-check": "#dc2626", "dense": "#0284c7"}


def gr_vs_dr_figure(rows: Sequence[Mapping[str, Any]]) -> go.Figure:
    """R@1 against corpus size (log scale) of the results store's GR-vs-DR rows: the docid search alone, with the
    self-check, and dense MiniLM; dev solid, the questions common to the sizes dotted, held-out train dashed (fp32,
    as docs/gr_vs_dr.png)."""
    from unirag.studies import GR_VS_DR_ROLES, gr_vs_dr_points

    fig = go.Figure()
    for role, words in GR_VS_DR_ROLES:
        for split, dash in (("dev", "solid"), ("dev-common", "dot"), ("train-held-out", "dash")):
            points = gr_vs_dr_points(rows, role, split, "recall@1")
            if points:
                xs, ys = zip(*points, strict=True)
                fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=f"{words} ({split})",
                                         line={"color": GR_VS_DR_COLORS[role], "dash": dash}))
    if not fig.data:
        return empty_figure("No GR-vs-DR runs in the results store (python -m benchmarks.gr_vs_dr).", "Scaling", 300)
    fig.update_xaxes(type="log", title="passages in the corpus", gridcolor="#e2e8f0")
    fig.update_yaxes(range=[0, 1.02], title="R@1", gridcolor="#e2e8f0")
    return _layout(fig, "Generative vs dense retrieval as the corpus grows: R@1 (fp32)", 380,
                   legend={"orientation": "h", "y": -0.25})


# --------------------------------------------------------------------------------------------- explain an answer


SIDE_LABELS = {"joint": "Joint", "rag": "Dense RAG"}
STAGE_LABELS = {"retrieve": "retrieve", "self_check": "self-check", "generate": "read / generate"}
STAGE_COLORS = {"retrieve": "#a78bfa", "self_check": "#f59e0b", "generate": "#38bdf8"}


def doc_anchor(system: str, index: int) -> str:
    """The HTML id of a document card (0-based `index`): what a citation links to."""
    return f"ur-doc-{re.sub(r'[^a-z0-9_-]+', '-', system.lower())}-{index + 1}"


def document_attention(answer: Answer | None) -> list[float]:
    """Per selected document, the answer's mean attention mass inside its span of the context (its share of what
    the answer tokens attended to); [] when there is no trace or the passages cannot be located in it."""
    if answer is None or not answer.docs:
        return []
    attention = answer.trace.answer_attention
    context = list(attention.context_tokens)
    rows = [r for r in _matrix(attention.weights) if len(r) == len(context)]
    spans = attention.doc_spans or infer_doc_spans(context, len(answer.docs))
    if not rows or len(spans) != len(answer.docs):
        return []
    return [sum(sum(row[int(a) : int(b)]) for row in rows) / len(rows) for a, b in spans]


def citation(answer: Answer | None) -> int | None:
    """0-based index of the document the answer cites: a span answer's source document; else the document the
    answer attended to most; None without either."""
    if answer is not None and answer.trace.answer_span is not None:
        ids = [d.doc_id for d in answer.docs]
        if answer.trace.answer_span.doc_id in ids:
            return ids.index(answer.trace.answer_span.doc_id)
    mass = document_attention(answer)
    return max(range(len(mass)), key=mass.__getitem__) if mass and any(mass) else None


def citations_html(answer: Answer | None, color: str = JOINT_COLOR) -> str:
    """ "[n]" after the answer, linked to its card: the document a span answer was copied from, or (free answers)
    the document that received most of its attention, saying it is not a span."""
    index = citation(answer)
    if answer is None or index is None:
        return ""
    doc = answer.docs[index]
    name = html.escape(_short(doc.title or doc.doc_id, 60))
    link = (f'<a href="#{doc_anchor(answer.system, index)}" '
            f'style="color:{color}; font-weight:700">[{index + 1}]</a> {name}')
    span = answer.trace.answer_span
    if span is not None:
        return ('<div class="ur-cite" style="font-size:.9rem; margin:.25rem 0 .4rem">Answer copied from '
                f'{link} <span class="ur-muted">({html.escape(doc.doc_id)}, characters {span.start}–{span.end}, '
                'highlighted in its card)</span></div>')
    mass = document_attention(answer)
    share = mass[index] / (sum(mass) or 1.0)
    return ('<div class="ur-cite" style="font-size:.9rem; margin:.25rem 0 .4rem">Answer drawn mostly from '
            f'{link} <span class="ur-muted">({html.escape(doc.doc_id)}; {share:.0%} of the answer\'s attention on the '
            'documents; the answer was decoded freely, not copied as a span)</span></div>')


def document_attention_figure(answers: Mapping[str, Answer | None], title: str = "Answer attention per document"
                              ) -> go.Figure:
    """Horizontal bars, one per selected document of each side ("joint", "rag"): the answer's mean attention mass
    on it. ``meta`` of each bar trace = {"side", "doc_ids"}."""
    colors = {"joint": JOINT_COLOR, "rag": RAG_COLOR}
    fig = go.Figure()
    count = 0
    for side, answer in answers.items():
        mass = document_attention(answer)
        if not mass or answer is None:
            continue
        labels = [_p(f"{SIDE_LABELS.get(side, side)} [{i + 1}] {_short(d.title or d.doc_id, 32)}")
                  for i, d in enumerate(answer.docs)]
        fig.add_trace(go.Bar(x=mass, y=labels, orientation="h", name=SIDE_LABELS.get(side, side),
                             marker={"color": colors.get(side, "#64748b")}, text=[f"{m:.2f}" for m in mass],
                             textposition="auto", meta={"side": side, "doc_ids": answer.doc_ids},
                             hovertemplate="%{y}<br>attention %{x:.3f}<extra></extra>"))
        count += len(mass)
    if not count:
        return empty_figure("No attention trace to split by document.", title)
    fig.update_xaxes(title_text="mean attention mass per answer token", gridcolor="#e2e8f0", rangemode="tozero")
    fig.update_yaxes(autorange="reversed", automargin=True)
    return _layout(fig, title, 110 + 30 * count, showlegend=False)


def latency_figure(answers: Mapping[str, Answer | None], title: str = "Latency per stage") -> go.Figure:
    """Stacked horizontal bars, one per side, one segment per stage of `Answer.timings_ms` (retrieve, self-check,
    read/generate, in that order; other stages after). ``meta`` of each segment trace = {"stage"}."""
    sides = [(side, a) for side, a in answers.items() if a is not None and a.timings_ms]
    if not sides:
        return empty_figure("No timings yet.", title)
    stages = list(STAGE_LABELS)
    for _, answer in sides:
        stages += [s for s in answer.timings_ms if s not in stages]
    labels = [SIDE_LABELS.get(side, side) for side, _ in sides]
    fig = go.Figure()
    for stage in stages:
        values = [float(a.timings_ms.get(stage, 0.0)) for _, a in sides]
        if not any(values):
            continue
        fig.add_trace(go.Bar(y=labels, x=values, orientation="h", name=STAGE_LABELS.get(stage, stage),
                             marker={"color": STAGE_COLORS.get(stage, "#94a3b8")}, meta={"stage": stage},
                             text=[_ms(v) if v else "" for v in values], textposition="inside",
                             hovertemplate="%{y} · " + _p(STAGE_LABELS.get(stage, stage)) + ": %{x:.0f} ms"
                             "<extra></extra>"))
    fig.update_xaxes(title_text="ms", gridcolor="#e2e8f0")
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, title, 150 + 40 * len(sides), barmode="stack",
                   legend={"orientation": "h", "y": -0.3, "yanchor": "top", "traceorder": "normal"})


def answer_token_choices(answers: Mapping[str, Answer | None]) -> list[tuple[str, str]]:
    """(label, "side:i") of every answer token with an attention row, for a token picker."""
    out = []
    for side, answer in answers.items():
        if answer is None:
            continue
        attention = answer.trace.answer_attention
        tokens = clean_tokens(attention.answer_tokens)
        for i, token in enumerate(tokens[: len(attention.weights)]):
            shown = token.replace("\n", "⏎").strip() or "·"
            out.append((f"{SIDE_LABELS.get(side, side)} · {i + 1}: {shown}", f"{side}:{i}"))
    return out


def token_attention_html(answers: Mapping[str, Answer | None], choice: str | None) -> str:
    """The context shaded by one answer token's attention row (`choice` = "side:i" from `answer_token_choices`)."""
    if not choice or ":" not in choice:
        return '<div class="ur-empty">Pick an answer token to see what it attended to.</div>'
    side, _, index = choice.rpartition(":")
    answer = answers.get(side)
    attention = answer.trace.answer_attention if answer is not None else AnswerAttention()
    rows = _matrix(attention.weights)
    if not index.isdigit() or int(index) >= len(rows) or len(rows[int(index)]) != len(attention.context_tokens):
        return '<div class="ur-empty">No attention row for this token.</div>'
    i = int(index)
    token = clean_tokens(attention.answer_tokens)[i] if i < len(attention.answer_tokens) else "?"
    rgb = (124, 58, 237) if side == "joint" else (2, 132, 199)
    body = highlight_tokens_html(attention.context_tokens, rows[i], rgb=rgb, top_k=5)
    return (f'<div class="ur-muted">{html.escape(SIDE_LABELS.get(side, side))}: answer token {i + 1} '
            f'<b>{html.escape(token.strip() or "·")}</b> attended to (darker = more; the top 5 underlined):</div>'
            f'<div class="ur-doc-body" style="white-space:pre-wrap">{body}</div>')
