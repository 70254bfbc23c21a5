"""The `evidence` system: the FM-index constraint (checked exhaustively against brute force), constrained greedy
decoding, and the system end to end on a tiny random joint model (offline, seconds)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from conftest import write_keyword_files
from test_cli import _joint_checkpoint, run
from test_joint_decoding import CORPUS, DOCIDS, FakeTrie, _build

from unirag.answer import Answer, EvidenceSpan, Trace
from unirag.data import Question
from unirag.errors import UniragError
from unirag.eval import run_eval
from unirag.joint.evidence_system import EvidenceSystem, ForwardRelevance
from unirag.joint.joint_system import JointSystem
from unirag.joint.prompts import evidence_prompt_ids
from unirag.joint.reader import answer_with_docs
from unirag.results import row_from_summary
from unirag.settings import InferenceSettings
from unirag.substring_index import MAX_TOKEN_ID, TokenSubstringIndex, constrained_greedy, doc_tokens, token_char
from unirag.systems import SPECS, build_system

# Repeats, shared tokens across documents (a match must not run from one into the next), a one-token document,
# and ids on both sides of the gap the character mapping leaves for the UTF-16 surrogates.
HIGH = 0xD800 - 0x100  # the first id mapped past the surrogates
DOCS = [[1, 2, 3, 1, 2, 4], [2, 3, 3, HIGH - 1, HIGH], [5], [4, 1, 2, 3]]


def substrings(docs, starts, max_len):
    """Brute force: every token sequence of length 1..max_len occurring in a document from an allowed start."""
    found = set()
    for d, doc in enumerate(docs):
        for p in range(len(doc)):
            if starts is not None and starts[d] is not None and p not in starts[d]:
                continue
            for n in range(1, max_len + 1):
                if p + n <= len(doc):
                    found.add(tuple(doc[p:p + n]))
    return found


def reachable(index, max_len):
    """Every sequence the constraint lets a decoder write, up to max_len tokens (all branches of next_tokens)."""
    seen, frontier = set(), [()]
    for _ in range(max_len):
        frontier = [prefix + (t,) for prefix in frontier for t in index.next_tokens(list(prefix))]
        seen.update(frontier)
    return seen


@pytest.mark.parametrize("starts", [None, [{0, 3}, {1}, None, set()]])
def test_the_constraint_allows_exactly_the_corpus_substrings(starts):
    index = TokenSubstringIndex(DOCS, starts)
    expected = substrings(DOCS, starts, 4)
    assert reachable(index, 4) == expected
    if starts is None:  # the corpus is not trivial: ids past the surrogate gap, no match across documents
        assert (3, 3, HIGH - 1, HIGH) in expected and (4, 2) not in expected and (2, 3, 3) in expected
    # Counts agree with brute force on every sequence over the alphabet (occurring or not), length 1..3.
    alphabet = sorted({t for doc in DOCS for t in doc})
    for n in (1, 2, 3):
        for seq in itertools.product(alphabet, repeat=n):
            brute = sum(1 for d, doc in enumerate(DOCS) for p in range(len(doc) - n + 1)
                        if tuple(doc[p:p + n]) == seq and (starts is None or starts[d] is None or p in starts[d]))
            assert index.count(list(seq)) == brute, seq


def test_no_match_runs_across_two_documents():
    index = TokenSubstringIndex([[1, 2], [3, 4]])
    assert index.count([2, 3]) == 0 and index.next_tokens([2]) == set() and index.next_tokens([1]) == {2}
    assert index.occurrences([3, 4]) == [(1, 0)]


def test_token_characters_are_distinct_and_bounded():
    ids = [0, 1, HIGH - 1, HIGH, HIGH + 1, 151_000, MAX_TOKEN_ID]
    chars = [token_char(i) for i in ids]
    assert len(set(chars)) == len(ids) and all(not 0xD800 <= ord(c) < 0xE000 for c in chars)
    for bad in (-1, MAX_TOKEN_ID + 1):
        with pytest.raises(UniragError, match="cannot be indexed"):
            token_char(bad)


def _random_logits(seed, vocab=8):
    gen = torch.Generator().manual_seed(seed)
    return lambda _token=None: torch.randn(vocab, generator=gen) * 3


@pytest.mark.parametrize("seed", range(30))
def test_constrained_greedy_writes_only_corpus_substrings(seed):
    starts = [{0, 3}, None, None, {1}]
    index = TokenSubstringIndex(DOCS[:1] + [[2, 3, 3, 6, 7]] + DOCS[2:], starts)
    logits = _random_logits(seed)
    out = constrained_greedy(logits(), logits, index, max_tokens=5, end_ids={0})
    assert 1 <= len(out.tokens) <= 5 and out.stop_reason in ("end", "document_end", "evidence_tokens")
    assert index.count(out.tokens) > 0  # the FM-index's answer …
    docs = index.docs  # … and brute force agree: it occurs, from an allowed start
    assert any(doc[p:p + len(out.tokens)] == out.tokens and (starts[d] is None or p in starts[d])
               for d, doc in enumerate(docs) for p in range(len(doc)))
    if out.stop_reason == "evidence_tokens":
        assert len(out.tokens) == 5
    if out.stop_reason == "document_end":
        assert not index.next_tokens(out.tokens)


def test_constrained_greedy_picks_the_likeliest_allowed_token_and_stops_when_the_end_is_likelier():
    index = TokenSubstringIndex([[1, 2, 3, 4]], [{0, 1}])
    # Step 0 prefers 9 (not in the corpus), then 3 (not allowed at a start): the likeliest allowed is 2.
    first = torch.tensor([0.0, 0.0, 5.0, 6.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0])
    after = iter([torch.tensor([0.0, 0.0, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]),  # 2 → 3
                  torch.tensor([8.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])])  # end (0) beats 4
    out = constrained_greedy(first, lambda _t: next(after), index, max_tokens=10, end_ids={0})
    assert (out.tokens, out.stop_reason) == ([2, 3], "end")
    # An end token at the very start is ignored (evidence has at least one token); the budget stops it.
    out = constrained_greedy(torch.tensor([9.0, 1.0, 0.0, 0.0, 0.0]), lambda _t: torch.zeros(5), index, 1, {0})
    assert (out.tokens, out.stop_reason) == ([1], "evidence_tokens")
    out = constrained_greedy(torch.zeros(5), lambda _t: torch.zeros(5), index, 10, ())
    assert (out.tokens, out.stop_reason) == ([1, 2, 3, 4], "document_end")


def test_futures_name_where_each_next_token_continues():
    index = TokenSubstringIndex([[1, 2, 3, 2, 4], [2, 5]], [None, {0}])
    assert index.futures([2]) == {3: [(0, 2)], 4: [(0, 4)], 5: [(1, 1)]}
    assert index.futures([1, 2]) == {3: [(0, 2)]} and index.futures([4]) == {}
    assert index.next_tokens([2]) == {3, 4, 5}


def test_a_lookahead_bonus_overrides_the_likelier_token_and_sees_the_continuations():
    index = TokenSubstringIndex([[1, 2, 3], [4, 5, 6]])
    seen = []

    def lookahead(written, futures):
        seen.append((list(written), dict(futures)))
        return {t: 10.0 for t, places in futures.items() if places[0][0] == 1}  # favour the second document

    first = torch.tensor([0.0, 5.0, 0.0, 0.0, 1.0, 0.0, 0.0])  # the LLM alone starts with 1 (document 0)
    assert constrained_greedy(first, lambda _t: torch.zeros(7), index, 2).tokens == [1, 2]
    out = constrained_greedy(first, lambda _t: torch.zeros(7), index, 2, lookahead=lookahead)
    assert out.tokens == [4, 5]
    assert seen[0][0] == [] and seen[0][1][4] == [(1, 0)] and seen[1] == ([4], {5: [(1, 1)]})


class _WordEncoder:
    """Bag-of-words "embeddings" over a fixed vocabulary: cosine = shared words (normalised)."""

    def __init__(self, vocab):
        self.vocab = vocab
        self.calls = 0

    def _vec(self, text):
        v = np.array([float(w in text.split()) for w in self.vocab]) + 1e-6
        return v / np.linalg.norm(v)

    def encode_queries(self, texts):
        return np.stack([self._vec(t) for t in texts])

    def encode_passages(self, texts):
        self.calls += len(texts)
        return np.stack([self._vec(t) for t in texts])


class _CharTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)


def test_forward_relevance_scores_each_token_by_its_best_continuation_and_embeds_each_window_once():
    docs = [[1, 2, 3], [4, 5, 6]]
    encoder = _WordEncoder(["w1", "w2", "w3", "w4", "w5", "w6"])
    relevance = ForwardRelevance(encoder, _CharTokenizer(), docs, "w5 w6", weight=2.0)
    index = TokenSubstringIndex(docs)
    bonus = relevance([], index.futures([]))
    assert max(bonus, key=bonus.get) in (5, 6) and bonus[1] < bonus[4] < bonus[5]
    assert all(0 <= b <= 2.0 + 1e-6 for b in bonus.values())
    calls = encoder.calls
    relevance([4], index.futures([4]))  # (1, 1) was embedded at the first step
    assert encoder.calls == calls


def test_doc_tokens_map_tokens_to_the_documents_characters(tiny_llm_dirs):
    from unirag.backbones import load_llm

    _, tokenizer = load_llm(str(tiny_llm_dirs["llama"]))
    text = "Ab cd, e."
    doc = doc_tokens(tokenizer, text)  # character-level tokenizer: " Ab cd, e."
    assert len(doc.ids) == len(text) + 1 and doc.spans[0] == (0, 0)
    assert [text[a:b] for a, b in doc.spans[1:]] == list(text)
    assert doc.starts == {0, 1, 3, 4, 7, 8}  # the spaces and the characters right after them (not ",")


@pytest.fixture(scope="module")
def joint_system(tiny_llm_dirs) -> JointSystem:
    model = _build(tiny_llm_dirs["llama"], seed=7)
    return JointSystem(model, model.tokenizer, CORPUS, FakeTrie(DOCIDS), traces=False)


@torch.no_grad()
def _brute_force_evidence(joint, question, docs, max_tokens, stop_at_end):
    """Greedy over the base LLM's full forward (no KV cache), restricted by brute force to the tokens that keep the
    evidence a document substring starting at a word; with stop_at_end, stops like `constrained_greedy` (EOS or
    newline likelier than every allowed token)."""
    tokenizer, base = joint.tokenizer, joint.model.causal_lm
    tokenized = [doc_tokens(tokenizer, d.text) for d in docs]
    prompt = evidence_prompt_ids(tokenizer, question)
    ends = {tokenizer.eos_token_id, tokenizer.encode("\n", add_special_tokens=False)[-1]}
    written = []
    while len(written) < max_tokens:
        n = len(written)
        allowed = sorted({t.ids[p + n] for t in tokenized for p in t.starts
                          if p + n < len(t.ids) and t.ids[p:p + n] == written})
        if not allowed:
            break
        log_probs = base(torch.tensor([prompt + written])).logits[0, -1].log_softmax(-1)
        best = max(allowed, key=lambda t: float(log_probs[t]))
        end = max(float(log_probs[e]) for e in ends)
        if stop_at_end and written and best not in ends and end > float(log_probs[best]):
            break
        written.append(best)
    return written


@pytest.mark.parametrize("question, stop_at_end", [("who wrote it?", False), ("text of doc 3", True), ("x", False),
                                                   ("x", True)])
def test_evidence_system_end_to_end(joint_system, question, stop_at_end):
    settings = InferenceSettings(evidence_docs=2, evidence_tokens=6, max_new_tokens=3, beam_width=4)
    answer = EvidenceSystem(joint_system, stop_at_end=stop_at_end).answer(question, settings)
    retrieval = joint_system.retrieve(question, settings.replace(k_docs=2))
    assert answer.system == "evidence" and answer.doc_ids == [d.doc_id for d in retrieval.docs]
    assert len(answer.trace.paths) == 2 and answer.trace.beams  # the search's trace, as the joint system's
    ev = answer.trace.evidence
    assert isinstance(ev, EvidenceSpan) and ev.doc_id in answer.doc_ids and 1 <= ev.tokens <= 6
    source = CORPUS[ev.doc_id].text
    assert ev.text == source[ev.start:ev.end] and ev.text.strip() == ev.text and ev.text
    # The same tokens as a cache-free greedy over the base LLM with the constraint by brute force.
    written = _brute_force_evidence(joint_system, question, retrieval.docs, 6, stop_at_end)
    assert len(written) == ev.tokens and joint_system.tokenizer.decode(written).strip() == ev.text
    # The answer is the base LLM reading the evidence alone.
    expected = answer_with_docs(joint_system.model, joint_system.tokenizer, question, [(ev.doc_id, "", ev.text)],
                                max_new_tokens=3, output_attentions=False, pathway=False, bridge=False, adapter=False)
    assert answer.text == expected.text and answer.context_tokens == expected.context_tokens
    assert "evidence" in answer.timings_ms and any("FM-index" in n for n in answer.notices)
    if not stop_at_end:
        assert ev.stop_reason in ("evidence_tokens", "document_end")


def test_evidence_budget_and_candidates_follow_the_settings(joint_system):
    system = EvidenceSystem(joint_system)
    one = system.answer("text of doc 3", InferenceSettings(evidence_docs=1, evidence_tokens=1, max_new_tokens=1))
    assert len(one.docs) == 1 and one.trace.evidence.tokens == 1 and one.trace.evidence.doc_id == one.doc_ids[0]
    assert one.trace.evidence.stop_reason == "evidence_tokens"
    three = system.answer("text of doc 3", InferenceSettings(evidence_docs=3, evidence_tokens=40, max_new_tokens=1))
    assert len(three.docs) == 3 and three.trace.evidence.tokens <= 40


def test_the_evidence_lookahead_setting_reaches_the_decoder(joint_system):
    encoder = _WordEncoder(["text", "of", "doc", "3"])
    system = EvidenceSystem(joint_system, encoder=encoder)
    settings = InferenceSettings(evidence_docs=2, evidence_tokens=4, max_new_tokens=1)
    system.answer("text of doc 3", settings)
    assert encoder.calls == 0  # off by default: the LLM's choice alone
    answer = system.answer("text of doc 3", settings.replace(evidence_lookahead=8))
    assert encoder.calls > 0 and answer.trace.evidence is not None


def test_the_named_system_answers_questions(joint_system):
    system = build_system("evidence", CORPUS, joint=joint_system)
    (answer,) = system.answer_many([Question("q", "who wrote it?", ("x",), "d1")],
                                   InferenceSettings(evidence_docs=2, evidence_tokens=3, max_new_tokens=1))
    assert answer.system == "evidence" and answer.trace.evidence is not None
    with pytest.raises(UniragError, match="needs a joint checkpoint"):
        build_system("evidence", CORPUS)
    assert SPECS["evidence"].documents_read(InferenceSettings(k_docs=1, evidence_docs=3)) == 3


@pytest.mark.parametrize("changes, message", [
    ({"evidence_tokens": 0}, "evidence_tokens must be between 1 and 128"),
    ({"evidence_tokens": 129}, "evidence_tokens must be between"),
    ({"evidence_docs": 4}, "evidence_docs must be between 1 and 3"),
    ({"evidence_docs": "two"}, "evidence_docs must be a whole number"),
    ({"evidence_tokens": 2.5}, "evidence_tokens must be a whole number"),
    ({"evidence_lookahead": -1}, "evidence_lookahead must be between 0 and 32"),
])
def test_evidence_settings_are_validated(changes, message):
    with pytest.raises(UniragError, match=message):
        InferenceSettings(**changes)
    assert InferenceSettings(evidence_tokens=2.0).evidence_tokens == 2  # sliders send floats


def _answer(system, text, evidence):
    trace = Trace(evidence=None if evidence is None else EvidenceSpan(evidence, "d1", 0, len(evidence), 3, "end"))
    return Answer(system, "q", text, trace=trace, timings_ms={"generate": 1.0})


def test_eval_scores_whether_the_evidence_holds_a_gold_answer(tmp_path):
    questions = [Question(i, "q", ("Paris",), None) for i in ("a", "b", "c")]
    evidences = iter(["The capital is Paris.", "Lyon is a city.", None])

    def batch(qs):
        return [_answer("evidence", "Paris", next(evidences)) for _ in qs]

    summary = run_eval(batch, "evidence", questions, k=1, batch_size=1, progress=False, out=tmp_path / "e.json")
    records = json.loads((tmp_path / "e.json").read_text())["records"]
    assert [r["evidence_has_answer"] for r in records] == [1.0, 0.0, 0.0]  # none written: no answer in it
    assert summary["evidence_has_answer"] == pytest.approx(1 / 3, abs=1e-4) and summary["accuracy"] == 1.0
    row = row_from_summary(summary, run="evidence smoke", system="evidence", corpus="nq", split="dev",
                           precision="fp32", settings={}, command="x")
    assert row["metrics"]["evidence_has_answer"] == summary["evidence_has_answer"]
    other = run_eval(lambda qs: [_answer("rag", "Paris", None) for _ in qs], "rag", questions, k=1, progress=False)
    assert other["evidence_has_answer"] is None  # other systems write no evidence
    row = row_from_summary(other, run="rag", system="rag", corpus="nq", split="dev", precision="fp32", settings={},
                           command="x")
    assert "evidence_has_answer" not in row["metrics"] and "evidence_has_answer" not in row.get("labels", {})


@pytest.fixture()
def files(tmp_path):
    return write_keyword_files(tmp_path, "where do cloves grow?", ["cloves"])


def test_eval_evidence_from_the_command_line(files, capsys, tiny_llm_dirs):
    root, corpus, questions = files
    ckpt = _joint_checkpoint(root, tiny_llm_dirs["llama"], corpus)
    out = root / "evidence.json"
    base = ("eval", "--corpus", corpus, "--questions", questions, "--system", "evidence", "--checkpoint", ckpt)
    code, stdout, err = run(capsys, *base, "--evidence-docs", 2, "--evidence-tokens", 5, "--max-new-tokens", 2,
                            "--out", out)
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["system"] == "evidence" and summary["k"] == 2 and summary["evidence_has_answer"] in (0.0, 1.0)
    assert summary["settings"] == {"evidence_docs": 2, "evidence_tokens": 5, "evidence_lookahead": 0, "beam_width": 10,
                                   "self_check": 0, "self_check_weight": 4.0, "max_new_tokens": 2}
    (record,) = json.loads(out.read_text())["records"]
    assert len(record["docs"]) == 2 and record["evidence_has_answer"] == summary["evidence_has_answer"]
    for extra, message in [(("--k-docs", 2), "--k-docs do(es) not apply to --system evidence"),
                           (("--joint-reader", "trained"), "--joint-reader do(es) not apply"),
                           (("--evidence-tokens", 0), "evidence_tokens must be between")]:
        code, stdout, err = run(capsys, *base, *extra)
        assert code == 2 and message in err and not stdout, (extra, err)
    code, stdout, err = run(capsys, "eval", "--corpus", corpus, "--questions", questions, "--system", "joint",
                            "--checkpoint", ckpt, "--evidence-tokens", 4)
    assert code == 2 and "--evidence-tokens do(es) not apply to --system joint" in err
