"""Qwen2 / Qwen2.5 decoder (MiniCPM-V 2.6, MiniCPM-o 2.6): Llama layout plus q/k/v biases."""

from __future__ import annotations

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
    model_type: str = "qwen2"
    num_key_value_heads: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


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
        qkv_bias=True,  # Qwen2's one difference from Llama
    )
    mlp = MLP(args.hidden_size, args.intermediate_size)
    return TransformerBlock(attention, mlp, args.hidden_size, args.rms_norm_eps)


class Qwen2Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [_block(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, h: mx.array, cache: list | None) -> mx.array:
        # h: [B, T, D] -> [B, T, D]
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
        self.model = Qwen2Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @property
    def layers(self) -> list:
        return self.model.layers

    def embed_tokens(self, ids: mx.array) -> mx.array:
        return self.model.embed_tokens(ids)  # [B, T] -> [B, T, D]

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
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        h = self.model(h, cache)  # [B, T, D]
        if last_only:
            h = h[:, -1:, :]  # [B, 1, D]
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)  # [B, T, V]

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        return sanitize_head(weights, tied=self.args.tie_word_embeddings)
