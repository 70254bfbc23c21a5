"""`python -m unirag build` on a tiny random model: the checkpoint, progress, resume, bad inputs (no downloads)."""

import json

import numpy as np
import pytest
import torch

from unirag import build
from unirag.cli import main as cli_main
from unirag.errors import UniragError
from unirag.joint import training

N_PASSAGES = 12


def write_corpus(path, n=N_PASSAGES, offset=0):
    path.write_text("".join(json.dumps({"id": f"p{i}", "title": f"Topic {i}",
                                        "text": f"Fact {i + offset} is true here. Detail {i} follows after it."}) + "\n"
                            for i in range(n)))
    return path


def write_questions(path, n=N_PASSAGES):
    path.write_text("".join(json.dumps({"id": f"q{i}", "question": f"what is fact {i}?", "answers": [str(i)],
                                        "doc_id": f"p{i}"}) + "\n" for i in range(n)))
    return path


@pytest.fixture()
def tiny(tiny_llm_dirs, tmp_path, monkeypatch):
    """(corpus path, argv prefix): random 8-dim embeddings and teacher vectors, so no encoder loads."""
    monkeypatch.setenv("UNIRAG_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    monkeypatch.setattr("unirag.docids.corpus_embeddings",
                        lambda corpus, *a, **k: rng.standard_normal((len(corpus), 8)).astype(np.float32))
    monkeypatch.setattr(training, "query_embeddings", lambda texts, name: torch.randn(
        len(texts), 8, generator=torch.Generator().manual_seed(len(texts))).numpy())
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    argv = ["--corpus", str(corpus), "--base-model", str(tiny_llm_dirs["llama"]), "--tree-k", "3", "--tree-c", "3",
            "--pathway-layers", "2", "--batch-size", "8", "--pseudo-queries", "1"]
    return corpus, argv


def loss_log(out):
    return [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]


def test_build_writes_a_loadable_checkpoint_with_progress_and_resumes(tiny, tmp_path, capsys):
    corpus, argv = tiny
    out, progress = tmp_path / "built", tmp_path / "progress.json"
    assert cli_main(["build", *argv, "--out", str(out), "--epochs", "2", "--progress-file", str(progress)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["passages"] == N_PASSAGES and summary["stage1_epochs"] == 2 and summary["stage1_examples"] == 12
    assert summary["questions_trained"] == 0 and summary["valid"] == {}
    assert [r["epoch"] for r in loss_log(out)] == [1, 2]
    assert all("level_kl" in r and "document_kl" in r for r in loss_log(out))  # the recipe: dense distillation
    state = json.loads((out / "trainer_state.json").read_text())["config"]
    assert state["level_distill_weight"] == 1.0 and state["document_distill_weight"] == 1.0
    status = build.read_progress(progress)
    assert status["state"] == "done" and status["fraction"] == 1.0 and status["steps"] == 2
    assert json.loads((out / build.SUMMARY_FILE).read_text())["corpus_fingerprint"] == summary["corpus_fingerprint"]
    from unirag.data import load_corpus
    from unirag.joint import JointSystem

    joint = JointSystem.from_checkpoint(out, load_corpus(corpus))  # as ask/eval/the app load it
    assert len(joint.tree) == N_PASSAGES
    # The same command again continues the build: nothing left to train, the same checkpoint.
    assert cli_main(["build", *argv, "--out", str(out), "--epochs", "2"]) == 0
    assert [r["epoch"] for r in loss_log(out)] == [1, 2]
    # More epochs continue from the last one.
    assert cli_main(["build", *argv, "--out", str(out), "--epochs", "3"]) == 0
    assert [r["epoch"] for r in loss_log(out)] == [1, 2, 3]


def test_build_with_questions_holds_out_and_runs_stage2(tiny, tmp_path, capsys):
    _, argv = tiny
    questions = write_questions(tmp_path / "pairs.jsonl")
    out = tmp_path / "built"
    assert cli_main(["build", *argv, "--out", str(out), "--questions", str(questions), "--epochs", "1",
                     "--stage2-steps", "1", "--save-every", "1", "--stage2-docid-batch", "2",
                     "--stage2-answer-batch", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["questions_held_out"] == 2 and summary["questions_trained"] == 10  # a fifth held out
    assert "recall@1" in summary["valid"] and summary["stage2_steps"] == 1
    assert [r["stage"] for r in loss_log(out)] == [1, 2] and (out / "lora").is_dir()


@pytest.mark.parametrize("case, message", [
    ("missing", "File not found"),
    ("few", "at least 10"),
    ("stage2", "give --questions"),
    ("dev", "evaluation split"),
    ("epochs", "--epochs must be at least 1"),
])
def test_bad_inputs_get_one_clear_message(tiny, tmp_path, capsys, case, message):
    corpus, argv = tiny
    extra = {"missing": ["--corpus", str(tmp_path / "nope.jsonl")],
             "few": ["--corpus", str(write_corpus(tmp_path / "few.jsonl", n=3))],
             "stage2": ["--stage2-steps", "5"],
             "dev": ["--questions", str(write_questions(tmp_path / "dev.jsonl"))],
             "epochs": ["--epochs", "0"]}[case]
    code = cli_main(["build", *argv, "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_out_folder_of_another_corpus_or_other_files_is_refused(tiny, tmp_path, capsys):
    corpus, argv = tiny
    out = tmp_path / "built"
    assert cli_main(["build", *argv, "--out", str(out), "--epochs", "1"]) == 0
    other = write_corpus(tmp_path / "other.jsonl", offset=100)
    assert cli_main(["build", *argv, "--corpus", str(other), "--out", str(out), "--epochs", "1"]) == 2
    assert "checkpoint of another corpus" in capsys.readouterr().err
    assert cli_main(["build", *argv, "--out", str(out), "--epochs", "1", "--pathway-layers", "1"]) == 2
    assert "other settings (pathway_layers)" in capsys.readouterr().err
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    assert cli_main(["build", *argv, "--out", str(stray)]) == 2
    assert "no build checkpoint" in capsys.readouterr().err and (stray / "notes.txt").read_text() == "mine"


def test_generated_queries_are_sampled_into_the_cache_and_trained_on(tiny, tmp_path, monkeypatch, capsys):
    _, argv = tiny
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    calls = {}

    def fake_generate(corpus_path, adapter_dir, out, config, banned, base_model, style=None, **_):
        from unirag.data import load_corpus

        corpus = load_corpus(corpus_path)
        calls.update(style=style, banned=banned, out=out)
        with open(out, "w") as handle:
            for p in corpus:
                handle.write(json.dumps({"doc_id": p.id, "question": f"generated about {p.id}?"}) + "\n")
        with open(out + ".meta.json", "w") as handle:
            json.dump({"settings": {"corpus_fingerprint": corpus.fingerprint}}, handle)
        return {"kept": len(corpus)}

    monkeypatch.setattr("unirag.querygen.generate_queries", fake_generate)
    out = tmp_path / "built"
    assert cli_main(["build", *argv, "--out", str(out), "--epochs", "1", "--generate-queries",
                     "--querygen-adapter", str(adapter), "--querygen-style", "squad"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert calls["style"] == "squad" and calls["banned"] == [] and str(tmp_path / "cache") in calls["out"]
    assert summary["generated_queries"] == calls["out"] and summary["stage1_examples"] == 2 * N_PASSAGES


def test_missing_query_generator_is_named(tiny, tmp_path, capsys):
    _, argv = tiny
    code = cli_main(["build", *argv, "--out", str(tmp_path / "o"), "--generate-queries", "--querygen-adapter",
                     str(tmp_path / "none")])
    assert code == 2 and "query generator" in capsys.readouterr().err


def test_recipe_scales_to_the_corpus():
    assert build.scaled_epochs(8735, 32) == 8  # the shipped nq run: its 8 epochs
    assert build.scaled_epochs(150, 32) == 40  # 50 passages: capped
    assert build.scaled_epochs(900, 32) == 8  # 29 steps an epoch * 8 >= 200
    assert build.scaled_epochs(600, 32) == 11  # 19 steps an epoch: 200 steps need 11
    assert build.held_out_count(3) == 0 and build.held_out_count(50) == 10 and build.held_out_count(5000) == 100


def test_build_help_is_field_metadata_never_source_comments():
    """Source comments are lab notes ("8 beat 4, RESULTS.md"): they never reach --help, even for a config
    dataclass that has no help metadata at all."""
    from dataclasses import dataclass, fields

    @dataclass
    class Noted:
        steps: int = 8  # 8 beat 4, RESULTS.md

    assert build.field_helps(Noted) == {}
    text = " ".join(build.build_parser().format_help().split())  # argparse wraps lines
    for f in fields(training.TrainConfig):
        if f.name != "questions":  # build words its own (optional there)
            assert " ".join(f.metadata["help"].split()) in text, f.name
    assert "RESULTS.md" not in text

def test_bar_progress_counts_stage1_epochs_as_one_phase():
    fraction, left = build.bar_progress("stage 1", "stage 1 epoch 2/4", 5, 10, 10.0)  # a batch every 2 s
    assert fraction == pytest.approx(15 / 40) and left == pytest.approx(50.0)  # 25 batches left
    # Bars that are not the phase's own measure (the lower-layer cache, the teacher's embedding) say nothing.
    assert build.bar_progress("stage 1", "stage 1: caching frozen lower layers", 3, 9, 1.0) == (0.0, None)
    assert build.bar_progress("stage 1", "Batches", 3, 9, 1.0) == (0.0, None)
    assert build.bar_progress("stage 2", "stage 2 (docid + answer)", 0, 10, 1.0) == (0.0, None)


def test_estimates_follow_the_corpus_size(tiny):
    corpus, argv = tiny
    options = build.options_from_args([*argv, "--out", "x", "--generate-queries"])
    small, large = build.estimate_seconds(options, 50), build.estimate_seconds(options, 500)
    assert list(small) == ["docid tree", "generated queries", "stage 1"]
    assert all(large[p] > small[p] for p in small) and large["generated queries"] > 500 * 3


def test_reporter_reads_the_open_bar(tmp_path):
    from tqdm.auto import tqdm

    path = tmp_path / "p.json"
    reporter = build.ProgressReporter(["docid tree", "stage 1"], path, estimates={"docid tree": 10, "stage 1": 30})
    reporter.phase("stage 1")
    bar = tqdm(total=4, desc="stage 1 epoch 1/2", disable=False)
    bar.update(2)
    status = reporter.snapshot()
    bar.close()
    assert status["step"] == 2 and status["done"] == 2 and status["total"] == 4
    assert status["fraction"] == pytest.approx((10 + 30 * 2 / 8) / 40) and status["seconds_left"] >= 0
    reporter.finish("failed", "boom")
    assert build.read_progress(path)["state"] == "failed" and build.read_progress(path)["message"] == "boom"


# ------------------------------------------------------------------------------------------ the app's queue

FAKE_BUILD = """
import json, os, sys, time
out, progress, seconds, code = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
with open(progress, "w") as handle:
    json.dump({"state": "running", "phase": "stage 1", "fraction": 0.5, "cache": os.environ["UNIRAG_CACHE"],
               "threads": os.environ["OMP_NUM_THREADS"]}, handle)
time.sleep(seconds)
if code:
    print("error: the corpus is bad", file=sys.stderr)
    sys.exit(code)
os.makedirs(out, exist_ok=True)
open(os.path.join(out, "joint_config.json"), "w").write("{}")
"""


def fake_command(seconds=0.3, code=0):
    import sys

    return lambda job: [sys.executable, "-c", FAKE_BUILD, str(job.out), str(job.progress_file), str(seconds),
                        str(code)]


def wait_for(predicate, timeout=20.0):
    import time

    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture()
def queue_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIRAG_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_queue_runs_one_build_at_a_time_in_order_with_positions(queue_dirs):
    root = queue_dirs
    queue = build.BuildQueue(command=fake_command(2.0), poll=0.05)
    a = queue.submit("alice", root / "a.jsonl", root / "a" / "ckpt", root / "a")
    b = queue.submit("bob", root / "b.jsonl", root / "b" / "ckpt", root / "b")
    assert wait_for(lambda: a.state == "running")
    with pytest.raises(UniragError, match="already training"):
        queue.submit("alice", root / "a.jsonl", root / "a" / "ckpt", root / "a")
    assert queue.status("bob")["state"] == "queued" and queue.status("bob")["position"] == 1
    assert queue.status("alice")["position"] == 0
    assert wait_for(lambda: queue.status("alice")["progress"].get("fraction") == 0.5)
    progress = queue.status("alice")["progress"]
    assert progress["cache"] == str(root / "a" / "cache") and int(progress["threads"]) >= 1  # its own cache
    assert (root / "a" / "cache" / "models").resolve() == (root / "cache" / "models").resolve()
    assert wait_for(lambda: b.state == "done") and a.state == "done"
    assert (root / "b" / "ckpt" / "joint_config.json").is_file() and queue.status("bob")["message"] == "built"


def test_queue_reports_a_failed_build_and_cancels(queue_dirs):
    root = queue_dirs
    failing = build.BuildQueue(command=fake_command(0.1, code=2), poll=0.05)
    job = failing.submit("s", root / "c.jsonl", root / "s" / "ckpt", root / "s")
    assert wait_for(lambda: job.state == "failed") and job.message == "the corpus is bad"
    slow = build.BuildQueue(command=fake_command(30), poll=0.05)
    running = slow.submit("x", root / "c.jsonl", root / "x" / "ckpt", root / "x")
    queued = slow.submit("y", root / "c.jsonl", root / "y" / "ckpt", root / "y")
    assert wait_for(lambda: running.state == "running")
    slow.cancel("y")
    assert queued.state == "cancelled" and slow.status("y") is None
    slow.cancel("x")
    assert running.state == "cancelled" and wait_for(lambda: running.process.poll() is not None, 5)
    assert not (root / "y").exists()  # never started


def test_queue_waits_for_another_servers_build(queue_dirs):
    import fcntl

    root = queue_dirs
    lock_path = root / "cache" / build.LOCK_FILE
    lock_path.parent.mkdir(parents=True)
    with open(lock_path, "a+") as other:
        fcntl.flock(other, fcntl.LOCK_EX)
        queue = build.BuildQueue(command=fake_command(0.1), poll=0.05)
        job = queue.submit("s", root / "c.jsonl", root / "s" / "ckpt", root / "s")
        assert wait_for(lambda: job.state == "waiting")
        import time

        time.sleep(0.3)
        assert job.state == "waiting"
        fcntl.flock(other, fcntl.LOCK_UN)
    assert wait_for(lambda: job.state == "done")
