"""The joint model: one decoder-only LLM that retrieves by generating hierarchical semantic docids and
answers from the documents it picked ("retrieval as reasoning").

A `JointModel` wraps a transformers CausalLM (Llama family incl. SmolLM2 / Llama-3, Qwen2, Qwen3) without
forking its modeling file:

    embed(ids)   base embedding for ids < V (the base embedding's row count), own table for extra tokens
    layer i      h_mid = h + Attn(norm(h))                   base, unchanged
                 H_out = h_mid + MLP(norm(h_mid))            base, unchanged
                 if i is a pathway layer and the pathway is on:
                   a      = r_o_proj(Attn_r(r_q_proj(norm(h))))   extra query heads over the SAME K/V + mask
                   H'_out = r_down(silu(r_gate(n)) * r_up(n)),   n = RMSNorm(H_out + a)
                   H_out  = H_out + H'_out
    bridge       h = h + g * H'_last + CrossAttn(Q = H'_last; K, V = h; causal)      before the final norm
    heads        lm_head(norm(h)) and docid_head(norm(h))

How it is wired: each attention module is replaced by a `JointAttention` that re-registers the original
children under their original names (so state-dict keys and peft targeting are unchanged), mirrors the
original forward exactly, and passes retrieval outputs through a per-call side channel (a ContextVar
holding a `_ForwardState`). A forward hook on each pathway decoder layer adds H'_out to its output, and a
forward pre-hook on the final norm applies the bridge. Outside `JointModel.forward` the wrapped base
behaves exactly like the original model.

New parameters are initialised so that a freshly built model is exact: r_down, the bridge gate and the
bridge output projection are zero. With `pathway=False, bridge=False` the LM logits equal the base
model's whatever the new parameters hold.

The config lives in `joint.config`, checkpoint files in `joint.checkpoint` (`save_pretrained`/`from_pretrained`
delegate there). The training stages' parameter selection (`stage_parameters`, `trainable_parameters`) stays
here: it reads the model's own module names and LoRA state.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import math
import sys
import types
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unirag.errors import UniragError
from unirag.joint import checkpoint
from unirag.joint.config import JointConfig
from unirag.quantization import dense_weight

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# State-dict prefixes of everything the joint model adds on top of the base (what joint_weights holds).
JOINT_PREFIXES = ("pathways.", "bridge.", "docid_head.", "extra_embed.", "entry_embed.", "semantic.")
# Fixed slots of the extra embedding table, before the docid tokens.
_RETRIEVE_SLOT, _GENERATES_SLOT, _FIRST_DOCID_SLOT = 0, 1, 2


# --------------------------------------------------------------------------------------------- output


@dataclass
class JointOutput:
    """Result of `JointModel.forward`. Attention tensors are only filled when output_attentions=True."""

    lm_logits: torch.Tensor | None  # [B, T, V]; None when return_lm_logits=False
    docid_logits: torch.Tensor  # [B, T, L*K+1]
    past_key_values: Any = None  # a transformers Cache (with one extra layer holding the bridge K/V)
    hidden_states: torch.Tensor | None = None  # final normed hidden states [B, T, hidden]
    # Unit query vectors of the semantic docid scorer [B, T, semantic_dim] (None when it is off). Exact only
    # on a pass over the whole prompt (it pools the prompt so far), which is where decoding reads it.
    query_vectors: torch.Tensor | None = None
    retrieval_attentions: tuple[torch.Tensor, ...] | None = None  # per pathway layer [B, H', T, S]
    bridge_attentions: torch.Tensor | None = None  # [B, bridge_heads, T, S]
    attentions: tuple[torch.Tensor | None, ...] | None = None  # per base layer [B, heads, T, S]


@dataclass
class _ForwardState:
    """Per-call side channel between JointModel.forward and the hooks/wrappers inside the base."""

    pathway: bool
    bridge: bool
    output_attentions: bool
    attention_layers: frozenset[int] | None
    cache: Any
    retrieval_hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    retrieval_attentions: dict[int, torch.Tensor] = field(default_factory=dict)
    base_attentions: dict[int, torch.Tensor] = field(default_factory=dict)
    bridge_mask: Any = None
    bridge_mask_set: bool = False
    h_prime_last: torch.Tensor | None = None
    bridge_attentions: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None  # for the docid entry embedding at the first pathway layer
    entry_hidden: torch.Tensor | None = None  # residual stream entering the first pathway layer


# --------------------------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    """Same arithmetic as LlamaRMSNorm (fp32 statistics, weight applied in the input dtype)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class RetrievalPathway(nn.Module):
    """Extra query heads over a layer's K/V plus a gated MLP' whose output joins the residual stream.

    Module names deliberately avoid the suffixes peft targets (q_proj, o_proj, gate_proj, ...): peft
    matches `name == target or name.endswith("." + target)`, and none of r_q_proj, r_o_proj, r_gate,
    r_up, r_down can match, so LoRA never wraps the pathway even if it were inside the base.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        mlp_dim: int,
        q_bias: bool,
        eps: float,
        q_norm: nn.Module | None,
        reads_residual: bool,
    ) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.reads_residual = reads_residual
        self.r_q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=q_bias)
        # Qwen3 normalises each query head before RoPE: keep an own copy, initialised from the base.
        self.r_q_norm = copy.deepcopy(q_norm) if q_norm is not None else None
        self.r_o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.r_norm = RMSNorm(hidden_size, eps)
        self.r_gate = nn.Linear(hidden_size, mlp_dim, bias=False)
        self.r_up = nn.Linear(hidden_size, mlp_dim, bias=False)
        self.r_down = nn.Linear(mlp_dim, hidden_size, bias=False)

    def queries(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, T, hidden] → [B, H', T, head_dim] before RoPE (mirrors the base's query path)."""
        q = self.r_q_proj(hidden_states).view(*hidden_states.shape[:-1], -1, self.head_dim)
        if self.r_q_norm is not None:
            q = self.r_q_norm(q)
        return q.transpose(1, 2)

    def mlp(self, layer_output: torch.Tensor, retrieval_out: torch.Tensor) -> torch.Tensor:
        x = layer_output + retrieval_out if self.reads_residual else retrieval_out
        x = self.r_norm(x)
        return self.r_down(F.silu(self.r_gate(x)) * self.r_up(x))


class Bridge(nn.Module):
    """h + g·H'_last + CrossAttn(Q from H'_last; K, V from h), causal. Zero gate and zero output projection
    make it the identity at init. No RoPE: the causal mask already orders it and positions live in h."""

    def __init__(self, hidden_size: int, num_heads: int, eps: float, inner_dim: int = 0) -> None:
        super().__init__()
        inner_dim = inner_dim or hidden_size
        if inner_dim % num_heads:
            raise UniragError(f"bridge_heads={num_heads} must divide the bridge width {inner_dim}.")
        self.num_heads, self.head_dim = num_heads, inner_dim // num_heads
        self.gate = nn.Parameter(torch.zeros(1))
        self.kv_norm = RMSNorm(hidden_size, eps)  # h is the un-normalised residual stream
        self.cross_q = nn.Linear(hidden_size, inner_dim, bias=False)
        self.cross_k = nn.Linear(hidden_size, inner_dim, bias=False)
        self.cross_v = nn.Linear(hidden_size, inner_dim, bias=False)
        self.cross_o = nn.Linear(inner_dim, hidden_size, bias=False)


class SemanticDocidScorer(nn.Module):
    """Docid-aware scores: cos(query vector, node embedding) · scale, one embedding per tree node.

    The query vector reads [causal mean of the residual stream entering the first pathway layer ; final
    hidden state], so it sees every question token. Node embeddings start at the cluster centroids of the
    encoder that built the docids, and training also pulls the query vector towards that encoder's
    embedding of the query (distillation), so routing down the tree starts from the tree's own geometry.
    """

    def __init__(self, hidden_size: int, dim: int, num_nodes: int) -> None:
        super().__init__()
        self.proj = nn.Linear(2 * hidden_size, dim, bias=True)
        self.node_embed = nn.Embedding(num_nodes, dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(20.0)))  # temperature 0.05 for unit vectors

    def query_vectors(self, entry_hidden: torch.Tensor, hidden: torch.Tensor,
                      attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is not None:  # a decoding step's mask also covers the cached positions: keep this pass's
            weights = attention_mask[:, -entry_hidden.shape[1]:].to(entry_hidden.dtype).unsqueeze(-1)
        else:
            weights = torch.ones_like(entry_hidden[..., :1])
        pooled = (entry_hidden * weights).cumsum(1) / weights.cumsum(1).clamp_min(1.0)
        features = torch.cat([pooled, hidden.to(pooled.dtype)], dim=-1).to(self.proj.weight.dtype)
        return F.normalize(self.proj(features).float(), dim=-1)

    def matches(self, query: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """query [B, D] (unit) against one shared node set rows [N] → [B, N] scaled cosine (as `scores`)."""
        nodes = F.normalize(self.node_embed(rows).float(), dim=-1)
        return (query.float() @ nodes.T) * self.log_scale.exp().float()

    def scores(self, query: torch.Tensor, node_rows: torch.Tensor) -> torch.Tensor:
        """query [..., D] (unit), node_rows [..., C] (-1 = no node) → [..., C] scaled cosine (0 where -1)."""
        nodes = F.normalize(self.node_embed(node_rows.clamp(min=0)).float(), dim=-1)
        sims = torch.einsum("...d,...cd->...c", query.float(), nodes)
        return (sims * self.log_scale.exp().float()).masked_fill(node_rows < 0, 0.0)


def tree_prefixes(trie) -> list[tuple[int, ...]]:
    """Every non-empty docid prefix of a trie (internal nodes and complete docids), in sorted order."""
    found: list[tuple[int, ...]] = []

    def walk(prefix: tuple[int, ...]) -> None:
        for child in sorted(int(c) for c in trie.allowed(prefix)):
            found.append(prefix + (child,))
            walk(prefix + (child,))

    walk(())
    return found


def _shim(config, layer_idx: int, groups: int, training: bool, head_dim: int, scaling: float):
    """Stand-in `module` argument for transformers' attention interfaces (they read these attributes)."""
    return types.SimpleNamespace(
        config=config,
        layer_idx=layer_idx,
        num_key_value_groups=groups,
        is_causal=True,
        training=training,
        head_dim=head_dim,
        scaling=scaling,
    )


def _additive_mask(mask: torch.Tensor | None, q_len: int, kv_len: int, dtype, device) -> torch.Tensor:
    """Any transformers mask form (None = plain causal, bool = keep, float = additive) → additive float."""
    if mask is None:
        offset = kv_len - q_len
        keep = torch.arange(kv_len, device=device)[None, :] <= torch.arange(q_len, device=device)[:, None] + offset
        mask = keep[None, None]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask[..., :kv_len].to(dtype)


def _eager_with_weights(eager_fn, module, query, key, value, mask, scaling: float):
    """Eager attention (which returns weights) with whatever mask form the configured implementation built."""
    add = _additive_mask(mask, query.shape[2], key.shape[2], query.dtype, query.device)
    return eager_fn(module, query, key, value, add, scaling=scaling, dropout=0.0)


class JointAttention(nn.Module):
    """Drop-in replacement for a Llama/Qwen2/Qwen3 attention module.

    Keeps the signature `(hidden_states, position_embeddings, attention_mask, past_key_values=None,
    **kwargs) -> (attn_output, attn_weights)` and the original children under their original names, so
    the base output is the original one (same ops, same attention interface, same cache update) and peft
    can wrap q/k/v/o_proj in place. Retrieval outputs leave through the owner's side channel.
    """

    def __init__(self, base_attn: nn.Module, owner: JointModel) -> None:
        super().__init__()
        for name, child in base_attn.named_children():
            self.add_module(name, child)
        for key, value in vars(base_attn).items():
            if not key.startswith("_") and key != "training":
                setattr(self, key, value)
        self.train(base_attn.training)
        modeling = sys.modules[type(base_attn).__module__]
        self._rope = modeling.apply_rotary_pos_emb
        self._eager = modeling.eager_attention_forward
        self._has_qk_norm = hasattr(base_attn, "q_norm") and hasattr(base_attn, "k_norm")
        self._passes_sliding_window = hasattr(base_attn, "sliding_window")  # Qwen2/3 pass it, Llama does not
        self._base_class = type(base_attn).__name__
        self._owner = weakref.ref(owner)  # not a submodule: the owner holds us

    def extra_repr(self) -> str:
        return f"wraps={self._base_class}, layer_idx={self.layer_idx}"

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        owner = self._owner()
        state = owner._state.get() if owner is not None else None

        # --- mirror of the original forward (modeling_llama / qwen2 / qwen3) -------------------------
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        if self._has_qk_norm:
            query_states = self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
            key_states = self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        else:
            query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
            key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = self._rope(query_states, key_states, cos, sin)

        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self._eager)
        extra = {"sliding_window": self.sliding_window} if self._passes_sliding_window else {}
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **extra,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        # -------------------------------------------------------------------------------------------------

        if state is not None:
            idx = self.layer_idx
            if state.output_attentions and (state.attention_layers is None or idx in state.attention_layers):
                if attn_weights is None:  # SDPA & co. return no weights: compute them (visualisation only)
                    _, attn_weights = _eager_with_weights(
                        self._eager, self, query_states, key_states, value_states, attention_mask, self.scaling
                    )
                state.base_attentions[idx] = attn_weights
            if idx == owner._bridge_mask_layer:
                state.bridge_mask, state.bridge_mask_set = attention_mask, True
            if state.pathway and idx in owner._pathway_set:
                self._retrieval(owner, state, hidden_states, cos, sin, key_states, value_states,
                                attention_mask, attention_interface, extra, kwargs)
        return attn_output, attn_weights

    def _retrieval(self, owner, state, hidden_states, cos, sin, key_states, value_states, attention_mask,
                   attention_interface, extra, kwargs) -> None:
        pathway: RetrievalPathway = owner.pathways[str(self.layer_idx)]
        r_query = pathway.queries(hidden_states)
        r_query, _ = self._rope(r_query, r_query, cos, sin)  # the layer's RoPE (the k output is discarded)
        shim = _shim(self.config, self.layer_idx, pathway.num_heads // pathway.num_kv_heads, self.training,
                     self.head_dim, self.scaling)
        if state.output_attentions:
            r_out, r_weights = _eager_with_weights(
                self._eager, shim, r_query, key_states, value_states, attention_mask, self.scaling
            )
            state.retrieval_attentions[self.layer_idx] = r_weights
        else:
            r_out, _ = attention_interface(
                shim, r_query, key_states, value_states, attention_mask,
                dropout=0.0, scaling=self.scaling, **extra, **kwargs,
            )
        r_out = r_out.reshape(*hidden_states.shape[:-1], -1).contiguous()
        state.retrieval_hidden[self.layer_idx] = pathway.r_o_proj(r_out)


# --------------------------------------------------------------------------------------------- helpers


def _is_kbit(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))



# --------------------------------------------------------------------------------------------- model


class JointModel(nn.Module):
    """Base CausalLM + retrieval pathway + bridge + docid head + extra input tokens.

    The base is modified in place (its attention modules are wrapped); outside `forward` it still computes
    exactly what it did. `tokenizer` (optional) seeds the extra token embeddings from existing words.

    Extra token ids start at the base embedding's row count V (not len(tokenizer): Qwen pads its matrix):
    V+0 `<retrieve_token>`, V+1 `<generates_token>`, V+2+l*K+s docid symbol s at level l, V+2+L*K end.
    Docid-head indices: l*K+s for (l, s), L*K for end-of-docid.
    """

    def __init__(self, base: nn.Module, config: JointConfig, tokenizer=None) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.base = base
        self._state: contextvars.ContextVar[_ForwardState | None] = contextvars.ContextVar(
            f"unirag_joint_state_{id(self)}", default=None
        )
        self._lora_enabled = False
        self._lora_layer_list: list[nn.Module] | None = None  # see _lora_layers
        self.checkpoint_dir: Path | None = None

        bc = self.base_config
        if bc.model_type not in SUPPORTED_MODEL_TYPES:
            raise UniragError(
                f"The joint model supports {', '.join(SUPPORTED_MODEL_TYPES)} base models, not {bc.model_type!r}."
            )
        bridge_dim = config.bridge_dim or bc.hidden_size
        if bridge_dim % config.bridge_heads:  # checked before the base is touched
            raise UniragError(f"bridge_heads={config.bridge_heads} must divide the bridge width {bridge_dim} "
                              f"({'bridge_dim' if config.bridge_dim else 'the hidden size'}).")
        decoder = self.decoder
        num_layers = len(decoder.layers)
        hidden = bc.hidden_size
        eps = getattr(bc, "rms_norm_eps", 1e-6)
        sample_attn = decoder.layers[0].self_attn
        head_dim = sample_attn.head_dim
        kv_heads = bc.num_key_value_heads
        self.num_retrieval_heads = math.ceil(config.retrieval_heads / kv_heads) * kv_heads
        self.pathway_layer_ids = config.resolve_pathway_layers(num_layers)
        self._pathway_set = frozenset(self.pathway_layer_ids)
        embed = self.causal_lm.get_input_embeddings()
        self.extra_vocab_offset = int(embed.num_embeddings)
        L, K = config.docid_levels, config.docid_branching
        self.num_extra_tokens = _FIRST_DOCID_SLOT + L * K + 1
        dtype, device = embed.weight.dtype, embed.weight.device

        # Wrap every attention module (not only pathway layers) so base attentions can be collected uniformly.
        for layer in decoder.layers:
            if isinstance(layer.self_attn, JointAttention):
                raise UniragError("This base model is already wrapped by a JointModel.")
            layer.self_attn = JointAttention(layer.self_attn, self)
        self._bridge_mask_layer = max(
            (i for i, layer in enumerate(decoder.layers) if getattr(layer.self_attn, "sliding_window", None) is None),
            default=num_layers - 1,
        )

        q_bias = getattr(_unwrap(sample_attn.q_proj), "bias", None) is not None
        self.pathways = nn.ModuleDict(
            {
                str(i): RetrievalPathway(
                    hidden, head_dim, self.num_retrieval_heads, kv_heads, config.retrieval_mlp_dim, q_bias, eps,
                    getattr(decoder.layers[i].self_attn, "q_norm", None), config.pathway_reads_residual,
                )
                for i in self.pathway_layer_ids
            }
        )
        self.bridge = Bridge(hidden, config.bridge_heads, eps, config.bridge_dim)
        self.docid_head = nn.Linear(hidden, L * K + 1, bias=True)
        self.extra_embed = nn.Embedding(self.num_extra_tokens, hidden)
        # Added to the residual stream of extra tokens as they enter the first pathway layer. Stage 1
        # caches the frozen layers below it, so this is where the docid embeddings can still learn there.
        self.entry_embed = nn.Embedding(self.num_extra_tokens, hidden)
        self.semantic = (SemanticDocidScorer(hidden, config.semantic_dim, config.semantic_nodes)
                         if config.semantic_dim else None)
        self._node_rows: dict[tuple[int, ...], int] | None = None
        self._node_rows_trie_id: int | None = None
        for module in self._new_modules():
            module.to(device=device, dtype=dtype)
        self._init_new_parameters(tokenizer)

        self._hooks = [
            decoder.layers[i].register_forward_hook(self._make_layer_hook(i)) for i in self.pathway_layer_ids
        ]
        self._hooks.append(decoder.norm.register_forward_pre_hook(self._make_norm_pre_hook()))
        self._hooks.append(
            decoder.layers[self.pathway_layer_ids[0]].register_forward_pre_hook(self._make_entry_pre_hook())
        )
        self.train(base.training)

    def _new_modules(self) -> list[nn.Module]:
        modules = [self.pathways, self.bridge, self.docid_head, self.extra_embed, self.entry_embed]
        return modules + ([self.semantic] if self.semantic is not None else [])

    def __deepcopy__(self, memo):
        # The wrappers and hooks point back at this instance; a copy would silently feed the original's
        # side channel. Rebuild instead.
        raise UniragError("A JointModel cannot be deep-copied; build a new one or use from_pretrained().")

    # ----------------------------------------------------------------------------- structure accessors

    @property
    def causal_lm(self) -> nn.Module:
        """The transformers CausalLM (under peft's wrapper if LoRA is on)."""
        get_base = getattr(self.base, "get_base_model", None)
        return get_base() if get_base is not None and self._lora_enabled else self.base

    @property
    def decoder(self) -> nn.Module:
        lm = self.causal_lm
        return getattr(lm, lm.base_model_prefix)

    @property
    def base_config(self):
        return self.causal_lm.config

    @property
    def device(self) -> torch.device:
        return self.extra_embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.extra_embed.weight.dtype

    # ----------------------------------------------------------------------------- token ids

    @property
    def retrieve_token_id(self) -> int:
        return self.extra_vocab_offset + _RETRIEVE_SLOT

    @property
    def generates_token_id(self) -> int:
        return self.extra_vocab_offset + _GENERATES_SLOT

    def docid_vocab_index(self, level: int, symbol: int) -> int:
        """Index of (level, symbol) in the docid head's output."""
        L, K = self.config.docid_levels, self.config.docid_branching
        if not (0 <= level < L and 0 <= symbol < K):
            raise UniragError(
                f"Docid symbol (level {level}, symbol {symbol}) is outside this model's {L} levels × {K} symbols."
            )
        return level * K + symbol

    @property
    def end_of_docid_index(self) -> int:
        return self.config.docid_levels * self.config.docid_branching

    def docid_token_id(self, level: int, symbol: int) -> int:
        """Input token id of (level, symbol) (fed back after the symbol is chosen)."""
        return self.extra_vocab_offset + _FIRST_DOCID_SLOT + self.docid_vocab_index(level, symbol)

    @property
    def end_of_docid_token_id(self) -> int:
        return self.extra_vocab_offset + _FIRST_DOCID_SLOT + self.end_of_docid_index

    def extra_token_name(self, token_id: int) -> str:
        """Readable name of an extra token id (for traces and debugging)."""
        slot = token_id - self.extra_vocab_offset
        K = self.config.docid_branching
        if slot == _RETRIEVE_SLOT:
            return "<retrieve_token>"
        if slot == _GENERATES_SLOT:
            return "<generates_token>"
        if slot == _FIRST_DOCID_SLOT + self.end_of_docid_index:
            return "<end_of_docid>"
        if _FIRST_DOCID_SLOT <= slot < _FIRST_DOCID_SLOT + self.end_of_docid_index:
            level, symbol = divmod(slot - _FIRST_DOCID_SLOT, K)
            return f"<docid_{level}_{symbol}>"
        raise UniragError(f"{token_id} is not an extra token id of this model.")

    # ----------------------------------------------------------------------------- initialisation

    @torch.no_grad()
    def _init_new_parameters(self, tokenizer) -> None:
        std = float(getattr(self.base_config, "initializer_range", 0.02))
        decoder = self.decoder
        for i in self.pathway_layer_ids:
            attn = decoder.layers[i].self_attn
            pw: RetrievalPathway = self.pathways[str(i)]
            self._warm_start_queries(attn, pw)
            nn.init.ones_(pw.r_norm.weight)
            nn.init.normal_(pw.r_gate.weight, std=std)
            nn.init.normal_(pw.r_up.weight, std=std)
            nn.init.zeros_(pw.r_down.weight)  # exact at init even with the pathway on
        for lin in (self.bridge.cross_q, self.bridge.cross_k, self.bridge.cross_v):
            nn.init.normal_(lin.weight, std=std)
        nn.init.zeros_(self.bridge.cross_o.weight)  # identity at init even with the bridge on
        nn.init.zeros_(self.bridge.gate)
        nn.init.zeros_(self.entry_embed.weight)  # the docid tokens start as their copied input embeddings
        nn.init.ones_(self.bridge.kv_norm.weight)

        base_embed = self.causal_lm.get_input_embeddings().weight.detach()
        emb_std = float(base_embed.float().std())
        nn.init.normal_(self.extra_embed.weight, std=emb_std)
        if tokenizer is not None:
            self._init_extra_from_tokenizer(tokenizer, base_embed)
        # Docid head rows start as the docid tokens' embeddings: with tied-embedding LMs this gives the same
        # scale (and meaning) as the LM's own logit for that token.
        self.docid_head.weight.copy_(self.extra_embed.weight[_FIRST_DOCID_SLOT:])
        nn.init.zeros_(self.docid_head.bias)
        if self.semantic is not None:
            nn.init.normal_(self.semantic.proj.weight, std=std)
            nn.init.zeros_(self.semantic.proj.bias)
            nn.init.normal_(self.semantic.node_embed.weight, std=1.0)

    @torch.no_grad()
    def _warm_start_queries(self, attn: nn.Module, pw: RetrievalPathway) -> None:
        """r_q_proj/r_o_proj from the base heads that read the same KV head (GQA-aware), repeated as needed."""
        n_heads = self.base_config.num_attention_heads
        kv = pw.num_kv_heads
        base_rep, r_rep, d = n_heads // kv, pw.num_heads // kv, pw.head_dim
        q_w = dense_weight(attn.q_proj).to(pw.r_q_proj.weight.dtype)
        o_w = dense_weight(attn.o_proj).to(pw.r_o_proj.weight.dtype)
        q_b = getattr(_unwrap(attn.q_proj), "bias", None)
        for j in range(pw.num_heads):
            group, within = divmod(j, r_rep)
            src = group * base_rep + within % base_rep
            pw.r_q_proj.weight[j * d : (j + 1) * d] = q_w[src * d : (src + 1) * d]
            pw.r_o_proj.weight[:, j * d : (j + 1) * d] = o_w[:, src * d : (src + 1) * d]
            if pw.r_q_proj.bias is not None and q_b is not None:
                pw.r_q_proj.bias[j * d : (j + 1) * d] = q_b.detach()[src * d : (src + 1) * d]

    def _text_embedding(self, tokenizer, text: str, base_embed: torch.Tensor) -> torch.Tensor | None:
        ids = [i for i in tokenizer(text, add_special_tokens=False)["input_ids"] if 0 <= i < base_embed.shape[0]]
        if not ids:
            return None
        return base_embed[ids].float().mean(0)

    @torch.no_grad()
    def _init_extra_from_tokenizer(self, tokenizer, base_embed: torch.Tensor) -> None:
        """Copy existing token embeddings: markers from words, docid (l, s) from the number s and a level letter."""
        rows = self.extra_embed.weight

        def put(slot: int, parts: list[torch.Tensor | None]) -> None:
            parts = [p for p in parts if p is not None]
            if not parts:
                return
            mean = torch.stack(parts).mean(0)
            target_norm = torch.stack([p.norm() for p in parts]).mean()
            rows[slot] = (mean * (target_norm / mean.norm().clamp_min(1e-8))).to(rows.dtype)

        put(_RETRIEVE_SLOT, [self._text_embedding(tokenizer, " retrieve", base_embed)])
        put(_GENERATES_SLOT, [self._text_embedding(tokenizer, " answer", base_embed)])
        L, K = self.config.docid_levels, self.config.docid_branching
        for level in range(L):
            level_emb = self._text_embedding(tokenizer, " " + _level_letter(level), base_embed)
            for symbol in range(K):
                number = self._text_embedding(tokenizer, f" {symbol}", base_embed)
                put(_FIRST_DOCID_SLOT + level * K + symbol, [number, level_emb])
        put(_FIRST_DOCID_SLOT + L * K, [self._text_embedding(tokenizer, " end", base_embed)])

    @torch.no_grad()
    def init_docid_embeddings_from_text(
        self,
        level_symbol_texts: Mapping[tuple[int, int], str] | Sequence[Sequence[str]],
        tokenizer=None,
        also_head: bool = True,
    ) -> int:
        """Docid-aware init: row (l, s) = mean embedding of the label text's tokens (e.g. cluster keywords).

        `level_symbol_texts` is {(level, symbol): text} or a list (per level) of lists (per symbol). Missing or
        empty labels keep their row. With `also_head`, the docid head's rows get the same vectors.
        Returns the number of rows set.
        """
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer is None:
            raise UniragError(
                "init_docid_embeddings_from_text needs a tokenizer (pass one or build the model with it)."
            )
        if isinstance(level_symbol_texts, Mapping):
            items = list(level_symbol_texts.items())
        else:
            items = [
                ((level, s), text) for level, texts in enumerate(level_symbol_texts) for s, text in enumerate(texts)
            ]
        base_embed = self.causal_lm.get_input_embeddings().weight.detach()
        count = 0
        for (level, symbol), text in items:
            if not text or not str(text).strip():
                continue
            index = self.docid_vocab_index(level, symbol)
            vec = self._text_embedding(tokenizer, " " + str(text).strip(), base_embed)
            if vec is None:
                continue
            self.extra_embed.weight[_FIRST_DOCID_SLOT + index] = vec.to(self.dtype)
            if also_head:
                self.docid_head.weight[index] = vec.to(self.docid_head.weight.dtype)
            count += 1
        return count

    # ----------------------------------------------------------------------------- semantic docid scores

    def node_rows(self, trie, prefixes: Sequence[tuple[int, ...]]) -> list[int]:
        """Rows of the semantic node table for docid prefixes of `trie` (built once per trie, checked)."""
        if self.semantic is None:
            raise UniragError("This joint model has no semantic docid scorer (semantic_dim=0).")
        if self._node_rows is None or self._node_rows_trie_id != id(trie):
            nodes = tree_prefixes(trie)
            if len(nodes) != self.config.semantic_nodes:
                raise UniragError(
                    f"The docid tree has {len(nodes)} nodes but the model's semantic node table has "
                    f"{self.config.semantic_nodes}: the checkpoint belongs to another docid tree."
                )
            self._node_rows = {prefix: row for row, prefix in enumerate(nodes)}
            self._node_rows_trie_id = id(trie)
        try:
            return [self._node_rows[tuple(p)] for p in prefixes]
        except KeyError as exc:
            raise UniragError(f"Docid prefix {exc.args[0]} is not in the docid tree.") from None

    def semantic_scores(self, trie, query: torch.Tensor, prefix: tuple[int, ...], children: Sequence[int]
                        ) -> torch.Tensor:
        """Scaled cosine of one unit query vector [D] with the children of `prefix` → [len(children)]."""
        rows = torch.tensor(self.node_rows(trie, [prefix + (int(c),) for c in children]), device=query.device)
        return self.semantic.scores(query, rows)

    @torch.no_grad()
    def init_semantic_nodes(self, trie, doc_vectors: Mapping[str, Any]) -> None:
        """Docid-aware init: each node's embedding = the normalised mean of its documents' encoder vectors."""
        if self.semantic is None:
            raise UniragError("This joint model has no semantic docid scorer (semantic_dim=0).")
        nodes = tree_prefixes(trie)
        self.node_rows(trie, nodes[:1])  # checks the node count
        leaves: dict[tuple[int, ...], list[str]] = {}
        for prefix in nodes:
            if not trie.allowed(prefix):
                doc = trie.doc_id_at(prefix)
                for cut in range(1, len(prefix) + 1):
                    leaves.setdefault(prefix[:cut], []).append(doc)
        table = self.semantic.node_embed.weight
        for row, prefix in enumerate(nodes):
            vectors = torch.stack([torch.as_tensor(doc_vectors[d], dtype=torch.float32) for d in leaves[prefix]])
            if vectors.shape[-1] != table.shape[-1]:
                raise UniragError(f"Encoder vectors have {vectors.shape[-1]} dims; semantic_dim is {table.shape[-1]}.")
            table[row] = F.normalize(F.normalize(vectors, dim=-1).mean(0), dim=0).to(table.dtype)

    # ----------------------------------------------------------------------------- hooks

    def _make_layer_hook(self, layer_idx: int):
        owner_ref = weakref.ref(self)
        is_last = layer_idx == self.pathway_layer_ids[-1]

        def hook(module, args, output):
            owner = owner_ref()
            state = owner._state.get() if owner is not None else None
            if state is None or not state.pathway:
                return None
            retrieval_out = state.retrieval_hidden.pop(layer_idx, None)
            if retrieval_out is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            h_prime = owner.pathways[str(layer_idx)].mlp(hidden, retrieval_out)
            if is_last:
                state.h_prime_last = h_prime
            hidden = hidden + h_prime
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    def _make_entry_pre_hook(self):
        owner_ref = weakref.ref(self)

        def pre_hook(module, args):
            owner = owner_ref()
            state = owner._state.get() if owner is not None else None
            if state is None or not state.pathway or not args:
                return None
            state.entry_hidden = args[0]
            if state.input_ids is None:
                return None
            ids = state.input_ids
            is_extra = ids >= owner.extra_vocab_offset
            if not bool(is_extra.any()):
                return None
            entry = owner.entry_embed((ids - owner.extra_vocab_offset).clamp(min=0)).to(args[0].dtype)
            return (args[0] + entry * is_extra.unsqueeze(-1).to(args[0].dtype), *args[1:])

        return pre_hook

    def _make_norm_pre_hook(self):
        owner_ref = weakref.ref(self)

        def pre_hook(module, args):
            owner = owner_ref()
            state = owner._state.get() if owner is not None else None
            if state is None or not state.bridge:
                return None
            return (owner._apply_bridge(state, args[0]), *args[1:])

        return pre_hook

    def _apply_bridge(self, state: _ForwardState, h: torch.Tensor) -> torch.Tensor:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if state.h_prime_last is None:
            raise UniragError("The bridge needs the retrieval pathway's output (pathway=True).")
        br, hp = self.bridge, state.h_prime_last
        batch, q_len, _ = h.shape
        q = br.cross_q(hp).view(batch, q_len, br.num_heads, br.head_dim).transpose(1, 2)
        kv_in = br.kv_norm(h)
        k = br.cross_k(kv_in).view(batch, q_len, br.num_heads, br.head_dim).transpose(1, 2)
        v = br.cross_v(kv_in).view(batch, q_len, br.num_heads, br.head_dim).transpose(1, 2)
        cache = state.cache
        if cache is not None:
            idx = self.bridge_cache_index
            past = cache.layers[idx].get_seq_length() if len(cache.layers) > idx else 0
            base_past = cache.layers[self._bridge_mask_layer].get_seq_length() - q_len
            if past != base_past:
                raise UniragError(
                    f"The KV cache holds {base_past} positions but bridge keys for {past}: it was built with a "
                    "different bridge setting. Use the same bridge flag for the whole generation."
                )
            k, v = cache.update(k, v, idx)
        scaling = br.head_dim**-0.5
        shim = _shim(self.base_config, self.bridge_cache_index, 1, self.training, br.head_dim, scaling)
        mask = state.bridge_mask if state.bridge_mask_set else None
        eager = self.decoder.layers[0].self_attn._eager
        if state.output_attentions:
            out, weights = _eager_with_weights(eager, shim, q, k, v, mask, scaling)
            state.bridge_attentions = weights
        else:
            interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.base_config._attn_implementation, eager)
            out, _ = interface(shim, q, k, v, mask, dropout=0.0, scaling=scaling)
        out = br.cross_o(out.reshape(batch, q_len, -1).contiguous())
        return h + br.gate * hp + out

    @property
    def bridge_cache_index(self) -> int:
        """The bridge's K/V live in one extra cache layer after the base's layers."""
        return len(self.decoder.layers)

    # ----------------------------------------------------------------------------- forward

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Base ids through the base embedding, extra ids (≥ V) through the extra table."""
        base_embed = self.causal_lm.get_input_embeddings()
        offset = self.extra_vocab_offset
        limit = offset + self.num_extra_tokens
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= limit):
            raise UniragError(
                f"Token ids must be in [0, {limit}); got [{int(input_ids.min())}, {int(input_ids.max())}]."
            )
        is_extra = input_ids >= offset
        base_vectors = base_embed(input_ids.clamp(max=offset - 1))
        if not bool(is_extra.any()):
            return base_vectors
        extra_vectors = self.extra_embed((input_ids - offset).clamp(min=0)).to(base_vectors.dtype)
        return torch.where(is_extra.unsqueeze(-1), extra_vectors, base_vectors)

    def new_cache(self):
        """An empty cache for incremental decoding (base layers + one bridge layer)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.base_config)
        self._ensure_bridge_layer(cache)
        return cache

    def _ensure_bridge_layer(self, cache) -> None:
        from transformers.cache_utils import DynamicLayer

        layers = getattr(cache, "layers", None)
        if layers is None or getattr(cache, "layer_class_to_replicate", None) is not None:
            return  # lazily-growing caches append the layer on first update
        while len(layers) <= self.bridge_cache_index:
            layers.append(DynamicLayer())

    def forward(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
        pathway: bool = True,
        bridge: bool = True,
        output_attentions: bool = False,
        position_ids: torch.Tensor | None = None,
        return_lm_logits: bool = True,
        attention_layers: Iterable[int] | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_layer: int = 0,
        logits_to_keep: int = 0,
    ) -> JointOutput:
        """Run the joint model.

        pathway/bridge switch the retrieval pathway and the bridge for this call (bridge needs pathway).
        output_attentions returns retrieval, bridge and base attention weights; they are exact under
        attn_implementation="eager" and recomputed in eager form otherwise (SDPA returns none), so any
        implementation works. `attention_layers` limits which base layers' weights are returned.
        `return_lm_logits=False` skips the LM head (docid decoding does not need it); `logits_to_keep=n > 0`
        runs it on the last n positions only (a 250-token prefill otherwise spends ~0.25 s on a 49k vocab).
        `inputs_embeds` replaces `embed(input_ids)`; with `start_layer > 0` it is the hidden state entering
        that layer (from `hidden_before_layer`), so training can cache the frozen lower layers (no KV cache).
        """
        if bridge and not pathway:
            raise UniragError("bridge=True needs pathway=True: the bridge reads the last pathway layer's output.")
        if inputs_embeds is None:
            if input_ids is None or input_ids.dim() != 2:
                shape = None if input_ids is None else tuple(input_ids.shape)
                raise UniragError(f"input_ids must be [batch, seq], got {shape}.")
            inputs_embeds = self.embed(input_ids)
        if self.training and (pathway or bridge) and any(
            getattr(layer, "gradient_checkpointing", False) for layer in self.decoder.layers
        ):
            # The checkpointed recompute would run without the per-call side channel and diverge.
            raise UniragError("Gradient checkpointing is not supported with the retrieval pathway; disable it.")
        if start_layer and (use_cache or past_key_values is not None):
            raise UniragError("start_layer > 0 runs without a KV cache (it is meant for training).")
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache()
        elif past_key_values is not None and bridge:
            self._ensure_bridge_layer(past_key_values)
        state = self._new_state(pathway, bridge, output_attentions, attention_layers, past_key_values)
        state.input_ids = input_ids
        token = self._state.set(state)
        try:
            if start_layer:
                hidden = self._run_layers(inputs_embeds, attention_mask, position_ids, start_layer, None)
                hidden = self.decoder.norm(hidden)  # the norm's pre-hook applies the bridge
                cache_out = None
            else:
                outputs = self.decoder(
                    inputs_embeds=inputs_embeds,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    past_key_values=past_key_values,
                    use_cache=use_cache or past_key_values is not None,
                )
                hidden, cache_out = outputs.last_hidden_state, outputs.past_key_values
        finally:
            self._state.reset(token)
        lm_hidden = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        lm_logits = self.causal_lm.lm_head(lm_hidden) if return_lm_logits else None
        docid_logits = self.docid_head(hidden.to(self.docid_head.weight.dtype))
        result = JointOutput(lm_logits=lm_logits, docid_logits=docid_logits, past_key_values=cache_out,
                             hidden_states=hidden)
        if self.semantic is not None and pathway and state.entry_hidden is not None:
            result.query_vectors = self.semantic.query_vectors(state.entry_hidden, hidden, attention_mask)
        if output_attentions:
            num_layers = len(self.decoder.layers)
            result.attentions = tuple(state.base_attentions.get(i) for i in range(num_layers))
            if pathway:
                result.retrieval_attentions = tuple(
                    state.retrieval_attentions[i] for i in self.pathway_layer_ids if i in state.retrieval_attentions
                )
            if bridge:
                result.bridge_attentions = state.bridge_attentions
        return result

    def _new_state(self, pathway, bridge, output_attentions, attention_layers, cache) -> _ForwardState:
        return _ForwardState(
            pathway=pathway,
            bridge=bridge,
            output_attentions=output_attentions,
            attention_layers=frozenset(attention_layers) if attention_layers is not None else None,
            cache=cache,
        )

    def _run_layers(self, hidden: torch.Tensor, attention_mask, position_ids, start: int, end: int | None):
        """Decoder layers [start, end) without a cache, mirroring the decoder's own loop (masks, RoPE)."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        decoder = self.decoder
        config = decoder.config
        if position_ids is None:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask_kwargs = {"config": config, "inputs_embeds": hidden, "attention_mask": attention_mask,
                       "past_key_values": None, "position_ids": position_ids}
        masks = {"full_attention": create_causal_mask(**mask_kwargs)}
        if getattr(decoder, "has_sliding_layers", False):
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
        layer_types = getattr(config, "layer_types", None)
        position_embeddings = decoder.rotary_emb(hidden, position_ids=position_ids)
        for i in range(start, len(decoder.layers) if end is None else end):
            mask = masks.get(layer_types[i], masks["full_attention"]) if layer_types else masks["full_attention"]
            hidden = decoder.layers[i](
                hidden,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=None,
                use_cache=False,
            )
        return hidden

    def hidden_before_layer(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, layer: int | None = None
    ) -> torch.Tensor:
        """Residual stream entering decoder layer `layer` (default: the first pathway layer), [B, T, hidden].

        Feed it back with `forward(..., inputs_embeds=hidden, start_layer=layer)`. Pathway layers below
        `layer` (if any) are applied; the bridge is not (it sits after the last layer).
        """
        layer = self.pathway_layer_ids[0] if layer is None else layer
        if not 0 <= layer < len(self.decoder.layers):
            raise UniragError(f"layer must be in [0, {len(self.decoder.layers)}), got {layer}.")
        state = self._new_state(True, False, False, (), None)
        token = self._state.set(state)
        try:
            return self._run_layers(self.embed(input_ids), attention_mask, None, 0, layer)
        finally:
            self._state.reset(token)

    # ----------------------------------------------------------------------------- LoRA & training

    def enable_lora(
        self,
        r: int = 16,
        alpha: int = 32,
        dropout: float = 0.05,
        target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
        layers: Sequence[int] | None = None,
    ) -> None:
        """Wrap the base's projections with peft LoRA (works on a bitsandbytes 4-bit base).

        `layers` limits LoRA to those decoder layers (None: all). With only top layers adapted, and the
        bottom embeddings frozen, backpropagation stops at the lowest adapted layer.

        Only the base is given to peft, so the pathway/bridge/heads cannot be caught; nothing goes to
        `modules_to_save` (the joint weights are saved separately), which avoids the peft pitfall of a module
        being both a target and saved in full.
        """
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if self._lora_enabled:
            raise UniragError("LoRA is already enabled on this model.")
        target_modules = list(target_modules)
        bad = [t for t in target_modules if t.startswith(("r_", "cross_"))]
        if bad:
            raise UniragError(f"LoRA targets {bad} name joint modules; LoRA is meant for the base's projections.")
        lm = self.base
        if _is_kbit(lm):
            # Freezes the base and upcasts fp16/bf16 non-quantised tensors; no gradient checkpointing (the
            # side channel does not survive recomputation, and it costs a second forward on CPU).
            prepare_model_for_kbit_training(lm, use_gradient_checkpointing=False)
        n_layers = len(self.decoder.layers)
        layers = sorted({int(i) for i in layers}) if layers is not None else None
        if layers is not None and (not layers or layers[0] < 0 or layers[-1] >= n_layers):
            raise UniragError(f"LoRA layers {layers} must be non-empty indices below {n_layers}.")
        lora_config = LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias="none",
            task_type="CAUSAL_LM", layers_to_transform=layers, layers_pattern="layers" if layers else None,
        )
        self.base = get_peft_model(lm, lora_config)
        self._lora_enabled = True
        self._lora_layer_list = None
        self.config.lora = {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": target_modules,
                            "layers": layers}
        # prepare_model_for_kbit_training may have upcast the embedding: keep the new modules in step.
        dtype = self.causal_lm.get_input_embeddings().weight.dtype
        for module in self._new_modules():
            module.to(dtype=dtype)
        self.train(self.training)

    @property
    def lora_enabled(self) -> bool:
        return self._lora_enabled

    @property
    def reader_trained(self) -> bool:
        """Whether stage 2 has adapted the LLM to read with the pathway and the bridge (its LoRA adapter)."""
        return self._lora_enabled and self.config.adapter_in_reading

    @contextlib.contextmanager
    def reading_mode(self, adapter: bool = True):
        """Context for answer generation: switches the LoRA adapter off when it serves retrieval only, or when
        `adapter` is False (the base LLM reads)."""
        if self._lora_enabled and not (adapter and self.config.adapter_in_reading):
            with self.adapter_disabled():
                yield
        else:
            yield

    @contextlib.contextmanager
    def retrieval_mode(self):
        """Context for docid generation: switches the LoRA adapter off when `config.adapter_in_retrieval` is
        False (a no-op otherwise, or without LoRA)."""
        if self._lora_enabled and not self.config.adapter_in_retrieval:
            with self.adapter_disabled():
                yield
        else:
            yield

    @contextlib.contextmanager
    def adapter_disabled(self):
        """The LoRA layers pass their input to the base layer alone: the base LLM's output, exactly.

        Without gradients this flips each LoRA layer's own switch. peft's `disable_adapter()`, used while training,
        also re-reads the whole model's adapter status and toggles `requires_grad`: about 10 ms a call on SmolLM2,
        and a question enters this context three to six times (search, self-check, reading).
        """
        layers = self._lora_layers()
        if torch.is_grad_enabled() or not layers or any(getattr(layer, "merged", False) for layer in layers):
            with self.base.disable_adapter():
                yield
            return
        before = [layer._disable_adapters for layer in layers]
        for layer in layers:
            layer._disable_adapters = True
        try:
            yield
        finally:
            for layer, was in zip(layers, before, strict=True):
                layer._disable_adapters = was

    def _lora_layers(self) -> list[nn.Module]:
        """peft's LoRA layers in the base, found once (enable_lora resets the list)."""
        if self._lora_layer_list is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._lora_layer_list = [m for m in self.base.modules()
                                     if isinstance(m, BaseTunerLayer) and hasattr(m, "_disable_adapters")]
        return self._lora_layer_list

    def joint_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if n.startswith(JOINT_PREFIXES)]

    def stage_parameters(self, stage: int) -> list[nn.Parameter]:
        """Parameters trained in a stage (no side effects). 1: pathway + docid head + entry embeddings (training
        adds LoRA with --stage1-lora); 2: those + bridge + LoRA (if enabled). The new tokens' bottom embeddings
        (`extra_embed`, copied from existing tokens) stay frozen: their trainable part is the entry embedding added
        at the first pathway layer, so no gradient has to travel below it (the stage-1 cache, a cheap stage-2
        backward)."""
        if stage not in (1, 2):
            raise UniragError(f"Unknown training stage {stage}; use 1 or 2.")
        prefixes = ("pathways.", "docid_head.", "entry_embed.", "semantic.") + (
            ("bridge.",) if stage == 2 else ())
        return [
            p for n, p in self.named_parameters()
            if n.startswith(prefixes) or (stage == 2 and self._lora_enabled and "lora_" in n)
        ]

    def stage1_parameters(self) -> list[nn.Parameter]:
        return self.stage_parameters(1)

    def trainable_parameters(self, stage: int) -> list[nn.Parameter]:
        """Set requires_grad for a training stage (True for its parameters, False for all others) and return
        the trainable parameters. Stage 1: pathway + docid head + entry embeddings (base and bridge frozen).
        Stage 2: stage 1 + bridge + LoRA (if enabled).
        """
        chosen = self.stage_parameters(stage)
        ids = {id(p) for p in chosen}
        for param in self.parameters():
            param.requires_grad_(id(param) in ids)
        return chosen


    # ----------------------------------------------------------------------------- save / load (joint.checkpoint)

    def save_pretrained(self, save_dir: str | Path, tree=None,
                        extra_files: Mapping[str, str | bytes | dict | list] | None = None) -> Path:
        """Write a self-describing checkpoint folder; see `unirag.joint.checkpoint.save_pretrained`."""
        return checkpoint.save_pretrained(self, save_dir, tree, extra_files)

    @classmethod
    def from_pretrained(
        cls, checkpoint_dir: str | Path, precision: str = "fp32", base_model: str | None = None,
        dtype: torch.dtype = torch.float32, device: str | None = None, attn_implementation: str = "eager",
    ) -> JointModel:
        """Load a checkpoint written by save_pretrained; see `unirag.joint.checkpoint.from_pretrained`."""
        return checkpoint.from_pretrained(cls, checkpoint_dir, precision, base_model, dtype, device,
                                          attn_implementation)


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "base_layer", module)


def _level_letter(level: int) -> str:
    return chr(ord("A") + level) if level < 26 else f"L{level}"



__all__ = [
    "Bridge",
    "JointAttention",
    "JointModel",
    "JointOutput",
    "RetrievalPathway",
    "tree_prefixes",
]
