"""The weights each precision loads: "fp32", "4bit" (the recovered 4-bit, HQQ) or "nf4" (bitsandbytes, no recovery).

Why "4bit" is not NF4: the embedded SmolLM2 ships as GGUF Q4_1, so every linear weight already sits on an asymmetric
4-bit grid, one scale and one minimum per 32 consecutive input weights. NF4 re-rounds those values onto its own
symmetric 64-weight codebook and the two rounding errors stack (docs/RESULTS.md, "4-bit recovery"). HQQ with 4 bits,
groups of 32 along the input dimension and a zero point can hold that same grid, so the Q4_1 weights come back
almost exactly, with no adapter and no calibration data. For any other model it is a calibration-free 4-bit
quantiser with smaller groups than NF4. Both are maintained libraries' own functions; nothing here rounds a weight.
"""

from __future__ import annotations

import torch
from torch import nn

from unirag.errors import MissingDependencyError

HQQ_BITS = 4
HQQ_GROUP_SIZE = 32  # GGUF Q4_0/Q4_1 block size: one HQQ group per GGUF block


def bitsandbytes_config(dtype: torch.dtype = torch.float32):
    """NF4 as the project loaded it before the recovery (`--no-recovery`): blocks of 64, fp32 compute."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def quantize_hqq(model: nn.Module, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 group_size: int = HQQ_GROUP_SIZE) -> nn.Module:
    """Replace the decoder's linear layers by HQQ 4-bit layers, in place (the tied lm_head and the embeddings
    stay as they are). peft wraps the result with its own HQQ LoRA layer."""
    try:
        from hqq.core.quantize import BaseQuantizeConfig
        from hqq.models.hf.base import AutoHQQHFModel
    except ImportError:
        raise MissingDependencyError(
            "The recovered 4-bit weights need the package `hqq`: `pip install hqq` (or run `make app`), or load "
            "with --no-recovery (bitsandbytes NF4) or --precision fp32."
        ) from None
    config = BaseQuantizeConfig(nbits=HQQ_BITS, group_size=group_size, axis=1)
    AutoHQQHFModel.quantize_model(model, quant_config=config, compute_dtype=dtype, device=device)
    return model


def weight_format(model: nn.Module) -> str:
    """What the model's decoder weights are: "nf4", "int8", "hqq4-g<group>" or the float dtype (cache keys)."""
    if getattr(model, "is_loaded_in_4bit", False):
        return "nf4"
    if getattr(model, "is_loaded_in_8bit", False):
        return "int8"
    for module in model.modules():
        if type(module).__name__ == "HQQLinear":
            return f"hqq{HQQ_BITS}-g{int(module.meta['group_size'])}"
    return str(next(model.parameters()).dtype).replace("torch.", "")


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """The float weight of a linear layer, also when it is peft-wrapped, bitsandbytes 4-bit or HQQ."""
    linear = getattr(linear, "base_layer", linear)
    if type(linear).__name__ == "HQQLinear":
        return linear.dequantize().detach()
    weight = linear.weight
    if type(weight).__name__ == "Params4bit":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state).detach()
    return weight.detach()


__all__ = ["HQQ_GROUP_SIZE", "bitsandbytes_config", "dense_weight", "quantize_hqq", "weight_format"]
