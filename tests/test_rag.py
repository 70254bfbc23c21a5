import numpy as np
import pytest
from conftest import BagOfWordsEncoder

from unirag.backbones import load_llm
from unirag.data import Corpus, Passage
from unirag.errors import UniragError
from unirag.rag import (
    DenseRetriever,
    GoldPassageSystem,
    NoRagSystem,
    RagSystem,
    Reader,
    build_prompt,
    clean_generation,
)
from unirag.settings import InferenceSettings


@pytest.fixture()
def corpus():
    return Corpus(
        [
            Passage("p0", "Paris", "Paris is the capital of France."),
            Passage("p1", "Rome", "Rome is the capital of Italy."),
            Passage("p2", "Oslo", "Oslo is the capital of Norway."),
        ],
        source="tiny",
    )


@pytest.fixture()
def retriever(corpus):
    encoder = BagOfWordsEncoder()
    return DenseRetriever(corpus, encoder, encoder.encode_passages([p.text for p in corpus]))


def test_dense_retrieval_ranks_by_inner_product(retriever):
    hits = retriever.search("capital of Italy Rome", 2)
    assert hits[0][0] == "p1" and hits[0][1] > hits[1][1]
    assert len(retriever.search("x", 10)) == 3  # k larger than the corpus
    with pytest.raises(UniragError):
        retriever.search("x", 0)


def test_retriever_refuses_mismatched_embeddings(corpus):
    with pytest.raises(UniragError, match="rebuild"):
        DenseRetriever(corpus, BagOfWordsEncoder(), np.zeros((2, 64), dtype=np.float32))


def test_embeddings_of_another_width_are_one_clear_error_not_a_faiss_assert(corpus):
    """A cached index 67 wide beside a 64-wide encoder: refused at build when the encoder says its width, at the
    first search when it does not (faiss itself only asserts)."""
    wide = np.ones((3, 67), dtype=np.float32)

    class Sized(BagOfWordsEncoder):
        dim = 64

    with pytest.raises(UniragError, match="67 wide but the encoder bow gives 64"):
        DenseRetriever(corpus, Sized(), wide)
    with pytest.raises(UniragError, match="64-wide queries but the passage embeddings are 67 wide"):
        DenseRetriever(corpus, BagOfWordsEncoder(), wide).search("capital of Italy", 2)


def test_prompt_uses_chat_template_when_present(tiny_llm_dirs):
    model, tok = load_llm(str(tiny_llm_dirs["llama"]))
    prompt = build_prompt(tok, "who?", "ctx")
    assert prompt.startswith("<|im_start|>user\nQ: who?\nctx\nA:") and prompt.endswith("assistant\n")
    _, plain = load_llm(str(tiny_llm_dirs["nochat"]))
    assert build_prompt(plain, "who?", "") == "Q: who?\nA:"
    assert clean_generation("\n  Paris \nmore") == "Paris"


def test_short_reader_prompt_puts_the_instruction_and_one_worked_example_first(tiny_llm_dirs):
    from unirag.rag import SHORT_ANSWER_EXAMPLE, SHORT_ANSWER_INSTRUCTION

    _, tok = load_llm(str(tiny_llm_dirs["llama"]))
    prompt = build_prompt(tok, "who?", "ctx", reader_prompt="short")
    example_q, example_ctx, example_answer = SHORT_ANSWER_EXAMPLE
    order = [prompt.index(piece) for piece in (SHORT_ANSWER_INSTRUCTION, f"Q: {example_q}\n{example_ctx}\nA:",
                                               example_answer + "<|im_end|>", "Q: who?\nctx\nA:")]
    assert order == sorted(order) and prompt.endswith("assistant\n")
    _, plain = load_llm(str(tiny_llm_dirs["nochat"]))
    text = build_prompt(plain, "who?", "ctx", reader_prompt="short")
    assert text.startswith(SHORT_ANSWER_INSTRUCTION) and text.endswith("Q: who?\nctx\nA:")
    assert f"\nA: {example_answer}\n\n" in text
    with pytest.raises(UniragError, match="reader_prompt"):
        build_prompt(tok, "who?", "ctx", reader_prompt="chatty")
    with pytest.raises(UniragError, match="reader_prompt"):
        InferenceSettings(reader_prompt="chatty")


def test_rag_and_norag_answers_record_everything(tiny_llm_dirs, retriever):
    model, tok = load_llm(str(tiny_llm_dirs["llama"]))
    reader = Reader(model, tok)
    reader.stop_ids = [199]  # a random model may emit EOS at once; only a never-sampled id stops it
    rag = RagSystem(retriever, reader)
    k2 = InferenceSettings(rag_k=2, max_new_tokens=5)
    answer = rag.answer("capital of Italy?", k2, with_attention=True)
    assert answer.doc_ids[0] == "p1" and len(answer.docs) == 2
    assert answer.context_tokens == len(tok("\n".join(f"{d.title}: {d.text}" for d in answer.docs))["input_ids"])
    assert answer.prompt_tokens > answer.context_tokens and 0 < answer.answer_tokens <= 5
    assert set(answer.timings_ms) == {"retrieve", "generate"}
    att = answer.trace.answer_attention
    assert len(att.weights) == answer.answer_tokens and len(att.weights[0]) == len(att.context_tokens)
    assert np.allclose(np.sum(att.weights, axis=1), 1.0, atol=1e-4)
    (gold,) = GoldPassageSystem(reader, retriever.corpus).answer_many(["anything"], ["p2"], k2)
    assert gold.doc_ids == ["p2"] and gold.ranking == ["p2"]
    # Reading one document still ranks three (R@3); the one read is the ranking's first.
    one = rag.answer("capital of Italy?", k2.replace(rag_k=1))
    assert one.doc_ids == ["p1"] and one.ranking[0] == "p1" and sorted(one.ranking) == ["p0", "p1", "p2"]
    assert len(answer.ranking) == 3 and answer.ranking[:2] == answer.doc_ids  # k=2: the ranking is longer
    assert rag.answer("capital of Italy?", k2.replace(rag_k=3)).ranked_doc_ids == []  # k=3: read = ranking
    with pytest.raises(UniragError, match="rag_k must be between 1 and 10"):
        rag.answer_many(["x"], k2.replace(rag_k=-1))
    # batched answers equal single ones (left padding must not change greedy outputs)
    many = rag.answer_many(["capital of Italy?", "Norway capital city, please?"], k2)
    assert many[0].text == rag.answer("capital of Italy?", k2).text
    norag = NoRagSystem(reader).answer("who?")
    assert norag.docs == [] and norag.context_tokens == 0


def test_bad_questions_are_handled(tiny_llm_dirs, retriever):
    model, tok = load_llm(str(tiny_llm_dirs["llama"]))
    rag = RagSystem(retriever, Reader(model, tok))
    one = InferenceSettings(rag_k=1, max_new_tokens=3)
    with pytest.raises(UniragError, match="empty"):
        rag.answer("   ", one)
    long = rag.answer("capital " * 3000, one)
    assert long.notices and "truncated" in long.notices[0]
    odd = rag.answer("Où est Rome ? 🇮🇹", one)  # non-ASCII and an emoji: answered as is, nothing to notice
    assert odd.question == "Où est Rome ? 🇮🇹" and odd.notices == [] and len(odd.docs) == 1
    assert isinstance(odd.text, str) and odd.answer_tokens <= 3


def test_answer_attention_is_recorded_during_generation(tiny_llm_dirs, corpus):
    """Row i = the last 4 layers' attention (mean over heads) of the query that produced answer token i,
    renormalised over the context: checked against one full forward pass, also for a left-padded batch."""
    import torch

    model, tok = load_llm(str(tiny_llm_dirs["llama"]))
    reader = Reader(model, tok)
    reader.stop_ids = [199]
    passages = [[corpus["p1"], corpus["p0"]], [corpus["p2"]]]
    outs = reader.read_many(["capital of Italy?", "Norway?"], passages, 4, with_attention=True)
    single = reader.read("Norway?", [corpus["p2"]], 4, with_attention=True)
    assert np.allclose(outs[1].attention["weights"], single.attention["weights"], atol=1e-4)

    prompt = build_prompt(tok, "capital of Italy?", "\n".join(p.as_context() for p in passages[0]))
    prompt_ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    answer_ids = tok.convert_tokens_to_ids(outs[0].attention["answer_tokens"])
    with torch.inference_mode():
        full = model(input_ids=torch.cat([prompt_ids, torch.tensor(answer_ids)])[None], output_attentions=True)
    start, end = reader.context_span(prompt, "\n".join(p.as_context() for p in passages[0]))
    n = len(prompt_ids)
    mean = torch.stack([a[0].float() for a in full.attentions[-4:]]).mean(dim=(0, 1))
    expected = mean[n - 1 : n - 1 + len(answer_ids)]
    expected = expected[:, start:end] / expected[:, start:end].sum(-1, keepdim=True)
    assert len(outs[0].attention["context_tokens"]) == end - start
    assert np.allclose(outs[0].attention["weights"], expected.numpy(), atol=1e-4)
    assert reader.read("x?", [corpus["p0"]]).attention == {}  # not asked for: no hooks, no trace
