"""Size of the self-check passage cache, from the tokenizer and the model's shapes (no weights, nothing built).

The cache stores, for every passage, its self-check prompt's keys and values in every decoder layer (float16)
plus the last hidden state (float32), so it grows linearly with the corpus:

    bytes = tokens × layers × 2 (K, V) × kv_heads × head_dim × 2  +  passages × hidden × 4

Prints one JSON line per corpus with the measured tokens per passage, the size per passage and for the corpus,
and the same per-passage size carried to 100k and 1M passages.

    python -m benchmarks.passage_cache_size --dataset nq squad [--llm HUB_ID_OR_FOLDER]
"""

from __future__ import annotations

import argparse
import json

SCALES = (100_000, 1_000_000)


def cache_bytes(config, tokens: int, passages: int, kv_bytes: int = 2) -> int:
    """Bytes of a cache of `tokens` prompt tokens over `passages` passages for a model of this config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_token = config.num_hidden_layers * 2 * kv_heads * head_dim * kv_bytes
    return tokens * per_token + passages * config.hidden_size * 4


def measure(dataset: str, llm: str | None) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    from unirag.backbones import resolve_llm_path
    from unirag.data import dataset_paths, load_corpus
    from unirag.joint.prompts import self_check_prompt_ids

    path = resolve_llm_path(llm)
    config, tokenizer = AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    corpus = load_corpus(dataset_paths(dataset, "dev")[0])
    tokens = sum(len(self_check_prompt_ids(tokenizer, p.title, p.text)) for p in corpus)
    total = cache_bytes(config, tokens, len(corpus))
    per_passage = total / len(corpus)
    return {
        "dataset": dataset, "llm": llm or "embedded SmolLM2-135M-Instruct", "passages": len(corpus),
        "tokens_per_passage": round(tokens / len(corpus), 1), "mb_per_passage": round(per_passage / 2**20, 3),
        "corpus_gb": round(total / 2**30, 2),
        **{f"gb_at_{n // 1000}k": round(per_passage * n / 2**30, 1) for n in SCALES},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", nargs="+", default=["nq", "squad"], choices=["nq", "squad"])
    parser.add_argument("--llm", default=None, help="hub id or folder (default: the embedded SmolLM2)")
    args = parser.parse_args(argv)
    for dataset in args.dataset:
        print(json.dumps(measure(dataset, args.llm)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
