"""Pieces every decoder family shares: config parsing, RoPE variants, attention, SwiGLU MLP.

Attention runs on `mx.fast` kernels (RoPE, RMSNorm, SDPA) and keeps the cache protocol
duck-typed: anything with `offset` and `update_and_fetch(keys, values)` works.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from framecast.errors import ModelLoadError
from framecast.model.compiled import linear
from framecast.model.kv_pool import attend_rows, same_pool
from framecast.kernels.cache_attention import cache_attention


@dataclass
class BaseModelArgs:
    @classmethod
    def from_dict(cls, params: dict[str, Any]):
        """Build from an HF config dict, ignoring keys this family does not use.

        transformers >= 5 nests `rope_theta` and the scaling under `rope_parameters`;
        older config.json files keep `rope_theta` / `rope_scaling` at top level. Both work.
        """
        params = dict(params)
        rope = params.get("rope_parameters")
        if isinstance(rope, dict):
            if "rope_theta" in rope:
                params.setdefault("rope_theta", rope["rope_theta"])
            if rope.get("rope_type", rope.get("type", "default")) != "default":
                params.setdefault("rope_scaling", rope)
        fields = inspect.signature(cls).parameters
        for name, field in fields.items():
            if field.default is inspect.Parameter.empty and params.get(name) is None:
                raise ModelLoadError(f"config is missing required key {name!r} ({cls.__module__})")
        return cls(**{k: v for k, v in params.items() if k in fields and v is not None})


# -- RoPE ------------------------------------------------------------------------------------


class RoPE(nn.Module):
    """Rotate-half RoPE (`traditional=False`), optionally with per-frequency periods.

    `freqs` are periods (1 / inverse frequency), as `mx.fast.rope` expects; `mscale`
    multiplies cos and sin (long-context variants), applied by scaling x since RoPE is linear.
    """

    def __init__(
        self,
        dims: int,
        *,
        base: float = 10000.0,
        scale: float = 1.0,
        freqs: mx.array | None = None,
        mscale: float = 1.0,
    ):
        super().__init__()
        self.dims = dims
        self.base = None if freqs is not None else base
        self.scale = scale
        self._freqs = freqs  # underscore: not a parameter, never saved or loaded
        self.mscale = mscale

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        # x: [B, n_heads, T, head_dim]; positions offset .. offset+T-1
        if self.mscale != 1.0:
            x = x * self.mscale
        return mx.fast.rope(
            x,
            self.dims,
            traditional=False,
            base=self.base,
            scale=self.scale,
            offset=offset,
            freqs=self._freqs,
        )


def _periods(dims: int, base: float) -> mx.array:
    # [dims/2] float32: base^(2i/dims) = 1 / inv_freq_i
    return base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)


def make_rope(
    dims: int,
    *,
    base: float,
    scaling: dict | None = None,
    max_position_embeddings: int | None = None,
) -> RoPE:
    """RoPE for an HF `rope_scaling` dict: default, linear, llama3, longrope (MiniCPM)."""
    if not scaling:
        return RoPE(dims, base=base)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return RoPE(dims, base=base)
    if kind == "linear":
        return RoPE(dims, base=base, scale=1.0 / float(scaling["factor"]))
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        periods = _periods(dims, base)
        wavelen = 2 * math.pi * periods
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended
        # (in inverse-frequency space, as the reference does).
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = 1.0 / ((1 - smooth) / (periods * factor) + smooth / periods)
        periods = mx.where(
            wavelen > old_ctx / low,
            periods * factor,
            mx.where(wavelen < old_ctx / high, periods, blended),
        )
        return RoPE(dims, freqs=periods)
    if kind == "longrope":
        # MiniCPM's LongRoPE: the choice between long and short factors is fixed by the
        # configured context (never by the current length, which would invalidate a cache).
        original = int(scaling.get("original_max_position_embeddings") or max_position_embeddings)
        max_pos = int(max_position_embeddings or original)
        factors = scaling["long_factor"] if max_pos > original else scaling["short_factor"]
        if len(factors) != dims // 2:
            raise ModelLoadError(
                f"rope_scaling factors have {len(factors)} entries, expected {dims // 2}"
            )
        ratio = max_pos / original
        mscale = math.sqrt(1 + math.log(ratio) / math.log(original)) if ratio > 1 else 1.0
        periods = mx.array(factors, dtype=mx.float32) * _periods(dims, base)
        return RoPE(dims, freqs=periods, mscale=mscale)
    raise ModelLoadError(f"config key rope_scaling: unsupported rope type {kind!r}")


# -- attention / MLP / block ------------------------------------------------------------------


def causal_mask(length: int) -> str | None:
    """SDPA mask for `length` new tokens.

    "causal" in `mx.fast.scaled_dot_product_attention` aligns the diagonal to the END of the
    keys, so it stays right when T_q < T_k (chunked prefill on a cache). One token sees all.
    """
    return "causal" if length > 1 else None


class RowCaches:
    """One layer's caches of several sessions, one per batch row: a batched forward whose rows
    continue different streams (`framecast.engine.generate.prefill_rows`).

    The projections and the MLP run on all rows at once (the weights are read once for the
    batch). When the caches are rows of one shared buffer (`framecast.model.kv_pool`), RoPE,
    the cache write and the attention run once for the batch, each row masked at its own
    length; otherwise row by row, on each row's own cache, exactly as a one-row forward does."""

    def __init__(self, caches: list):
        self.rows = list(caches)

    def __len__(self) -> int:
        return len(self.rows)


class Attention(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        rope: RoPE,
        *,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm_eps: float | None = None,
    ):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.q_proj = nn.Linear(hidden_size, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden_size, bias=o_bias)
        if qk_norm_eps is not None:  # Qwen3: RMSNorm over head_dim, per head, before RoPE
            self.q_norm = nn.RMSNorm(head_dim, eps=qk_norm_eps)
            self.k_norm = nn.RMSNorm(head_dim, eps=qk_norm_eps)
        self.qk_norm = qk_norm_eps is not None
        self.rope = rope

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """x [B, L, D] -> q [B, n_heads, L, head_dim], k and v [B, n_kv, L, head_dim] (before RoPE)."""
        # unflatten / flatten, never reshape to x.shape: the compiled bodies are shapeless
        q = mx.unflatten(linear(self.q_proj, x), -1, (self.n_heads, self.head_dim))  # [B, L, n_heads, head_dim]
        k = mx.unflatten(linear(self.k_proj, x), -1, (self.n_kv_heads, self.head_dim))
        v = mx.unflatten(linear(self.v_proj, x), -1, (self.n_kv_heads, self.head_dim))
        if self.qk_norm:
            q = self.q_norm(q)
            k = self.k_norm(k)
        return q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask, cache) -> mx.array:
        """RoPE, cache write and attention of projected q/k/v: [B, n_heads, L, head_dim]."""
        if isinstance(cache, RowCaches):  # row b continues its own session's cache
            if len(cache) != q.shape[0]:
                raise ValueError(f"{len(cache)} row caches for a batch of {q.shape[0]}")
            if (mask is None or mask == "causal") and same_pool(cache.rows) is not None:
                # rows of one shared buffer: one RoPE, one cache write, one attention for all
                return attend_rows(q, k, v, cache.rows, self.rope, scale=self.scale)
            return mx.concatenate([self._attend(q[b:b + 1], k[b:b + 1], v[b:b + 1], mask, c)
                                   for b, c in enumerate(cache.rows)])
        return self._attend(q, k, v, mask, cache)

    def output(self, out: mx.array) -> mx.array:
        """[B, n_heads, L, head_dim] -> o_proj -> [B, L, D]."""
        return linear(self.o_proj, mx.flatten(out.transpose(0, 2, 1, 3), -2, -1))

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        return self.output(self.attend(*self.project(x), mask, cache))

    def _attend(self, q: mx.array, k: mx.array, v: mx.array, mask, cache) -> mx.array:
        """RoPE at the cache's offset, cache write, attention: [B, heads, L, head_dim] in and out."""
        L = q.shape[2]
        if cache is not None:
            q = self.rope(q, offset=cache.offset)
            k = self.rope(k, offset=cache.offset)
            k, v = cache.update_and_fetch(k, v)  # [B, n_kv, T_k, head_dim]
        else:
            q = self.rope(q)
            k = self.rope(k)
        # GQA is handled inside the kernels (n_heads a multiple of n_kv_heads).
        if cache is not None and ((isinstance(mask, str) and mask == "causal") or (mask is None and L == 1)):
            # New tokens onto a cache (causal inside the block): the op picks an implementation
            # with no per-key-length set-up on CUDA and may read the cache buffers in place.
            out = cache_attention(q, k, v, scale=self.scale, buffers=getattr(cache, "buffers", None))
        else:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return out


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return linear(self.down_proj, nn.silu(linear(self.gate_proj, x)) * linear(self.up_proj, x))


class TransformerBlock(nn.Module):
    """Pre-norm decoder layer; `residual_scale` multiplies each branch (MiniCPM muP)."""

    def __init__(
        self,
        attention: Attention,
        mlp: MLP,
        hidden_size: int,
        rms_norm_eps: float,
        *,
        residual_scale: float = 1.0,
    ):
        super().__init__()
        self.self_attn = attention
        self.mlp = mlp
        self.input_layernorm = nn.RMSNorm(hidden_size, eps=rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(hidden_size, eps=rms_norm_eps)
        self.residual_scale = residual_scale

    # FRAMECAST_COMPILE=on runs the layer as two compiled bodies around the attention
    # (`framecast.model.compiled.compile_layers`): the norms, projections, residuals and the MLP
    # fuse into fewer launches, while RoPE offsets, cache writes and attention stay eager (their
    # key lengths change every step). Training never switches it on.
    compiled = False

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        if self.compiled:
            if self._pre is None:
                # shapeless: one trace serves every token count and batch (a new question's
                # length must not pay a trace and kernel build, as SDPA's per-shape set-up did)
                self._pre = mx.compile(self._before_attention, inputs=self, shapeless=True)
                self._post = mx.compile(self._after_attention, inputs=self, shapeless=True)
            return self._post(x, self.self_attn.attend(*self._pre(x), mask, cache))
        return self._residuals(x, self.self_attn(self.input_layernorm(x), mask, cache))

    _pre = _post = None  # the compiled bodies, made at the first compiled call

    def _before_attention(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        return self.self_attn.project(self.input_layernorm(x))  # x [B, L, D] -> q, k, v

    def _after_attention(self, x: mx.array, attended: mx.array) -> mx.array:
        # x [B, L, D] the residual stream, attended [B, n_heads, L, head_dim] -> [B, L, D]
        return self._residuals(x, self.self_attn.output(attended))

    def _residuals(self, x: mx.array, h: mx.array) -> mx.array:
        """x + attention branch h, then + the MLP branch (each scaled by residual_scale)."""
        if self.residual_scale != 1.0:
            h = h * self.residual_scale
        x = x + h
        h = self.mlp(self.post_attention_layernorm(x))
        if self.residual_scale != 1.0:
            h = h * self.residual_scale
        return x + h


def drop_rotary_buffers(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """HF checkpoints may carry `rotary_emb.inv_freq` buffers; RoPE is recomputed here."""
    return {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}


def sanitize_head(weights: dict[str, mx.array], *, tied: bool) -> dict[str, mx.array]:
    """Tied: drop any stored `lm_head.*`. Untied but absent: the head is the embedding table
    (some checkpoints tie without saying so), including quantisation scales/biases."""
    weights = drop_rotary_buffers(weights)
    if tied:
        return {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
    if "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights:
        for part in ("weight", "scales", "biases"):
            if f"model.embed_tokens.{part}" in weights:
                weights[f"lm_head.{part}"] = weights[f"model.embed_tokens.{part}"]
    return weights
