"""Scale by measurement and by simulation: the docid tree, the docid search and the checkpoint against corpus size.

Per corpus size it measures the docid-tree build (recursive k-means, faiss above the library's threshold), the
tree's shape, the trie's and the semantic table's memory, the trie-constrained docid search's latency and the
checkpoint's size against the 50 MB budget. "nq" is the real corpus (its cached MiniLM embeddings); a number N is
a synthetic corpus of N passages whose embeddings are sampled from a Gaussian mixture fitted to the real MiniLM
embeddings of both corpora (diagonal covariances, normalised after sampling), with titles, cluster labels and
questions taken from the real data where text is needed.

The search runs a joint model of the tree's depth and branching around the real SmolLM2 base (fp32) with
freshly initialised joint weights: its latency depends on shapes and the beam, not on trained weights (only
the early stop of the beam search reads the scores, so trained weights can finish a little sooner).

    OMP_NUM_THREADS=1 python -m benchmarks.scaling --sizes nq,10000,100000,1000000
    python -m benchmarks.scaling --render docs/scaling.md

Rows go to results/scaling.json (one per size); a size already there is skipped unless --overwrite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from unirag import docids as docids_module
from unirag.docids import FAISS_KMEANS_MIN_POINTS, DocidTree, TreeConfig, recursive_kmeans
from unirag.paths import write_json_atomic

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "results" / "scaling.json"
SHIPPED_CHECKPOINT = REPO / "checkpoints" / "nq-smollm2"
BUDGET_MB = 50.0  # issue 3: at most 50 MB per checkpoint (as benchmarks/checkpoint_size.py)
MACHINE = "2-core CPU, 24 GB"
REAL_CORPORA = ("nq", "squad")
# (beam width, distinct documents returned): the shipped fp32/4-bit setting (beam 10, self-check 5) and the
# widest one (NF4: beam 32, self-check 20), as the app sizes the search (InferenceSettings.search_width).
BEAMS: tuple[tuple[int, int], ...] = ((10, 5), (32, 20))


def log(message: str) -> None:
    print(f"[scaling {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- memory


def _status_kb(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return round((kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024, 1)


@dataclass
class Memory:
    """RSS growth over a block: `peak_mb` above the RSS at its start, `retained_mb` still held at its end."""

    peak_mb: float = 0.0
    retained_mb: float = 0.0
    exact_peak: bool = field(default=False, repr=False)


@contextmanager
def measure_memory() -> Iterator[Memory]:
    """Peak RSS of a block: Linux resets the high-water mark on `5 > /proc/self/clear_refs`, so the peak is the
    block's own (numpy, torch and faiss allocations included). Without it the peak is the process's so far."""
    memory = Memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        memory.exact_peak = True
    except OSError:
        pass
    start = rss_mb()
    try:
        yield memory
    finally:
        hwm = _status_kb("VmHWM")
        peak = hwm / 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        memory.peak_mb = round(max(peak - start, 0.0), 1)
        memory.retained_mb = round(rss_mb() - start, 1)


def python_mb(*objects: Any) -> float:
    return round(python_bytes(*objects) / 1e6, 1)


def python_bytes(*objects: Any) -> int:
    """Bytes held by Python objects and everything they contain (dict, list, tuple and set members; each object once).
    The trie and the node index are pure Python: RSS growth would miss what they take over from freed memory."""
    seen: set[int] = set()
    total = 0
    stack = list(objects)
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)
    return total


# --------------------------------------------------------------------------------------------- synthetic corpus


def real_embeddings(names: Sequence[str] = REAL_CORPORA) -> dict[str, np.ndarray]:
    """The cached MiniLM passage embeddings of the real corpora (computed once with the embedded encoder)."""
    from unirag.data import dataset_paths, load_corpus
    from unirag.docids import corpus_embeddings

    out = {}
    for name in names:
        corpus = load_corpus(dataset_paths(name)[0])
        out[name] = np.asarray(corpus_embeddings(corpus, progress=False), dtype=np.float32)
    return out


def fit_mixture(vectors: np.ndarray, components: int, seed: int):
    """A diagonal Gaussian mixture over the real embeddings (sklearn, deterministic for a seed)."""
    from sklearn.mixture import GaussianMixture

    gmm = GaussianMixture(n_components=components, covariance_type="diag", random_state=seed, reg_covar=1e-6)
    return gmm.fit(np.asarray(vectors, dtype=np.float64))


def sample_embeddings(gmm, n: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    """n unit vectors [n, dim] float32 from the mixture, in chunks (GaussianMixture.sample is float64 and sorted by
    component: 1M x 384 of it would be 3 GB, and the order would decide the k-means seeding)."""
    rng = np.random.default_rng(seed)
    means = gmm.means_.astype(np.float32)
    stds = np.sqrt(gmm.covariances_).astype(np.float32)
    out = np.empty((n, means.shape[1]), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        comp = rng.choice(len(gmm.weights_), size=stop - start, p=gmm.weights_)
        block = means[comp] + rng.standard_normal((stop - start, means.shape[1]), dtype=np.float32) * stds[comp]
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


@dataclass
class RealText:
    """Text from the real corpora, for the parts that need text: titles (leaf labels), cluster labels, questions."""

    titles: list[str]
    cluster_labels: list[str]
    questions: list[str]


def real_text(seed: int) -> RealText:
    from unirag.data import dataset_paths, load_corpus, load_questions

    titles: list[str] = []
    for name in REAL_CORPORA:
        titles += [p.title or p.id for p in load_corpus(dataset_paths(name)[0])]
    shipped = json.loads((SHIPPED_CHECKPOINT / "docid_tree.json").read_text(encoding="utf-8"))
    leaves = {"-".join(map(str, d)) for d in shipped["docids"]}
    cluster_labels = [text for key, text in shipped["labels"].items() if key and key not in leaves]
    corpus_path, dev_path = dataset_paths("nq")
    questions = [q.question for q in load_questions(dev_path, load_corpus(corpus_path))]
    np.random.default_rng(seed).shuffle(questions)
    return RealText(titles, cluster_labels, questions)


def synthetic_labels(tree: DocidTree, text: RealText, seed: int) -> dict[tuple[int, ...], str]:
    """Labels shaped like build_tree's (keywords per cluster, title per document), drawn from the real ones: only
    their length matters here (the size of docid_tree.json)."""
    rng = np.random.default_rng(seed)
    clusters = [p for p in tree.nodes() if p]
    labels = dict(zip(clusters, (text.cluster_labels[i] for i in
                                 rng.integers(len(text.cluster_labels), size=len(clusters))), strict=True))
    labels.update(zip(tree.docids, (text.titles[i] for i in rng.integers(len(text.titles), size=len(tree))),
                      strict=True))
    labels[()] = "corpus"
    return labels


# --------------------------------------------------------------------------------------------- measurements


@contextmanager
def timed_calls(module: Any, name: str, totals: dict[str, float], report_every: int = 0) -> Iterator[None]:
    """Sum the seconds spent in module.name (e.g. the faiss splits of the tree build) into totals[name]; with
    report_every, log the call count that often (a 1M-passage tree makes hundreds of thousands of splits)."""
    original = getattr(module, name)
    totals.setdefault(name, 0.0)
    calls = 0
    began = time.perf_counter()

    def wrapper(*args, **kwargs):
        nonlocal calls
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start
            calls += 1
            if report_every and calls % report_every == 0:
                log(f"  {calls:,} k-means splits, {time.perf_counter() - began:,.0f} s")

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, original)


def build_tree(embeddings: np.ndarray, config: TreeConfig, doc_ids: list[str], faiss_min_points: int,
               fingerprint: str) -> tuple[DocidTree, dict[str, Any]]:
    """The docid tree of `embeddings` as the library builds it (recursive_kmeans, then the DocidTree trie), timed."""
    # First calls import sklearn and faiss and start their thread pools: do that before measuring.
    warm = np.random.default_rng(0).standard_normal((50, embeddings.shape[1])).astype(np.float32)
    docids_module._kmeans(warm, 2, 0, faiss_min_points=10**9)
    docids_module._faiss_kmeans(warm, 2, 0)
    totals: dict[str, float] = {}
    with measure_memory() as kmeans_memory, timed_calls(docids_module, "_kmeans", totals, 20_000), \
            timed_calls(docids_module, "_faiss_kmeans", totals):
        start = time.perf_counter()
        docids = recursive_kmeans(embeddings, config.k, config.c, config.seed, faiss_min_points)
        kmeans_s = time.perf_counter() - start
    start = time.perf_counter()
    tree = DocidTree(doc_ids, docids, config, fingerprint)
    trie_s = time.perf_counter() - start
    del docids
    trie_mb = python_mb(*(value for name, value in vars(tree).items() if name != "labels"))
    nodes = sum(len(tree.allowed(p)) for p in tree.nodes())
    shape = tree.shape()
    return tree, {
        "build_s": round(kmeans_s, 1),
        "faiss_kmeans_s": round(totals["_faiss_kmeans"], 1),
        "sklearn_kmeans_s": round(totals["_kmeans"] - totals["_faiss_kmeans"], 1),
        "faiss_splits": sum(1 for p in tree.nodes() if tree.size(p) >= faiss_min_points),
        "splits": shape["clusters"],
        "build_peak_mb": kmeans_memory.peak_mb,
        "depth_max": shape["depth_max"],
        "depth_mean": shape["depth_mean"],
        "branching": shape["branching"],
        "leaf_clusters": shape["leaf_clusters"],
        "leaf_size_mean": shape["leaf_size_mean"],
        "nodes": nodes,
        "trie_build_s": round(trie_s, 1),
        "trie_mb": trie_mb,
        "exact_peaks": kmeans_memory.exact_peak,
    }


def split_costs(embeddings: np.ndarray, k: int, seed: int, sizes: Sequence[int]) -> list[dict[str, Any]]:
    """Seconds of one k-way split of the first n points by sklearn and by faiss (the two paths of _kmeans): what
    the faiss threshold trades."""
    rows = []
    for n in sizes:
        if n > len(embeddings):
            continue
        cost: dict[str, Any] = {"points": n}
        for path, threshold in (("sklearn_s", 10**12), ("faiss_s", 0)):
            start = time.perf_counter()
            docids_module._kmeans(embeddings[:n], k, seed, faiss_min_points=threshold)
            cost[path] = round(time.perf_counter() - start, 2)
        log(f"  one split of {n:,} points: sklearn {cost['sklearn_s']} s, faiss {cost['faiss_s']} s")
        rows.append(cost)
    return rows


def shipped_joint_config() -> dict[str, Any]:
    """The shipped nq checkpoint's joint preset (pathway, bridge, semantic width, LoRA)."""
    return json.loads((SHIPPED_CHECKPOINT / "joint_config.json").read_text(encoding="utf-8"))["config"]


def build_joint(tree: DocidTree, seed: int, base_name: str | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """A joint model with the shipped preset, sized for `tree` (levels, branching, one semantic row per node),
    around the base in fp32 with freshly initialised joint weights and LoRA adapter."""
    import torch

    from unirag.backbones import load_llm
    from unirag.joint.config import JointConfig
    from unirag.joint.modeling import JointModel

    preset = shipped_joint_config()
    lora = preset.pop("lora", None)
    preset.update(docid_levels=tree.depth, docid_branching=tree.branching, base_model=base_name)
    if preset.get("semantic_dim"):  # one row per node: every non-empty docid prefix
        preset["semantic_nodes"] = sum(len(tree.allowed(p)) for p in tree.nodes())
    torch.manual_seed(seed)
    with measure_memory() as memory:
        base, tokenizer = load_llm(base_name, precision="fp32")
        model = JointModel(base, JointConfig(**preset), tokenizer=tokenizer).eval()
        if lora:
            model.enable_lora(r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"],
                              target_modules=lora["target_modules"], layers=lora["layers"])
        model.eval()
    return model, tokenizer, {"model_mb": memory.retained_mb, "preset": {**preset, "lora": lora}}


def checkpoint_size(model: Any, tree: DocidTree) -> dict[str, Any]:
    """What a checkpoint of this model and tree stores: joint weights in their save dtype, the LoRA adapter as
    peft saves it (its parameters' dtype) and docid_tree.json."""
    import torch

    save_bytes = torch.empty((), dtype=getattr(torch, model.config.save_dtype)).element_size()
    joint = sum(p.numel() for _, p in model.joint_named_parameters())
    table = model.semantic.node_embed.weight if model.semantic is not None else None
    lora_bytes = sum(p.numel() * p.element_size() for n, p in model.base.named_parameters() if "lora_" in n)
    tree_bytes = len(json.dumps(tree.to_dict(), ensure_ascii=False).encode("utf-8"))
    total = joint * save_bytes + lora_bytes + tree_bytes
    return {
        "joint_mb": round(joint * save_bytes / 1e6, 1),
        "semantic_table_mb": round(table.numel() * save_bytes / 1e6, 1) if table is not None else 0.0,
        "lora_mb": round(lora_bytes / 1e6, 1),
        "tree_json_mb": round(tree_bytes / 1e6, 1),
        "tree_json_bytes": tree_bytes,
        "total_mb": round(total / 1e6, 1),
        "budget_mb": BUDGET_MB,
        "within_budget": total / 1e6 <= BUDGET_MB,
        "semantic_table_ram_mb": round(table.numel() * table.element_size() / 1e6, 1) if table is not None else 0.0,
    }


def search_latency(model: Any, tokenizer: Any, tree: DocidTree, questions: Sequence[str],
                   beams: Sequence[tuple[int, int]] = BEAMS) -> dict[str, Any]:
    """ms per question of search_docids at each (beam width, documents returned), after one warm-up search."""
    from unirag.joint.search import search_docids

    start = time.perf_counter()
    if model.semantic is not None:  # the node → table-row index, built once per tree on first use
        model.node_rows(tree, [])
    index_s = time.perf_counter() - start
    index_mb = python_mb(model._node_rows) if model.semantic is not None else 0.0
    rows = []
    with measure_memory() as search_memory:
        search_docids(model, tokenizer, questions[0], tree, beams[0][0], beams[0][1])
        for width, num_return in beams:
            times = []
            for question in questions:
                start = time.perf_counter()
                search_docids(model, tokenizer, question, tree, width, num_return)
                times.append((time.perf_counter() - start) * 1000)
            rows.append({"beam_width": width, "num_return": num_return, "ms_mean": round(float(np.mean(times)), 1),
                         "ms_p50": round(float(np.percentile(times, 50)), 1),
                         "ms_p90": round(float(np.percentile(times, 90)), 1)})
            log(f"  beam {width}: {rows[-1]['ms_mean']} ms/question over {len(times)} questions")
    return {"questions": len(questions), "by_beam": rows, "node_index_s": round(index_s, 1),
            "node_index_mb": index_mb, "search_peak_mb": search_memory.peak_mb}


# --------------------------------------------------------------------------------------------- one size


def size_key(size: str) -> str:
    return size if size in REAL_CORPORA else str(int(size))


def measure_size(size: str, args: argparse.Namespace, text: RealText, command: str) -> dict[str, Any]:
    """One row: corpus (real or sampled), tree build and shape, memory, search latency and checkpoint size."""
    config = TreeConfig(k=args.k, c=args.c, seed=args.seed)
    start = time.perf_counter()
    if size in REAL_CORPORA:
        embeddings = real_embeddings([size])[size]
        from unirag.data import dataset_paths, load_corpus

        corpus = load_corpus(dataset_paths(size)[0])
        doc_ids, fingerprint, source = corpus.ids, corpus.fingerprint, f"real {size} (cached MiniLM embeddings)"
    else:
        n = int(size)
        log(f"{n:,}: fitting the mixture and sampling")
        gmm = fit_mixture(np.concatenate(list(real_embeddings().values())), args.components, args.seed)
        embeddings = sample_embeddings(gmm, n, args.seed + 1)
        width = len(str(n - 1))
        doc_ids, fingerprint = [f"syn{i:0{width}d}" for i in range(n)], f"synthetic-{n}-seed{args.seed}"
        source = (f"synthetic: Gaussian mixture ({args.components} diagonal components) fitted to the MiniLM "
                  f"embeddings of {' + '.join(REAL_CORPORA)}, normalised")
    corpus_s = time.perf_counter() - start
    n = len(doc_ids)
    log(f"{n:,}: building the docid tree (k={config.k}, c={config.c}, faiss from {args.faiss_min_points:,} points)")
    tree, tree_row = build_tree(embeddings, config, doc_ids, args.faiss_min_points, fingerprint)
    tree_row["split_costs"] = split_costs(embeddings, config.k, config.seed, args.split_costs)
    del embeddings
    log(f"{n:,}: tree in {tree_row['build_s']} s, depth {tree_row['depth_max']}, {tree_row['nodes']:,} nodes")
    if size in REAL_CORPORA:  # the shipped labels (same corpus, same tree): the real docid_tree.json's size
        shipped = DocidTree.load(REPO / "checkpoints" / f"{size}-smollm2" / "docid_tree.json")
        tree.labels = shipped.labels
        # k-means' floating point differs a little between CPUs: count the documents whose docid moved.
        tree_row["docids_differing_from_shipped"] = sum(
            shipped.docid_of(doc) != docid for doc, docid in zip(tree.doc_ids, tree.docids, strict=True))
    else:
        tree.labels = synthetic_labels(tree, text, args.seed)
    model, tokenizer, model_row = build_joint(tree, args.seed)
    size_row = checkpoint_size(model, tree)
    log(f"{n:,}: checkpoint {size_row['total_mb']} MB (semantic table {size_row['semantic_table_mb']} MB)")
    questions = text.questions[: args.questions]
    search = search_latency(model, tokenizer, tree, questions, [tuple(b) for b in args.beams])
    return {
        "size": size_key(size),
        "passages": n,
        "corpus": source,
        "corpus_s": round(corpus_s, 1),
        "tree": tree_row,
        "search": {**search, "docid_levels": model.config.docid_levels,
                   "docid_branching": model.config.docid_branching, "model_mb": model_row["model_mb"]},
        "checkpoint": size_row,
        "settings": {
            "k": config.k, "c": config.c, "seed": args.seed, "faiss_min_points": args.faiss_min_points,
            "mixture_components": None if size in REAL_CORPORA else args.components,
            "encoder": config.encoder, "base": "embedded:smollm2-135m-instruct, fp32, eager attention",
            "joint_preset": model_row["preset"], "questions": "nq dev, shuffled with the seed",
            "threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        },
        "command": command,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": MACHINE,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------------------------- store and page


def load_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    blob = json.loads(path.read_text(encoding="utf-8"))
    return list(blob["rows"])


def save_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ordered = sorted(rows, key=lambda r: r["passages"])
    write_json_atomic(path, {"description": "python -m benchmarks.scaling: one row per corpus size",
                             "rows": ordered}, indent=1)


def _mb(value: float) -> str:
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def _seconds(value: float) -> str:
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def _table(head: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in body]


def render_table(rows: Sequence[dict[str, Any]]) -> str:
    """The Markdown tables of docs/scaling.md (tree; search and checkpoint), from results/scaling.json's rows."""
    rows = sorted(rows, key=lambda r: r["passages"])
    if not rows:
        return "_No rows yet: run `python -m benchmarks.scaling`._\n"
    tree = _table(
        ["passages", "corpus", "faiss from (points)", "build s (faiss part)", "build peak MB", "depth max (mean)",
         "nodes", "docs per leaf cluster", "trie MB"],
        [[f"{r['passages']:,}", "real nq" if r["size"] in REAL_CORPORA else "synthetic",
          f"{r['settings']['faiss_min_points']:,}",
          f"{_seconds(r['tree']['build_s'])} ({_seconds(r['tree']['faiss_kmeans_s'])})",
          _mb(r["tree"]["build_peak_mb"]), f"{r['tree']['depth_max']} ({r['tree']['depth_mean']})",
          f"{r['tree']['nodes']:,}", f"{r['tree']['leaf_size_mean']}", _mb(r["tree"]["trie_mb"])] for r in rows])
    beams = [(b["beam_width"], b["num_return"]) for b in rows[0]["search"]["by_beam"]]
    body = []
    for r in rows:
        s, c = r["search"], r["checkpoint"]
        by = {(b["beam_width"], b["num_return"]): b for b in s["by_beam"]}
        body.append([
            f"{r['passages']:,}", str(s["docid_levels"]), str(s["questions"]),
            *(f"{by[b]['ms_mean']:,.0f} ({by[b]['ms_p90']:,.0f})" if b in by else "–" for b in beams),
            _mb(c["semantic_table_ram_mb"]), _mb(s["node_index_mb"]),
            f"{_mb(c['joint_mb'])} ({_mb(c['semantic_table_mb'])})", _mb(c["lora_mb"]), _mb(c["tree_json_mb"]),
            _mb(c["total_mb"]), "yes" if c["within_budget"] else "**no**"])
    search = _table(
        ["passages", "docid levels", "questions",
         *(f"search ms, beam {w} / top {n} (p90)" for w, n in beams), "semantic table RAM MB (fp32)",
         "node index MB", "joint weights MB (of it table)", "LoRA MB", "docid_tree.json MB", "checkpoint MB",
         f"within {rows[0]['checkpoint']['budget_mb']:g} MB"], body)
    loads = ", ".join(f"{r['passages']:,}: {r['load_average_1m']}" for r in rows)
    def secs(value: float) -> str:
        return f"{value:g} s" if value else "< 0.01 s"

    costs = [f"{c['points']:,} points: sklearn {secs(c['sklearn_s'])}, faiss {secs(c['faiss_s'])} "
             f"({r['passages']:,} row)" for r in rows for c in r["tree"].get("split_costs", [])]
    costs_text = f"One k-means split timed on both paths: {'; '.join(costs)}.\n\n" if costs else ""
    return ("\n".join(tree) + "\n\n" + costs_text + "\n".join(search) + "\n\n" + budget_sentence(rows)
            + f"Load average (1 min) when each row finished: {loads}; measured {rows[0]['date'][:10]}"
            + (f" to {rows[-1]['date'][:10]}" if rows[-1]["date"][:10] != rows[0]["date"][:10] else "") + ".\n")


def budget_sentence(rows: Sequence[dict[str, Any]]) -> str:
    """Where the checkpoint crosses its budget (linear between the rows around it) and its growth per passage."""
    largest = rows[-1]
    c = largest["checkpoint"]
    text = (f"At {largest['passages']:,} passages the tree has {largest['tree']['nodes'] / largest['passages']:.2f} "
            f"nodes per passage and the checkpoint grows by "
            f"{(c['semantic_table_mb'] + c['tree_json_mb']) * 1e3 / largest['passages']:.2f} kB per passage "
            f"(semantic table and docid_tree.json). ")
    for low, high in zip(rows, rows[1:], strict=False):
        if low["checkpoint"]["within_budget"] and not high["checkpoint"]["within_budget"]:
            budget = low["checkpoint"]["budget_mb"]
            t0, t1 = low["checkpoint"]["total_mb"], high["checkpoint"]["total_mb"]
            at = low["passages"] + (budget - t0) * (high["passages"] - low["passages"]) / (t1 - t0)
            text += (f"The checkpoint reaches the {budget:g} MB budget at about {round(at, -3):,.0f} passages "
                     f"(linear between the {low['passages']:,} and {high['passages']:,} rows). ")
    return text.rstrip() + "\n\n"


MARKER = re.compile(r"(<!-- scaling:table -->\n)(?P<body>.*?)(?P<end><!-- /scaling -->)", re.S)


def update_page(text: str, rows: Sequence[dict[str, Any]]) -> str:
    """`text` with its `<!-- scaling:table -->` … `<!-- /scaling -->` block regenerated from the rows."""
    return MARKER.sub(lambda m: f"{m.group(1)}{render_table(rows)}{m['end']}", text)


# --------------------------------------------------------------------------------------------- main


def _beam(text: str) -> tuple[int, int]:
    width, _, num_return = text.partition(":")
    return int(width), int(num_return or width)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="nq,10000,100000,1000000",
                        help="comma-separated: nq or squad (real corpus) or a passage count (synthetic)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--overwrite", action="store_true", help="measure sizes already in --out again")
    parser.add_argument("--questions", type=int, default=20, help="questions timed per beam setting")
    parser.add_argument("--beams", type=_beam, nargs="+", default=list(BEAMS), metavar="WIDTH:RETURN")
    parser.add_argument("--components", type=int, default=48, help="Gaussian mixture components")
    parser.add_argument("--k", type=int, default=TreeConfig.k)
    parser.add_argument("--c", type=int, default=TreeConfig.c)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faiss-min-points", type=int, default=FAISS_KMEANS_MIN_POINTS,
                        help="splits of at least this many points run faiss (default: the library's threshold)")
    parser.add_argument("--split-costs", type=int, nargs="*", default=[], metavar="N",
                        help="also time one split of N points by sklearn and by faiss")
    parser.add_argument("--render", type=Path, default=None, metavar="PAGE",
                        help="rewrite the <!-- scaling:table --> block of PAGE from --out; measure nothing")
    parser.add_argument("--check", action="store_true", help="with --render: exit 1 if PAGE is stale")
    args = parser.parse_args(argv)
    if args.render is not None:
        text = args.render.read_text(encoding="utf-8")
        new = update_page(text, load_rows(args.out))
        if args.check:
            return int(new != text)
        if new != text:
            args.render.write_text(new, encoding="utf-8")
        log(f"{args.render}: table regenerated from {args.out}")
        return 0
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for size in sizes:
        if size not in REAL_CORPORA and not size.isdigit():
            parser.error(f"--sizes: {size!r} is neither {' nor '.join(REAL_CORPORA)} nor a passage count")
    rows = load_rows(args.out)
    done = {r["size"] for r in rows}
    pending = []
    for size in sizes:
        if size_key(size) in done and not args.overwrite:
            log(f"{size_key(size)}: already in {args.out}, skipped (--overwrite to measure again)")
        else:
            pending.append(size)
    if not pending:
        return 0
    text = real_text(args.seed)
    if args.questions > len(text.questions):
        parser.error(f"--questions: nq dev has {len(text.questions)}")
    command = "python -m benchmarks.scaling " + shlex.join(sys.argv[1:] if argv is None else argv)
    for size in pending:
        key = size_key(size)
        row = measure_size(size, args, text, command)
        rows = [r for r in rows if r["size"] != key] + [row]
        save_rows(args.out, rows)  # after every size: a killed run resumes at the next one
        log(f"{key}: written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
