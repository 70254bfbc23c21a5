"""Training on a tiny random model: stage 1 (cached lower layers), stage 2 (LoRA + answers), resume."""

import json
from dataclasses import fields

import pytest
import torch

from unirag.data import Corpus, Passage, Question
from unirag.docids import DocidTree, TreeConfig
from unirag.errors import UniragError
from unirag.joint import training
from unirag.joint.modeling import JointConfig, JointModel


@pytest.fixture()
def setup(tiny_llm_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("UNIRAG_CACHE", str(tmp_path / "cache"))
    from unirag.backbones import load_llm

    corpus = Corpus([Passage(f"d{i}", f"Topic {i}", f"Fact number {i} is here. It has detail {i}. More {i} words.")
                     for i in range(6)], source="tiny")
    docids = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 0)]
    tree = DocidTree(corpus.ids, docids, TreeConfig(k=3, c=3), corpus.fingerprint)
    base, tok = load_llm(str(tiny_llm_dirs["llama"]))
    model = JointModel(base, JointConfig(docid_levels=2, docid_branching=3, base_model=str(tiny_llm_dirs["llama"]),
                                         pathway_layers=2), tok)
    return corpus, tree, model, tok


def test_examples_cover_every_passage_and_question(setup):
    corpus, tree, model, tok = setup
    config = training.TrainConfig(corpus="c", questions="q", out="o", pseudo_queries=2)
    qs = [Question("q1", "what is fact 3?", ("3",), "d3")]
    examples = training.stage1_examples(corpus, qs, tree, config)
    assert examples[0] == ("what is fact 3?", (1, 1))
    assert {docid for _, docid in examples} == set(tree.docids) and len(examples) == 1 + 2 * len(corpus)
    enc = training.encode_example(model, tok, tree, *examples[0])
    assert enc.targets == [model.docid_vocab_index(0, 1), model.docid_vocab_index(1, 1)]
    assert enc.input_ids[enc.first_target] == model.retrieve_token_id
    assert enc.input_ids[-1] == model.docid_token_id(0, 1)
    assert enc.allowed[1] == [model.docid_vocab_index(1, s) for s in (0, 1, 2)]


def test_passage_text_indexing_examples(setup):
    corpus, tree, model, tok = setup
    config = training.TrainConfig(corpus="c", questions="q", out="o", pseudo_queries=1, index_passages=True,
                                  passage_words=4)
    examples = training.stage1_examples(corpus, [], tree, config)
    assert len(examples) == 2 * len(corpus)
    assert examples[1] == ("Topic 0. Fact number", tree.docid_of("d0"))  # title + text, clipped to 4 words
    everything = training.TrainConfig(corpus="c", questions="q", out="o", pseudo_queries=16)
    # more pseudo-queries than sentences: every sentence once (two per passage: "More 0 words." is too short)
    assert len(training.stage1_examples(corpus, [], tree, everything)) == 2 * len(corpus)


def test_cached_top_layer_forward_matches_full_forward(setup):
    corpus, tree, model, tok = setup
    with torch.no_grad():
        for p in model.stage1_parameters():
            p.normal_(0, 0.05)
    enc = [training.encode_example(model, tok, tree, "fact 3", (1, 1)),
           training.encode_example(model, tok, tree, "a longer question about fact 5", (2, 0))]
    ids, mask, *_ = training.collate(enc, model.docid_head.out_features, 0)
    layer = model.pathway_layer_ids[0]
    with torch.no_grad():
        full = model(ids, attention_mask=mask, pathway=True, bridge=False).docid_logits
        hidden = model.hidden_before_layer(ids, mask, layer)
        top = model(ids, attention_mask=mask, inputs_embeds=hidden, start_layer=layer, pathway=True,
                    bridge=False).docid_logits
    real = mask.bool()
    assert torch.allclose(full[real], top[real], atol=1e-5)


def test_docid_loss_respects_trie(setup):
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 3] = 100.0  # a disallowed index with a huge logit must not matter
    allowed = torch.tensor([[[True, True, False, False]]])
    loss = training.docid_loss(logits, torch.tensor([[0]]), torch.tensor([[1]]), allowed)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-5)


def test_train_stage1_stage2_and_resume(tiny_llm_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("UNIRAG_CACHE", str(tmp_path / "cache"))
    corpus_path, q_path = write_tiny_data(tmp_path)
    encoder = "embedded:all-minilm-l6-v2"
    emb = torch.randn(8, 8).numpy()
    monkeypatch.setattr("unirag.docids.corpus_embeddings", lambda *a, **k: emb)
    teacher_calls = []

    def fake_teacher(texts, name):
        teacher_calls.append(len(texts))
        return torch.randn(len(texts), 8, generator=torch.Generator().manual_seed(len(texts))).numpy()

    monkeypatch.setattr(training, "query_embeddings", fake_teacher)
    out = tmp_path / "ckpt"
    args = ["--corpus", str(corpus_path), "--questions", str(q_path), "--out", str(out), "--base-model",
            str(tiny_llm_dirs["llama"]), "--tree-k", "2", "--tree-c", "2", "--pathway-layers", "2",
            "--stage1-epochs", "2", "--batch-size", "4", "--validation-questions", "2", "--pseudo-queries", "1"]
    assert training.main(args) == 0
    log = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all(r["loss"] > 0 for r in log)
    assert json.loads((out / "trainer_state.json").read_text())["epoch"] == 2
    with pytest.raises(UniragError, match="--resume"):
        training.main(args)
    # resume into stage 2 with a few LoRA steps
    assert training.main(args + ["--resume", "--stage2-steps", "2", "--save-every", "1",
                                 "--stage2-docid-batch", "2", "--stage2-answer-batch", "1"]) == 0
    log = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert [r.get("step") for r in log if r["stage"] == 2] == [1, 2]
    assert (out / "lora").is_dir() and json.loads((out / "trainer_state.json").read_text())["stage"] == 2
    loaded = JointModel.from_pretrained(out)
    assert loaded.lora_enabled and loaded.reader_trained  # stage 2's adapter is saved and is the reader's
    assert json.loads((out / "docid_tree.json").read_text())["config"]["encoder"] == encoder  # the tree's encoder
    assert loaded.semantic is not None and loaded.config.semantic_dim == 8 and teacher_calls
    assert all("distill" in r for r in log)
    assert loaded.config.adapter_in_retrieval is False  # the default: docids are generated without the adapter
    with pytest.raises(UniragError, match="no-adapter-in-retrieval"):
        training.main(args + ["--resume", "--stage2-steps", "3", "--adapter-in-retrieval"])


def test_stage1_lora_trains_retrieval_and_leaves_the_reader_alone(tiny_llm_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("UNIRAG_CACHE", str(tmp_path / "cache"))
    corpus_path, q_path = write_tiny_data(tmp_path)
    monkeypatch.setattr("unirag.docids.corpus_embeddings", lambda *a, **k: torch.randn(8, 8).numpy())
    monkeypatch.setattr(training, "query_embeddings", lambda texts, name: torch.randn(len(texts), 8).numpy())
    out = tmp_path / "ckpt"
    args = ["--corpus", str(corpus_path), "--questions", str(q_path), "--out", str(out), "--base-model",
            str(tiny_llm_dirs["llama"]), "--tree-k", "2", "--tree-c", "2", "--pathway-layers", "2",
            "--stage1-epochs", "1", "--batch-size", "4", "--validation-questions", "2", "--pseudo-queries", "1",
            "--stage1-lora", "--stage1-lora-lr", "0.05"]
    assert training.main(args) == 0
    model = JointModel.from_pretrained(out)
    assert model.lora_enabled and not model.reader_trained
    assert model.config.adapter_in_retrieval and model.config.lora["layers"] == model.pathway_layer_ids
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained (peft initialises B to zero)
    ids = model.tokenizer("Q: what about 3?\nA:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        with model.reading_mode():  # the reader is still the base LLM: adapter off, pathway off
            reading = model(ids, pathway=False, bridge=False).lm_logits
        with model.base.disable_adapter():
            base = model(ids, pathway=False, bridge=False).lm_logits
        adapted = model(ids, pathway=False, bridge=False).lm_logits
    assert torch.allclose(reading, base, atol=1e-6) and not torch.allclose(adapted, base, atol=1e-4)
    with pytest.raises(UniragError, match="--stage1-lora"):  # resuming needs the same setting
        training.main([a for a in args if a != "--stage1-lora"] + ["--resume", "--stage1-epochs", "2"])
    assert training.main(args + ["--resume", "--stage2-steps", "1", "--save-every", "1", "--stage2-docid-batch",
                                 "2", "--stage2-answer-batch", "1"]) == 0
    assert JointModel.from_pretrained(out).reader_trained  # stage 2 trains the adapter as the reader too


def test_semantic_query_vectors_match_between_cached_and_full_forward(tiny_llm_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("UNIRAG_CACHE", str(tmp_path / "cache"))
    from unirag.backbones import load_llm
    from unirag.joint.modeling import tree_prefixes

    corpus = Corpus([Passage(f"d{i}", f"T{i}", f"text {i}.") for i in range(4)], source="tiny")
    tree = DocidTree(corpus.ids, [(0, 0), (0, 1), (1, 0), (1, 1)], TreeConfig(k=2, c=2), corpus.fingerprint)
    base, tok = load_llm(str(tiny_llm_dirs["llama"]))
    model = JointModel(base, JointConfig(docid_levels=2, docid_branching=2, base_model=str(tiny_llm_dirs["llama"]),
                                         pathway_layers=2, semantic_dim=5, semantic_nodes=len(tree_prefixes(tree))),
                       tok)
    with torch.no_grad():
        for p in model.stage1_parameters():
            p.normal_(0, 0.05)
    enc = [training.encode_example(model, tok, tree, "a short one", (1, 1)),
           training.encode_example(model, tok, tree, "a much longer question text here", (0, 1))]
    ids, mask, positions, targets, allowed, node_rows = training.collate(enc, model.docid_head.out_features, 0)
    assert node_rows[0, 1].tolist().count(-1) == node_rows.shape[-1] - 2  # two children at level 1
    layer = model.pathway_layer_ids[0]
    with torch.no_grad():
        full = model(ids, attention_mask=mask, pathway=True, bridge=False)
        hidden = model.hidden_before_layer(ids, mask, layer)
        top = model(ids, attention_mask=mask, inputs_embeds=hidden, start_layer=layer, pathway=True, bridge=False)
    rows = torch.arange(2)
    assert torch.allclose(full.query_vectors[rows, positions[:, 0]], top.query_vectors[rows, positions[:, 0]],
                          atol=1e-5)
    teacher = torch.nn.functional.normalize(torch.randn(2, 5), dim=-1)
    scores, distill, query = training.semantic_terms(model, top, positions, node_rows, teacher)
    loss = training.docid_loss(top.docid_logits, positions, targets, allowed, scores)
    assert scores.shape == allowed.shape and 0 <= distill.item() <= 2 and torch.isfinite(loss)

    # The all-documents contrast is the cross-entropy of the gold leaf among every leaf's match, with the same
    # scaled cosine the search ranks by.
    documents = training.document_rows(model, tree)
    assert len(documents) == len(tree.docids)
    contrast = training.document_contrast(model, query, targets, node_rows, documents)
    matches = torch.stack([torch.stack([model.semantic_scores(tree, query[b], d[:-1], [d[-1]])[0]
                                        for d in tree.docids]) for b in range(2)])
    gold = torch.tensor([tree.docids.index((1, 1)), tree.docids.index((0, 1))])
    assert torch.allclose(contrast, torch.nn.functional.cross_entropy(matches, gold), atol=1e-5)
    contrast.backward()
    assert model.semantic.node_embed.weight.grad is not None  # (the query came from a no-grad forward)


def write_tiny_data(root):
    """An 8-passage corpus and one training question per passage (JSONL)."""
    corpus_path, q_path = root / "corpus.jsonl", root / "train.jsonl"
    corpus_path.write_text("".join(json.dumps({"id": f"d{i}", "title": f"T{i}",
                                               "text": f"Fact {i} is true. Detail {i} follows here."}) + "\n"
                                   for i in range(8)))
    q_path.write_text("".join(json.dumps({"id": f"q{i}", "question": f"what about {i}?", "answers": [str(i)],
                                          "doc_id": f"d{i}"}) + "\n" for i in range(8)))
    return corpus_path, q_path


def test_refuses_dev_split(tmp_path):
    with pytest.raises(UniragError, match="train split"):
        training.train(training.TrainConfig(corpus="../shared/data/nq/corpus.jsonl",
                                            questions="../shared/data/nq/dev.jsonl", out=str(tmp_path / "x")))


@pytest.mark.slow  # two processes with their own model loads: minutes on a shared CPU
def test_accelerate_launch_two_processes(tiny_llm_dirs, tmp_path):
    """The same training code under `accelerate launch` (2 processes; on this CPU they use gloo; `--multi_gpu` is
    what launches them, as on a GPU machine): gradients are averaged, only
    the main process writes, and both processes end with identical weights."""
    import os
    import shutil
    import subprocess
    import sys

    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    if launcher is None:
        pytest.skip("accelerate CLI not installed")
    corpus_path, q_path = write_tiny_data(tmp_path)
    out = tmp_path / "ckpt"
    env = {**os.environ, "UNIRAG_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "UNIRAG_DUMP_WEIGHTS": str(tmp_path / "rank")}
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "unirag", "train", "--corpus", str(corpus_path), "--questions",
           str(q_path), "--out", str(out), "--base-model", str(tiny_llm_dirs["llama"]), "--tree-k", "2",
           "--tree-c", "2", "--pathway-layers", "2", "--stage1-epochs", "1", "--batch-size", "2",
           "--validation-questions", "2", "--pseudo-queries", "1", "--stage2-steps", "2", "--save-every", "2",
           "--stage2-docid-batch", "2", "--stage2-answer-batch", "1"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert [(r["stage"], r.get("epoch"), r.get("step")) for r in log] == [(1, 1, None), (2, None, 2)]  # main only
    ranks = [load_file_dict(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name


def load_file_dict(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_boundary_cache_key_survives_a_checkpoint_roundtrip(setup, tmp_path):
    """Checkpoints store fp16 weights: a resumed run must still find the lower-layer cache of the first run."""
    corpus, tree, model, tok = setup
    config = training.TrainConfig(corpus="c", questions="q", out="o")
    enc = [training.encode_example(model, tok, tree, "fact 3", (1, 1))]
    model.save_pretrained(tmp_path / "ckpt")
    loaded = JointModel.from_pretrained(tmp_path / "ckpt")
    key = training.boundary_cache_key(model, tree, enc, config)
    assert training.boundary_cache_key(loaded, tree, enc, config) == key
    with torch.no_grad():
        loaded.extra_embed.weight[3] += 1.0
    assert training.boundary_cache_key(loaded, tree, enc, config) != key


def test_train_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        training.TrainConfig.from_args(["--help"])
    text = capsys.readouterr().out
    for f in fields(training.TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text
    config = training.TrainConfig.from_args(["--corpus", "c", "--questions", "q", "--out", "o", "--pathway-layers", "8",
                                             "--no-semantic-docids", "--stage1-lr", "0.01"])
    assert (config.pathway_layers, config.semantic_docids, config.stage1_lr) == (8, False, 0.01)
    # The help is field metadata (not scraped from source comments): every field has some.
    assert all(f.metadata.get("help") for f in fields(training.TrainConfig))
    legacy = training.TrainConfig.from_args(["--corpus", "c", "--questions", "q", "--out", "o", "--load-in-4bit"])
    assert legacy.precision == "nf4" and "--precision nf4" in capsys.readouterr().err
    with pytest.raises(UniragError, match="train in fp32 or nf4"):
        training._precision(training.TrainConfig(corpus="c", questions="q", out="o", precision="4bit"))


def _tiny_train_args(tiny_llm_dirs, tmp_path, monkeypatch, *extra):
    """A tiny training run's arguments (fake encoder vectors: no sentence encoder is loaded)."""
    monkeypatch.setenv("UNIRAG_CACHE", str(tmp_path / "cache"))
    corpus_path, q_path = write_tiny_data(tmp_path)
    monkeypatch.setattr("unirag.docids.corpus_embeddings",
                        lambda *a, **k: torch.randn(8, 8, generator=torch.Generator().manual_seed(1)).numpy())
    monkeypatch.setattr(training, "query_embeddings", lambda texts, name: torch.randn(
        len(texts), 8, generator=torch.Generator().manual_seed(len(texts))).numpy())
    return ["--corpus", str(corpus_path), "--questions", str(q_path), "--out", str(tmp_path / "ckpt"),
            "--base-model", str(tiny_llm_dirs["llama"]), "--tree-k", "2", "--tree-c", "2", "--pathway-layers", "2",
            "--validation-questions", "2", "--pseudo-queries", "1", *extra]


def test_training_lowers_the_loss(tiny_llm_dirs, tmp_path, monkeypatch):
    """Stage 1 and stage 2 really learn: the logged losses fall by a clear margin within a few steps."""
    args = _tiny_train_args(tiny_llm_dirs, tmp_path, monkeypatch, "--stage1-epochs", "4", "--batch-size", "2",
                            "--stage1-lr", "0.02", "--stage2-steps", "20", "--save-every", "5", "--stage2-lr", "0.01",
                            "--stage2-docid-batch", "4", "--stage2-answer-batch", "2")
    assert training.main(args) == 0
    log = [json.loads(line) for line in (tmp_path / "ckpt" / "loss_log.jsonl").read_text().splitlines()]
    stage1 = [r["loss"] for r in log if r["stage"] == 1]
    answer = [r["loss_answer"] for r in log if r["stage"] == 2]
    docid = [r["loss_docid"] for r in log if r["stage"] == 2]  # each record: the mean over its 5 steps
    assert len(stage1) == 4 and len(answer) == 4
    assert stage1[-1] < 0.6 * stage1[0], stage1  # about 5.2 → 2.0
    # Stage 2's own objective, the answer loss, falls (about 5.2 → 4.6); its docid loss is logged too.
    assert answer[-1] < answer[0] - 0.3, answer
    assert all(0 < d < 10 for d in docid), docid


def test_held_out_questions_never_reach_training(tiny_llm_dirs, tmp_path, monkeypatch):
    """The questions `held_out_split` holds out (benchmarks re-create them from trainer_state.json to choose
    settings) appear in no stage-1 example and in no stage-2 docid or answer example."""
    from unirag.data import load_corpus, load_questions

    args = _tiny_train_args(tiny_llm_dirs, tmp_path, monkeypatch, "--validation-questions", "3", "--seed", "5",
                            "--stage1-epochs", "1", "--batch-size", "4", "--stage2-steps", "3", "--save-every", "3",
                            "--stage2-docid-batch", "8", "--stage2-answer-batch", "2")
    seen_texts, answered = [], []
    encode, answer_example = training.encode_example, training._answer_example

    def spy_encode(model, tokenizer, tree, text, docid):
        seen_texts.append(text)
        return encode(model, tokenizer, tree, text, docid)

    def spy_answer(model, tokenizer, corpus, tree, question, *args):
        answered.append(question.question)
        return answer_example(model, tokenizer, corpus, tree, question, *args)

    monkeypatch.setattr(training, "encode_example", spy_encode)
    monkeypatch.setattr(training, "_answer_example", spy_answer)
    assert training.main(args) == 0
    corpus = load_corpus(tmp_path / "corpus.jsonl")
    questions = load_questions(tmp_path / "train.jsonl", corpus)
    held_out, trained = training.held_out_split(questions, 5, 3)
    assert len(held_out) == 3 and {q.id for q in held_out}.isdisjoint(q.id for q in trained)
    held = {q.question for q in held_out}
    assert seen_texts and answered
    assert held.isdisjoint(seen_texts) and held.isdisjoint(answered)
    assert {q.question for q in trained} & set(seen_texts)  # the training questions themselves are used
    state = json.loads((tmp_path / "ckpt" / "trainer_state.json").read_text())
    assert (state["config"]["seed"], state["config"]["validation_questions"]) == (5, 3)  # enough to re-create it


def test_teacher_ranking_losses_train_and_are_logged(tiny_llm_dirs, tmp_path, monkeypatch):
    """The level and document KL terms run in stage 1 and stage 2, are logged and stay finite and non-negative."""
    args = _tiny_train_args(tiny_llm_dirs, tmp_path, monkeypatch, "--stage1-epochs", "2", "--batch-size", "2",
                            "--level-distill-weight", "1", "--document-distill-weight", "1", "--stage2-steps", "2",
                            "--save-every", "2", "--stage2-docid-batch", "2", "--stage2-answer-batch", "1")
    assert training.main(args) == 0
    log = [json.loads(line) for line in (tmp_path / "ckpt" / "loss_log.jsonl").read_text().splitlines()]
    stage1 = [r for r in log if r["stage"] == 1]
    assert len(stage1) == 2 and all(r["level_kl"] >= 0 and r["document_kl"] >= 0 for r in stage1)
    assert all(r["examples"] > 0 and r["minutes"] >= 0 for r in stage1)


def test_answer_target_is_the_documents_own_span():
    """The answer target is a gold as the passage writes it (its casing), at word boundaries, golds in order."""
    texts = ["The Treaty of Paris was signed in 1783.", "Paris is the capital of France."]
    assert training.answer_target(["treaty of paris"], texts) == "Treaty of Paris"
    assert training.answer_target(["aris", "France"], texts) == "France"  # "aris" is inside a word: not a span
    assert training.answer_target(["London"], texts) == "London"  # no span: the gold as given
    assert training.answer_target(["", "1783"], texts) == "1783"


def test_answer_documents_put_the_gold_passage_in_place():
    import random

    rng = random.Random(0)
    assert training.answer_documents(["a", "b", "c"], "g", 2, with_gold=False, rng=rng) == ["a", "b"]
    assert training.answer_documents(["a", "g", "c"], "g", 2, with_gold=True, rng=rng) == ["a", "g"]
    with_gold = training.answer_documents(["a", "b", "c"], "g", 2, with_gold=True, rng=rng)
    assert len(with_gold) == 2 and "g" in with_gold and set(with_gold) - {"g"} <= {"a", "b"}
    assert training.answer_documents(["a"], "g", 2, with_gold=True, rng=rng) in (["g", "a"], ["a", "g"])
    assert training.answer_documents(["a", "b"], None, 2, with_gold=True, rng=rng) == ["a", "b"]
    positions = {training.answer_documents(["a", "b"], "g", 2, True, random.Random(s)).index("g") for s in range(20)}
    assert positions == {0, 1}  # the gold's position carries no signal


def test_stage2_keeps_the_best_reader_by_held_out_f1(tiny_llm_dirs, tmp_path, monkeypatch):
    """With --stage2-select-every, each selection step logs held-out reader scores and `<out>.best` holds the
    checkpoint of the best F1 (its state names the step)."""
    args = _tiny_train_args(tiny_llm_dirs, tmp_path, monkeypatch, "--stage1-epochs", "1", "--batch-size", "4",
                            "--stage2-steps", "4", "--save-every", "2", "--stage2-select-every", "2",
                            "--stage2-docid-batch", "2", "--stage2-answer-batch", "1", "--stage2-gold-rate", "1")
    f1s = iter([0.2, 0.1])
    monkeypatch.setattr(training, "reader_scores",
                        lambda *a, **k: {"em": 0.0, "f1": next(f1s), "contains": 0.0, "n": 2})
    assert training.main(args) == 0
    log = [json.loads(line) for line in (tmp_path / "ckpt" / "loss_log.jsonl").read_text().splitlines()]
    assert [r["valid_reader"]["f1"] for r in log if r["stage"] == 2] == [0.2, 0.1]
    best = json.loads((tmp_path / "ckpt.best" / "trainer_state.json").read_text())
    assert best["best_reader_step"] == 2 and best["best_reader_f1"] == 0.2
    assert (tmp_path / "ckpt.best" / "joint_weights.safetensors").is_file()
    final = json.loads((tmp_path / "ckpt" / "trainer_state.json").read_text())
    assert final["step"] == 4 and final["best_reader_step"] == 2


def test_reader_scores_read_the_gold_passage(tiny_llm_dirs, tmp_path, monkeypatch):
    """reader_scores asks the reader with each question's gold passage and averages EM / F1 / contains."""
    from unirag.data import Passage, Question

    calls = []

    def fake_answer(model, tokenizer, question, passages, **kwargs):
        calls.append((question, [p[0] for p in passages]))
        return type("G", (), {"text": "Paris" if question == "q1" else "no idea"})()

    monkeypatch.setattr("unirag.joint.reader.answer_with_docs", fake_answer)
    corpus = {"d1": Passage("d1", "T1", "Paris text"), "d2": Passage("d2", "T2", "other")}
    model = type("M", (), {"eval": lambda self: None})()
    questions = [Question("1", "q1", ("Paris",), "d1"), Question("2", "q2", ("Rome",), "d2"),
                 Question("3", "q3", (), "d1")]
    scores = training.reader_scores(model, None, corpus, questions)
    assert calls == [("q1", ["d1"]), ("q2", ["d2"])]  # an unanswerable question is not asked
    assert scores == {"em": 0.5, "f1": 0.5, "contains": 0.5, "n": 2}
