"""The precisions' weights (unirag.quantization) on tiny random models: fast, offline."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from unirag.backbones import load_llm
from unirag.errors import UniragError
from unirag.quantization import HQQ_GROUP_SIZE, dense_weight, pack_for_cpu, quantize_hqq, weight_format
from unirag.settings import precision_from_flags

pytest.importorskip("hqq")


def _on_q4_1_grid(weight: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Random weights as GGUF Q4_1 stores them: per 32 consecutive inputs a minimum and a scale, 16 levels."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = weight.shape
    blocks = weight.new_empty(rows, cols // 32, 1)
    minimum = -0.1 - 0.1 * torch.rand(blocks.shape, generator=gen)
    scale = (0.01 + 0.02 * torch.rand(blocks.shape, generator=gen)).half().float()
    levels = torch.randint(0, 16, (rows, cols // 32, 32), generator=gen).float()
    levels[..., 0], levels[..., 1] = 0, 15  # each block spans its whole range, as Q4_1's min/max do
    return (minimum.half().float() + scale * levels).reshape(rows, cols)


def _tiny_on_grid(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for i, module in enumerate(m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)):
            module.weight.copy_(_on_q4_1_grid(module.weight, seed=i))
    return model


def test_hqq_holds_weights_that_are_already_on_a_4bit_group_grid(tiny_llm_dirs):
    """The reason "4bit" is HQQ with groups of 32: a GGUF Q4_1 weight comes back (almost) exactly; NF4 re-rounds it."""
    import bitsandbytes.functional as bnbf

    model = _tiny_on_grid(tiny_llm_dirs["llama"])
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.startswith("model.layers")}
    ids = torch.tensor([[1, 5, 7, 9, 11, 3]])
    with torch.no_grad():
        expected = model(ids).logits
    quantize_hqq(model)
    assert weight_format(model) == f"hqq4-g{HQQ_GROUP_SIZE}"
    hqq_error, nf4_error = 0.0, 0.0
    for name, weight in originals.items():
        hqq_error = max(hqq_error, (dense_weight(model.get_submodule(name)) - weight).abs().mean().item())
        packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", blocksize=64)
        nf4_error = max(nf4_error, (bnbf.dequantize_4bit(packed, state) - weight).abs().mean().item())
    assert hqq_error < 1e-3 * nf4_error
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-3, rtol=0)


def test_the_cpu_int4_kernel_multiplies_by_the_same_4bit_weights(tiny_llm_dirs):
    """pack_for_cpu keeps HQQ's integers, scales and zeros: the weight it multiplies by is HQQ's up to bfloat16
    scales, and the logits stay those of HQQ's own forward up to bfloat16 activations."""
    model = _tiny_on_grid(tiny_llm_dirs["llama"])
    quantize_hqq(model)
    names = [n for n, m in model.named_modules() if type(m).__name__ == "HQQLinear"]
    hqq_weights = {n: dense_weight(model.get_submodule(n)) for n in names}
    ids = torch.tensor([[1, 5, 7, 9, 11, 3], [2, 4, 6, 8, 10, 12]])
    with torch.no_grad():
        expected = model(ids).logits
    pack_for_cpu(model)
    assert weight_format(model) == "hqq4-g32-cpu-int4"
    assert {type(model.get_submodule(n)).__name__ for n in names} == {"CPUInt4HQQLinear"}
    for name, weight in hqq_weights.items():
        packed = dense_weight(model.get_submodule(name))
        assert packed.shape == weight.shape
        assert ((packed - weight).abs().max() / weight.abs().max()).item() < 1e-2  # bfloat16 scales
    with torch.no_grad():
        logits = model(ids).logits
    assert ((logits - expected).abs().max() / expected.abs().max()).item() < 2e-2
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


def test_load_llm_precisions_and_the_joint_model_on_the_recovered_base(tiny_llm_dirs):
    from unirag.joint.config import JointConfig
    from unirag.joint.modeling import JointModel

    path = str(tiny_llm_dirs["llama"])
    base, tok = load_llm(path, precision="4bit")
    assert weight_format(base) == "hqq4-g32-cpu-int4"  # on a CPU, HQQ's layers run in PyTorch's int4 kernel
    assert weight_format(load_llm(path, precision="fp32")[0]) == "float32"
    assert weight_format(load_llm(path, precision="nf4")[0]) == "nf4"
    ids = torch.tensor([tok("Q: what is x?\n")["input_ids"]])
    with torch.no_grad():
        expected = base(ids).logits
    model = JointModel(base, JointConfig(base_model=path, docid_levels=2, docid_branching=4, pathway_layers=2,
                                         retrieval_heads=3, retrieval_mlp_dim=32, bridge_heads=4), tokenizer=tok)
    with torch.no_grad():  # with the pathway off it is exactly the 4-bit base
        torch.testing.assert_close(model(ids, pathway=False, bridge=False).lm_logits, expected, atol=1e-5, rtol=0)
    model.enable_lora(r=4, alpha=8)
    assert any(type(m).__name__ == "HqqLoraLinear" for m in model.base.modules())  # peft wraps the HQQ layers
    out = model(torch.cat([ids, torch.tensor([[model.retrieve_token_id]])], dim=1), pathway=True, bridge=True)
    assert torch.isfinite(out.lm_logits).all()


def test_precision_flags():
    assert precision_from_flags(False) == "fp32"
    assert precision_from_flags(True) == "4bit"
    assert precision_from_flags(True, no_recovery=True) == "nf4"
    with pytest.raises(UniragError, match="--no-recovery"):
        precision_from_flags(False, no_recovery=True)


def test_one_precision_flag_for_every_command(capsys):
    import argparse

    from unirag.cli import add_precision_flags, precision_of

    parser = argparse.ArgumentParser()
    add_precision_flags(parser)
    assert precision_of(parser.parse_args([])) == "fp32"
    assert precision_of(parser.parse_args(["--precision", "4-bit"])) == "4bit"  # the app's spellings
    assert precision_of(parser.parse_args(["--precision", "nf4"])) == "nf4"
    # The older flags still mean what they meant, with a note naming the new spelling.
    assert precision_of(parser.parse_args(["--load-in-4bit", "--no-recovery"])) == "nf4"
    assert "--precision nf4" in capsys.readouterr().err
    with pytest.raises(UniragError, match="contradicts"):
        precision_of(parser.parse_args(["--precision", "fp32", "--load-in-4bit"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--precision", "int8"])
    assert "--load-in-4bit" not in parser.format_help()
