"""The "Your passages" tab in a real browser (tiny app): bad uploads, dense and BM25 at once, training to the end,
the joint side answering, and two sessions that never see each other's passages."""

from __future__ import annotations

import json
import time

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from test_app import running_app, tiny  # noqa: F401  (fixtures)
from test_browser import browser  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

WORDS = ["amber", "basil", "cedar", "delta", "ember", "fjord", "grove", "heron", "indigo", "juniper"]


def corpus_file(path, topic: str, n: int = 50):
    path.write_text("".join(json.dumps({"id": f"{topic}{i}", "title": f"{topic} {WORDS[i % 10]} {i}",
                                        "text": f"The {topic} called {WORDS[i % 10]} number {i} lives here. It is "
                                                f"a {topic} of kind {WORDS[(i + 3) % 10]}."}) + "\n"
                            for i in range(n)))
    return path


def open_tab(browser, url):  # noqa: F811
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(url, wait_until="domcontentloaded")
    page.get_by_role("tab", name="Your passages").click()
    page.wait_for_selector("#ur-yours-file", timeout=60_000)
    return page


def use_file(page, path) -> str:
    """Put `path` in the upload box (clearing the previous file) and press "Use these passages".

    The box re-renders its file input after a clear and after an upload, and on a loaded machine the upload can
    take longer than a fixed wait: poll the box's state instead of assuming one."""
    box = page.locator("#ur-yours-file")
    shown = box.get_by_text(path.name)
    clear = box.locator("button[aria-label*='lear']")
    file_input = box.locator("input[type=file]")
    deadline = time.monotonic() + 180
    while not (shown.count() and shown.first.is_visible()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path.name} never reached the upload box: {box.inner_text()!r}")
        try:
            if clear.count() and clear.first.is_visible():  # the previous upload is still shown
                clear.first.click(timeout=5_000)
            elif file_input.count():
                file_input.first.set_input_files(str(path), timeout=5_000)
                shown.first.wait_for(timeout=30_000)
                continue
        except PlaywrightTimeout:
            pass  # the box re-rendered under us: look again
        page.wait_for_timeout(500)
    before = page.inner_text("#ur-yours-status")
    page.locator("#ur-yours-use").click()
    page.wait_for_function("(before) => { const m = document.querySelector('#ur-yours-status .ur-msg');"
                           " return m && m.innerText !== before; }", arg=before, timeout=120_000)
    return page.inner_text("#ur-yours-status")


def ask(page, question: str, sides=("rag", "bm25")) -> None:
    page.locator("#ur-yours-question textarea, #ur-yours-question input").first.fill(question)
    page.locator("#ur-yours-ask").click()
    page.wait_for_function("(sides) => sides.every(s => document.querySelector(`#ur-yours-${s} .ur-answer`))",
                           arg=list(sides), timeout=120_000)


def test_your_passages_end_to_end(browser, tiny, tmp_path):  # noqa: F811
    settings, data = tiny
    args = ["--llm", settings.llm, "--precision", "fp32", "--checkpoint-dir", str(settings.checkpoint_dir),
            "--data", str(data), "--no-preload"]
    bad = {"binary.pdf": (b"%PDF-1.4\x00\x01\x02" * 64, "binary file"),
           "empty.txt": (b"", "is empty"),
           "dupes.jsonl": (b'{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', "duplicate id"),
           "big.txt": (b"ten megabytes of text. " * (10 * 2**20 // 23), "the limit is 5 MB")}
    env = {"UNIRAG_CACHE": str(tmp_path / "cache"), "UNIRAG_BUILD_ARGS": "--pathway-layers 2 --epochs 3"}
    with running_app(args, tmp_path / "app.log", env=env) as (url, _):
        page = open_tab(browser, url)
        for name, (raw, message) in bad.items():
            (tmp_path / name).write_bytes(raw)
            shown = use_file(page, tmp_path / name)
            assert message in shown, (name, shown)
        assert "50 passages ready" in use_file(page, corpus_file(tmp_path / "cats.jsonl", "cat"))
        ask(page, "which cat is called delta?")
        assert "Not trained yet" in page.inner_text("#ur-yours-joint")
        other = open_tab(browser, url)  # a second session, at the same time
        assert "50 passages ready" in use_file(other, corpus_file(tmp_path / "dogs.jsonl", "dog"))
        ask(other, "which dog is called delta?")
        assert "cat" not in other.inner_text("#ur-yours-rag").lower()
        page.locator("#ur-yours-train").click()
        page.wait_for_function("() => /done|failed/.test(document.querySelector('#ur-yours-progress').innerText)",
                               timeout=600_000)
        assert "done" in page.inner_text("#ur-yours-progress"), page.inner_text("#ur-yours-progress")
        page.wait_for_selector("#ur-yours-download a", timeout=60_000)
        ask(page, "which cat is called delta?", sides=("joint", "rag", "bm25"))
        assert "dog" not in page.inner_text("#ur-yours-joint").lower()
        ask(other, "which dog is called delta?")
        assert "Not trained yet" in other.inner_text("#ur-yours-joint")
        sessions = list((tmp_path / "cache" / "sessions").glob("session-*"))
        assert len(sessions) == 2
        other.close()
        page.wait_for_timeout(3000)  # unload: the closed session's folder goes
        assert len(list((tmp_path / "cache" / "sessions").glob("session-*"))) == 1
