"""Shared pytest fixtures: tiny offline models and tokenizers (never downloads anything)."""

from __future__ import annotations

import json
import string
import sys
from pathlib import Path

import numpy as np
import pytest

# The repo root on sys.path, whatever the working directory: tests import `benchmarks` helpers too.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer(chat_template: bool = True):
    """A character-level fast tokenizer (~110 ids) with offsets, built offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<|im_end|>", "<|im_start|>"]
    chars = list(string.ascii_letters + string.digits + string.punctuation + " \n")
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_llm(path: Path, kind: str = "llama", vocab_size: int = 200, num_layers: int = 3, seed: int = 0,
                   hidden_size: int = 64, chat_template: bool = True) -> Path:
    """Save a tiny random Llama/Qwen2/Qwen3 CausalLM and the tiny tokenizer to `path`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    common = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "bos_token_id": 3,
    }
    if kind == "llama":
        config = LlamaConfig(**common)
    elif kind == "qwen2":
        config = Qwen2Config(**common)
    elif kind == "qwen3":
        config = Qwen3Config(head_dim=hidden_size // 4, **common)
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    build_tiny_tokenizer(chat_template).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llm_dirs(tmp_path_factory) -> dict[str, Path]:
    """{"llama", "qwen2", "qwen3", "llama4" (4 layers, other weights), "nochat" (no chat template)} → folders."""
    root = tmp_path_factory.mktemp("tiny_llms")
    return {
        "llama": build_tiny_llm(root / "llama", "llama"),
        "qwen2": build_tiny_llm(root / "qwen2", "qwen2", seed=1),
        "qwen3": build_tiny_llm(root / "qwen3", "qwen3", seed=2),
        "llama4": build_tiny_llm(root / "llama4", "llama", num_layers=4, seed=3),
        "nochat": build_tiny_llm(root / "nochat", "llama", chat_template=False, seed=4),
    }


class BagOfWordsEncoder:
    """Deterministic stand-in encoder: hashed bag of words, L2-normalised."""

    name = "bow"

    def _enc(self, texts):
        out = np.zeros((len(texts), 64), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.lower().replace(".", " ").replace("?", " ").split():
                out[i, sum(map(ord, word)) % 64] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)

    encode_queries = encode_passages = _enc


KEYWORD_TEXTS = ["city facts", "river facts", "zanzibar cloves", "mountain facts"]


def write_keyword_files(root: Path, question: str, answers: list[str]) -> tuple[Path, Path, Path]:
    """A four-passage corpus (d2 holds the keywords) and one question about d2, as JSONL files under `root`."""
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "title": f"T{i}", "text": text}) + "\n"
                              for i, text in enumerate(KEYWORD_TEXTS)))
    questions = root / "q.jsonl"
    questions.write_text(json.dumps({"id": "q1", "question": question, "answers": answers, "doc_id": "d2"}) + "\n")
    return root, corpus, questions
