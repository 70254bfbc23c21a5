"""The weights each precision loads: "fp32", "4bit" (the recovered 4-bit, HQQ) or "nf4" (bitsandbytes, no recovery).

Why "4bit" is not NF4: the embedded SmolLM2 ships as GGUF Q4_1, so every linear weight already sits on an asymmetric
4-bit grid, one scale and one minimum per 32 consecutive input weights. NF4 re-rounds those values onto its own
symmetric 64-weight codebook and the two rounding errors stack (docs/RESULTS.md, "4-bit recovery"). HQQ with 4 bits,
groups of 32 along the input dimension and a zero point can hold that same grid, so the Q4_1 weights come back
almost exactly, with no adapter and no calibration data. For any other model it is a calibration-free 4-bit
quantiser with smaller groups than NF4. Both are maintained libraries' own functions; nothing here rounds a weight.

On a CPU, HQQ's own forward dequantises every weight in PyTorch at every call, slower than NF4. `pack_for_cpu`
moves the same integers, scales and zeros into PyTorch's int4 CPU matmul kernel (the one torchao's retired
`Int4CPULayout` used), which takes bfloat16 activations: the 4-bit grid is unchanged; scales, zeros and the
activations entering each projection are rounded to bfloat16.
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


def _hqq_linear_class():
    from hqq.core.quantize import HQQLinear

    return HQQLinear


def pack_for_cpu(model: nn.Module) -> nn.Module:
    """Turn every HQQ 4-bit layer (axis 1, zero point, groups of 32/64/128/256) into a `CPUInt4HQQLinear`, in place.
    Layers the kernel cannot take stay HQQ's."""
    for module in model.modules():
        if isinstance(module, _hqq_linear_class()) and not isinstance(module, _cpu_int4_class()):
            meta = module.meta
            if meta["nbits"] == HQQ_BITS and meta["axis"] == 1 and int(meta["group_size"]) in (32, 64, 128, 256):
                _cpu_int4_class().convert(module)
    return model


_CPU_INT4_CLASS = None


def _cpu_int4_class():
    """`CPUInt4HQQLinear`, defined on first use so that importing this module does not need `hqq`."""
    global _CPU_INT4_CLASS
    if _CPU_INT4_CLASS is not None:
        return _CPU_INT4_CLASS

    class CPUInt4HQQLinear(_hqq_linear_class()):
        """An HQQ layer whose matmul runs in PyTorch's int4 CPU kernel. It stays an `HQQLinear`, so peft still
        wraps it with its HQQ LoRA layer."""

        @classmethod
        def convert(cls, layer) -> None:
            meta = layer.meta
            out_features, in_features = meta["shape"]
            group = int(meta["group_size"])
            weight = layer.dequantize()  # only to check the integers below reproduce it
            codes = layer.unpack(dtype=torch.uint8).view(out_features, in_features).to(torch.int32)
            scale = meta["scale"].view(out_features, in_features // group)
            zero = meta["zero"].view(out_features, in_features // group)
            # HQQ: w = (q - zero) * scale; the kernel: w = (q - 8) * scale + offset, so offset = (8 - zero) * scale
            scale_and_offset = torch.stack([scale, (8 - zero) * scale], dim=-1).transpose(0, 1).contiguous()
            layer.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            layer.W_q = None
            layer.register_buffer("scale_and_offset", scale_and_offset.to(torch.bfloat16))
            layer.group = group
            layer.__class__ = cls
            error = (layer.dequantize().float() - weight).abs().max() / weight.abs().max().clamp_min(1e-12)
            if error > 1e-2:  # bfloat16 scales: about 4e-3 at most
                raise RuntimeError(f"int4 CPU packing does not reproduce the HQQ weight (relative error {error:.3g})")
            layer.W_q = nn.Parameter(layer.packed, requires_grad=False)  # peft reads the device off `W_q`
            layer.meta = {key: meta[key] for key in ("nbits", "group_size", "axis", "shape", "packing")}

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scale_and_offset)
            out = out.to(x.dtype).reshape(*x.shape[:-1], out.shape[-1])
            return out + self.bias if self.bias is not None else out

        def dequantize(self) -> torch.Tensor:
            # the kernel applied to the identity: exactly the weight `forward` multiplies by
            identity = torch.eye(self.packed.shape[1] * 2, dtype=torch.bfloat16)
            return torch.ops.aten._weight_int4pack_mm_for_cpu(
                identity, self.packed, self.group, self.scale_and_offset).t().float()

    _CPU_INT4_CLASS = CPUInt4HQQLinear
    return _CPU_INT4_CLASS


def weight_format(model: nn.Module) -> str:
    """What the model's decoder weights are: "nf4", "int8", "hqq4-g<group>" or the float dtype (cache keys)."""
    if getattr(model, "is_loaded_in_4bit", False):
        return "nf4"
    if getattr(model, "is_loaded_in_8bit", False):
        return "int8"
    for module in model.modules():
        if type(module).__name__ == "CPUInt4HQQLinear":
            return f"hqq{HQQ_BITS}-g{int(module.meta['group_size'])}-cpu-int4"
        if type(module).__name__ == "HQQLinear":
            return f"hqq{HQQ_BITS}-g{int(module.meta['group_size'])}"
    return str(next(model.parameters()).dtype).replace("torch.", "")


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """The float weight of a linear layer, also when it is peft-wrapped, bitsandbytes 4-bit or HQQ."""
    linear = getattr(linear, "base_layer", linear)
    if type(linear).__name__ in ("HQQLinear", "CPUInt4HQQLinear"):
        return linear.dequantize().detach()
    weight = linear.weight
    if type(weight).__name__ == "Params4bit":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state).detach()
    return weight.detach()


__all__ = ["HQQ_GROUP_SIZE", "bitsandbytes_config", "dense_weight", "pack_for_cpu", "quantize_hqq", "weight_format"]
