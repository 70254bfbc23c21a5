"""The baselines as named systems: BM25, hybrid and rag-selfcheck (dense top N re-ranked by the joint model's
self-check), on tiny offline models (seconds)."""

from __future__ import annotations

import json

import pytest
from conftest import BagOfWordsEncoder, write_keyword_files
from test_cli import _joint_checkpoint, run
from test_joint_decoding import CORPUS, DOCIDS, FakeTrie, _build

from unirag.data import Corpus, Passage
from unirag.errors import UniragError
from unirag.joint.dense_selfcheck import DenseSelfCheckSystem
from unirag.joint.joint_system import JointSystem
from unirag.joint.passage_cache import PassageCache
from unirag.joint.selfcheck import question_likelihood, rerank
from unirag.rag import DenseRetriever
from unirag.settings import MAX_SELF_CHECK_WEIGHT, InferenceSettings
from unirag.sparse import RRF_K, BM25Retriever, HybridRetriever
from unirag.systems import SPECS, build_system, spec

QUESTIONS = ("who wrote it?", "text of doc 3", "what is in doc 5 text", "of doc", "x")


def _dense(corpus: Corpus) -> DenseRetriever:
    encoder = BagOfWordsEncoder()
    return DenseRetriever(corpus, encoder, encoder.encode_passages([p.text for p in corpus]))


@pytest.fixture(scope="module")
def joint_system(tiny_llm_dirs) -> JointSystem:
    model = _build(tiny_llm_dirs["llama"], seed=5)
    return JointSystem(model, model.tokenizer, CORPUS, FakeTrie(DOCIDS), traces=False)


def _expected(joint: JointSystem, retriever, question: str, n: int, weight: float):
    """The joint model's self-check (selfcheck.rerank over question_likelihood) applied to dense top N by hand."""
    hits = retriever.search(question, n)
    passages = [(d, CORPUS[d].title, CORPUS[d].text) for d, _ in hits]
    return rerank(hits, question_likelihood(joint.model, joint.tokenizer, question, passages), weight)


def test_rag_selfcheck_ranking_is_the_joint_rerank_of_the_dense_candidates(joint_system):
    retriever = _dense(CORPUS)
    system = DenseSelfCheckSystem(retriever, joint_system)
    settings = InferenceSettings(k_docs=2, self_check=5, self_check_weight=4.0, joint_reader="base",
                                 max_new_tokens=2)
    reordered = 0
    for question in QUESTIONS:
        rows = _expected(joint_system, retriever, question, 5, 4.0)
        answer = system.answer(question, settings)
        assert answer.system == "rag-selfcheck"
        assert answer.ranked_doc_ids == [r.doc_id for r in rows]  # R@1/R@3 read the re-ranked order
        assert answer.doc_ids == [r.doc_id for r in rows[:2]]
        assert [d.score for d in answer.docs] == pytest.approx([r.score for r in rows[:2]], abs=1e-5)
        got = answer.trace.self_check
        assert [r.doc_id for r in got] == [r.doc_id for r in rows]
        cosine = dict(retriever.search(question, 5))  # the "search score" is the dense cosine
        assert [r.search_score for r in got] == pytest.approx([cosine[r.doc_id] for r in rows], abs=1e-6)
        assert "self_check" in answer.timings_ms and any("cosine + 4" in n for n in answer.notices)
        reordered += [r.doc_id for r in rows] != [d for d, _ in retriever.search(question, 5)]
    assert reordered, "no question was re-ordered: the test could not tell a re-rank from dense order"


def test_rag_selfcheck_with_a_huge_weight_ranks_by_the_likelihood_alone(joint_system):
    retriever = _dense(CORPUS)
    system = DenseSelfCheckSystem(retriever, joint_system)
    settings = InferenceSettings(k_docs=1, self_check=6, self_check_weight=MAX_SELF_CHECK_WEIGHT, max_new_tokens=1)
    question = "who wrote it?"
    hits = retriever.search(question, 6)
    passages = [(d, CORPUS[d].title, CORPUS[d].text) for d, _ in hits]
    likelihood = dict(zip([d for d, _ in hits],
                          question_likelihood(joint_system.model, joint_system.tokenizer, question, passages),
                          strict=True))
    answer = system.answer(question, settings)
    assert answer.ranked_doc_ids == sorted(likelihood, key=lambda d: -likelihood[d])
    assert answer.doc_ids == answer.ranked_doc_ids[:1]


def test_rag_selfcheck_reads_the_passage_cache_like_the_joint_model(joint_system, tmp_path):
    cache = PassageCache.build(joint_system.model, CORPUS, tmp_path / "kv", storage_dtype="float32", progress=False)
    cached = JointSystem(joint_system.model, joint_system.tokenizer, CORPUS, FakeTrie(DOCIDS), passage_cache=cache,
                         traces=False)
    retriever = _dense(CORPUS)
    settings = InferenceSettings(k_docs=1, self_check=4, max_new_tokens=1)
    plain = DenseSelfCheckSystem(retriever, joint_system).answer("who wrote it?", settings)
    fast = DenseSelfCheckSystem(retriever, cached).answer("who wrote it?", settings)
    assert fast.ranked_doc_ids == plain.ranked_doc_ids and any("cached reading" in n for n in fast.notices)


def test_rag_selfcheck_refuses_the_self_check_off_and_rereads_given_documents(joint_system):
    retriever = _dense(CORPUS)
    system = DenseSelfCheckSystem(retriever, joint_system)
    with pytest.raises(UniragError, match="self_check 0"):
        system.answer("who wrote it?", InferenceSettings(k_docs=1, self_check=0))
    with pytest.raises(UniragError, match="self_check 0"):
        spec("rag-selfcheck").check(InferenceSettings())
    spec("joint").check(InferenceSettings())  # the joint model runs with or without it
    again = system.read("who wrote it?", [("d3", 0.5), ("d4", None)], InferenceSettings(max_new_tokens=1))
    assert again.doc_ids == ["d3", "d4"] and again.docs[0].score == 0.5
    assert again.docs[1].score == pytest.approx(retriever.similarity("who wrote it?", ["d4"])[0])
    assert again.docs[0].docid == (1, 0, 0)  # the joint tree's docid, as the joint side shows it


def test_the_joint_search_still_ranks_by_the_shared_rerank(joint_system):
    """JointSystem.retrieve and rag-selfcheck go through one JointSystem.rank: the search's candidates, re-ranked."""
    settings = InferenceSettings(k_docs=1, beam_width=6, self_check=4, max_new_tokens=1)
    retrieval = joint_system.retrieve("who wrote it?", settings)
    candidates = [(beam.doc_id, beam.score) for beam in retrieval.search.beams]
    passages = [(d, CORPUS[d].title, CORPUS[d].text) for d, _ in candidates]
    rows = rerank(candidates, question_likelihood(joint_system.model, joint_system.tokenizer, "who wrote it?",
                                                  passages), settings.self_check_weight)
    assert retrieval.ranking == [r.doc_id for r in rows]
    assert retrieval.docs[0].docid == next(b.docid for b in retrieval.search.beams if b.doc_id == rows[0].doc_id)
    assert any("search score + 4" in n for n in retrieval.notices)


KEYWORD_CORPUS = Corpus([
    Passage("a", "Rivers", "The river flows through the old city and past the bridges."),
    Passage("b", "Spices", "Cloves grow on Zanzibar, an island off the coast."),
    Passage("c", "Kings", "The king of the old city built many bridges over the river."),
    Passage("d", "Music", "The composer wrote music for the king and the city."),
], source="fake")


def test_bm25_ranks_the_exact_keyword_passage_first():
    bm25 = BM25Retriever(KEYWORD_CORPUS)
    hits = bm25.search("what grows on the island of zanzibar?", 3)
    assert hits[0][0] == "b" and hits[0][1] > hits[1][1] >= 0
    assert bm25.similarity("what grows on the island of zanzibar?", ["b", "a"]) == pytest.approx(
        [hits[0][1], dict(hits).get("a", 0.0)])
    # Stopwords and words the corpus never uses count for nothing; a question of only those ranks nothing up.
    assert bm25.search("the of and", 4) == [(p.id, 0.0) for p in KEYWORD_CORPUS]
    assert bm25.search("unheardofword", 1) == [("a", 0.0)]
    with pytest.raises(UniragError):
        bm25.search("river", 0)


def test_hybrid_fuses_the_two_rankings_by_reciprocal_rank():
    dense, bm25 = _dense(KEYWORD_CORPUS), BM25Retriever(KEYWORD_CORPUS)
    hybrid = HybridRetriever(dense, bm25)
    question = "zanzibar cloves island"
    dense_rank = {d: i for i, (d, _) in enumerate(dense.search(question, 4), start=1)}
    bm25_rank = {d: i for i, (d, _) in enumerate(bm25.search(question, 4), start=1)}
    fused = {d: 1 / (RRF_K + dense_rank[d]) + 1 / (RRF_K + bm25_rank[d]) for d in KEYWORD_CORPUS.ids}
    hits = hybrid.search(question, 4)
    assert [d for d, _ in hits] == sorted(fused, key=lambda d: -fused[d]) and hits[0][0] == "b"
    assert [s for _, s in hits] == pytest.approx([fused[d] for d, _ in hits])


def test_build_system_needs_the_parts_each_baseline_reads():
    with pytest.raises(UniragError, match="needs its bm25 retriever"):
        build_system("bm25", KEYWORD_CORPUS, reader=object())
    with pytest.raises(UniragError, match="needs a joint checkpoint"):
        build_system("rag-selfcheck", KEYWORD_CORPUS, retriever=_dense(KEYWORD_CORPUS))
    assert SPECS["rag-selfcheck"].documents_read(InferenceSettings(k_docs=2, rag_k=5)) == 2  # the joint's count
    assert SPECS["bm25"].documents_read(InferenceSettings(k_docs=2, rag_k=5)) == 5


@pytest.fixture()
def files(tmp_path):
    return write_keyword_files(tmp_path, "where do cloves grow, zanzibar?", ["x"])


def test_eval_bm25_writes_records_with_the_ranking(files, capsys, tiny_llm_dirs):
    root, corpus, questions = files
    out = root / "bm25.json"
    code, stdout, err = run(capsys, "eval", "--corpus", corpus, "--questions", questions, "--system", "bm25",
                            "--llm", tiny_llm_dirs["llama"], "--rag-k", 1, "--max-new-tokens", 2, "--out", out)
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["system"] == "bm25" and summary["k"] == 1
    assert summary["recall@1"] == 1.0 and summary["recall@3"] == 1.0  # reads 1, ranks 3 like dense RAG
    assert summary["settings"] == {"rag_k": 1, "max_new_tokens": 2}
    (record,) = json.loads(out.read_text())["records"]
    assert [d["doc_id"] for d in record["docs"]] == ["d2"] and record["docs"][0]["score"] > 0
    assert record["ranked_doc_ids"][0] == "d2" and len(record["ranked_doc_ids"]) == 3
    assert (record["recall@1"], record["recall@3"], record["system"]) == (1.0, 1.0, "bm25")


def test_baselines_refuse_the_flags_they_do_not_read(files, capsys, tiny_llm_dirs):
    root, corpus, questions = files
    ckpt = _joint_checkpoint(root, tiny_llm_dirs["llama"], corpus)
    base = ("eval", "--corpus", corpus, "--questions", questions, "--system")
    for system, extra, message in [
        ("bm25", ("--self-check", 3), "--self-check do(es) not apply to --system bm25"),
        ("hybrid", ("--k-docs", 2), "--k-docs do(es) not apply to --system hybrid"),
        ("bm25", ("--checkpoint", ckpt), "takes no --checkpoint"),
        ("rag-selfcheck", ("--checkpoint", ckpt, "--rag-k", 3), "--rag-k do(es) not apply to --system rag-selfcheck"),
        ("rag-selfcheck", ("--checkpoint", ckpt, "--beam-width", 4), "--beam-width do(es) not apply"),
        ("rag-selfcheck", (), "needs --checkpoint"),
    ]:
        code, out, err = run(capsys, *base, system, *extra)
        assert code == 2 and message in err and not out, (system, extra, err)


def test_eval_rag_selfcheck_takes_the_checkpoints_self_check_like_joint(files, capsys, tiny_llm_dirs, monkeypatch):
    from unirag import rag

    root, corpus, questions = files
    monkeypatch.setenv("UNIRAG_CACHE", str(root / "cache"))
    monkeypatch.setattr(rag.DenseRetriever, "from_corpus",
                        classmethod(lambda cls, c, name=None, progress=True: _dense(c)))
    ckpt = _joint_checkpoint(root, tiny_llm_dirs["llama"], corpus)
    (ckpt / "recommended_settings.json").write_text(json.dumps({"fp32": {
        "k_docs": 1, "beam_width": 4, "self_check": 3, "self_check_weight": 16.0, "joint_reader": "base",
        "without_cache": {"self_check": 0}}}))
    command = ("eval", "--corpus", corpus, "--questions", questions, "--system", "rag-selfcheck", "--checkpoint",
               ckpt, "--max-new-tokens", 2)
    code, out, err = run(capsys, *command)  # no passage cache: the checkpoint's setting turns the self-check off
    assert code == 2 and "self_check 0" in err and not out
    code, out, err = run(capsys, *command, "--self-check-cache")  # builds it: the recommended N, weight and reader
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["system"] == "rag-selfcheck" and summary["passage_cache"] is True
    assert summary["settings"] == {"k_docs": 1, "self_check": 3, "self_check_weight": 16.0, "joint_reader": "base",
                                   "max_new_tokens": 2}
    assert summary["k"] == 1 and summary["recall@3"] is not None  # reads one, the self-check ranked three
