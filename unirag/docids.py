"""Hierarchical semantic docids: cached passage embeddings → recursive k-means → `DocidTree`.

As in the Neural Corpus Indexer: a cluster with more than `c` documents is split into `k`
clusters again; a document's docid is its path of cluster indices, ending with its position in
its leaf cluster. Documents sharing a longer prefix are more alike.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from unirag.data import Corpus
from unirag.errors import FingerprintMismatchError, UniragError
from unirag.paths import cache_dir, file_sha256, write_json_atomic

TREE_FORMAT = 1

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TreeConfig:
    k: int = 10  # branching factor of each k-means split
    c: int = 10  # a cluster with more than c documents is split again
    seed: int = 0
    encoder: str = "embedded:all-minilm-l6-v2"

    def __post_init__(self) -> None:
        if self.k < 2 or self.c < 1:
            raise UniragError(f"Docid tree needs k >= 2 and c >= 1 (got k={self.k}, c={self.c}).")


def corpus_name(corpus: Corpus) -> str:
    """A corpus's human name: its file's folder (`nq` for data/nq/corpus.jsonl), else its source."""
    source = Path(corpus.source) if corpus.source else None
    return (source.parent.name if source is not None and source.parent.name else corpus.source) or "unnamed"


def passage_text(title: str, text: str) -> str:
    return f"{title}. {text}" if title else text


def embeddings_path(corpus: Corpus, encoder_name: str) -> Path:
    key = hashlib.sha256(f"{corpus.fingerprint}|{encoder_name}".encode()).hexdigest()[:16]
    return cache_dir() / "embeddings" / f"{key}.npy"


def _cached_embeddings(
    path: Path, meta_path: Path, corpus: Corpus, name: str, encoder=None
) -> tuple[np.ndarray | None, str]:
    """(embeddings, "") from a sound cache, else (None, why it cannot be used: "" when there is none). `encoder`,
    when loaded, gives the width an old cache (no `dim`/`sha256` in its metadata) must have."""
    if not path.is_file():
        return None, ""
    if not meta_path.is_file():
        return None, f"its metadata {meta_path.name} is missing"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as exc:
        return None, f"its metadata is unreadable ({exc})"
    if meta.get("corpus_fingerprint") != corpus.fingerprint or meta.get("encoder") != name:
        return None, "its metadata names another corpus or encoder"
    if meta.get("sha256") is not None and meta["sha256"] != file_sha256(path):
        return None, "checksum mismatch: the file was truncated or altered"
    try:
        emb = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        return None, f"unreadable array ({exc})"
    if emb.ndim != 2 or emb.shape[0] != len(corpus):
        return None, f"shape {emb.shape} for {len(corpus)} passages"
    if meta.get("dim") is not None and emb.shape[1] != meta["dim"]:
        return None, f"width {emb.shape[1]}, the metadata says {meta['dim']}"
    if meta.get("dim") is None or meta.get("sha256") is None:  # an old cache: its width against the encoder's
        # The loaded encoder's own width: encoder_width may not know it (a hub id offline) and a wrong-width
        # cache accepted here dies later as a bare AssertionError inside faiss.
        width = getattr(encoder, "dim", None) if encoder is not None else None
        width = width if width is not None else encoder_width(name)
        if width is not None and emb.shape[1] != width:
            return None, f"width {emb.shape[1]}, the encoder {name} gives {width}"
    if not np.issubdtype(emb.dtype, np.floating):
        return None, f"dtype {emb.dtype} is not floating point"
    if not np.isfinite(emb).all():
        return None, f"{int((~np.isfinite(emb)).any(axis=1).sum())} rows hold NaN or inf values"
    if meta.get("sha256") is None:  # a cache from before checksums: sound, so record its checksum now
        write_json_atomic(meta_path, {**meta, "sha256": file_sha256(path)})
    return emb, ""


BUNDLED_EMBEDDINGS = "embeddings"  # data/<corpus>/embeddings/<key>.npy + .json: the cache's own two files


def bundled_embeddings(corpus: Corpus, encoder_name: str) -> Path | None:
    """Embeddings of this corpus and encoder shipped with the repo's data (`python -m unirag index --bundle`
    writes them), found by the cache key (corpus fingerprint + encoder), metadata and checksum checked on use."""
    from unirag.paths import bundled_data_dir

    name = embeddings_path(corpus, encoder_name).name
    for candidate in sorted(bundled_data_dir().glob(f"*/{BUNDLED_EMBEDDINGS}/{name}")):
        if candidate.with_suffix(".json").is_file():
            return candidate
    return None


def bundle_embeddings(corpus: Corpus, encoder_name: str = "", folder: str | Path | None = None) -> Path:
    """Write this corpus's embeddings (computed or cached) beside the repo's data, where `bundled_embeddings`
    finds them: `data/<corpus folder>/embeddings/` by default."""
    from unirag.paths import bundled_data_dir

    name = encoder_name or TreeConfig.encoder
    corpus_embeddings(corpus, encoder_name=name)
    source = embeddings_path(corpus, name)
    target_dir = Path(folder) if folder else bundled_data_dir() / Path(corpus.source).parent.name / BUNDLED_EMBEDDINGS
    target_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target_dir / source.name)
    shutil.copyfile(source.with_suffix(".json"), target_dir / source.with_suffix(".json").name)
    return target_dir / source.name


def encoder_width(name: str) -> int | None:
    """The embedding width of a sentence encoder, from its files when they are on this machine (None: unknown)."""
    from unirag.backbones import SentenceEncoder

    try:
        return int(SentenceEncoder(None if name == TreeConfig.encoder else name).dim)
    except Exception:  # noqa: BLE001 - no files here (a hub id offline): the other checks still apply
        return None


def corpus_embeddings(
    corpus: Corpus, encoder=None, encoder_name: str | None = None, progress: bool = True
) -> np.ndarray:
    """Passage embeddings [N, dim], cached on disk by corpus fingerprint and encoder name. A corrupt cache
    (truncated, wrong shape or dtype, NaN/inf, checksum mismatch) is logged and rebuilt."""
    name = encoder.name if encoder is not None else (encoder_name or TreeConfig.encoder)
    path = embeddings_path(corpus, name)
    meta_path = path.with_suffix(".json")
    emb, problem = _cached_embeddings(path, meta_path, corpus, name, encoder)
    if emb is not None:
        return emb
    if problem:
        log.warning("the cached embeddings at %s were corrupt (%s); rebuilding", path, problem)
    bundled = bundled_embeddings(corpus, name)
    if bundled is not None:  # shipped beside the data: a fresh machine need not embed the corpus first
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bundled, path)
        write_json_atomic(meta_path, json.loads(bundled.with_suffix(".json").read_text(encoding="utf-8")))
        emb, problem = _cached_embeddings(path, meta_path, corpus, name, encoder)
        if emb is not None:
            return emb
        log.warning("the bundled embeddings %s do not fit (%s); embedding the corpus", bundled, problem)
    if encoder is None:
        from unirag.backbones import SentenceEncoder

        encoder = SentenceEncoder(None if name == TreeConfig.encoder else name)
    emb = np.asarray(encoder.encode_passages([passage_text(p.title, p.text) for p in corpus], progress=progress))
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():  # never cache (or cluster) vectors that compare as nothing
        raise UniragError(f"The encoder {name} returned NaN or inf embeddings for {int(bad.sum())} passages "
                          f"(e.g. {corpus.ids[int(np.flatnonzero(bad)[0])]}); check the encoder files.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + f".{os.getpid()}.tmp.npy")
    np.save(tmp, emb)
    checksum = file_sha256(tmp)
    os.replace(tmp, path)  # atomic: a killed run never leaves a half-written cache
    # Written after the array: a kill in between leaves an old checksum, so the next run rebuilds.
    write_json_atomic(meta_path, {"corpus_fingerprint": corpus.fingerprint, "encoder": name, "n": len(corpus),
                                   "dim": int(emb.shape[1]), "dtype": str(emb.dtype), "sha256": checksum})
    return emb


# A split of at least this many points runs faiss k-means instead of sklearn's: faiss trains on a subsample
# (max_points_per_centroid) and assigns in C++, where sklearn's full Lloyd iterations over 100k+ vectors take
# minutes a split. The shipped corpora are far below it, so their trees (and checkpoints) are unchanged.
FAISS_KMEANS_MIN_POINTS = 50_000


def _faiss_kmeans(vectors: np.ndarray, k: int, seed: int) -> np.ndarray:
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    # min_points_per_centroid=1: small inputs (tests) would otherwise print a warning on every split.
    km = faiss.Kmeans(x.shape[1], k, niter=20, nredo=3, seed=seed, min_points_per_centroid=1, verbose=False)
    km.train(x)
    _, labels = km.index.search(x, 1)
    return labels.ravel().astype(np.int64)


def _kmeans(vectors: np.ndarray, k: int, seed: int, faiss_min_points: int = FAISS_KMEANS_MIN_POINTS) -> np.ndarray:
    if len(vectors) >= faiss_min_points:
        return _faiss_kmeans(vectors, k, seed)
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():  # duplicate points: the caller falls back to an even split
        warnings.simplefilter("ignore", ConvergenceWarning)
        labels = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(vectors)
    return np.asarray(labels)


def recursive_kmeans(embeddings: np.ndarray, k: int, c: int, seed: int = 0,
                     faiss_min_points: int = FAISS_KMEANS_MIN_POINTS) -> list[tuple[int, ...]]:
    """Docid (path of cluster indices + leaf position) for each row; deterministic for a seed. Splits of at least
    `faiss_min_points` points use faiss k-means, smaller ones sklearn's."""
    docids: list[tuple[int, ...] | None] = [None] * len(embeddings)

    def split(indices: np.ndarray, prefix: tuple[int, ...]) -> None:
        if len(indices) <= c:
            for position, row in enumerate(indices):
                docids[row] = prefix + (position,)
            return
        n_clusters = min(k, len(indices))
        labels = _kmeans(embeddings[indices], n_clusters, seed + len(prefix), faiss_min_points)
        if len(np.unique(labels)) < 2:  # identical vectors: k-means cannot split, so chunk evenly
            labels = np.arange(len(indices)) * n_clusters // len(indices)
        # Order clusters by their first member, so numbering does not depend on k-means' label order.
        order = sorted(np.unique(labels), key=lambda lab: int(np.flatnonzero(labels == lab)[0]))
        for new_label, lab in enumerate(order):
            split(indices[labels == lab], prefix + (new_label,))

    split(np.arange(len(embeddings)), ())
    return [d for d in docids if d is not None]


class DocidTree:
    """docid ↔ doc id, a prefix trie of allowed next symbols, cluster sizes and keyword labels."""

    def __init__(
        self,
        doc_ids: list[str],
        docids: list[tuple[int, ...]],
        config: TreeConfig,
        corpus_fingerprint: str,
        labels: dict[tuple[int, ...], str] | None = None,
        corpus_name: str | None = None,
    ):
        if len(doc_ids) != len(docids):
            raise UniragError("Docid tree: doc ids and docids differ in length.")
        self.config = config
        self.corpus_fingerprint = corpus_fingerprint
        self.corpus_name = corpus_name  # for messages only (older trees lack it); the fingerprint decides
        self.doc_ids = list(doc_ids)
        self.docids = [tuple(int(s) for s in d) for d in docids]
        self._by_docid = dict(zip(self.docids, self.doc_ids, strict=True))
        if len(self._by_docid) != len(self.docids):
            raise UniragError("Docid tree: two documents share a docid.")
        self._by_doc_id = dict(zip(self.doc_ids, self.docids, strict=True))
        children: dict[tuple[int, ...], set[int]] = defaultdict(set)
        sizes: dict[tuple[int, ...], int] = defaultdict(int)
        for docid in self.docids:
            for depth in range(len(docid)):
                children[docid[:depth]].add(docid[depth])
                sizes[docid[:depth]] += 1
            sizes[docid] += 1
        self._children = {prefix: sorted(symbols) for prefix, symbols in children.items()}
        self._sizes = dict(sizes)
        self.labels = labels or {}

    # --- lookup -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.doc_ids)

    def doc_id_at(self, docid: tuple[int, ...]) -> str:
        """The document id (e.g. "nq00042") at a complete docid path."""
        return self._by_docid[tuple(docid)]

    def docid_of(self, doc_id: str) -> tuple[int, ...]:
        """The docid path of a document id."""
        return self._by_doc_id[doc_id]

    def allowed(self, prefix: tuple[int, ...]) -> list[int]:
        """Allowed next symbols after `prefix`; [] when the prefix is a complete docid (or invalid)."""
        return self._children.get(tuple(prefix), [])

    def is_complete(self, prefix: tuple[int, ...]) -> bool:
        return tuple(prefix) in self._by_docid

    def size(self, prefix: tuple[int, ...]) -> int:
        """Number of documents under a prefix (1 for a complete docid, 0 if unknown)."""
        return self._sizes.get(tuple(prefix), 0)

    def label(self, prefix: tuple[int, ...]) -> str:
        return self.labels.get(tuple(prefix), "")

    def nodes(self) -> list[tuple[int, ...]]:
        """Every internal cluster prefix (the root is ())."""
        return sorted(self._children)

    def docs_under(self, prefix: tuple[int, ...]) -> list[str]:
        n = len(prefix)
        return [doc for doc, docid in zip(self.doc_ids, self.docids, strict=True) if docid[:n] == tuple(prefix)]

    # --- shape ------------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return max(len(d) for d in self.docids)

    @property
    def branching(self) -> int:
        """Largest symbol + 1: the docid vocabulary size per level."""
        return max(max(d) for d in self.docids) + 1

    def shape(self) -> dict:
        lengths = [len(d) for d in self.docids]
        leaves = [self._sizes[p] for p, kids in self._children.items() if self.is_complete(p + (kids[0],))]
        return {
            "documents": len(self),
            "depth_max": max(lengths),
            "depth_mean": round(float(np.mean(lengths)), 2),
            "leaf_clusters": len(leaves),
            "leaf_size_mean": round(float(np.mean(leaves)), 2),
            "leaf_size_max": max(leaves),
            "branching": self.branching,
            "clusters": len(self._children),
        }

    # --- persistence -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": TREE_FORMAT,
            "corpus_fingerprint": self.corpus_fingerprint,
            **({"corpus_name": self.corpus_name} if self.corpus_name else {}),
            "config": asdict(self.config),
            "doc_ids": self.doc_ids,
            "docids": [list(d) for d in self.docids],
            "labels": {"-".join(map(str, p)): text for p, text in self.labels.items()},
        }

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path, corpus: Corpus | None = None) -> DocidTree:
        """Load a tree; with `corpus`, refuse one built from any other corpus (saying which it was built for)."""
        path = Path(path)
        try:
            blob = json.loads(path.read_text(encoding="utf-8"))
            fingerprint = blob["corpus_fingerprint"]
            name = blob.get("corpus_name")
            config = TreeConfig(**blob["config"])
            doc_ids, docids = blob["doc_ids"], [tuple(d) for d in blob["docids"]]
            if not all(isinstance(d, str) for d in doc_ids):
                raise ValueError("a doc id is not a string")
            if not all(d and all(isinstance(s, int) and s >= 0 for s in d) for d in docids):
                raise ValueError("a docid is not a non-empty list of non-negative integers")
            labels = {
                tuple(int(s) for s in key.split("-")) if key else (): text for key, text in blob["labels"].items()
            }
        except FileNotFoundError:
            raise UniragError(f"Docid tree not found: {path}. Build it with `python -m unirag index`.") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, UnicodeDecodeError) as exc:
            raise UniragError(f"{path} is not a valid docid tree ({type(exc).__name__}: {exc}).") from None
        if corpus is not None and fingerprint != corpus.fingerprint:
            built_for = f"corpus {name!r} (fingerprint {fingerprint})" if name else f"fingerprint {fingerprint}"
            here = corpus_name(corpus)
            advice = (f"the corpus {here!r} has changed since: rebuild the tree (`python -m unirag index --corpus "
                      f"{corpus.source}`) or retrain the checkpoint on it" if name == here else
                      f"pass the corpus it was built for{f' ({name})' if name else ''}, or a tree or checkpoint "
                      f"built for {here!r}")
            raise FingerprintMismatchError(
                f"The docid tree {path} was built for another corpus: {built_for}, not for {here!r} (fingerprint "
                f"{corpus.fingerprint}, {corpus.source}). Either {advice}."
            )
        try:
            tree = cls(doc_ids, docids, config, fingerprint, labels, corpus_name=name)
        except UniragError as exc:
            raise UniragError(f"{path} is not a valid docid tree ({exc})") from None
        if corpus is not None and set(tree.doc_ids) != set(corpus.ids):  # same fingerprint: an edited file
            raise UniragError(f"{path} is not a valid docid tree (its documents are not the corpus's).")
        return tree


def cluster_labels(corpus: Corpus, tree: DocidTree, top_n: int = 3) -> dict[tuple[int, ...], str]:
    """Keyword label per cluster by class-based TF-IDF against the sibling clusters at the same depth."""
    from sklearn.feature_extraction.text import CountVectorizer

    texts = [passage_text(p.title, p.text) for p in corpus]
    vectorizer = CountVectorizer(
        stop_words="english", token_pattern=r"(?u)\b[^\W\d_][\w'-]{2,}\b", max_df=0.5, min_df=2
    )
    try:
        counts = vectorizer.fit_transform(texts)  # [docs, terms]
    except ValueError:  # tiny corpora: every term pruned by min_df/max_df
        vectorizer = CountVectorizer(stop_words="english", token_pattern=r"(?u)\b[^\W\d_][\w'-]{2,}\b")
        try:
            counts = vectorizer.fit_transform(texts)
        except ValueError:
            counts = None
    if counts is None:
        return {(): "corpus", **{d: corpus[i].title or i for i, d in zip(tree.doc_ids, tree.docids, strict=True)}}
    vocab = np.asarray(vectorizer.get_feature_names_out())
    rows = {doc_id: i for i, doc_id in enumerate(corpus.ids)}
    labels: dict[tuple[int, ...], str] = {}
    by_depth: dict[int, list[tuple[int, ...]]] = defaultdict(list)
    for prefix in tree.nodes():
        for child in tree.allowed(prefix):
            node = prefix + (child,)
            if not tree.is_complete(node):
                by_depth[len(node)].append(node)
    for nodes in by_depth.values():
        members = [[rows[d] for d in tree.docs_under(node)] for node in nodes]
        tf = np.vstack([np.asarray(counts[m].sum(axis=0)).ravel() for m in members]).astype(np.float64)
        avg_words = tf.sum() / max(len(nodes), 1)
        idf = np.log1p(avg_words / np.maximum(tf.sum(axis=0), 1.0))
        weights = (tf / np.maximum(tf.sum(axis=1, keepdims=True), 1.0)) * idf
        for node, row in zip(nodes, weights, strict=True):
            # A stable sort: numpy's default picks a SIMD kernel per CPU, which orders tied scores differently.
            top = [vocab[j] for j in np.argsort(-row, kind="stable")[:top_n] if row[j] > 0]
            labels[node] = ", ".join(top)
    for doc_id, docid in zip(tree.doc_ids, tree.docids, strict=True):
        labels[docid] = corpus[doc_id].title or doc_id
    labels[()] = "corpus"
    return labels


def build_tree(corpus: Corpus, embeddings: np.ndarray, config: TreeConfig | None = None) -> DocidTree:
    config = config or TreeConfig()
    if embeddings.shape[0] != len(corpus):
        raise UniragError(f"{embeddings.shape[0]} embeddings for {len(corpus)} passages.")
    docids = recursive_kmeans(embeddings, config.k, config.c, config.seed)
    tree = DocidTree(corpus.ids, docids, config, corpus.fingerprint, corpus_name=corpus_name(corpus))
    tree.labels = cluster_labels(corpus, tree)
    return tree


def tree_path(corpus: Corpus, config: TreeConfig) -> Path:
    enc = hashlib.sha256(config.encoder.encode()).hexdigest()[:8]
    name = f"{corpus.fingerprint}-k{config.k}-c{config.c}-s{config.seed}-{enc}.json"
    return cache_dir() / "trees" / name


def load_or_build_tree(
    corpus: Corpus, config: TreeConfig | None = None, encoder=None, progress: bool = True
) -> DocidTree:
    """The cached tree for (corpus, config), building embeddings and tree on first use."""
    config = config or TreeConfig()
    path = tree_path(corpus, config)
    checksum = path.with_name(path.name + ".sha256")  # a swapped docid still parses: only a checksum tells
    if path.is_file():
        try:
            if checksum.is_file() and checksum.read_text().strip() != file_sha256(path):
                raise UniragError("checksum mismatch: the file was altered")
            tree = DocidTree.load(path, corpus)
            if tree.config != config:
                raise UniragError(f"built with {tree.config}, not {config}")
            if not checksum.is_file():  # a cache from before checksums: sound, so record its checksum now
                checksum.write_text(file_sha256(path))
            return tree
        except UniragError as exc:  # a cache: rebuild it rather than advise the command that just failed
            log.warning("the cached docid tree at %s was corrupt (%s); rebuilding", path, exc)
    embeddings = corpus_embeddings(corpus, encoder, config.encoder, progress=progress)
    tree = build_tree(corpus, embeddings, config)
    checksum.unlink(missing_ok=True)  # a kill between the two writes leaves no checksum, never a stale one
    tree.save(path)
    checksum.write_text(file_sha256(path))
    return tree
