"""Docid beam search, answer generation and JointSystem on tiny random models (offline, seconds)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unirag.answer import Answer
from unirag.backbones import load_llm
from unirag.data import MAX_QUESTION_CHARS, Corpus, Passage
from unirag.errors import UniragError
from unirag.joint import joint_system as system_module
from unirag.joint.config import JointConfig
from unirag.joint.joint_system import JointSystem
from unirag.joint.modeling import JointModel
from unirag.joint.prompts import SELF_CHECK_PROMPT, answer_prompt, retrieval_prompt
from unirag.joint.reader import answer_with_docs
from unirag.joint.search import search_docids
from unirag.joint.selfcheck import question_likelihood, rerank
from unirag.settings import InferenceSettings

SELF_CHECK_WEIGHT = InferenceSettings().self_check_weight  # the library default

# docid → document id. Depths differ on purpose (a leaf at level 2 next to leaves at level 3).
DOCIDS = {
    (0, 0, 0): "d0",
    (0, 0, 1): "d1",
    (0, 1): "d2",
    (1, 0, 0): "d3",
    (1, 2, 3): "d4",
    (2, 3): "d5",
    (3, 1, 2): "d6",
}


class FakeTrie:
    """Same protocol as unirag.docids.DocidTree: allowed(prefix), doc_id_at(docid), docid_of(doc_id)."""

    def __init__(self, mapping: dict[tuple[int, ...], str]):
        self.mapping = dict(mapping)

    def allowed(self, prefix: tuple[int, ...]) -> list[int]:
        n = len(prefix)
        return sorted({d[n] for d in self.mapping if len(d) > n and d[:n] == tuple(prefix)})

    def doc_id_at(self, docid: tuple[int, ...]) -> str:
        return self.mapping[tuple(docid)]

    def docid_of(self, doc_id: str) -> tuple[int, ...]:
        return next(d for d, name in self.mapping.items() if name == doc_id)


CORPUS = Corpus([Passage(f"d{i}", f"T{i}", f"text of doc {i}.") for i in range(7)], source="fake")


@pytest.fixture(scope="module")
def joint(tiny_llm_dirs) -> JointModel:
    return _build(tiny_llm_dirs["llama"])


def _build(path, seed: int = 0, **config) -> JointModel:
    base, tok = load_llm(str(path))
    model = JointModel(
        base,
        JointConfig(base_model=str(path), docid_levels=3, docid_branching=4, pathway_layers=2, retrieval_heads=2,
                    retrieval_mlp_dim=32, **config),
        tokenizer=tok,
    ).eval()
    model.tokenizer = tok
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.joint_named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


@torch.no_grad()
def brute_force_logprob(model: JointModel, question: str, trie: FakeTrie, docid: tuple[int, ...]) -> float:
    """Log-probability of a full docid from one full forward, restricted & renormalised per level."""
    ids, _ = retrieval_prompt(model, model.tokenizer, question)
    ids = ids + [model.docid_token_id(level, s) for level, s in enumerate(docid)]
    logits = model(torch.tensor([ids])).docid_logits[0]
    start = len(ids) - len(docid) - 1
    total = 0.0
    for level, s in enumerate(docid):
        children = trie.allowed(docid[:level])
        index = [model.docid_vocab_index(level, c) for c in children]
        logp = torch.log_softmax(logits[start + level, index], -1)
        total += float(logp[children.index(s)])
    return total


def test_beam_search_finds_the_exact_top_documents(joint):
    trie = FakeTrie(DOCIDS)
    question = "who wrote it?"
    exact = sorted(((brute_force_logprob(joint, question, trie, d), name) for d, name in DOCIDS.items()), reverse=True)
    beams = search_docids(joint, joint.tokenizer, question, trie, beam_width=len(DOCIDS), num_return=3).beams
    assert [b.doc_id for b in beams] == [name for _, name in exact[:3]]
    for beam, (logprob, _) in zip(beams, exact[:3], strict=True):
        assert beam.logprob == pytest.approx(logprob, abs=1e-4)
    logprobs = [b.logprob for b in beams]
    assert logprobs == sorted(logprobs, reverse=True)
    assert all(b.document_match == 0.0 and b.score == b.logprob for b in beams)  # no semantic scorer: no match


def test_beam_levels_trace(joint):
    trie = FakeTrie(DOCIDS)
    beams = search_docids(joint, joint.tokenizer, "what year?", trie, beam_width=4, num_return=4).beams
    assert len({b.doc_id for b in beams}) == len(beams) >= 2
    for beam in beams:
        assert beam.doc_id == trie.doc_id_at(beam.docid)
        assert len(beam.levels) == len(beam.docid)
        total = 0.0
        for level, info in enumerate(beam.levels):
            assert info["prefix"] == list(beam.docid[:level])
            assert info["children"] == trie.allowed(beam.docid[:level])
            assert info["chosen"] == beam.docid[level]
            assert sum(info["probs"]) == pytest.approx(1.0, abs=1e-5)
            assert len(info["probs"]) == len(info["children"])
            total += math.log(info["probs"][info["children"].index(info["chosen"])])
        assert total == pytest.approx(beam.logprob, abs=1e-4)


@pytest.mark.parametrize("beam_width", [1, 2, 50])
def test_beam_widths(joint, beam_width):
    trie = FakeTrie(DOCIDS)
    beams = search_docids(joint, joint.tokenizer, "where?", trie, beam_width=beam_width, num_return=10).beams
    assert 1 <= len(beams) <= len(DOCIDS)
    if beam_width == 50:  # wider than the corpus: every document, once
        assert sorted(b.doc_id for b in beams) == sorted(DOCIDS.values())
    if beam_width == 1:
        assert len(beams) == 1


def test_distinct_documents_when_docids_share_a_document(joint):
    trie = FakeTrie({(0, 0): "dup", (0, 1): "dup", (1, 0): "other"})
    beams = search_docids(joint, joint.tokenizer, "q?", trie, beam_width=5, num_return=3).beams
    assert sorted(b.doc_id for b in beams) == ["dup", "other"]


def test_empty_and_too_deep_tries(joint):
    assert search_docids(joint, joint.tokenizer, "q?", FakeTrie({}), beam_width=3).beams == []
    with pytest.raises(UniragError, match="deeper"):
        search_docids(joint, joint.tokenizer, "q?", FakeTrie({(0, 0, 0, 0): "x"}), beam_width=3)
    with pytest.raises(UniragError):
        search_docids(joint, joint.tokenizer, "q?", FakeTrie({(9,): "x"}), beam_width=3)  # symbol ≥ K


def test_retrieval_attention_covers_question_tokens(joint):
    search = search_docids(joint, joint.tokenizer, "who is it", FakeTrie(DOCIDS), beam_width=3, num_return=2)
    att = search.attention
    assert "".join(att.tokens) == "who is it"  # char tokenizer: one token per character
    assert len(att.weights) == len(att.tokens)
    assert all(w >= 0 for w in att.weights) and 0 < sum(att.weights) <= 1 + 1e-5
    assert len(search.finished) >= len(search.beams)


def test_answer_prompt_spans(joint):
    passages = [("d1", "T1", "alpha beta"), ("d2", "", "gamma")]
    prompt = answer_prompt(joint, joint.tokenizer, "why?", passages)
    tok = joint.tokenizer
    assert joint.generates_token_id in prompt.ids
    context = "".join(tok.decode([prompt.ids[i]]) for i in prompt.context_positions)
    assert context == "T1: alpha beta\ngamma"
    pieces = [context[s:e] for s, e in prompt.doc_spans]
    assert pieces == ["T1: alpha beta", "gamma"]
    # <generates_token> sits right before the assistant turn of the chat template.
    gen_at = prompt.ids.index(joint.generates_token_id)
    assert tok.decode(prompt.ids[gen_at + 1:]) == "<|im_start|>assistant\n"


def test_short_answer_prompt_keeps_the_spans_on_the_real_question(joint):
    passages = [("d1", "T1", "alpha beta"), ("d2", "", "gamma")]
    prompt = answer_prompt(joint, joint.tokenizer, "why?", passages, reader_prompt="short")
    tok = joint.tokenizer
    context = "".join(tok.decode([prompt.ids[i]]) for i in prompt.context_positions)
    assert context == "T1: alpha beta\ngamma"  # not the worked example's passage
    assert "shortest phrase" in prompt.text and prompt.text.index("shortest phrase") < prompt.text.index("Q: why?")


@pytest.mark.parametrize("bridge", [True, False])
def test_answer_with_docs(joint, bridge):
    passages = [("d1", "T1", "alpha beta"), ("d2", "T2", "gamma delta")]
    gen = answer_with_docs(joint, joint.tokenizer, "why?", passages, max_new_tokens=6, bridge=bridge)
    att = gen.attention
    assert gen.answer_tokens == len(gen.token_ids) <= 6
    assert gen.context_tokens == len(att.context_tokens) == len("T1: alpha beta\nT2: gamma delta")
    assert len(att.weights) == len(att.answer_tokens) == gen.answer_tokens
    assert all(len(row) == gen.context_tokens for row in att.weights)
    assert att.doc_spans == [[0, 14], [15, 30]]
    assert att.source == ("bridge" if bridge else "base_last_3_layers")
    assert gen.stop_reason in ("eos", "newline", "max_new_tokens")
    assert "\n" not in gen.text


def test_answer_without_chat_template(tiny_llm_dirs):
    model = _build(tiny_llm_dirs["nochat"])
    prompt = answer_prompt(model, model.tokenizer, "why?", [("d1", "T", "x y")])
    assert prompt.ids[-1] == model.generates_token_id
    assert model.tokenizer.decode(prompt.ids[:-1]) == "Q: why?\nT: x y\nA:"
    gen = answer_with_docs(model, model.tokenizer, "why?", [("d1", "T", "x y")], max_new_tokens=3,
                           output_attentions=False)
    assert gen.attention.weights == [] and gen.prompt_tokens == len(prompt.ids)


def test_joint_system_answer(joint):
    system = JointSystem(joint, joint.tokenizer, CORPUS, FakeTrie(DOCIDS))
    answer = system.answer("  who   wrote it? ", InferenceSettings(k_docs=2, beam_width=4, max_new_tokens=4))
    assert isinstance(answer, Answer) and answer.system == "joint"
    assert answer.question == "who wrote it?"
    assert 1 <= len(answer.docs) <= 2 and len(set(answer.doc_ids)) == len(answer.docs)
    for doc in answer.docs:
        assert doc.docid is not None and DOCIDS[doc.docid] == doc.doc_id and doc.score <= 0
        assert doc.text == CORPUS[doc.doc_id].text
    assert set(answer.timings_ms) == {"retrieve", "generate"}
    trace = answer.trace
    assert trace.beams and trace.retrieval_attention.tokens and trace.answer_attention.context_tokens
    assert len(trace.paths) == len(answer.docs)
    assert answer.prompt_tokens > answer.context_tokens > 0
    record = answer.to_record()  # JSON-safe summary works
    assert record["latency_ms"] >= 0


def test_joint_system_gold_and_input_checks(joint):
    system = JointSystem(joint, joint.tokenizer, CORPUS, FakeTrie(DOCIDS))
    # Forcing documents (the gold passage here) is `read` with the caller's documents: retrieval skipped.
    gold = system.read("who?", system.documents(["d4"]), InferenceSettings(max_new_tokens=2))
    assert gold.doc_ids == ["d4"] and gold.docs[0].docid == (1, 2, 3)
    assert gold.timings_ms["retrieve"] == 0.0 and not gold.trace.beams and not gold.trace.paths
    with pytest.raises(UniragError):
        system.answer("   ")
    with pytest.raises(UniragError):
        system.documents(["missing"])
    long = system.answer("x" * (MAX_QUESTION_CHARS + 50), InferenceSettings(k_docs=1, beam_width=2, max_new_tokens=1))
    assert len(long.question) == MAX_QUESTION_CHARS and any("truncated" in n for n in long.notices)


def test_joint_system_from_checkpoint(joint, tmp_path):
    from unirag.docids import DocidTree, TreeConfig
    from unirag.errors import FingerprintMismatchError

    names = [f"d{i}" for i in range(7)]
    by_name = {name: docid for docid, name in DOCIDS.items()}
    tree = DocidTree(names, [by_name[n] for n in names], TreeConfig(), CORPUS.fingerprint)
    ckpt = joint.save_pretrained(tmp_path / "ckpt", tree=tree)
    system = JointSystem.from_checkpoint(ckpt, CORPUS)
    answer = system.answer("who?", InferenceSettings(k_docs=2, beam_width=3, max_new_tokens=2))
    assert answer.docs and all(d.doc_id in names for d in answer.docs)
    other = Corpus([Passage("x", "", "other corpus")], source="other")
    with pytest.raises(FingerprintMismatchError):
        JointSystem.from_checkpoint(ckpt, other)
    (ckpt / "docid_tree.json").unlink()
    with pytest.raises(UniragError, match="docid tree"):
        JointSystem.from_checkpoint(ckpt, CORPUS)
    with pytest.raises(UniragError, match="The checkpoint folder .*nowhere does not exist"):
        JointSystem.from_checkpoint(tmp_path / "nowhere", CORPUS)


# ----------------------------------------------------------------------------- semantic docid scores


@pytest.fixture(scope="module")
def semantic_joint(tiny_llm_dirs) -> JointModel:
    from unirag.joint.modeling import tree_prefixes

    return _build(tiny_llm_dirs["llama"], seed=1, semantic_dim=6, semantic_nodes=len(tree_prefixes(FakeTrie(DOCIDS))))


@torch.no_grad()
def brute_force_semantic_logprob(model: JointModel, question: str, trie: FakeTrie, docid: tuple[int, ...]) -> float:
    ids, _ = retrieval_prompt(model, model.tokenizer, question)
    ids = ids + [model.docid_token_id(level, s) for level, s in enumerate(docid)]
    out = model(torch.tensor([ids]))
    start = len(ids) - len(docid) - 1
    query = out.query_vectors[0, start]
    total = 0.0
    for level, s in enumerate(docid):
        children = trie.allowed(docid[:level])
        index = [model.docid_vocab_index(level, c) for c in children]
        logits = out.docid_logits[0, start + level, index] + model.semantic_scores(trie, query, docid[:level], children)
        total += float(torch.log_softmax(logits, -1)[children.index(s)])
    return total


@torch.no_grad()
def brute_force_document_match(model: JointModel, question: str, trie: FakeTrie, docid: tuple[int, ...]) -> float:
    ids, _ = retrieval_prompt(model, model.tokenizer, question)
    query = model(torch.tensor([ids])).query_vectors[0, -1]
    node = F.normalize(model.semantic.node_embed.weight[model.node_rows(trie, [docid])[0]].float(), dim=0)
    return float(query.float() @ node) * float(model.semantic.log_scale.exp())


def test_semantic_scores_enter_the_beam_search_exactly(semantic_joint):
    trie = FakeTrie(DOCIDS)
    question = "which river is longest?"
    exact = sorted(((brute_force_semantic_logprob(semantic_joint, question, trie, d), name)
                    for d, name in DOCIDS.items()), reverse=True)
    beams = search_docids(semantic_joint, semantic_joint.tokenizer, question, trie, beam_width=len(DOCIDS),
                            num_return=3, rescore=False).beams
    assert [b.doc_id for b in beams] == [name for _, name in exact[:3]]
    for beam, (logprob, _) in zip(beams, exact[:3], strict=True):
        assert beam.logprob == pytest.approx(logprob, abs=1e-4)
        assert beam.document_match == 0.0 and beam.score == beam.logprob
    for level in beams[0].levels:
        assert sum(level["probs"]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("num_return", [1, 3, len(DOCIDS)])
def test_rescored_ranking_is_exact(semantic_joint, num_return):
    """score = path log-prob + the document node's scaled cosine, and the pruning never drops a winner."""
    model, trie = semantic_joint, FakeTrie(DOCIDS)
    for question in ("which river is longest?", "who painted the ceiling?", "when did it end"):
        exact = sorted(((brute_force_semantic_logprob(model, question, trie, d)
                         + brute_force_document_match(model, question, trie, d), name)
                        for d, name in DOCIDS.items()), reverse=True)
        beams = search_docids(model, model.tokenizer, question, trie, beam_width=len(DOCIDS),
                              num_return=num_return).beams
        assert [b.doc_id for b in beams] == [name for _, name in exact[:num_return]]
        for beam, (score, _) in zip(beams, exact, strict=False):
            assert beam.score == pytest.approx(score, abs=1e-4)
            assert beam.document_match == pytest.approx(brute_force_document_match(model, question, trie,
                                                                                   beam.docid), abs=1e-4)
            assert beam.score == pytest.approx(beam.logprob + beam.document_match, abs=1e-6)


def test_semantic_node_embeddings_steer_retrieval(semantic_joint):
    """Nodes on one document's path aligned with the query vector (and the others opposed) win the search."""
    from unirag.joint.modeling import tree_prefixes

    model = semantic_joint
    trie = FakeTrie(DOCIDS)
    question = "who painted the ceiling?"
    ids, _ = retrieval_prompt(model, model.tokenizer, question)
    table = model.semantic.node_embed.weight
    saved = table.detach().clone()
    head = model.docid_head.weight.detach().clone()
    try:
        with torch.no_grad():
            query = model(torch.tensor([ids])).query_vectors[0, -1]
            model.docid_head.weight.zero_()
            target = (1, 2, 3)
            for row, prefix in enumerate(tree_prefixes(trie)):
                on_path = target[: len(prefix)] == prefix
                table[row] = query if on_path else -query
        beams = search_docids(model, model.tokenizer, question, trie, beam_width=4, num_return=1).beams
        assert beams[0].doc_id == "d4"
    finally:
        with torch.no_grad():
            table.copy_(saved)
            model.docid_head.weight.copy_(head)


def test_semantic_checkpoint_roundtrip_and_wrong_tree(semantic_joint, tmp_path):
    semantic_joint.save_pretrained(tmp_path / "ckpt")
    loaded = JointModel.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(loaded.semantic.node_embed.weight.half(), semantic_joint.semantic.node_embed.weight.half())
    smaller = FakeTrie({d: n for d, n in DOCIDS.items() if n != "d6"})
    with pytest.raises(UniragError, match="semantic node table"):
        search_docids(loaded, loaded.tokenizer, "q?", smaller, beam_width=3, num_return=1)


def test_init_semantic_nodes_uses_centroids(semantic_joint):
    from unirag.joint.modeling import tree_prefixes

    trie = FakeTrie(DOCIDS)
    saved = semantic_joint.semantic.node_embed.weight.detach().clone()
    vectors = {f"d{i}": torch.eye(6)[i % 6] * (i + 1) for i in range(7)}
    try:
        semantic_joint.init_semantic_nodes(trie, vectors)
        rows = {p: r for r, p in enumerate(tree_prefixes(trie))}
        table = semantic_joint.semantic.node_embed.weight
        expected = torch.nn.functional.normalize(torch.eye(6)[0] + torch.eye(6)[1], dim=0)  # (0, 0) holds d0, d1
        assert torch.allclose(table[rows[(0, 0)]].float(), expected, atol=1e-6)
        assert torch.allclose(table[rows[(1, 2, 3)]].float(), torch.eye(6)[4], atol=1e-6)
    finally:
        with torch.no_grad():
            semantic_joint.semantic.node_embed.weight.copy_(saved)


def test_base_reader_reads_with_the_base_llm(tiny_llm_dirs):
    """--base-reader: a stage-2 model (trained adapter, reader pathway and bridge on) reads as the base LLM."""
    plain = _build(tiny_llm_dirs["llama"], seed=3)  # the same joint weights, no adapter at all
    adapted = _build(tiny_llm_dirs["llama"], seed=3)
    adapted.enable_lora(r=4, alpha=8, dropout=0.0)
    adapted.config.adapter_in_reading = True  # as after stage 2 (which retrieves without the adapter)
    adapted.config.adapter_in_retrieval = False
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    assert adapted.reader_trained
    trie = FakeTrie(DOCIDS)
    question = "who wrote it?"
    base_side = JointSystem(plain, plain.tokenizer, CORPUS, trie)  # no adapter: reads with the pathway off
    system = JointSystem(adapted, adapted.tokenizer, CORPUS, trie)
    settings = InferenceSettings(k_docs=2, beam_width=4, max_new_tokens=6)
    expected = base_side.answer(question, settings)
    got = system.answer(question, settings.replace(joint_reader="base"))
    assert got.doc_ids == expected.doc_ids and got.text == expected.text
    assert adapted.reader_trained is True
    # The reader is chosen per call (the app's "Joint reader" setting), either way round.
    own = system.answer(question, settings)
    back = system.answer(question, settings.replace(joint_reader="trained"))
    assert back.text == own.text and back.doc_ids == own.doc_ids
    assert any("Read by the base LLM" in n for n in got.notices) and not any("base LLM" in n for n in own.notices)
    passages = [(d.doc_id, d.title, d.text) for d in got.docs]
    ids = torch.tensor([answer_prompt(adapted, adapted.tokenizer, question, passages).ids])
    with torch.no_grad():
        with adapted.reading_mode(adapter=False):
            base_logits = adapted(ids, pathway=False, bridge=False).lm_logits
        with adapted.reading_mode():
            adapter_logits = adapted(ids, pathway=False, bridge=False).lm_logits
        plain_logits = plain(ids, pathway=False, bridge=False).lm_logits
    assert torch.allclose(base_logits, plain_logits, atol=1e-5)
    assert not torch.allclose(adapter_logits, plain_logits, atol=1e-3)  # the adapter does change the reader


# ----------------------------------------------------------------------------- self-check (query likelihood)


@torch.no_grad()
def _reference_question_logprob(base, tok, passage: tuple[str, str, str], question: str) -> float:
    """Mean log-prob of the question's tokens after the passage prompt: one unpadded forward of the plain base."""
    _, title, text = passage
    prompt = tok(SELF_CHECK_PROMPT.format(passage=f"{title}. {text}" if title else text))["input_ids"]
    q = tok(" " + question, add_special_tokens=False)["input_ids"]
    logits = base(torch.tensor([prompt + q])).logits[0].log_softmax(-1)
    return float(torch.stack([logits[len(prompt) - 1 + i, t] for i, t in enumerate(q)]).mean())


def test_question_likelihood_is_the_base_llms_and_exact_under_padding(tiny_llm_dirs):
    """Rows of different lengths share one right-padded batch; the adapter must not take part."""
    model = _build(tiny_llm_dirs["llama"], seed=5)
    model.enable_lora(r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    reference, tok = load_llm(str(tiny_llm_dirs["llama"]))
    passages = [("d0", "Short", "tiny."), ("d1", "", "a much longer passage " * 6), ("d2", "T", "mid length text")]
    got = question_likelihood(model, model.tokenizer, "who wrote it?", passages)
    expected = [_reference_question_logprob(reference, tok, p, "who wrote it?") for p in passages]
    assert got == pytest.approx(expected, abs=1e-4)
    assert len(set(round(x, 4) for x in got)) == 3  # the passage matters
    assert question_likelihood(model, model.tokenizer, "who?", []) == []


def test_self_check_reranks_the_search_candidates(joint, monkeypatch):
    system = JointSystem(joint, joint.tokenizer, CORPUS, FakeTrie(DOCIDS))
    plain = system.answer("who wrote it?", InferenceSettings(k_docs=3, beam_width=6, max_new_tokens=2, self_check=0))
    assert "self_check" not in plain.timings_ms and not plain.trace.self_check
    order = system.retrieve("who wrote it?", InferenceSettings(k_docs=3, beam_width=6, self_check=4)).search.beams
    order = [beam.doc_id for beam in order]
    assert order[:3] == plain.doc_ids
    # A likelihood that strongly prefers the search's last candidate and dislikes its first.
    fake = {doc: 10.0 * i for i, doc in enumerate(order)}
    monkeypatch.setattr(system_module, "question_likelihood", lambda m, t, q, ps: [fake[p[0]] for p in ps])
    settings = InferenceSettings(k_docs=2, beam_width=6, max_new_tokens=2, self_check=4)
    checked = system.answer("who wrote it?", settings)
    assert checked.doc_ids == [order[3], order[2]]
    trace = checked.trace.self_check
    assert [t.doc_id for t in trace] == order[::-1] and [t.search_rank for t in trace] == [4, 3, 2, 1]
    for t, doc in zip(trace, checked.docs, strict=False):
        assert t.score == pytest.approx(t.search_score + SELF_CHECK_WEIGHT * t.question_logprob)
        assert doc.score == pytest.approx(t.score)
    assert [DOCIDS[tuple(p[-1]["prefix"]) + (p[-1]["chosen"],)] for p in checked.trace.paths] == checked.doc_ids
    assert "self_check" in checked.timings_ms and any("Self-check" in n for n in checked.notices)
    assert checked.ranked_doc_ids == order[::-1]  # the whole self-checked ranking, for R@3
    # 0 switches it off again.
    off = system.answer("who wrote it?", settings.replace(self_check=0))
    assert off.doc_ids == order[:2]


def test_self_check_weight_sets_the_mix(joint, monkeypatch):
    system = JointSystem(joint, joint.tokenizer, CORPUS, FakeTrie(DOCIDS))
    order = [b.doc_id for b in system.retrieve("who wrote it?", InferenceSettings(k_docs=3, beam_width=6,
                                                                                   self_check=4)).search.beams]
    fake = {doc: 10.0 * i for i, doc in enumerate(order)}  # prefers the search's last candidate
    monkeypatch.setattr(system_module, "question_likelihood", lambda m, t, q, ps: [fake[p[0]] for p in ps])
    for weight, expected in ((1e-9, order[:2]), (1000.0, [order[3], order[2]])):
        settings = InferenceSettings(k_docs=2, beam_width=6, max_new_tokens=2, self_check=4, self_check_weight=weight)
        answer = system.answer("who wrote it?", settings)
        assert answer.doc_ids == expected
        for t in answer.trace.self_check:
            assert t.score == pytest.approx(t.search_score + weight * t.question_logprob)
        assert any(f"{weight:g} ×" in n for n in answer.notices)


def test_rerank_adds_the_weighted_likelihood_and_keeps_the_search_order_on_ties():
    rows = rerank([("a", -1.0), ("b", -2.0), ("c", -2.0)], [-3.0, -1.0, -1.0], 2.0)
    assert [r.doc_id for r in rows] == ["b", "c", "a"]  # b and c tie: the search's order
    assert [r.search_rank for r in rows] == [2, 3, 1]
    assert [r.score for r in rows] == [-4.0, -4.0, -7.0]
    assert rerank([], [], 4.0) == []


def test_retrieve_sizes_the_search_from_the_settings(joint, monkeypatch):
    system = JointSystem(joint, joint.tokenizer, CORPUS, FakeTrie(DOCIDS))
    calls = []
    real = system_module.search_docids

    def spy(*args, **kwargs):
        calls.append(args[4:6])
        return real(*args, **kwargs)

    monkeypatch.setattr(system_module, "search_docids", spy)
    monkeypatch.setattr(system_module, "question_likelihood", lambda m, t, q, ps: [0.0] * len(ps))
    settings = InferenceSettings(k_docs=2, beam_width=3, self_check=5)
    retrieval = system.retrieve("who?", settings)
    assert calls == [(settings.search_width, settings.documents_searched)] == [(5, 5)]
    assert len(retrieval.docs) == 2 and len(retrieval.self_check) == len(retrieval.search.beams)
    assert set(retrieval.timings) == {"retrieve", "self_check"}
    assert [b.doc_id for b in retrieval.beams] == [d.doc_id for d in retrieval.docs]


def test_document_match_off_ranks_by_path_logprob_alone(semantic_joint):
    trie = FakeTrie(DOCIDS)
    settings = InferenceSettings(k_docs=3, beam_width=len(DOCIDS))
    for document_match in (True, False):
        system = JointSystem(semantic_joint, semantic_joint.tokenizer, CORPUS, trie, document_match=document_match)
        search = search_docids(semantic_joint, semantic_joint.tokenizer, "which river?", trie, len(DOCIDS), 3,
                               rescore=document_match)
        retrieval = system.retrieve("which river?", settings)
        assert [d.doc_id for d in retrieval.docs] == [b.doc_id for b in search.beams]
        assert [d.score for d in retrieval.docs] == [b.score for b in search.beams]
