"""MiniCPM decoder (MiniCPM-V 4.0's MiniCPM4-class LLM): Llama layout with muP scaling.

muP differs from Llama in three places, all constant multipliers:
  - text token embeddings are multiplied by `scale_emb` (in `embed_tokens`: vision features
    scattered in afterwards are never scaled);
  - each residual branch (attention, MLP) is multiplied by `scale_depth / sqrt(num_layers)`;
  - logits are divided by `hidden_size / dim_model_base` (applied to the final hidden state,
    which is the same for a bias-free head and costs D instead of V multiplies).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

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


@dataclass
class ModelArgs(BaseModelArgs):
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    model_type: str = "minicpm"
    num_key_value_heads: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # MiniCPM4: {"rope_type": "longrope", ...}
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    head_dim: int | None = None
    kv_channels: int | None = None  # MiniCPM4's name for head_dim
    attention_bias: bool = False
    scale_emb: float = 1.0
    scale_depth: float = 1.0
    dim_model_base: int | None = None  # None: no logit scaling

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def residual_scale(self) -> float:
        return self.scale_depth / math.sqrt(self.num_hidden_layers)

    @property
    def logit_scale(self) -> float:
        """Logits are divided by this (hidden_size / dim_model_base)."""
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
        qkv_bias=args.attention_bias,
        o_bias=args.attention_bias,
    )
    mlp = MLP(args.hidden_size, args.intermediate_size)
    return TransformerBlock(
        attention,
        mlp,
        args.hidden_size,
        args.rms_norm_eps,
        residual_scale=args.residual_scale,
    )


class MiniCPMModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [_block(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, h: mx.array, cache: list | None) -> mx.array:
        # h: [B, T, D] (already scaled by scale_emb) -> [B, T, D]
        mask = causal_mask(h.shape[1])
        if cache is None:
            cache = [None] * len(self.layers)
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, mask, layer_cache)
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = MiniCPMModel(args)
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
        prefill that just needs the next token skips T-1 rows of the V-wide head)."""
        # input_embeddings, when given, are final (text part already scaled by embed_tokens).
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        h = self.model(h, cache)  # [B, T, D]
        if last_only:
            h = h[:, -1:, :]  # [B, 1, D]
        if self.args.logit_scale != 1.0:
            h = h * (1.0 / self.args.logit_scale)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)  # [B, T, V]

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        return sanitize_head(weights, tied=self.args.tie_word_embeddings)
