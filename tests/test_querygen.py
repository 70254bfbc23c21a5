"""The query generator's data pipeline on a tiny model: format, sampling, dedup, filter, resume, and the rule that
no held-back question reaches training."""

import json

import pytest
import torch

from unirag import querygen
from unirag.data import Corpus, Passage, Question, load_corpus
from unirag.docids import DocidTree, TreeConfig
from unirag.errors import UniragError
from unirag.joint import training


def test_pair_format_masks_the_prompt_and_ends_with_eos(tiny_llm_dirs):
    from unirag.backbones import load_llm

    _, tok = load_llm(str(tiny_llm_dirs["llama"]))
    corpus = Corpus([Passage("d0", "Moon", "The moon orbits the earth.")])
    pairs = querygen.train_pairs([corpus], [[Question("q0", "what orbits the earth", ("moon",), "d0"),
                                             Question("q1", "no gold", ("x",), None)]], ["nq"])
    assert pairs == [("Moon", "The moon orbits the earth.", "nq", "what orbits the earth")]
    ids, labels = querygen.encode_pair(tok, *pairs[0], words=100)
    prompt = querygen.prompt_text("Moon", "The moon orbits the earth.", 100, "nq")
    assert prompt.startswith("Passage: Moon. The moon orbits the earth.\n") and "nq question" in prompt
    n_prompt = len(tok(prompt, add_special_tokens=True)["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[-1] == tok.eos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(labels[n_prompt:-1]) == " what orbits the earth"


def test_generator_refuses_evaluation_splits(tmp_path):
    with pytest.raises(UniragError, match="evaluation split"):
        querygen.train_generator(querygen.GeneratorConfig(corpora=["c.jsonl"], questions=["nq/dev.jsonl"],
                                                          out=str(tmp_path)))


def test_dedupe_normalises_and_drops_banned():
    banned = {querygen.normalize_question("Who wrote Hamlet?")}
    got = querygen.dedupe(["Who wrote hamlet", "when was it built?", "When was it built", "who WROTE Hamlet?!"],
                          banned)
    assert got == ["when was it built?"]
    assert querygen.clean_question("  where is it\nextra line") == "where is it"
    assert querygen.clean_question("two words") is None


def test_kv_shared_sampling_equals_greedy_generate_at_top_k_1(tiny_llm_dirs):
    """Reading each prompt once and repeating its cache samples what generate() would (checked greedily)."""
    from unirag.backbones import load_llm

    model, tok = load_llm(str(tiny_llm_dirs["llama"]))
    passages = [("A", "short text"), ("Bee", "a much longer passage text here")]
    config = querygen.SamplingConfig(samples=2, top_k=1, max_new_tokens=6)
    got = querygen.sample_questions(model, tok, passages, config, seed=0, style="nq")
    texts = [querygen.prompt_text(t, x, config.passage_words, "nq") for t, x in passages]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True)
    greedy = model.generate(**enc, do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_token_id)
    for row, samples in enumerate(got):
        assert samples[0] == samples[1]  # top-k 1: both samples are the greedy path
        new = greedy[row, enc["input_ids"].shape[1]:].tolist()
        ended = tok.eos_token_id in new or any(t in tok("\n", add_special_tokens=False)["input_ids"] for t in new)
        # a path still open after the budget is dropped (""), an ended one is its text up to the end
        assert samples[0] == "" if not ended else tok.decode(new).startswith(samples[0])
    again = querygen.sample_questions(model, tok, passages, querygen.SamplingConfig(samples=3, max_new_tokens=5),
                                      seed=7, style="nq")
    assert again == querygen.sample_questions(model, tok, passages,
                                              querygen.SamplingConfig(samples=3, max_new_tokens=5), seed=7, style="nq")


class FirstWordRanker:
    """Ranks first the passage whose id is the question's first word (a stand-in for dense / BM25)."""

    def search(self, question, k):
        return [(question.split()[0], 1.0)]


@pytest.fixture()
def generation(tmp_path, monkeypatch, tiny_llm_dirs):
    root = tmp_path / "nq"
    root.mkdir()
    corpus_path = root / "corpus.jsonl"
    corpus_path.write_text("".join(json.dumps({"id": f"d{i}", "title": f"T{i}", "text": f"text {i}."}) + "\n"
                                   for i in range(5)))
    dev = root / "dev.jsonl"
    dev.write_text(json.dumps({"id": "x", "question": "d1 is a dev question", "answers": ["a"], "doc_id": "d1"}) + "\n")
    from unirag.backbones import load_llm

    monkeypatch.setattr(querygen, "_load_base", lambda name: load_llm(str(tiny_llm_dirs["llama"])))

    def fake_sampler(model, tok, passages, config, seed, style):
        out = []
        for title, _ in passages:
            doc = "d" + title[1:]
            out.append([f"{doc} asks about {title}?", f"{doc} asks about {title}", "d0 points elsewhere, wrongly?",
                        f"{doc} is a dev question", "", f"{doc} asks again {seed}?"][: config.samples])
        return out

    monkeypatch.setattr(querygen, "sample_questions", fake_sampler)
    return corpus_path, dev, tmp_path / "queries.jsonl"


def test_generation_dedupes_filters_bans_and_resumes(generation):
    corpus_path, dev, out = generation
    config = querygen.SamplingConfig(samples=6, batch_passages=2)
    rankers = {"dense": FirstWordRanker()}
    first = querygen.generate_queries(str(corpus_path), None, str(out), config, [str(dev)], limit=3,
                                      progress=False, rankers=rankers)
    assert first["passages"] == 4  # whole chunks of 2
    summary = querygen.generate_queries(str(corpus_path), None, str(out), config, [str(dev)], progress=False,
                                        rankers=rankers)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["passages"] == 5 and json.loads(out.with_name("queries.jsonl.meta.json").read_text())["complete"]
    for row in rows:
        assert row["question"].split()[0] == row["doc_id"]  # the round-trip filter kept only self-ranked ones
    assert "d1 is a dev question" not in [r["question"] for r in rows]  # a dev question is banned...
    assert "d2 is a dev question" in [r["question"] for r in rows]  # ...not its look-alikes
    per_doc = {d: [r["question"] for r in rows if r["doc_id"] == d] for d in {r["doc_id"] for r in rows}}
    # the near-duplicate and the empty sample are dropped: 3 a passage, 2 for d1 (its dev question banned)
    assert {d: len(qs) for d, qs in per_doc.items()} == {"d0": 4, "d1": 2, "d2": 3, "d3": 3, "d4": 3}
    # d0's "points elsewhere" is kept only for d0 itself, where the ranker agrees
    assert sum("points elsewhere" in r["question"] for r in rows) == 1
    # a one-shot run gives the same file as the interrupted-then-resumed one
    other = out.with_name("oneshot.jsonl")
    querygen.generate_queries(str(corpus_path), None, str(other), config, [str(dev)], progress=False,
                              rankers=rankers)
    assert other.read_text() == out.read_text()
    with pytest.raises(UniragError, match="other settings"):
        querygen.generate_queries(str(corpus_path), None, str(out), querygen.SamplingConfig(samples=3), [str(dev)],
                                  progress=False, rankers=rankers)


def test_generated_queries_reach_stage1_but_no_held_back_question(generation):
    corpus_path, dev, out = generation
    querygen.generate_queries(str(corpus_path), None, str(out), querygen.SamplingConfig(samples=6), [str(dev)],
                              progress=False, rankers={"dense": FirstWordRanker()})
    corpus = load_corpus(corpus_path)
    tree = DocidTree(corpus.ids, [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)], TreeConfig(k=3, c=2), corpus.fingerprint)
    config = training.TrainConfig(corpus=str(corpus_path), questions="train.jsonl", out="x", pseudo_queries=1,
                                  generated_queries=str(out), generated_per_passage=1)
    validation = [Question("v", "d2 asks about T2?", ("a",), "d2")]
    examples = training.stage1_examples(corpus, [], tree, config, validation=validation)
    generated = [t for t, _ in examples if t.startswith("d")]
    assert "d2 asks about T2?" not in generated  # a held-out validation question is dropped
    assert len([t for t in generated if t.startswith("d3")]) == 1  # at most generated_per_passage
    assert ("d3 asks about T3?", tree.docid_of("d3")) in examples
    # a file holding an evaluation question is refused, not silently used
    with out.open("a") as handle:
        handle.write(json.dumps({"doc_id": "d1", "question": "d1 is a dev question"}) + "\n")
    from unirag.data import load_questions

    with pytest.raises(UniragError, match="held-back"):
        training.stage1_examples(corpus, [], tree, config, evaluation=load_questions(dev))
    other = Corpus([Passage("d0", "", "another corpus")])
    with pytest.raises(UniragError, match="another corpus"):
        querygen.load_generated_queries(out, other)


def test_sampling_filters_are_seeded_and_respect_top_k():
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0]] * 200)
    draws = querygen._sample(logits, querygen.SamplingConfig(top_k=2, top_p=1.0), torch.Generator().manual_seed(0))
    assert set(draws.tolist()) <= {0, 1} and len(set(draws.tolist())) == 2
    nucleus = querygen._sample(logits, querygen.SamplingConfig(top_k=0, top_p=0.5), torch.Generator().manual_seed(0))
    assert set(nucleus.tolist()) == {0}  # token 0 alone holds more than half the mass


def test_the_throughput_benchmark_row_is_valid_and_stays_out_of_the_qa_tables(tmp_path):
    from benchmarks.querygen_throughput import row_from
    from benchmarks.report import render_query_generator
    from unirag import results

    summary = {"passages": 4, "sampled": 32, "distinct": 30, "kept": 21, "seconds": 16.0, "keep_rate": 0.7,
               "questions_per_second": 2.0}
    row = row_from(summary, {"sampling": {"samples": 8}}, "nq", "first 4 passages", "python -m benchmarks.x")
    assert row["metrics"]["keep_rate"] == 0.7 and row["settings"]["kept"] == 21 and row["n"] == 4
    results.append_run(row, tmp_path)
    store = results.load_store(tmp_path)
    assert results.table(store, "nq", "fp32", "dev") == []
    assert "| nq | throughput and keep rate, first 4 passages | 4 | 32 | 21 | 0.700 | 2.00 |" in \
        render_query_generator(store)
