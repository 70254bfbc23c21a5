import json

import numpy as np
import pytest

from unirag.data import Corpus, Passage
from unirag.docids import DocidTree, TreeConfig, build_tree, recursive_kmeans
from unirag.errors import FingerprintMismatchError, UniragError


def make_corpus(n=120, seed=0):
    rng = np.random.default_rng(seed)
    topics = [
        "football team season goals",
        "river mountain valley lake",
        "piano music composer opera",
        "election party parliament vote",
    ]
    passages = []
    for i in range(n):
        words = topics[i % 4].split() + [f"w{rng.integers(50)}" for _ in range(5)]
        passages.append(Passage(f"d{i:03d}", f"Title {i}", " ".join(words)))
    centers = rng.normal(size=(4, 16))
    emb = np.stack([centers[i % 4] + 0.1 * rng.normal(size=16) for i in range(n)]).astype(np.float32)
    return Corpus(passages, source="synthetic"), emb


@pytest.mark.parametrize("k,c", [(4, 5), (3, 10), (10, 10), (2, 1)])
def test_every_document_gets_exactly_one_unique_docid(k, c):
    corpus, emb = make_corpus()
    docids = recursive_kmeans(emb, k, c)
    assert len(docids) == len(corpus) and len(set(docids)) == len(corpus)
    tree = DocidTree(corpus.ids, docids, TreeConfig(k, c), corpus.fingerprint)
    for doc_id in corpus.ids:
        assert tree.doc_id_at(tree.docid_of(doc_id)) == doc_id
    assert max(max(d) for d in docids) < max(k, c)


def test_leaves_hold_at_most_c_documents_and_trie_is_consistent():
    corpus, emb = make_corpus()
    tree = DocidTree(corpus.ids, recursive_kmeans(emb, 4, 5), TreeConfig(4, 5), corpus.fingerprint)
    assert tree.size(()) == len(corpus)
    for prefix in tree.nodes():
        kids = tree.allowed(prefix)
        assert kids == sorted(set(kids)) and kids
        if tree.is_complete(prefix + (kids[0],)):
            assert len(kids) <= 5
        assert sum(tree.size(prefix + (kid,)) for kid in kids) == tree.size(prefix)
    full = tree.docids[0]
    assert tree.allowed(full) == [] and tree.is_complete(full)
    assert tree.allowed((99,)) == []


def test_kmeans_is_deterministic_and_similar_docs_share_prefixes():
    _, emb = make_corpus()
    assert recursive_kmeans(emb, 4, 5, seed=3) == recursive_kmeans(emb, 4, 5, seed=3)
    docids = recursive_kmeans(emb, 4, 40)
    # the four synthetic topics are far apart, so each topic sits under one top-level cluster
    for topic in range(4):
        assert len({docids[i][0] for i in range(topic, len(docids), 4)}) == 1


def test_identical_embeddings_still_split():
    docids = recursive_kmeans(np.ones((50, 8), dtype=np.float32), 4, 5)
    assert len(set(docids)) == 50


def test_labels_save_load_and_fingerprint_check(tmp_path):
    corpus, emb = make_corpus()
    tree = build_tree(corpus, emb, TreeConfig(k=4, c=40))
    top = [(kid,) for kid in tree.allowed(())]
    labels = {tree.label(node) for node in top}
    assert any("football" in lab for lab in labels) and any("piano" in lab or "music" in lab for lab in labels)
    path = tmp_path / "tree.json"
    tree.save(path)
    loaded = DocidTree.load(path, corpus)
    assert loaded.docids == tree.docids and loaded.labels == tree.labels and loaded.shape() == tree.shape()
    other, _ = make_corpus(n=121)
    with pytest.raises(FingerprintMismatchError, match="another corpus"):
        DocidTree.load(path, other)
    blob = json.loads(path.read_text())
    del blob["docids"]
    path.write_text(json.dumps(blob))
    with pytest.raises(UniragError, match="not a valid docid tree"):
        DocidTree.load(path)
    with pytest.raises(UniragError, match="python -m unirag index"):
        DocidTree.load(tmp_path / "missing.json")


def test_bad_config_and_mismatched_embeddings():
    with pytest.raises(UniragError):
        TreeConfig(k=1)
    corpus, emb = make_corpus()
    with pytest.raises(UniragError, match="embeddings for"):
        build_tree(corpus, emb[:10])
