"""The one decoder: Llama, Qwen2, Qwen3 and MiniCPM are rows of a table, not modules.

As in gpt-fast, a family is data. Every family shares the Llama layout (pre-norm blocks,
GQA attention with RoPE, SwiGLU MLP, RMSNorm, HF weight names `model.*` / `lm_head.*`);
what differs is a handful of `ModelArgs` fields that `FAMILIES` fills in:

  family    HF keys it reads (beyond the common ones)      fixed by the family
  llama     head_dim, attention_bias (q,k,v,o), mlp_bias    RoPE base 1e4
  qwen2     -                                               q/k/v biases, RoPE base 1e6
  qwen3     head_dim, attention_bias                        per-head q/k RMSNorm, RoPE base 1e6
  minicpm   head_dim, kv_channels, attention_bias,          muP scales (see below), RoPE base 1e4
            scale_emb, scale_depth, dim_model_base

A family ignores the keys it does not read, as its HF class does (a MiniCPM-V 4.0 config.json
run as `llama` never picks up muP keys).

MiniCPM's muP (MiniCPM4 technical report; HF `modeling_minicpm.py`), all constant multipliers:
  - text token embeddings are multiplied by `scale_emb` (in `embed_tokens`: vision features
    scattered in afterwards are never scaled);
  - each residual branch (attention, MLP) is multiplied by `scale_depth / sqrt(num_layers)`;
  - logits are divided by `hidden_size / dim_model_base` (applied to the final hidden state,
    which is the same for a bias-free head and costs D instead of V multiplies).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from framecast.errors import ModelLoadError
from framecast.model.cache import KVCache
from framecast.model.lm.base import (
    MLP,
    Attention,
    BaseModelArgs,
    TransformerBlock,
    causal_mask,
    make_rope,
    sanitize_head,
)

# Keys every family reads from an HF config (the ModelArgs fields not listed per family).
_COMMON_KEYS = frozenset({
    "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size",
    "model_type", "num_key_value_heads", "rms_norm_eps", "rope_theta", "rope_scaling",
    "max_position_embeddings", "tie_word_embeddings",
})


@dataclass(frozen=True)
class Family:
    """One row of the family table: which optional HF keys it reads, what it fixes."""

    reads: frozenset[str] = frozenset()
    defaults: tuple[tuple[str, Any], ...] = ()  # ModelArgs fields set when the config leaves them unset


FAMILIES: dict[str, Family] = {
    "llama": Family(frozenset({"head_dim", "attention_bias", "mlp_bias"}),
                    (("rope_theta", 10000.0),)),
    "qwen2": Family(frozenset(),
                    (("rope_theta", 1000000.0), ("qkv_bias", True))),
    "qwen3": Family(frozenset({"head_dim", "attention_bias"}),
                    (("rope_theta", 1000000.0), ("qk_norm", True))),
    "minicpm": Family(frozenset({"head_dim", "kv_channels", "attention_bias", "scale_emb", "scale_depth",
                                 "dim_model_base"}),
                      (("rope_theta", 10000.0), ("scale_depth", 1.0))),
}


def family(model_type: str) -> Family:
    """The table row for an HF `model_type` (or GGUF arch); ModelLoadError names the known ones."""
    row = FAMILIES.get(model_type)
    if row is None:
        known = ", ".join(sorted(FAMILIES))
        raise ModelLoadError(f"unsupported language model_type {model_type!r} (known: {known})")
    return row


@dataclass
class ModelArgs(BaseModelArgs):
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    model_type: str  # a FAMILIES key
    num_key_value_heads: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float | None = None  # None: the family's base
    rope_scaling: dict | None = None  # default | linear | llama3 | longrope (MiniCPM4)
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    head_dim: int | None = None  # Qwen3-8B: 128, not hidden_size / heads in general
    kv_channels: int | None = None  # MiniCPM4's name for head_dim
    attention_bias: bool = False  # bias on o_proj, and on q/k/v unless `qkv_bias` says otherwise
    mlp_bias: bool = False
    qkv_bias: bool | None = None  # None: follows attention_bias (Qwen2: always True, o_proj never)
    qk_norm: bool | None = None  # Qwen3: RMSNorm over head_dim, per head, before RoPE (None: off)
    scale_emb: float = 1.0  # muP: text embeddings times this
    scale_depth: float | None = None  # muP: residual branches times scale_depth / sqrt(layers)
    dim_model_base: int | None = None  # muP: logits divided by hidden_size / dim_model_base

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> "ModelArgs":
        """From an HF config dict: only the keys its family reads (see the table above)."""
        model_type = params.get("model_type")
        if model_type is not None:
            reads = _COMMON_KEYS | family(model_type).reads
            params = {k: v for k, v in params.items() if k in reads or k == "rope_parameters"}
        return super().from_dict(params)

    def __post_init__(self):
        for name, value in family(self.model_type).defaults:
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.kv_channels or self.hidden_size // self.num_attention_heads
        if self.qkv_bias is None:
            self.qkv_bias = self.attention_bias
        self.qk_norm = bool(self.qk_norm)

    @property
    def residual_scale(self) -> float:
        """Each residual branch is multiplied by this (muP; 1.0 without `scale_depth`)."""
        return self.scale_depth / math.sqrt(self.num_hidden_layers) if self.scale_depth is not None else 1.0

    @property
    def logit_scale(self) -> float:
        """Logits are divided by this (hidden_size / dim_model_base; 1.0 without muP)."""
        return self.hidden_size / self.dim_model_base if self.dim_model_base else 1.0


def _block(args: ModelArgs) -> TransformerBlock:
    rope = make_rope(
        args.head_dim,
        base=args.rope_theta,
        scaling=args.rope_scaling,
        max_position_embeddings=args.max_position_embeddings,
    )
    attention = Attention(
        args.hidden_size,
        args.num_attention_heads,
        args.num_key_value_heads,
        args.head_dim,
        rope,
        qkv_bias=args.qkv_bias,
        o_bias=args.attention_bias,
        qk_norm_eps=args.rms_norm_eps if args.qk_norm else None,
    )
    mlp = MLP(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
    return TransformerBlock(attention, mlp, args.hidden_size, args.rms_norm_eps,
                            residual_scale=args.residual_scale)


class Decoder(nn.Module):
    """Embeddings, layers, final norm (HF's `model.*`)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [_block(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, h: mx.array, cache: list | None) -> mx.array:
        # h: [B, T, D] (text part already scaled by scale_emb) -> [B, T, D]
        mask = causal_mask(h.shape[1])
        if cache is None:
            cache = [None] * len(self.layers)
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, mask, layer_cache)
        return self.norm(h)


class Model(nn.Module):
    """A causal language model of any family in `FAMILIES` (mlx-lm's `Model` interface)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Decoder(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @property
    def layers(self) -> list:
        return self.model.layers

    def embed_tokens(self, ids: mx.array) -> mx.array:
        # [B, T] -> [B, T, D], INCLUDING the muP embedding scale (text tokens only)
        h = self.model.embed_tokens(ids)
        return h * self.args.scale_emb if self.args.scale_emb != 1.0 else h

    def __call__(
        self,
        inputs: mx.array | None = None,
        cache: list | None = None,
        input_embeddings: mx.array | None = None,
        *,
        last_only: bool = False,
    ) -> mx.array:
        """Logits [B, T, V]; with `last_only`, [B, 1, V] for the last position only (a
        prefill that just needs the next token skips T-1 rows of the V-wide head).
        `input_embeddings`, when given, are final (text part already scaled by embed_tokens)."""
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        h = self.model(h, cache)  # [B, T, D]
        if last_only:
            h = h[:, -1:, :]  # [B, 1, D]
        return self.head(h)

    def head(self, h: mx.array) -> mx.array:
        """Final-normed hidden states [B, T, D] -> logits [B, T, V] (muP logit scale, tied or own head)."""
        if self.args.logit_scale != 1.0:
            h = h * (1.0 / self.args.logit_scale)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)  # [B, T, V]

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        return sanitize_head(weights, tied=self.args.tie_word_embeddings)
