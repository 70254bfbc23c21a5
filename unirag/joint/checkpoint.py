"""Joint checkpoints on disk: save/load, the base model's fingerprint, file checksums, the LoRA reader alone.

A checkpoint folder holds joint_config.json (config, base fingerprint, format version, file checksums; written
last, so a folder without it is incomplete), joint_weights.safetensors, lora/ (peft adapter) when LoRA is on,
docid_tree.json and any extra files (e.g. recommended_settings.json). No pickle anywhere.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unirag.errors import FingerprintMismatchError, UniragError
from unirag.joint.config import JointConfig
from unirag.paths import file_sha256

# modeling imports this module to delegate save/load, so this one never imports modeling (not even for types):
# a JointModel is passed in as `model`, its class as `cls`.
JointModel = nn.Module  # the annotation's meaning: a unirag.joint.modeling.JointModel

FORMAT_VERSION = 1
CONFIG_FILE = "joint_config.json"
WEIGHTS_FILE = "joint_weights.safetensors"
LORA_DIR = "lora"
TREE_FILE = "docid_tree.json"


def check_checkpoint_dir(checkpoint_dir: str | Path) -> Path:
    """The folder as a Path; a clear error when it does not exist (before any file inside is looked for)."""
    ckpt = Path(checkpoint_dir)
    if not ckpt.is_dir():
        raise UniragError(f"The checkpoint folder {ckpt} does not exist.")
    return ckpt


def save_pretrained(
    model: JointModel,
    save_dir: str | Path,
    tree=None,
    extra_files: Mapping[str, str | bytes | dict | list] | None = None,
) -> Path:
    """Write a self-describing checkpoint folder (safetensors only, no pickle).

    joint_config.json (config, base fingerprint, format version, file checksums), joint_weights.safetensors
    (pathway, bridge, docid head, extra embeddings; stored as config.save_dtype), lora/ (peft adapter) if
    LoRA is on, docid_tree.json if `tree` is given (via tree.save), and `extra_files` (name → text, bytes,
    or JSON-able object). joint_config.json is written last, so a folder without it is incomplete.
    """
    from safetensors.torch import save_file

    from unirag.backbones import llm_fingerprint

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = llm_fingerprint(model.config.base_model)
    _check_fingerprint_describes_base(model, fingerprint)
    (save_dir / CONFIG_FILE).unlink(missing_ok=True)  # mark incomplete while writing

    dtype = _DTYPES[model.config.save_dtype]
    tensors = {n: p.detach().to("cpu", dtype).contiguous() for n, p in model.joint_named_parameters()}
    tmp = save_dir / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "unirag_format_version": str(FORMAT_VERSION)})
    tmp.replace(save_dir / WEIGHTS_FILE)
    written = [WEIGHTS_FILE]

    if model._lora_enabled:
        model.base.save_pretrained(str(save_dir / LORA_DIR), safe_serialization=True)
        (save_dir / LORA_DIR / "README.md").unlink(missing_ok=True)  # peft's blank model card
        written += sorted(f"{LORA_DIR}/{f.name}" for f in (save_dir / LORA_DIR).iterdir() if f.is_file())
    if tree is not None:
        tree.save(save_dir / TREE_FILE)
        written.append(TREE_FILE)
    for name, content in (extra_files or {}).items():
        if Path(name).name != name or name in (CONFIG_FILE, WEIGHTS_FILE, LORA_DIR):
            raise UniragError(f"extra_files name {name!r} must be a plain file name and not a reserved one.")
        path = save_dir / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_text(json.dumps(content, indent=2, ensure_ascii=False), encoding="utf-8")
        written.append(name)
    # Every file the checkpoint is made of, checksummed: a swapped docid or an overwritten adapter is refused.
    files = {name: file_sha256(save_dir / name) for name in written}

    bc = model.base_config
    meta = {
        "format": "unirag-joint",
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "base_fingerprint": fingerprint,
        "base_shape": {
            "model_type": bc.model_type,
            "hidden_size": bc.hidden_size,
            "num_hidden_layers": bc.num_hidden_layers,
            "num_key_value_heads": bc.num_key_value_heads,
            "extra_vocab_offset": model.extra_vocab_offset,
        },
        "files": files,
        "lora": model._lora_enabled,
    }
    (save_dir / CONFIG_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return save_dir


def _check_fingerprint_describes_base(model: JointModel, fingerprint: str) -> None:
    """Refuse to save a checkpoint whose config.base_model names a different model than the one wrapped."""
    if "|" not in fingerprint:
        return  # hub id not available locally: nothing to compare against
    bc = model.base_config
    shape = ",".join(
        str(getattr(bc, k, None))
        for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads")
    )
    if fingerprint.split("|", 1)[1] != shape:
        raise UniragError(
            f"config.base_model={model.config.base_model!r} describes {fingerprint.split('|', 1)[1]}, but the "
            f"wrapped model is {shape}. Set JointConfig.base_model to the model actually loaded."
        )


def from_pretrained(
    cls: type[JointModel], checkpoint_dir: str | Path, precision: str = "fp32", base_model: str | None = None,
    dtype: torch.dtype = torch.float32, device: str | None = None, attn_implementation: str = "eager",
) -> JointModel:
    """Load a checkpoint written by save_pretrained; the base comes from `base_model` or the saved config.

    Raises FingerprintMismatchError if the base is not the one the checkpoint was trained on, and
    UniragError for missing, truncated or corrupt files. The tokenizer is attached as `.tokenizer`.
    `cls` is the JointModel class (passed in, so this module never imports modeling).
    """
    from unirag.backbones import llm_fingerprint, load_llm

    ckpt = check_checkpoint_dir(checkpoint_dir)
    meta = _read_meta(ckpt)
    config = JointConfig.from_dict(meta["config"], source=ckpt / CONFIG_FILE)
    missing = [name for name in (WEIGHTS_FILE,) if not (ckpt / name).is_file()]
    if meta.get("lora") and not (ckpt / LORA_DIR / "adapter_model.safetensors").is_file():
        missing.append(f"{LORA_DIR}/adapter_model.safetensors")
    if meta.get("lora") and not (ckpt / LORA_DIR / "adapter_config.json").is_file():
        missing.append(f"{LORA_DIR}/adapter_config.json")
    if missing:
        raise UniragError(f"Checkpoint {ckpt} is incomplete: missing {', '.join(missing)}.")

    name = base_model if base_model is not None else config.base_model
    expected, actual = meta.get("base_fingerprint"), llm_fingerprint(name)
    if expected != actual:
        raise FingerprintMismatchError(
            f"Checkpoint {ckpt} was trained on the base model {expected!r}, but the base model given is "
            f"{actual!r}. Load it with the base it was trained on (base_model=...), or retrain."
        )
    config.base_model = name

    weights_path = ckpt / WEIGHTS_FILE
    verify_files(ckpt, meta)
    tensors = _load_safetensors(weights_path)

    base, tokenizer = load_llm(name, precision=precision, dtype=dtype, device=device,
                               attn_implementation=attn_implementation)
    lora = config.lora
    config.lora = None
    model = cls(base, config, tokenizer=None)
    model.tokenizer = tokenizer
    if meta.get("lora"):
        if not lora:
            raise UniragError(f"{ckpt / CONFIG_FILE} says LoRA is on but has no LoRA settings.")
        model.enable_lora(**lora)
        _load_lora_weights(model, ckpt / LORA_DIR)
    _load_joint_tensors(model, tensors, weights_path)
    model.checkpoint_dir = ckpt
    model.eval()
    return model


@torch.no_grad()
def _load_joint_tensors(model: JointModel, tensors: dict[str, torch.Tensor], source: Path) -> None:
    own = dict(model.joint_named_parameters())
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise UniragError(
            f"{source} does not match this model (missing {missing[:5]}, unexpected {unexpected[:5]}); "
            "was it saved with another joint config or pathway layout?"
        )
    for name, param in own.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise UniragError(
                f"{source}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}."
            )
        param.copy_(tensor.to(param.dtype))


def _load_lora_weights(model: JointModel, lora_dir: Path) -> None:
    from peft.utils import set_peft_model_state_dict

    tensors = _load_safetensors(lora_dir / "adapter_model.safetensors")
    try:
        result = set_peft_model_state_dict(model.base, tensors)
    except Exception as exc:  # noqa: BLE001 - shape mismatches surface as RuntimeError deep in torch
        raise UniragError(f"The LoRA adapter in {lora_dir} does not fit this model: {exc}") from None
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing_lora = [k for k in getattr(result, "missing_keys", []) or [] if "lora_" in k]
    if unexpected or missing_lora:
        raise UniragError(
            f"The LoRA adapter in {lora_dir} does not match this model "
            f"(unexpected {unexpected[:3]}, missing {missing_lora[:3]})."
        )


_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

def load_lora_reader(model: nn.Module, checkpoint_dir: str | Path) -> nn.Module:
    """Put a joint checkpoint's LoRA adapter on a plain CausalLM, for reading without the joint retrieval.

    The adapter was trained inside the joint model (with pathway and bridge), so this is the fine-tuned
    reader alone, e.g. to compare dense RAG with and without it. Returns a peft model (generate() works).
    """
    from peft import PeftModel

    ckpt = check_checkpoint_dir(checkpoint_dir)
    meta = _read_meta(ckpt)
    if not meta.get("lora"):
        raise UniragError(f"Checkpoint {ckpt} has no LoRA adapter (a stage-1 checkpoint trains no reader).")
    adapter = ckpt / LORA_DIR / "adapter_model.safetensors"
    if not adapter.is_file() or not (ckpt / LORA_DIR / "adapter_config.json").is_file():
        raise UniragError(
            f"Checkpoint {ckpt} is incomplete: {LORA_DIR}/ lacks adapter_model.safetensors or its config."
        )
    config = getattr(getattr(model, "get_base_model", lambda: model)(), "config", None)
    expected = meta.get("base_shape", {})
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_key_value_heads"):
        if key in expected and getattr(config, key, None) != expected[key]:
            raise FingerprintMismatchError(
                f"Checkpoint {ckpt} was trained on {meta.get('base_fingerprint')!r}; this model's {key} is "
                f"{getattr(config, key, None)!r}, not {expected[key]!r}. Load the base it was trained on."
            )
    verify_files(ckpt, meta)
    _load_safetensors(adapter)  # clean error on a truncated file before peft reads it
    try:
        reader = PeftModel.from_pretrained(model, str(ckpt / LORA_DIR), is_trainable=False)
    except Exception as exc:  # noqa: BLE001 - peft raises assorted errors on mismatching adapters
        raise UniragError(f"The LoRA adapter in {ckpt / LORA_DIR} does not fit this model: {exc}") from None
    return reader.eval()


def verify_files(ckpt: Path, meta: Mapping[str, Any] | None = None, only: str | None = None) -> None:
    """Check the files joint_config.json lists against their checksums (all, or `only` that one); checkpoints
    saved before every file was listed name the weights alone, and files they do not list are not checked."""
    meta = _read_meta(ckpt) if meta is None else meta
    listed = meta.get("files") or {}
    if not isinstance(listed, Mapping):
        raise UniragError(f"{ckpt / CONFIG_FILE}: 'files' must map file names to checksums.")
    for name, expected in listed.items():
        if only is not None and name != only:
            continue
        path = ckpt / name
        if not path.is_file():
            raise UniragError(f"Checkpoint {ckpt} is incomplete: missing {name}.")
        if file_sha256(path) != expected:
            raise UniragError(f"{path} is corrupt or truncated, or was altered (checksum mismatch with "
                              f"{CONFIG_FILE}); re-copy or re-save the checkpoint.")


def verify_tree_file(checkpoint_dir: str | Path) -> Path:
    """The checkpoint's docid tree path, checked against its checksum when the checkpoint lists one."""
    ckpt = check_checkpoint_dir(checkpoint_dir)
    tree_path = ckpt / TREE_FILE
    if not tree_path.is_file():
        raise UniragError(f"{tree_path} is missing: a joint checkpoint must ship its docid tree.")
    verify_files(ckpt, only=TREE_FILE)
    return tree_path


def _read_meta(ckpt: Path) -> dict[str, Any]:
    path = ckpt / CONFIG_FILE
    if not path.is_file():
        present = sorted(p.name for p in ckpt.iterdir())
        raise UniragError(
            f"{ckpt} is not a joint checkpoint: {CONFIG_FILE} is missing (found: {', '.join(present) or 'nothing'}). "
            "An interrupted save leaves the folder in this state; save again."
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UniragError(f"{path} is corrupt ({exc}); re-save the checkpoint.") from None
    if not isinstance(meta, dict) or meta.get("format") != "unirag-joint" or "config" not in meta:
        raise UniragError(f"{path} is not a unirag joint checkpoint config.")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise UniragError(f"{path} has format version {version}; this code reads version {FORMAT_VERSION}.")
    return meta


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ... on truncated or garbled files
        reason = re.sub(r"\s+", " ", str(exc))[:200]
        raise UniragError(
            f"{path} is truncated or corrupt and cannot be read ({reason}); re-copy or re-save it."
        ) from None


__all__ = ["CONFIG_FILE", "FORMAT_VERSION", "LORA_DIR", "TREE_FILE", "WEIGHTS_FILE", "check_checkpoint_dir",
           "from_pretrained", "load_lora_reader", "save_pretrained", "verify_files", "verify_tree_file"]
