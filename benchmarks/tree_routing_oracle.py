"""Upper bound of retrieval by walking the docid tree with the docid encoder's own query vector.

A generative retriever that routes down the k-means tree can at best imitate the encoder that built the
tree. This oracle takes the encoder's query embedding itself and runs the same beam search the joint model
runs (children scored by cosine with their centroid, softmax per level, beam 10), so it shows how much the
hierarchy alone loses against flat dense search.

    python -m benchmarks.tree_routing_oracle --dataset nq --trees 10x10 16x16
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def centroids(tree, embeddings: np.ndarray, row_of: dict[str, int]) -> dict[tuple[int, ...], np.ndarray]:
    from unirag.joint.modeling import tree_prefixes

    vectors = {}
    for prefix in tree_prefixes(tree):
        docs = [tree.doc_id_at(prefix)] if tree.is_complete(prefix) else tree.docs_under(prefix)
        mean = embeddings[[row_of[d] for d in docs]].mean(0)
        vectors[prefix] = mean / np.linalg.norm(mean)
    return vectors


def route(tree, node_vectors, query: np.ndarray, beam: int, temperature: float) -> list[str]:
    """Distinct documents of the best finished paths (same pruning rule as the joint model's beam search)."""
    live, done = [((), 0.0)], []
    while live:
        candidates = []
        for prefix, score in live:
            children = tree.allowed(prefix)
            logits = np.array([query @ node_vectors[prefix + (c,)] for c in children]) / temperature
            logp = logits - np.logaddexp.reduce(logits)
            candidates += [(prefix + (c,), score + lp) for c, lp in zip(children, logp, strict=True)]
        candidates.sort(key=lambda item: -item[1])
        live = []
        for prefix, score in candidates[:beam]:
            (done if tree.is_complete(prefix) else live).append((prefix, score))
    done.sort(key=lambda item: -item[1])
    return [tree.doc_id_at(prefix) for prefix, _ in done]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="nq", help="nq or squad (under UNIRAG_DATA)")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--trees", nargs="+", default=["10x10", "16x16"], help="KxC: branching x leaf size")
    parser.add_argument("--beam", type=int, default=10)
    parser.add_argument("--temperature", type=float, default=0.05)
    args = parser.parse_args(argv)

    from unirag.backbones import SentenceEncoder
    from unirag.data import dataset_paths, load_corpus, load_questions
    from unirag.docids import TreeConfig, corpus_embeddings, load_or_build_tree

    corpus_path, questions_path = dataset_paths(args.dataset, args.split)
    corpus = load_corpus(corpus_path)
    questions = [q for q in load_questions(questions_path, corpus) if q.doc_id]
    embeddings = corpus_embeddings(corpus, progress=False)
    row_of = {doc: i for i, doc in enumerate(corpus.ids)}
    queries = SentenceEncoder().encode_queries([q.question for q in questions])
    gold = np.array([row_of[q.doc_id] for q in questions])
    flat = np.argsort(-(queries @ embeddings.T), axis=1)[:, :3]
    flat_r3 = float(np.mean([g in row for g, row in zip(gold, flat, strict=True)]))
    print(json.dumps({"dataset": args.dataset, "n": len(questions),
                      "flat_dense_recall@1": round(float(np.mean(flat[:, 0] == gold)), 4),
                      "flat_dense_recall@3": round(flat_r3, 4)}))
    for spec in args.trees:
        k, c = (int(x) for x in spec.lower().split("x"))
        tree = load_or_build_tree(corpus, TreeConfig(k=k, c=c), progress=False)
        node_vectors = centroids(tree, embeddings, row_of)
        found = [route(tree, node_vectors, query, args.beam, args.temperature) for query in queries]
        r1 = np.mean([q.doc_id in f[:1] for q, f in zip(questions, found, strict=True)])
        r3 = np.mean([q.doc_id in f[:3] for q, f in zip(questions, found, strict=True)])
        print(json.dumps({"tree": f"k={k},c={c}", "depth_max": tree.depth,
                          "oracle_routing_recall@1": round(float(r1), 4),
                          "oracle_routing_recall@3": round(float(r3), 4)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
