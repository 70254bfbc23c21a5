"""`JointConfig`: everything needed to rebuild the joint model around its base (joint_config.json's "config")."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from unirag.errors import UniragError

# The JSON types each field accepts (bool is not an int here: `true` for a head count is a mistake).
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "docid_levels": (int,),
    "docid_branching": (int,),
    "base_model": (str, type(None)),
    "pathway_layers": (int, list),
    "retrieval_heads": (int,),
    "retrieval_mlp_dim": (int,),
    "bridge_heads": (int,),
    "bridge_dim": (int,),
    "pathway_reads_residual": (bool,),
    "save_dtype": (str,),
    "semantic_dim": (int,),
    "semantic_nodes": (int,),
    "lora": (dict, type(None)),
    "adapter_in_retrieval": (bool,),
    "adapter_in_reading": (bool,),
}
_TYPE_NAMES = {int: "a whole number", str: "a string", list: "a list of layer indices", bool: "true or false",
               dict: "an object", type(None): "null"}


def _type_ok(value: Any, expected: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in expected
    if isinstance(value, list) and list in expected:
        return all(isinstance(i, int) and not isinstance(i, bool) for i in value)
    return isinstance(value, expected)


# The LoRA block enable_lora writes: key -> (accepted JSON types, what it must be).
_LORA_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "r": ((int,), "a whole number >= 1"),
    "alpha": ((int, float), "a number"),
    "dropout": ((int, float), "a number in [0, 1)"),
    "target_modules": ((list,), "a list of module names"),
    "layers": ((list, type(None)), "a list of layer indices or null"),
}


def _check_lora_block(lora: Mapping[str, Any], where: str) -> None:
    for key, value in lora.items():
        if key not in _LORA_TYPES:
            raise UniragError(f"Invalid joint config{where}: unknown key {key!r} in 'lora' "
                              f"(known: {', '.join(_LORA_TYPES)}).")
        kinds, wanted = _LORA_TYPES[key]
        ok = not isinstance(value, bool) and isinstance(value, kinds)
        if ok and key == "r":
            ok = value >= 1
        elif ok and key == "dropout":
            ok = 0 <= value < 1
        elif ok and key == "target_modules":
            ok = bool(value) and all(isinstance(m, str) for m in value)
        elif ok and key == "layers" and value is not None:
            ok = all(isinstance(i, int) and not isinstance(i, bool) for i in value)
        if not ok:
            raise UniragError(f"Invalid joint config{where}: lora.{key} must be {wanted}, got {value!r}.")
    if "r" not in lora:
        raise UniragError(f"Invalid joint config{where}: the 'lora' block has no 'r'.")


@dataclass
class JointConfig:
    """Everything needed to rebuild the joint model around its base (JSON-serialisable)."""

    docid_levels: int  # L: maximum docid length, excluding end-of-docid
    docid_branching: int  # K: symbols are 0..K-1 at each level
    base_model: str | None = None  # hub id or local folder; None = the embedded SmolLM2
    pathway_layers: int | list[int] = 4  # int N = top N layers; list = explicit indices (negatives allowed)
    retrieval_heads: int = 4  # rounded UP to a multiple of the base's num_key_value_heads
    retrieval_mlp_dim: int = 512
    bridge_heads: int = 4
    # Inner width of the bridge's cross-attention (0 = the base's hidden size). Its four projections are
    # hidden x bridge_dim each: on a 4B base a full-width bridge alone is 52 MB in float16, over the budget.
    bridge_dim: int = 0
    # The retrieval MLP' reads the layer output plus the retrieval-attention output (a pre-norm block whose
    # result is added back as a delta); False = it reads the retrieval-attention output alone.
    pathway_reads_residual: bool = True
    save_dtype: str = "float16"  # storage dtype of joint_weights.safetensors ("float16" or "float32")
    # Semantic docid scores (0 = off): a query vector in the docid encoder's space is scored against one
    # embedding per tree node (initialised from the cluster centroids) and added to the docid-head logits.
    semantic_dim: int = 0
    semantic_nodes: int = 0  # number of tree nodes (every non-empty docid prefix) the node table holds
    lora: dict[str, Any] | None = None  # set by enable_lora: {"r", "alpha", "dropout", "target_modules", "layers"}
    # Whether docid generation runs with the LoRA adapter. False: the adapter is the reader's only (switched off
    # while generating docids), so stage 2's answer loss cannot move the hidden states retrieval was trained on.
    adapter_in_retrieval: bool = True
    # Whether answers are read with the LoRA adapter. False after LoRA in stage 1 (the adapter was trained for
    # docid generation only, so reading uses the unchanged base LLM); stage 2 sets it (it trains the reader).
    adapter_in_reading: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.pathway_layers, tuple):
            self.pathway_layers = list(self.pathway_layers)
        checks = [
            (isinstance(self.docid_levels, int) and self.docid_levels >= 1, "docid_levels must be an int >= 1"),
            (isinstance(self.docid_branching, int) and self.docid_branching >= 1,
             "docid_branching must be an int >= 1"),
            (self.retrieval_heads >= 1, "retrieval_heads must be >= 1"),
            (self.retrieval_mlp_dim >= 1, "retrieval_mlp_dim must be >= 1"),
            (self.bridge_heads >= 1, "bridge_heads must be >= 1"),
            (isinstance(self.bridge_dim, int) and self.bridge_dim >= 0, "bridge_dim must be an int >= 0"),
            (self.save_dtype in ("float16", "float32", "bfloat16"), "save_dtype must be float16, bfloat16 or float32"),
            (self.semantic_dim >= 0 and self.semantic_nodes >= 0, "semantic_dim and semantic_nodes must be >= 0"),
            (bool(self.semantic_dim) == bool(self.semantic_nodes), "semantic_dim and semantic_nodes go together"),
        ]
        for ok, message in checks:
            if not ok:
                raise UniragError(f"Invalid JointConfig: {message}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | Path | None = None) -> JointConfig:
        """The config from its JSON form, every value type-checked; `source` (the file) names where it came from."""
        where = f" in {source}" if source is not None else ""
        if not isinstance(data, Mapping):
            raise UniragError(f"The joint config{where} must be a JSON object, got {type(data).__name__}.")
        known = {f.name for f in fields(cls)}
        # Unknown keys come from newer versions: ignore them rather than refuse an otherwise valid checkpoint.
        values = {k: v for k, v in data.items() if k in known}
        for key, value in values.items():
            expected = _FIELD_TYPES[key]
            if not _type_ok(value, expected):
                wanted = " or ".join(_TYPE_NAMES[t] for t in expected)
                raise UniragError(f"Invalid joint config{where}: {key!r} must be {wanted}, got {value!r} "
                                  f"({type(value).__name__}).")
        missing = sorted(f.name for f in fields(cls) if f.name in ("docid_levels", "docid_branching")
                         and f.name not in values)
        if missing:
            raise UniragError(f"Invalid joint config{where}: {', '.join(missing)} missing.")
        if values.get("lora") is not None:
            _check_lora_block(values["lora"], where)
        try:
            return cls(**values)
        except UniragError as exc:  # a value check of __post_init__: name the file it came from
            raise UniragError(f"{str(exc).rstrip('.')}{where}.") from None

    def resolve_pathway_layers(self, num_layers: int) -> list[int]:
        """Sorted, distinct layer indices of the pathway for a base with `num_layers` layers."""
        spec = self.pathway_layers
        if isinstance(spec, int):
            if not 1 <= spec <= num_layers:
                raise UniragError(
                    f"pathway_layers={spec} but the base model has {num_layers} layers (use 1..{num_layers})."
                )
            return list(range(num_layers - spec, num_layers))
        valid = all(isinstance(i, int) and -num_layers <= i < num_layers for i in spec)
        if not spec or not valid:
            raise UniragError(
                f"pathway_layers={spec} must be a non-empty list of layer indices in [-{num_layers}, {num_layers})."
            )
        return sorted({i % num_layers for i in spec})

