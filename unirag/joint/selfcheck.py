"""Self-check: re-rank the search's top documents by how likely the question is after each (query likelihood).

`question_likelihood` reads each passage in full; `unirag.joint.passage_cache.PassageCache.question_likelihood`
gives the same numbers from precomputed passage states. `rerank` is the one ranking rule both feed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from unirag.answer import SelfCheckRow
from unirag.joint.modeling import JointModel
from unirag.joint.prompts import question_ids as tokenize_question
from unirag.joint.prompts import self_check_prompt_ids


@torch.inference_mode()
def question_likelihood(
    model: JointModel, tokenizer, question: str, passages: Sequence[tuple[str, str, str]]
) -> list[float]:
    """Mean log-probability of the question's tokens written after each (doc_id, title, text) passage.

    The base LLM reads (adapter, pathway and bridge off): how well each document explains the question
    (query likelihood, as in UPR; Sachan et al., 2022). One right-padded batch: attention is causal, so the
    padding after a row never reaches its tokens and each row is exact.
    """
    if not passages:
        return []
    question_ids = tokenize_question(tokenizer, question)
    rows = [self_check_prompt_ids(tokenizer, title, text) + question_ids for _, title, text in passages]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = model.device
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    with model.reading_mode(adapter=False):
        out = model(ids, attention_mask=mask, pathway=False, bridge=False, return_lm_logits=False)
    n = len(question_ids)
    # Position t predicts token t + 1: the question's tokens are predicted from the n positions before each.
    index = torch.stack([torch.arange(len(r) - n - 1, len(r) - 1) for r in rows]).to(device)
    hidden = out.hidden_states.gather(1, index[..., None].expand(-1, -1, out.hidden_states.shape[-1]))
    logp = model.causal_lm.lm_head(hidden).float().log_softmax(-1)
    target = torch.tensor(question_ids, device=device).expand(len(rows), -1)
    return logp.gather(-1, target[..., None])[..., 0].mean(-1).tolist()


def rerank(candidates: Sequence[tuple[str, float]], likelihoods: Sequence[float], weight: float) -> list[SelfCheckRow]:
    """(doc_id, search score) candidates in the search's order, re-ranked best first by
    score = search score + weight × the question's mean log-probability after the document; ties keep the
    search's order."""
    rows = [SelfCheckRow(doc_id, rank, search_score, ql, search_score + weight * ql)
            for rank, ((doc_id, search_score), ql) in enumerate(zip(candidates, likelihoods, strict=True), start=1)]
    rows.sort(key=lambda row: (-row.score, row.search_rank))
    return rows


__all__ = ["question_likelihood", "rerank"]
