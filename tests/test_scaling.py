"""benchmarks.scaling and the faiss switch of the tree builder, on tiny inputs (seconds, no SmolLM2)."""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import scaling
from unirag.backbones import load_llm
from unirag.docids import FAISS_KMEANS_MIN_POINTS, DocidTree, TreeConfig, recursive_kmeans
from unirag.joint.config import JointConfig
from unirag.joint.modeling import JointModel

REPO = Path(__file__).resolve().parent.parent


def _points(n: int = 500, dim: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((8, dim))
    x = centres[rng.integers(8, size=n)] + 0.3 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _assert_valid_tree(docids: list[tuple[int, ...]], n: int, k: int, c: int) -> DocidTree:
    assert len(docids) == n
    tree = DocidTree([f"d{i}" for i in range(n)], docids, TreeConfig(k=k, c=c), "fp")  # refuses shared docids
    for docid in docids:
        assert tree.allowed(docid) == []  # no docid is a prefix of another
        assert tree.size(docid[:-1]) <= c  # leaf clusters hold at most c documents
        assert all(0 <= s < max(k, c) for s in docid)
    return tree


@pytest.mark.parametrize("faiss_min_points", [0, 10**9], ids=["faiss", "sklearn"])
def test_both_kmeans_paths_give_a_valid_deterministic_tree(faiss_min_points):
    x = _points()
    docids = recursive_kmeans(x, k=10, c=10, seed=0, faiss_min_points=faiss_min_points)
    tree = _assert_valid_tree(docids, len(x), 10, 10)
    assert tree.depth >= 2
    assert recursive_kmeans(x, k=10, c=10, seed=0, faiss_min_points=faiss_min_points) == docids


def test_the_threshold_only_changes_large_splits():
    x = _points(300)
    # Every split is below both thresholds: the default build is the sklearn build, docid for docid.
    assert recursive_kmeans(x, 10, 10, 0) == recursive_kmeans(x, 10, 10, 0, faiss_min_points=10**9)
    mixed = recursive_kmeans(x, 10, 10, 0, faiss_min_points=100)  # the root split by faiss, the rest by sklearn
    _assert_valid_tree(mixed, len(x), 10, 10)


@pytest.mark.parametrize("name", ["nq", "squad"])
def test_shipped_corpora_never_reach_the_faiss_path(name):
    # The root split is a tree's largest, so below the threshold every split is the unchanged sklearn one.
    from unirag.data import dataset_paths, load_corpus

    assert len(load_corpus(dataset_paths(name)[0])) < FAISS_KMEANS_MIN_POINTS


def test_mixture_samples_are_unit_float32_and_seeded():
    gmm = scaling.fit_mixture(_points(400), components=4, seed=0)
    a = scaling.sample_embeddings(gmm, 1000, seed=1, chunk=300)
    assert a.shape == (1000, 16) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(a, scaling.sample_embeddings(gmm, 1000, seed=1, chunk=300))
    assert not np.array_equal(a, scaling.sample_embeddings(gmm, 1000, seed=2))


def test_measure_memory_sees_a_block_peak():
    # An anonymous mapping, not a numpy array: whether malloc hands a freed array back to the kernel depends on
    # the allocator's state after the rest of the suite, while munmap always does. The pages are touched one by one
    # for the same reason: a temporary bytes object as large as the block would be a malloc'd block too.
    with scaling.measure_memory() as memory:
        block = mmap.mmap(-1, 50 * 2**20)
        for offset in range(0, len(block), mmap.PAGESIZE):  # touch every page, with no temporary 50 MB bytes object
            block[offset] = 1
        block.close()
    assert memory.peak_mb >= 40
    assert memory.retained_mb < 40


def test_python_mb_counts_each_object_once():
    shared = tuple(range(1000, 2000))
    once = scaling.python_bytes(shared)
    assert once > 30_000  # a 1,000-tuple of distinct ints: 8 kB of pointers + 28 kB of ints
    assert scaling.python_bytes({"a": shared, "b": shared}) < 1.1 * once


def test_tree_search_and_checkpoint_rows_on_a_tiny_model(tiny_llm_dirs):
    x = _points(200)
    tree, row = scaling.build_tree(x, TreeConfig(k=4, c=5), [f"d{i}" for i in range(len(x))], 0, "fp")
    assert row["faiss_splits"] == row["splits"] > 0  # threshold 0: every split ran faiss
    assert row["nodes"] == len(tree) + row["splits"] - 1  # every prefix but the root
    assert row["depth_max"] == tree.depth
    text = scaling.RealText(titles=["A title"], cluster_labels=["x, y, z"], questions=["who?", "what?"])
    tree.labels = scaling.synthetic_labels(tree, text, seed=0)
    base, tok = load_llm(str(tiny_llm_dirs["llama"]))
    torch.manual_seed(0)
    model = JointModel(base, JointConfig(docid_levels=tree.depth, docid_branching=tree.branching, pathway_layers=2,
                                         retrieval_heads=2, retrieval_mlp_dim=16, semantic_dim=8,
                                         semantic_nodes=row["nodes"]), tokenizer=tok).eval()
    size = scaling.checkpoint_size(model, tree)
    assert size["semantic_table_mb"] == round(row["nodes"] * 8 * 2 / 1e6, 1)
    assert size["tree_json_bytes"] > 0 and size["within_budget"]
    costs = scaling.split_costs(x, k=4, seed=0, sizes=[100, 10**6])  # sizes beyond the input are skipped
    assert [c["points"] for c in costs] == [100] and costs[0]["sklearn_s"] >= 0 and costs[0]["faiss_s"] >= 0
    search = scaling.search_latency(model, tok, tree, text.questions, beams=[(3, 2)])
    assert search["questions"] == 2 and search["by_beam"][0]["beam_width"] == 3
    assert search["by_beam"][0]["ms_mean"] > 0


def _row(passages: int, size: str) -> dict:
    return {
        "size": size, "passages": passages, "load_average_1m": 1.0, "date": "2025-01-01 00:00 UTC",
        "settings": {"faiss_min_points": 50_000},
        "tree": {"build_s": 1.0, "faiss_kmeans_s": 0.0, "build_peak_mb": 10.0, "depth_max": 5, "depth_mean": 4.1,
                 "nodes": 3720, "leaf_size_mean": 4.2, "trie_mb": 3.0},
        "search": {"questions": 20, "docid_levels": 5, "node_index_mb": 0.5,
                   "by_beam": [{"beam_width": 10, "num_return": 5, "ms_mean": 300.0, "ms_p90": 400.0}]},
        "checkpoint": {"semantic_table_ram_mb": 5.7, "total_mb": 33.0, "semantic_table_mb": 2.9, "joint_mb": 27.8,
                       "lora_mb": 5.2, "tree_json_mb": 0.2, "budget_mb": 50.0, "within_budget": True},
    }


def test_render_rewrites_only_the_marked_block(tmp_path):
    out = tmp_path / "scaling.json"
    scaling.save_rows(out, [_row(100_000, "100000"), _row(2600, "nq")])
    assert [r["size"] for r in scaling.load_rows(out)] == ["nq", "100000"]  # ordered by size
    page = tmp_path / "page.md"
    page.write_text("# Scaling\nbefore\n<!-- scaling:table -->\nold\n<!-- /scaling -->\nafter\n")
    assert scaling.main(["--render", str(page), "--out", str(out), "--check"]) == 1
    assert scaling.main(["--render", str(page), "--out", str(out)]) == 0
    text = page.read_text()
    assert text.startswith("# Scaling\nbefore\n<!-- scaling:table -->\n| passages |") and text.endswith("after\n")
    assert "| 2,600 | real nq |" in text and "| 100,000 | synthetic |" in text and "old" not in text
    assert scaling.main(["--render", str(page), "--out", str(out), "--check"]) == 0


def test_sizes_already_measured_are_skipped(tmp_path, monkeypatch):
    out = tmp_path / "scaling.json"
    scaling.save_rows(out, [_row(2600, "nq"), _row(10_000, "10000")])
    monkeypatch.setattr(scaling, "measure_size", lambda *a: pytest.fail("measured a size already stored"))
    assert scaling.main(["--sizes", "nq,10000", "--out", str(out)]) == 0
    assert len(json.loads(out.read_text())["rows"]) == 2


def test_scaling_page_is_generated_from_the_store():
    page = REPO / "docs" / "scaling.md"
    text = page.read_text(encoding="utf-8")
    assert "<!-- scaling:table -->" in text
    # If this fails, run `python -m benchmarks.scaling --render docs/scaling.md` and commit the page.
    assert scaling.update_page(text, scaling.load_rows(scaling.DEFAULT_OUT)) == text
    assert scaling.main(["--render", str(page), "--check"]) == 0
