"""Size of a joint checkpoint on a large base, counted without downloading it.

Builds the base from its layer shapes alone (uninitialised memory; the default shapes are
Qwen3-4B-Instruct-2507's: hidden 2560, MLP 9728, 36 layers, 32 query / 8 KV heads of 128), wraps it in the
joint model with the given preset, adds the LoRA adapter, and counts what a checkpoint stores: the joint
weights and the adapter, at 2 bytes a parameter (float16 storage; safetensors headers add kilobytes).
The vocabulary is cut to 1,000 tokens: the checkpoint never stores the base's embeddings.

    python -m benchmarks.checkpoint_size --pathway-layers 2 --retrieval-mlp-dim 256 --bridge-dim 256 \\
        --lora-r 8 --lora-layers 8
"""

from __future__ import annotations

import argparse
import json

BUDGET_MB = 50.0  # issue 3: at most 50 MB per checkpoint


def build_base(model_type: str, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
               head_dim: int):
    """A causal LM with these shapes and uninitialised weights (nothing is computed with it)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=1000,
        tie_word_embeddings=True, torch_dtype="bfloat16")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    with torch.no_grad():  # finite values: the joint model's initialisation reads the embedding's spread
        model.get_input_embeddings().weight.normal_()
    return model


def count(args: argparse.Namespace) -> dict:
    from unirag.joint.config import JointConfig
    from unirag.joint.modeling import JointModel

    base = build_base(args.model_type, args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads,
                      args.head_dim)
    config = JointConfig(
        docid_levels=args.docid_levels, docid_branching=args.docid_branching, pathway_layers=args.pathway_layers,
        retrieval_heads=args.retrieval_heads, retrieval_mlp_dim=args.retrieval_mlp_dim, bridge_dim=args.bridge_dim,
        semantic_dim=args.semantic_dim, semantic_nodes=args.semantic_nodes)
    model = JointModel(base, config)
    groups: dict[str, int] = {}
    for name, param in model.joint_named_parameters():
        group = name.split(".", 1)[0]
        groups[group] = groups.get(group, 0) + param.numel()
    layers = None if args.lora_layers == 0 else list(range(args.layers - args.lora_layers, args.layers))
    model.enable_lora(r=args.lora_r, alpha=2 * args.lora_r, layers=layers)
    lora = sum(p.numel() for n, p in model.base.named_parameters() if "lora_" in n)
    joint = sum(groups.values())
    total_mb = 2 * (joint + lora) / 1e6
    return {
        "joint_params": joint, "by_module": groups, "lora_params": lora, "float16_mb": round(total_mb, 1),
        "within_budget": total_mb <= BUDGET_MB, "budget_mb": BUDGET_MB,
        "preset": {k: getattr(args, k) for k in ("pathway_layers", "retrieval_mlp_dim", "bridge_dim", "lora_r",
                                                 "lora_layers")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shape = parser.add_argument_group("base shapes (default: Qwen3-4B-Instruct-2507)")
    shape.add_argument("--model-type", default="qwen3", choices=["qwen3", "qwen2", "llama"])
    shape.add_argument("--hidden", type=int, default=2560)
    shape.add_argument("--intermediate", type=int, default=9728)
    shape.add_argument("--layers", type=int, default=36)
    shape.add_argument("--heads", type=int, default=32)
    shape.add_argument("--kv-heads", type=int, default=8)
    shape.add_argument("--head-dim", type=int, default=128)
    preset = parser.add_argument_group("joint preset (the `train` flags of the same names)")
    preset.add_argument("--pathway-layers", type=int, default=8)
    preset.add_argument("--retrieval-heads", type=int, default=4)
    preset.add_argument("--retrieval-mlp-dim", type=int, default=512)
    preset.add_argument("--bridge-dim", type=int, default=0)
    preset.add_argument("--lora-r", type=int, default=16)
    preset.add_argument("--lora-layers", type=int, default=8, help="top N layers (0: all)")
    tree = parser.add_argument_group("docid tree (nq: 2,600 passages, k = c = 10)")
    tree.add_argument("--docid-levels", type=int, default=5)
    tree.add_argument("--docid-branching", type=int, default=10)
    tree.add_argument("--semantic-dim", type=int, default=384, help="the docid encoder's width (MiniLM: 384)")
    tree.add_argument("--semantic-nodes", type=int, default=3720, help="tree nodes (every docid prefix; nq: 3,720)")
    args = parser.parse_args(argv)
    if not 0 <= args.lora_layers <= args.layers:
        parser.error(f"--lora-layers must be between 0 and --layers ({args.layers})")
    print(json.dumps(count(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
