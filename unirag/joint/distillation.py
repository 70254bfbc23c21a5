"""Dense distillation at every tree level: the teacher's ranking of all documents as the docid search's target.

The teacher (the encoder that built the docids, MiniLM by default) gives each training text a softmax over every
document; summed onto the tree's nodes it says how much of its mass lies under each cluster. Two losses read it:

- `level_distillation`: at each level along the gold path, KL(teacher's split of the parent's mass over its
  children || the docid head's child distribution, semantic scores included, as the beam search renormalises);
- `document_distillation`: KL(teacher's softmax over all documents || the semantic scorer's document match,
  which is how the search ranks finished paths).

Both sit on top of the gold-path cross-entropy; any query text works, since the target needs no gold document.
Where BM25 ranks better than the encoder (squad), the teacher can mix in BM25's softmax (`bm25_document_probs`):
p = (1 - w) · softmax(cos / T) + w · softmax(BM25 / T_bm25).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from unirag.errors import UniragError


class TeacherRanking(torch.nn.Module):
    """The teacher's document softmax and its node sums. Nodes are the semantic node rows (tree_prefixes order);
    documents are in the tree's document order (the order of `document_rows`)."""

    def __init__(self, document_vectors: np.ndarray | torch.Tensor, document_nodes: list[list[int]], num_nodes: int,
                 temperature: float = 0.05) -> None:
        super().__init__()
        if temperature <= 0:
            raise UniragError(f"The teacher's temperature must be positive (got {temperature}).")
        vectors = torch.as_tensor(np.asarray(document_vectors), dtype=torch.float32)
        if vectors.shape[0] != len(document_nodes):
            raise UniragError(f"{vectors.shape[0]} teacher document vectors for {len(document_nodes)} documents.")
        self.register_buffer("documents", F.normalize(vectors, dim=-1), persistent=False)
        # membership[d, n] = 1 when document d lies under node n (every node on its path, the leaf included)
        membership = torch.zeros(len(document_nodes), num_nodes)
        for d, nodes in enumerate(document_nodes):
            membership[d, nodes] = 1.0
        self.register_buffer("membership", membership, persistent=False)
        self.temperature = temperature

    def document_probs(self, query_vectors: torch.Tensor, sparse_probs: torch.Tensor | None = None,
                       sparse_weight: float = 0.0) -> torch.Tensor:
        """[B, D] teacher query vectors → [B, N] softmax over the documents (cosine / temperature), mixed with
        `sparse_probs` [B, N] (BM25's softmax) at `sparse_weight` when given."""
        query = F.normalize(query_vectors.float(), dim=-1)
        dense = torch.softmax(query @ self.documents.T / self.temperature, dim=-1)
        if sparse_probs is None or sparse_weight == 0:
            return dense
        if sparse_probs.shape != dense.shape:
            raise UniragError(f"BM25 teacher probabilities of shape {tuple(sparse_probs.shape)} for a dense teacher "
                              f"of shape {tuple(dense.shape)}.")
        return (1 - sparse_weight) * dense + sparse_weight * sparse_probs.float()

    def node_mass(self, probs: torch.Tensor) -> torch.Tensor:
        """[B, N] document probabilities → [B, nodes]: the mass under each node."""
        return probs @ self.membership


def document_paths(node_rows_of, docids: list[tuple[int, ...]]) -> list[list[int]]:
    """The node rows on each document's path (its prefixes, the leaf included), for `TeacherRanking`."""
    return [node_rows_of([d[:cut] for cut in range(1, len(d) + 1)]) for d in docids]


def level_distillation(picked: torch.Tensor, allowed: torch.Tensor, targets: torch.Tensor, node_rows: torch.Tensor,
                       node_mass: torch.Tensor) -> torch.Tensor:
    """Mean over the gold path's levels of KL(teacher || student) over each level's allowed children.

    picked [B, L, V] logits (semantic scores added), allowed [B, L, V], targets [B, L] (-100 = no level),
    node_rows [B, L, V] (-1 outside the allowed children), node_mass [B, nodes]."""
    valid = targets != -100
    if not bool(valid.any()):
        return picked.sum() * 0.0
    rows = node_rows.clamp(min=0).flatten(1)
    mass = node_mass.gather(1, rows).view_as(node_rows).masked_fill(node_rows < 0, 0.0)
    target = mass / mass.sum(-1, keepdim=True).clamp_min(1e-12)
    logp = torch.log_softmax(picked.masked_fill(~allowed, float("-inf")), dim=-1).masked_fill(~allowed, 0.0)
    terms = torch.where(target > 0, target * (torch.log(target.clamp_min(1e-30)) - logp), torch.zeros_like(logp))
    return terms.sum(-1)[valid].mean()


def document_distillation(matches: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """KL(teacher's document softmax || softmax of the student's document matches), mean over the batch."""
    logp = torch.log_softmax(matches.float(), dim=-1)
    terms = torch.where(teacher_probs > 0, teacher_probs * (torch.log(teacher_probs.clamp_min(1e-30)) - logp),
                        torch.zeros_like(logp))
    return terms.sum(-1).mean()


def bm25_document_probs(scores_of, texts: list[str], temperature: float = 1.0) -> torch.Tensor:
    """[len(texts), N] float16: softmax(BM25 / temperature) of each text over the documents. `scores_of(text)` gives
    the text's BM25 score of every document, in the teacher's document order."""
    if temperature <= 0:
        raise UniragError(f"The BM25 teacher's temperature must be positive (got {temperature}).")
    rows = [torch.softmax(torch.as_tensor(np.asarray(scores_of(t)), dtype=torch.float32) / temperature, dim=-1)
            for t in texts]
    if not rows:
        raise UniragError("No texts for the BM25 teacher.")
    return torch.stack(rows).half()  # half: 20k texts x 2k documents stays under 100 MB


__all__ = ["TeacherRanking", "bm25_document_probs", "document_distillation", "document_paths", "level_distillation"]
