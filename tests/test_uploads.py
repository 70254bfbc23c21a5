"""Uploads and pasted text → a corpus: formats, one clear message per bad case, per-session folders."""

import json

import pytest

from unirag import uploads
from unirag.errors import DataError


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_jsonl_with_optional_id_and_title():
    up = uploads.parse_upload(jsonl([{"id": "a", "title": "Alpha", "text": "First passage."},
                                     {"text": "No id or title here."}]), "mine.jsonl")
    assert up.format == "jsonl" and [p.id for p in up.passages] == ["a", "p2"]
    assert up.passages[0].title == "Alpha" and up.passages[1].title == ""


def test_plain_text_paragraphs_with_headings_and_first_words():
    text = ("Paris\nParis is the capital of France.\nIt lies on the Seine.\n\n"
            "The Nile is the longest river in Africa and flows north into the sea.\n\n\n")
    up = uploads.parse_upload(text)
    assert up.format == "text" and [p.id for p in up.passages] == ["p1", "p2"]
    assert up.passages[0].title == "Paris"
    assert up.passages[0].text == "Paris is the capital of France. It lies on the Seine."
    assert up.passages[1].title == "The Nile is the longest river in Africa…"
    assert up.passages[1].text.startswith("The Nile") and up.notices


def test_one_line_paragraph_is_its_own_text():
    up = uploads.parse_upload("Short note without heading")
    assert up.passages[0].text == "Short note without heading" and up.passages[0].title == "Short note without heading"


@pytest.mark.parametrize("raw, message", [
    (b"", "is empty"),
    (b"  \n\n \n", "is empty"),
    (b"%PDF-1.4\x00\x01\x02binary", "binary file"),
    ("caf\u00e9 au lait".encode("latin-1"), "not UTF-8 text (invalid byte on line 1)"),
    (jsonl([{"id": "a", "text": "x"}, {"id": "b", "text": "y"}, {"id": "a", "text": "z"}]),
     "line 3: duplicate id 'a' (first on line 1)"),
    (jsonl([{"id": "a", "text": "   "}]), "line 1: the passage text is empty"),
    (jsonl([{"id": "a", "title": "t"}]), "line 1: field \"text\" is missing"),
    (jsonl([{"id": 3, "text": "x"}]), "field \"id\" must be a string, not int"),
    (b'{"id": "a", "text": "x"}\n{"id": "b", "te\n', "line 2: invalid JSON"),
    (b'{"id": "a", "text": "x"}\n[1, 2]\n', "line 2: expected a JSON object"),
    (("word " * 2000).encode(), "paragraph 1: the passage is 9,999 characters long; the limit is 8,000"),
    (jsonl([{"id": "a", "title": "t" * 400, "text": "x"}]), "the title is 400 characters long"),
])
def test_bad_uploads_get_one_clear_message(raw, message):
    with pytest.raises(DataError) as info:
        uploads.parse_upload(raw, "up.txt")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_over_the_size_and_passage_limits(tmp_path, monkeypatch):
    big = b"x" * (uploads.MAX_BYTES + 1)
    with pytest.raises(DataError, match="is 5.0 MB; the limit is 5 MB"):
        uploads.parse_upload(big, "big.txt")
    path = tmp_path / "ten.txt"
    path.write_bytes(b"ten megabytes of text. " * (10 * 2**20 // 23))
    with pytest.raises(DataError, match=r"ten.txt is 10.0 MB; the limit is 5 MB"):
        uploads.read_upload(path)  # refused from its size, before it is read
    many = "\n\n".join(f"Passage number {i}." for i in range(uploads.MAX_PASSAGES + 1))
    with pytest.raises(DataError, match="holds 1,001 passages; the limit is 1,000"):
        uploads.parse_upload(many)
    with pytest.raises(DataError, match="is gone"):
        uploads.read_upload(tmp_path / "missing.jsonl")


def test_session_folders_are_separate_and_deleted(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIRAG_CACHE", str(tmp_path / "cache"))
    folders = uploads.SessionFolders()
    a = folders.save("alice", uploads.parse_upload("Alice's passage about cats."))
    b = folders.save("bob", uploads.parse_upload(jsonl([{"id": "x", "text": "Bob's passage about dogs."}])))
    assert a.fingerprint != b.fingerprint and folders.folder("alice") != folders.folder("bob")
    assert folders.folder("alice").parent == tmp_path / "cache" / "sessions"
    assert [p.text for p in a] == ["Alice's passage about cats."] and b.ids == ["x"]
    (folders.folder("alice") / "ckpt").mkdir()  # a build of the old corpus goes with it
    again = folders.save("alice", uploads.parse_upload("A new passage."))
    assert again.ids == ["p1"] and not (folders.folder("alice") / "ckpt").exists()
    alice = folders.folder("alice")
    folders.close("alice")
    assert not alice.exists() and folders.folder("bob").is_dir()
    folders.close("nobody")  # unknown sessions: nothing to do


def test_sweep_and_remove_stay_inside_the_root(tmp_path):
    root = tmp_path / "sessions"
    folders = uploads.SessionFolders(root)
    live = folders.folder("live")
    stale = root / "session-old"
    stale.mkdir()
    import os

    os.utime(stale, (0, 0))
    outside = tmp_path / "keep"
    outside.mkdir()
    assert folders.sweep(max_age_hours=1) == 1 and not stale.exists() and live.is_dir()
    assert uploads.remove_folder(outside, root) is False and outside.is_dir()


# ------------------------------------------------------------------------------------------ the tab's library side


class FakePipeline:
    """What YourPassages reads of the app's Pipeline: its config, its loaded-once encoder and reader, their locks."""

    def __init__(self, llm_dir):
        from types import SimpleNamespace

        from conftest import BagOfWordsEncoder

        from unirag.backbones import load_llm
        from unirag.rag import Reader

        self.config = SimpleNamespace(precision="fp32", llm=None, device="cpu")
        self.encoder, self.reader = BagOfWordsEncoder(), Reader(*load_llm(str(llm_dir)))

    def shared_encoder(self, corpus):
        return self.encoder

    def shared_reader(self, corpus):
        return self.reader

    def side_lock(self, side):
        import threading

        return threading.Lock()


def tiny_checkpoint(corpus, llm_dir, out):
    """A tiny untrained joint checkpoint for `corpus`, as a build would leave it."""
    from unirag.backbones import load_llm
    from unirag.docids import DocidTree, TreeConfig
    from unirag.joint.modeling import JointConfig, JointModel

    docids = [(i // 4, i % 4) for i in range(len(corpus))]
    tree = DocidTree(corpus.ids, docids, TreeConfig(k=4, c=4), corpus.fingerprint)
    base, tok = load_llm(str(llm_dir))
    model = JointModel(base, JointConfig(docid_levels=2, docid_branching=4, base_model=str(llm_dir),
                                         pathway_layers=1), tok)
    model.save_pretrained(out, tree=tree)


def copy_command(source):
    import sys

    script = "import shutil, sys; shutil.copytree(sys.argv[1], sys.argv[2])"
    return lambda job: [sys.executable, "-c", script, str(source), str(job.out)]


WORDS = ["amber", "basil", "cedar", "delta", "ember", "fjord", "grove", "heron", "indigo", "juniper"]


def passages(topic, n=10):
    return "\n\n".join(f"{topic} fact {WORDS[i]}: the {topic} called {WORDS[i]} is here." for i in range(n))


def test_two_sessions_answer_on_their_own_passages_and_the_joint_side_joins(tiny_llm_dirs, tmp_path, monkeypatch):
    import time

    from unirag.build import BuildQueue

    monkeypatch.setenv("UNIRAG_CACHE", str(tmp_path / "cache"))
    yours = uploads.YourPassages(FakePipeline(tiny_llm_dirs["llama"]), queue=None)
    alice = yours.use("alice", uploads.parse_upload(passages("cats")))
    bob = yours.use("bob", uploads.parse_upload(passages("dogs", 3)))
    answers = yours.ask("alice", "which cats are called delta?")
    assert set(answers) == {"joint", "rag", "bm25"} and "Not trained yet" in answers["joint"]
    assert all(d.doc_id in alice.corpus for side in ("rag", "bm25") for d in answers[side].docs)
    assert answers["bm25"].docs[0].doc_id == "p4"  # "delta" is in the fourth paragraph only
    assert all("dogs" in bob.corpus[d.doc_id].text for d in yours.ask("bob", "dogs?")["rag"].docs)
    with pytest.raises(DataError, match="at least 10 passages"):
        yours.train("bob")
    with pytest.raises(DataError, match="Upload or paste"):
        yours.ask("carol", "anything?")
    # Training: the queue's job (here: copying a prebuilt checkpoint) then the joint side answers.
    source = tmp_path / "prebuilt"
    tiny_checkpoint(alice.corpus, tiny_llm_dirs["llama"], source)
    yours.queue = BuildQueue(command=copy_command(source), poll=0.05)
    monkeypatch.setenv("UNIRAG_BUILD_ARGS", "--epochs 3 --pathway-layers 1")
    status = yours.train("alice")
    assert yours.queue.job("alice").extra == ("--epochs", "3", "--pathway-layers", "1")  # the server's own flags
    assert status["state"] in ("queued", "waiting", "running", "done")
    end = time.time() + 20
    while yours.queue.status("alice")["state"] != "done" and time.time() < end:
        time.sleep(0.05)
    assert uploads.describe_build(yours.queue.status("alice"))[1] == 1.0
    answers = yours.ask("alice", "cats fact 3?")
    assert answers["joint"].docs and all(d.doc_id in alice.corpus for d in answers["joint"].docs)
    archive = yours.archive("alice")
    import zipfile

    names = zipfile.ZipFile(archive).namelist()
    assert "ckpt/joint_config.json" in names and "corpus.jsonl" in names
    with pytest.raises(DataError, match="train one first"):
        yours.archive("bob")
    folder = alice.folder
    yours.close("alice")
    assert not folder.exists() and bob.folder.is_dir()
    with pytest.raises(DataError):
        yours.get("alice")


def test_describe_build_says_queue_position_step_and_time_left():
    line, fraction = uploads.describe_build({"state": "queued", "position": 2, "message": "", "progress": {}})
    assert "position 2" in line and fraction == 0.0
    running = {"state": "running", "position": 0, "message": "", "progress": {
        "step": 2, "steps": 3, "phase": "stage 1", "detail": "stage 1 epoch 3/8", "done": 5, "total": 26,
        "fraction": 0.4, "seconds_left": 300}}
    line, fraction = uploads.describe_build(running)
    assert line == "training, step 2/3: stage 1 (stage 1 epoch 3/8, 5/26), about 5 min left" and fraction == 0.4
    assert uploads.describe_build({"state": "failed", "message": "boom", "progress": {}})[0] == "failed: boom"


# ------------------------------------------------------------------------------------------ the app's tab


def test_app_tab_helpers_show_one_message_per_bad_upload_and_the_cards(tiny_llm_dirs, tmp_path, monkeypatch):
    import app

    monkeypatch.setenv("UNIRAG_CACHE", str(tmp_path / "cache"))
    yours = uploads.YourPassages(FakePipeline(tiny_llm_dirs["llama"]))
    binary = tmp_path / "scan.pdf"
    binary.write_bytes(b"%PDF\x00\x01" * 100)
    for path, text, message in ((str(binary), None, "binary file"), (None, "  ", "Upload a file or paste"),
                                (None, jsonl([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]).decode(),
                                 "duplicate id")):
        shown = app.yours_use(yours, "s", path, text)
        assert "ur-msg-error" in shown and message in shown
    shown = app.yours_use(yours, "s", None, passages("cats"))
    assert "10 passages ready (text)" in shown and "min here" in shown
    joint, dense, bm25 = app.yours_cards(yours.ask("s", "which cats are called delta?"))
    assert "Not trained yet" in joint and "ur-answer" in dense and "BM25" in bm25
    assert "position 1" in app.yours_progress_html({"state": "queued", "position": 1, "message": "",
                                                    "progress": {}})
    yours.close("s")


def test_app_has_the_your_passages_tab(tmp_path, monkeypatch, tiny_llm_dirs):
    import app
    from unirag.pipeline import AppConfig, Pipeline

    monkeypatch.setenv("UNIRAG_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    for name in ("nq", "squad"):
        (data / name).mkdir(parents=True)
        (data / name / "corpus.jsonl").write_text(jsonl([{"id": "d1", "title": "T", "text": "A passage."}]).decode())
        (data / name / "dev.jsonl").write_text(json.dumps({"id": "q", "question": "q?", "answers": ["a"]}) + "\n")
    pipeline = Pipeline(AppConfig(llm=str(tiny_llm_dirs["llama"]), precision="fp32",
                                  checkpoint_dir=tmp_path / "none", data_dir=data))
    demo = app.build_demo(pipeline)
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    assert {"ur-yours-file", "ur-yours-paste", "ur-yours-train", "ur-yours-progress", "ur-yours-joint"} <= ids
