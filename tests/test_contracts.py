"""Contracts that lose nothing: resumable eval, safe outputs, strict merges, metric edge cases, long passages,
corrupt caches and trees for another corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unirag.data import load_questions
from unirag.errors import DataError, UniragError
from unirag.eval import contains_answer, exact_match, token_f1


def shared_data() -> Path | None:
    """The shared data folder: UNIRAG_DATA / ../shared/data, or `shared/data` above a git worktree."""
    from unirag.paths import default_data_dir

    for root in (default_data_dir(), *(p / "shared" / "data" for p in Path(__file__).resolve().parents)):
        if (root / "nq" / "corpus.jsonl").is_file():
            return root
    return None


# --- metrics ------------------------------------------------------------------------------------------------------
def test_golds_or_predictions_that_normalise_to_empty_never_match():
    for gold in ("The", ".", "", "  a  "):
        assert exact_match("", [gold]) == 0.0
        assert exact_match("the", [gold]) == 0.0
        assert token_f1("", [gold]) == 0.0
        assert contains_answer("anything at all", [gold]) == 0.0
    assert exact_match("", ["Paris"]) == 0.0 and token_f1("", ["Paris"]) == 0.0
    assert contains_answer("", ["Paris"]) == 0.0
    assert exact_match("Paris", ["The", "paris"]) == 1.0  # an empty gold beside a real one does not hide it


def test_best_gold_wins_for_em_and_f1():
    golds = ["London", "the city of Paris", "Paris"]
    assert exact_match("Paris.", golds) == 1.0
    assert token_f1("Paris", golds) == 1.0
    assert token_f1("city of Paris", ["London", "Paris"]) == pytest.approx(0.5)
    assert token_f1("city of Paris", ["London", "Paris", "city Paris"]) == pytest.approx(0.8)


def test_f1_counts_repeated_tokens_once_per_occurrence():
    # prediction "paris paris" vs gold "paris": 1 common token; precision 1/2, recall 1/1 → F1 2/3
    assert token_f1("Paris Paris", ["Paris"]) == pytest.approx(2 / 3)
    # both sides repeat: min(2, 3) = 2 common tokens of 3 and 2 → precision 2/3, recall 1
    assert token_f1("new new new", ["new new"]) == pytest.approx(0.8)


def test_accuracy_is_the_answer_contained_substring_metric_even_inside_words():
    """The paper's (DPR-style) accuracy counts a gold inside a word; every measured number uses it, so it stays."""
    assert contains_answer("1991", ["1"]) == 1.0
    assert contains_answer("the Beatles' drummer", ["beat"]) == 1.0
    # EM and F1 compare whole strings and whole tokens: no match inside a word
    assert exact_match("1991", ["1"]) == 0.0
    assert token_f1("1991", ["1"]) == 0.0
    assert token_f1("in 1991", ["1"]) == 0.0


def test_questions_without_gold_answers_are_refused_with_file_and_line(tmp_path):
    path = tmp_path / "q.jsonl"
    for answers in ([], ["", "  "]):
        path.write_text(json.dumps({"id": "q1", "question": "who?", "answers": ["x"]}) + "\n"
                        + json.dumps({"id": "q2", "question": "what?", "answers": answers}) + "\n")
        with pytest.raises(DataError, match=r"q.jsonl:2: question 'q2' has no gold answer"):
            load_questions(path)


@pytest.mark.parametrize("name", ["nq", "squad"])
@pytest.mark.parametrize("split", ["dev", "train"])
def test_shipped_question_files_all_have_gold_answers(name, split):
    root = shared_data()
    if root is None or not (root / name / f"{split}.jsonl").is_file():
        pytest.skip("the shared data is not present")
    path = root / name / f"{split}.jsonl"
    assert all(q.answers for q in load_questions(path))


# --- eval: records written as they finish, resumable -----------------------------------------------------------------
def _questions(n=12):
    from unirag.data import Question

    return [Question(f"q{i:02d}", f"question {i}?", (f"answer {i}",), f"d{i % 3}") for i in range(n)]


def _answerer(calls: list[str], interrupt_after: int | None = None):
    from unirag.answer import Answer, RetrievedDoc

    def answer_batch(batch):
        answers = []
        for q in batch:
            if interrupt_after is not None and len(calls) >= interrupt_after:
                raise KeyboardInterrupt
            calls.append(q.id)
            n = int(q.id[1:])
            answers.append(Answer("rag", q.question, f"answer {n}" if n % 2 else "no idea",
                                  [RetrievedDoc(f"d{n % 2}", "", "", 0.5), RetrievedDoc("d2", "", "", 0.1)],
                                  context_tokens=10 + n, timings_ms={"generate": float(n)}))
        return answers

    return answer_batch


LABELS = {"corpus": "nq", "precision": "fp32", "settings": {"beam_width": 10}}


def test_interrupted_eval_keeps_its_records_and_resume_answers_only_the_rest(tmp_path):
    from unirag.eval import partial_path, run_eval

    whole = tmp_path / "whole.json"
    run_eval(_answerer([]), "rag", _questions(), 2, batch_size=1, out=whole, progress=False, labels=LABELS)

    out = tmp_path / "run.json"
    calls: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_eval(_answerer(calls, interrupt_after=5), "rag", _questions(), 2, batch_size=1, out=out, progress=False,
                 labels=LABELS)
    sidecar = partial_path(out)
    assert not out.exists() and sidecar.exists()
    lines = [json.loads(line) for line in sidecar.read_text().splitlines()]
    assert lines[0]["labels"] == LABELS and lines[0]["system"] == "rag" and lines[0]["k"] == 2
    assert [r["id"] for r in lines[1:] if "id" in r] == [f"q{i:02d}" for i in range(5)]

    with pytest.raises(UniragError, match="--resume"):  # a fresh run would throw the 5 records away
        run_eval(_answerer([]), "rag", _questions(), 2, out=out, progress=False, labels=LABELS)
    with pytest.raises(UniragError, match="another run.*labels"):
        run_eval(_answerer([]), "rag", _questions(), 2, out=out, progress=False, labels={**LABELS, "precision": "4bit"},
                 resume=True)
    with pytest.raises(UniragError, match="another run.*k"):
        run_eval(_answerer([]), "rag", _questions(), 3, out=out, progress=False, labels=LABELS, resume=True)
    with pytest.raises(UniragError, match="does not ask"):
        run_eval(_answerer([]), "rag", _questions()[6:], 2, out=out, progress=False, labels=LABELS, resume=True)

    resumed: list[str] = []
    summary = run_eval(_answerer(resumed), "rag", _questions(), 2, batch_size=3, out=out, progress=False,
                       labels=LABELS, resume=True)
    assert resumed == [f"q{i:02d}" for i in range(5, 12)]
    assert not sidecar.exists()
    strip = lambda blob: [{k: v for k, v in r.items() if k != "latency_ms"} for r in blob["records"]]  # noqa: E731
    done, reference = json.loads(out.read_text()), json.loads(whole.read_text())
    assert strip(done) == strip(reference)
    for key in ("n", "accuracy", "em", "f1", "recall@1", "recall@k", "corpus", "settings"):
        assert summary[key] == reference["summary"][key], key

    # A finished run: refused without --resume/--overwrite; resume has nothing to do.
    with pytest.raises(UniragError, match="already exists"):
        run_eval(_answerer([]), "rag", _questions(), 2, out=out, progress=False, labels=LABELS)
    again: list[str] = []
    assert run_eval(_answerer(again), "rag", _questions(), 2, out=out, progress=False, labels=LABELS,
                    resume=True) == done["summary"] and again == []
    with pytest.raises(UniragError, match="other labels"):
        run_eval(_answerer([]), "rag", _questions(), 2, out=out, progress=False, labels={"corpus": "squad"},
                 resume=True)
    fresh: list[str] = []
    run_eval(_answerer(fresh), "rag", _questions(), 2, out=out, progress=False, labels=LABELS, overwrite=True)
    assert len(fresh) == 12


def test_resume_drops_a_line_cut_by_a_kill_and_redoes_that_question(tmp_path):
    from unirag.eval import partial_path, run_eval

    out = tmp_path / "run.json"
    with pytest.raises(KeyboardInterrupt):
        run_eval(_answerer([], interrupt_after=4), "rag", _questions(), 2, batch_size=2, out=out, progress=False)
    sidecar = partial_path(out)
    sidecar.write_bytes(sidecar.read_bytes() + b'{"id": "q04", "text": "ans')  # killed while writing
    calls: list[str] = []
    run_eval(_answerer(calls), "rag", _questions(), 2, out=out, progress=False, resume=True)
    assert calls == [f"q{i:02d}" for i in range(4, 12)]
    assert [r["id"] for r in json.loads(out.read_text())["records"]] == [f"q{i:02d}" for i in range(12)]


def test_check_output_paths_refuses_outputs_that_lose_data(tmp_path):
    from unirag.eval import check_output_paths

    questions = tmp_path / "q.jsonl"
    questions.write_text("{}\n")
    out = tmp_path / "out.json"
    check_output_paths({"--out": out, "--summary-out": tmp_path / "s.json", "--unused": None}, [questions])
    with pytest.raises(UniragError, match="--out and --summary-out are the same file"):
        check_output_paths({"--out": out, "--summary-out": tmp_path / "." / "out.json"}, [questions])
    with pytest.raises(UniragError, match="would overwrite one of the inputs"):
        check_output_paths({"--out": tmp_path / "x" / ".." / "q.jsonl"}, [questions])
    with pytest.raises(UniragError, match="is a folder"):
        check_output_paths({"--out": tmp_path}, [questions])
    with pytest.raises(UniragError, match="does not exist"):
        check_output_paths({"--summary-out": tmp_path / "missing" / "s.json"}, [questions])
    link = tmp_path / "link.jsonl"
    link.symlink_to(questions)
    with pytest.raises(UniragError, match="overwrite one of the shards"):
        check_output_paths({"OUT": link}, [questions], what="shards")


# --- merge / compare ---------------------------------------------------------------------------------------------
def _shard(ids, **labels):
    records = [{"id": i, "accuracy": 1.0, "em": 0.0, "f1": 0.5, "latency_ms": 3.0} for i in ids]
    summary = {"system": "rag", "k": 1, "n": len(ids), "wall_time_s": 1.0, "corpus": "nq",
               "corpus_fingerprint": "ab12", "settings": {"beam_width": 10, "reader": {"max_new_tokens": 8}}}
    summary.update(labels)
    return {"summary": summary, "records": records}


def test_merge_refuses_any_label_difference_nested_or_missing():
    from unirag.eval import merge_runs

    a = _shard(["q1", "q2"])
    assert merge_runs([a, _shard(["q3"])])["summary"]["n"] == 3
    with pytest.raises(UniragError, match=r"differ in settings\.beam_width"):
        merge_runs([a, _shard(["q3"], settings={"beam_width": 5, "reader": {"max_new_tokens": 8}})])
    with pytest.raises(UniragError, match=r"differ in settings\.reader\.max_new_tokens"):
        merge_runs([a, _shard(["q3"], settings={"beam_width": 10, "reader": {"max_new_tokens": 16}})])
    with pytest.raises(UniragError, match="differ in corpus_fingerprint"):  # two corpora in one folder named nq
        merge_runs([a, _shard(["q3"], corpus_fingerprint="cd34")], names=["a.json", "b.json"])
    lacking = _shard(["q3"])
    del lacking["summary"]["corpus_fingerprint"]
    with pytest.raises(UniragError, match=r"corpus_fingerprint \(missing in one\)"):
        merge_runs([a, lacking])
    with pytest.raises(UniragError, match=r"self_check \(missing in one\)"):
        merge_runs([a, _shard(["q3"], self_check=None)])


def test_merge_and_compare_name_the_file_and_record_without_an_id(tmp_path, capsys):
    from unirag.cli import main
    from unirag.eval import merge_runs, paired_comparison

    broken = _shard(["q3", "q4"])
    del broken["records"][1]["id"]
    with pytest.raises(UniragError, match="b.json: record 1 has no question 'id'"):
        merge_runs([_shard(["q1"]), broken], names=["a.json", "b.json"])
    with pytest.raises(UniragError, match="B: record 1 has no question 'id'"):
        paired_comparison(_shard(["q3", "q4"])["records"], broken["records"])
    (tmp_path / "a.json").write_text(json.dumps(_shard(["q3", "q4"])))
    (tmp_path / "b.json").write_text(json.dumps(broken))
    for argv in (["compare", "a.json", "b.json"], ["merge", "m.json", "a.json", "b.json"]):
        code = main([str(tmp_path / a) if a.endswith(".json") else a for a in argv])
        err = capsys.readouterr().err
        assert code == 2 and "b.json: record 1 has no question 'id'" in err and "Traceback" not in err
    assert not (tmp_path / "m.json").exists()


def test_merge_never_loses_a_shard_and_records_in_the_store(tmp_path, capsys, monkeypatch):
    """The merged summary goes to the results store, never to a file that could be the records (the old
    `--summary-out X` with X = OUT kept the summary alone); OUT equal to a shard is refused."""
    from unirag.cli import main

    monkeypatch.setenv("UNIRAG_RESULTS", str(tmp_path / "store"))
    for name, ids in (("a.json", ["q1"]), ("b.json", ["q2"])):
        (tmp_path / name).write_text(json.dumps(_shard(ids)))
    out = tmp_path / "m.json"
    argv = ["merge", str(out), str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    with pytest.raises(SystemExit):  # the option is gone: argparse refuses it
        main([*argv, "--summary-out", str(out)])
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "b.json"), str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 2
    assert "overwrite one of the shards" in capsys.readouterr().err
    assert len(json.loads((tmp_path / "b.json").read_text())["records"]) == 1
    assert main(argv) == 0
    assert len(json.loads(out.read_text())["records"]) == 2


# --- long passages -----------------------------------------------------------------------------------------------
def test_long_passages_are_truncated_at_a_boundary_with_one_notice(tmp_path, caplog):
    from unirag.data import MAX_PASSAGE_CHARS, load_corpus, truncate_passage

    sentence = "The river flows north past the old mill. "
    huge = sentence * (1_000_000 // len(sentence))  # ~1 MB: used to index silently and crash the reader
    words = "word " * 3000
    lines = [{"id": "p0", "title": "ok", "text": "short text"}, {"id": "p12", "title": "", "text": huge},
             {"id": "p40", "title": "", "text": words}, {"id": "p41", "title": "", "text": "x" * 9000}]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with caplog.at_level("WARNING", logger="unirag.data"):
        corpus = load_corpus(path)
    assert corpus["p0"].text == "short text"
    cut = corpus["p12"].text
    assert len(cut) <= MAX_PASSAGE_CHARS and cut.endswith("mill.") and huge.startswith(cut)
    assert corpus["p40"].text.endswith("word") and len(corpus["p40"].text) <= MAX_PASSAGE_CHARS
    assert corpus["p41"].text == "x" * MAX_PASSAGE_CHARS  # no boundary at all: a hard cut
    assert corpus.notices == [f"3 passages longer than {MAX_PASSAGE_CHARS:,} characters were truncated: p12, p40, p41"]
    assert [r.getMessage() for r in caplog.records].count(f"{path}: {corpus.notices[0]}") == 1
    assert truncate_passage("short") == "short"
    assert load_corpus(path).fingerprint == corpus.fingerprint  # deterministic


def test_shipped_corpora_keep_their_fingerprints():
    """Truncation must not touch the shipped corpora: their trees (and checkpoints) stay valid."""
    from unirag.data import load_corpus
    from unirag.paths import REPO_ROOT

    root = shared_data()
    if root is None:
        pytest.skip("the shared data is not present")
    for name in ("nq", "squad"):
        corpus = load_corpus(root / name / "corpus.jsonl")
        tree = json.loads((REPO_ROOT / "checkpoints" / f"{name}-smollm2" / "docid_tree.json").read_text())
        assert corpus.notices == [] and corpus.fingerprint == tree["corpus_fingerprint"], name


def _bow():
    """conftest's BagOfWordsEncoder, taking the `progress` argument corpus_embeddings passes."""
    from conftest import BagOfWordsEncoder

    class Bow(BagOfWordsEncoder):
        dim = 64  # known, as a loaded SentenceEncoder's: no hub lookup (a minute offline) for an old cache's width

        def encode_passages(self, texts, progress=True):
            return self._enc(texts)

    return Bow()


# --- corrupt caches ------------------------------------------------------------------------------------------------
def _small_corpus(n=30, tag="a"):
    from unirag.data import Corpus, Passage

    topics = ["football team goals", "river mountain lake", "piano music opera"]
    return Corpus([Passage(f"d{i:02d}", f"T{i}", f"{topics[i % 3]} {tag}{i} words") for i in range(n)],
                  source=f"/data/{tag}/corpus.jsonl")


def _corrupt(kind: str, path: Path, meta: Path) -> None:
    import numpy as np

    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif kind == "wrong rows":
        np.save(path, np.load(path)[:-1])
    elif kind == "wrong width":
        np.save(path, np.load(path)[:, :32])
    elif kind == "nan":
        emb = np.load(path)
        emb[3, 5] = np.nan
        np.save(path, emb)
    elif kind == "inf same checksum":  # the array altered and the checksum updated: the values still count
        emb = np.load(path)
        emb[0, 0] = np.inf
        np.save(path, emb)
        blob = json.loads(meta.read_text())
        import hashlib

        blob["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        meta.write_text(json.dumps(blob))
    elif kind == "integer dtype":
        np.save(path, np.zeros(np.load(path).shape, dtype=np.int64))
        blob = json.loads(meta.read_text())
        del blob["sha256"]  # an old cache without a checksum is still checked
        meta.write_text(json.dumps(blob))
    elif kind == "bad metadata":
        meta.write_text('{"corpus_fingerp')
    elif kind == "garbage":
        path.write_bytes(b"not an array at all")


@pytest.mark.parametrize("kind", ["truncated", "wrong rows", "wrong width", "nan", "inf same checksum",
                                  "integer dtype", "bad metadata", "garbage"])
def test_corrupt_embedding_caches_are_detected_and_rebuilt(kind, tmp_path, monkeypatch, caplog):
    import numpy as np

    from unirag.docids import corpus_embeddings, embeddings_path

    monkeypatch.setenv("UNIRAG_CACHE", str(tmp_path / "cache"))
    corpus, encoder = _small_corpus(), _bow()
    first = corpus_embeddings(corpus, encoder, progress=False)
    path = embeddings_path(corpus, encoder.name)
    meta = path.with_suffix(".json")
    assert json.loads(meta.read_text())["sha256"]
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, meta.name])  # no temp files
    _corrupt(kind, path, meta)
    with caplog.at_level("WARNING", logger="unirag.docids"):
        again = corpus_embeddings(corpus, encoder, progress=False)
    assert np.array_equal(again, first)
    assert any(f"the cached embeddings at {path} were corrupt" in r.getMessage() and "rebuilding" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="unirag.docids"):  # rebuilt sound: read back quietly
        assert np.array_equal(corpus_embeddings(corpus, encoder, progress=False), first)
    assert not caplog.records


def test_a_cache_without_checksum_is_kept_and_gets_one(tmp_path, monkeypatch):
    from conftest import BagOfWordsEncoder

    from unirag.docids import corpus_embeddings, embeddings_path

    monkeypatch.setenv("UNIRAG_CACHE", str(tmp_path / "cache"))
    corpus, encoder = _small_corpus(), _bow()
    corpus_embeddings(corpus, encoder, progress=False)
    meta = embeddings_path(corpus, encoder.name).with_suffix(".json")
    blob = json.loads(meta.read_text())
    checksum = blob.pop("sha256")
    meta.write_text(json.dumps(blob))

    class Refuses(BagOfWordsEncoder):  # the cache is keyed by the encoder's name ("bow")
        dim = 64

        def encode_passages(self, texts, progress=True):
            raise AssertionError("a sound cache must not be re-encoded")

    corpus_embeddings(corpus, Refuses(), progress=False)
    assert json.loads(meta.read_text())["sha256"] == checksum


def test_an_encoder_returning_nan_is_an_error_not_a_cache(tmp_path, monkeypatch):
    import numpy as np
    from conftest import BagOfWordsEncoder

    from unirag.docids import corpus_embeddings, embeddings_path

    class NaNs(BagOfWordsEncoder):
        def encode_passages(self, texts, progress=True):
            out = self._enc(texts)
            out[2] = np.nan
            return out

    monkeypatch.setenv("UNIRAG_CACHE", str(tmp_path / "cache"))
    corpus = _small_corpus()
    with pytest.raises(UniragError, match="NaN or inf embeddings for 1 passages.*d02"):
        corpus_embeddings(corpus, NaNs(), progress=False)
    assert not embeddings_path(corpus, "bow").exists()


@pytest.mark.parametrize("damage", ["truncated", "not json", "edited docids", "swapped docids", "other documents",
                                    "other config"])
def test_corrupt_cached_trees_are_rebuilt(damage, tmp_path, monkeypatch, caplog):
    from unirag.docids import TreeConfig, load_or_build_tree, tree_path

    monkeypatch.setenv("UNIRAG_CACHE", str(tmp_path / "cache"))
    corpus, config = _small_corpus(), TreeConfig(k=3, c=4, encoder="bow")
    tree = load_or_build_tree(corpus, config, encoder=_bow(), progress=False)
    path = tree_path(corpus, config)
    text = path.read_text()
    blob = json.loads(text)
    if damage == "truncated":
        path.write_text(text[: len(text) // 2])
    elif damage == "not json":
        path.write_bytes(b"\xff\xfe garbage")
    elif damage == "edited docids":
        blob["docids"][0] = [-1]
        path.write_text(json.dumps(blob))
    elif damage == "swapped docids":  # still a valid tree: only its checksum can tell
        blob["docids"][0], blob["docids"][1] = blob["docids"][1], blob["docids"][0]
        path.write_text(json.dumps(blob))
    elif damage == "other documents":
        blob["doc_ids"][0] = "intruder"
        path.write_text(json.dumps(blob))
    else:
        blob["config"]["k"] = 7
        path.write_text(json.dumps(blob))
    with caplog.at_level("WARNING", logger="unirag.docids"):
        rebuilt = load_or_build_tree(corpus, config, encoder=_bow(), progress=False)
    assert rebuilt.docids == tree.docids and rebuilt.labels == tree.labels
    assert any(f"the cached docid tree at {path} was corrupt" in r.getMessage() for r in caplog.records)
    assert json.loads(path.read_text()) == json.loads(text)
    # Written via a temp file, none left; beside it only its checksum.
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".sha256"]


# --- a tree for another corpus -------------------------------------------------------------------------------------
def test_a_tree_for_another_corpus_says_which_corpus_it_was_built_for(tmp_path):
    from conftest import BagOfWordsEncoder

    from unirag.docids import DocidTree, TreeConfig, build_tree
    from unirag.errors import FingerprintMismatchError

    squad, nq = _small_corpus(tag="squad"), _small_corpus(tag="nq")
    tree = build_tree(squad, BagOfWordsEncoder().encode_passages([p.text for p in squad]), TreeConfig(k=3, c=4))
    path = tmp_path / "tree.json"
    tree.save(path)
    assert json.loads(path.read_text())["corpus_name"] == "squad"
    assert DocidTree.load(path, squad).corpus_name == "squad"
    with pytest.raises(FingerprintMismatchError) as err:
        DocidTree.load(path, nq)
    message = str(err.value)
    assert f"built for another corpus: corpus 'squad' (fingerprint {squad.fingerprint}), not for 'nq'" in message
    assert nq.fingerprint in message and "unirag index" not in message
    changed = _small_corpus(tag="squad", n=31)  # same folder, other content: rebuilding is the advice
    with pytest.raises(FingerprintMismatchError, match="'squad' has changed since: rebuild the tree"):
        DocidTree.load(path, changed)
    old = json.loads(path.read_text())
    del old["corpus_name"]  # trees saved before the key: the fingerprint alone
    path.write_text(json.dumps(old))
    assert DocidTree.load(path, squad).corpus_name is None
    with pytest.raises(FingerprintMismatchError, match=f"another corpus: fingerprint {squad.fingerprint}, not"):
        DocidTree.load(path, nq)


def test_shipped_trees_load_with_their_corpus_names():
    from unirag.data import load_corpus
    from unirag.docids import DocidTree
    from unirag.errors import FingerprintMismatchError
    from unirag.paths import REPO_ROOT

    root = shared_data()
    for name in ("nq", "squad"):
        path = REPO_ROOT / "checkpoints" / f"{name}-smollm2" / "docid_tree.json"
        assert DocidTree.load(path).corpus_name == name
        if root is not None:
            assert len(DocidTree.load(path, load_corpus(root / name / "corpus.jsonl"))) > 2000
    if root is not None:
        with pytest.raises(FingerprintMismatchError, match="built for another corpus: corpus 'nq'.*not for 'squad'"):
            DocidTree.load(REPO_ROOT / "checkpoints" / "nq-smollm2" / "docid_tree.json",
                           load_corpus(root / "squad" / "corpus.jsonl"))


def test_index_out_may_not_be_the_corpus(tmp_path, capsys):
    from unirag.cli import main

    corpus = tmp_path / "corpus.jsonl"
    original = json.dumps({"id": "d0", "title": "", "text": "some text here."}) + "\n"
    corpus.write_text(original)
    assert main(["index", "--corpus", str(corpus), "--out", str(corpus)]) == 2
    assert "would overwrite" in capsys.readouterr().err
    assert corpus.read_text() == original
    assert main(["index", "--corpus", str(corpus), "--seed", "-1"]) == 2
    assert "--seed must be 0 or more" in capsys.readouterr().err


def test_merge_and_compare_refuse_an_existing_output_without_overwrite(tmp_path, capsys):
    from unirag.cli import main

    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("keep me")
    shard = tmp_path / "shard.json"
    shard.write_text("{}")
    assert main(["merge", str(unrelated), str(shard)]) == 2
    assert "--overwrite" in capsys.readouterr().err and unrelated.read_text() == "keep me"
    assert main(["compare", str(shard), str(shard), "--per-question", str(unrelated)]) == 2
    assert "--overwrite" in capsys.readouterr().err and unrelated.read_text() == "keep me"


def test_cache_pointing_at_a_file_is_one_clear_error(tmp_path, monkeypatch):
    from unirag.paths import cache_dir

    target = tmp_path / "a-file"
    target.write_text("x")
    monkeypatch.setenv("UNIRAG_CACHE", str(target))
    with pytest.raises(UniragError, match="is a file"):
        cache_dir()
    monkeypatch.setenv("UNIRAG_CACHE", str(target / "inside"))  # a folder inside a file cannot be made
    with pytest.raises(UniragError, match="cannot be created"):
        cache_dir()


def test_titles_are_capped_with_a_notice(tmp_path):
    from unirag.data import MAX_TITLE_CHARS, load_corpus

    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"id": "d0", "title": "word " * 200_000, "text": "short text."}) + "\n")
    corpus = load_corpus(path)
    assert len(corpus["d0"].title) <= MAX_TITLE_CHARS and corpus["d0"].text == "short text."
    assert any("title" in n for n in corpus.notices)


# --- checkpoint files, configs and inputs that used to pass silently or crash ------------------------------------
def test_every_checkpoint_file_is_checksummed(tiny_llm_dirs, tmp_path):
    """A docid tree with two docids swapped, or a LoRA adapter whose data was overwritten (header intact),
    is refused at load, not served."""
    from test_joint_modeling import make_joint

    from unirag.docids import DocidTree, TreeConfig
    from unirag.joint import JointModel
    from unirag.joint.checkpoint import CONFIG_FILE, LORA_DIR, TREE_FILE, verify_tree_file

    model = make_joint(tiny_llm_dirs["llama"])
    model.enable_lora(r=2, alpha=4, layers=[0])
    tree = DocidTree(["a", "b"], [(0,), (1,)], TreeConfig(k=2, c=1), "fp")
    ckpt = model.save_pretrained(tmp_path / "ckpt", tree=tree)
    files = json.loads((ckpt / CONFIG_FILE).read_text())["files"]
    assert TREE_FILE in files and f"{LORA_DIR}/adapter_model.safetensors" in files
    JointModel.from_pretrained(ckpt)  # sound

    blob = json.loads((ckpt / TREE_FILE).read_text())
    blob["docids"].reverse()
    (ckpt / TREE_FILE).write_text(json.dumps(blob))
    with pytest.raises(UniragError, match="docid_tree.json is corrupt or truncated, or was altered"):
        verify_tree_file(ckpt)
    tree.save(ckpt / TREE_FILE)
    verify_tree_file(ckpt)

    adapter = ckpt / LORA_DIR / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header:] = bytes(len(data) - header)  # zeros: the header still parses
    adapter.write_bytes(bytes(data))
    with pytest.raises(UniragError, match="adapter_model.safetensors is corrupt"):
        JointModel.from_pretrained(ckpt)


@pytest.mark.parametrize("lora, message", [
    ({"r": "16"}, "lora.r must be a whole number"),
    ({"r": 16, "alpha": True}, "lora.alpha must be a number"),
    ({"r": 16, "dropout": 2}, r"lora.dropout must be a number in \[0, 1\)"),
    ({"r": 16, "target_modules": "q_proj"}, "lora.target_modules must be a list"),
    ({"r": 16, "layers": ["0"]}, "lora.layers must be a list of layer indices"),
    ({"r": 16, "rank": 2}, "unknown key 'rank' in 'lora'"),
    ({"alpha": 2}, "no 'r'"),
])
def test_a_wrong_lora_block_is_one_error_naming_the_file(lora, message):
    from unirag.joint.config import JointConfig

    with pytest.raises(UniragError, match=message) as info:
        JointConfig.from_dict({"docid_levels": 2, "docid_branching": 2, "lora": lora}, source="ckpt/joint_config.json")
    assert "ckpt/joint_config.json" in str(info.value)


def test_a_bad_value_names_the_config_file():
    from unirag.joint.config import JointConfig

    with pytest.raises(UniragError, match=r"retrieval_heads must be >= 1 in ckpt/joint_config.json"):
        JointConfig.from_dict({"docid_levels": 2, "docid_branching": 2, "retrieval_heads": -3},
                              source="ckpt/joint_config.json")


def test_an_old_embedding_cache_of_the_wrong_width_is_rebuilt(tmp_path, monkeypatch, caplog):
    """A cache whose metadata predates `dim`/`sha256` is checked against the encoder's width."""
    import numpy as np

    from unirag import docids
    from unirag.docids import corpus_embeddings, embeddings_path

    monkeypatch.setenv("UNIRAG_CACHE", str(tmp_path / "cache"))
    corpus, encoder = _small_corpus(), _bow()
    encoder.dim = None  # an encoder that does not say its width: encoder_width gives it
    good = corpus_embeddings(corpus, encoder, progress=False)
    path = embeddings_path(corpus, encoder.name)
    np.save(path, np.ones((len(corpus), good.shape[1] + 3), dtype=np.float32))
    meta = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps({k: meta[k] for k in ("corpus_fingerprint", "encoder", "n")}))
    monkeypatch.setattr(docids, "encoder_width", lambda name: good.shape[1])
    with caplog.at_level("WARNING", logger="unirag.docids"):
        rebuilt = corpus_embeddings(corpus, encoder, progress=False)
    assert rebuilt.shape == good.shape
    assert any(f"the encoder {encoder.name} gives {good.shape[1]}" in r.getMessage() for r in caplog.records)


def test_an_old_wrong_width_cache_is_checked_against_the_loaded_encoder(tmp_path, monkeypatch, caplog):
    """The encoder in hand gives the width even when encoder_width cannot (a hub id offline: None)."""
    import numpy as np

    from unirag import docids
    from unirag.docids import corpus_embeddings, embeddings_path

    monkeypatch.setenv("UNIRAG_CACHE", str(tmp_path / "cache"))
    corpus, encoder = _small_corpus(), _bow()
    good = corpus_embeddings(corpus, encoder, progress=False)
    assert encoder.dim == good.shape[1]
    path = embeddings_path(corpus, encoder.name)
    np.save(path, np.ones((len(corpus), good.shape[1] + 3), dtype=np.float32))
    meta = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps({k: meta[k] for k in ("corpus_fingerprint", "encoder", "n")}))
    monkeypatch.setattr(docids, "encoder_width", lambda name: None)
    with caplog.at_level("WARNING", logger="unirag.docids"):
        assert corpus_embeddings(corpus, encoder, progress=False).shape == good.shape
    assert any(f"the encoder {encoder.name} gives {good.shape[1]}" in r.getMessage() for r in caplog.records)


def test_merge_and_compare_refuse_malformed_records_in_one_line(tmp_path, capsys):
    from unirag.cli import main
    from unirag.eval import merge_runs, paired_comparison

    no_latency = _shard(["q2"])
    del no_latency["records"][0]["latency_ms"]
    with pytest.raises(UniragError, match="b.json: record 'q2' has no 'latency_ms'"):
        merge_runs([_shard(["q1"]), no_latency], names=["a.json", "b.json"])
    words = _shard(["q2"])
    words["records"][0]["accuracy"] = "yes"
    with pytest.raises(UniragError, match="'accuracy' must be a number, got 'yes'"):
        merge_runs([_shard(["q1"]), words], names=["a.json", "b.json"])
    with pytest.raises(UniragError, match="B: record 'q2' has 'accuracy' 'yes', not a number"):
        paired_comparison(_shard(["q2"])["records"], words["records"])
    listed = _shard(["q2"])
    listed["summary"] = ["not", "an", "object"]
    with pytest.raises(UniragError, match="b.json: its summary is not an object"):
        merge_runs([_shard(["q1"]), listed], names=["a.json", "b.json"])
    twice = _shard(["q2", "q2"])
    with pytest.raises(UniragError, match="Question 'q2' occurs twice in b.json"):
        merge_runs([_shard(["q1"]), twice], names=["a.json", "b.json"])
    (tmp_path / "a.json").write_text(json.dumps(_shard(["q2"])))
    (tmp_path / "b.json").write_text(json.dumps(words))
    for argv in (["compare", "a.json", "b.json"], ["merge", "m.json", "a.json", "b.json"]):
        code = main([str(tmp_path / a) if a.endswith(".json") else a for a in argv])
        err = capsys.readouterr().err
        assert code == 2 and ("not a number" in err or "must be a number" in err) and "Traceback" not in err


def test_eval_checks_its_outputs_before_loading_anything(tmp_path, capsys, monkeypatch):
    """An existing --out (or its sidecar) is refused before any model loads; a sidecar that is an input too."""
    from unirag import cli

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "d0", "title": "", "text": "some text here."}) + "\n")
    questions = tmp_path / "qs.jsonl"
    questions.write_text(json.dumps({"id": "q0", "question": "what?", "answers": ["text"]}) + "\n")
    monkeypatch.setattr(cli, "_resolve", lambda *a, **k: pytest.fail("loaded a system"))
    out = tmp_path / "run.json"
    out.write_text("{}")
    argv = ["eval", "--corpus", str(corpus), "--questions", str(questions), "--system", "rag", "--out", str(out)]
    assert cli.main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    out.unlink()
    (tmp_path / "run.json.partial.jsonl").write_text("{}\n")
    assert cli.main(argv) == 2
    assert "interrupted run" in capsys.readouterr().err
    # --out q gives the sidecar q.partial.jsonl: a questions file of that name would be overwritten, then deleted.
    sidecar_input = tmp_path / "x.partial.jsonl"
    sidecar_input.write_text(questions.read_text())
    assert cli.main(["eval", "--corpus", str(corpus), "--questions", str(sidecar_input), "--system", "rag",
                     "--out", str(tmp_path / "x"), "--overwrite"]) == 2
    assert "would overwrite one of the inputs" in capsys.readouterr().err
    assert sidecar_input.read_text() == questions.read_text()


def test_a_corpus_folder_is_named_as_a_folder(tmp_path):
    from unirag.data import load_corpus

    (tmp_path / "corpus.jsonl").write_text(json.dumps({"id": "d0", "title": "", "text": "t."}) + "\n")
    with pytest.raises(UniragError, match=r"is a folder, not a JSONL file \(it holds corpus.jsonl\)"):
        load_corpus(tmp_path)


def test_bundled_embeddings_spare_a_fresh_machine_the_encoder(tmp_path, monkeypatch):
    """Embeddings shipped beside the data (found by corpus fingerprint and encoder) fill an empty cache without
    running the encoder; a bundled file that does not fit (altered) is ignored and the corpus is embedded."""
    import numpy as np

    from unirag import paths
    from unirag.docids import bundle_embeddings, corpus_embeddings, embeddings_path

    corpus, encoder = _small_corpus(), _bow()
    monkeypatch.setattr(paths, "bundled_data_dir", lambda: tmp_path / "data")
    monkeypatch.setenv("UNIRAG_CACHE", str(tmp_path / "built"))
    want = corpus_embeddings(corpus, encoder, progress=False)
    shipped = bundle_embeddings(corpus, encoder.name, tmp_path / "data" / "a" / "embeddings")
    monkeypatch.setenv("UNIRAG_CACHE", str(tmp_path / "fresh"))

    class Refuses(type(encoder)):
        def encode_passages(self, texts, progress=True):
            raise AssertionError("the encoder ran although embeddings were shipped")

    got = corpus_embeddings(corpus, Refuses(), progress=False)
    assert np.array_equal(got, want) and embeddings_path(corpus, encoder.name).is_file()
    monkeypatch.setenv("UNIRAG_CACHE", str(tmp_path / "fresh2"))
    np.save(shipped, want[::-1].copy())  # altered: its checksum no longer matches
    assert np.array_equal(corpus_embeddings(corpus, encoder, progress=False), want)
