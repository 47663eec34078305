"""Perceiver resamplers: `query_num` learned queries cross-attend to one view's vision tokens.

2D (MiniCPM-V 2.6 / o-2.6 / 4.0): keys get a fixed 2D sin-cos position (crop of a 70x70 table),
values do not; queries carry no position. 3D (4.5): keys also get a temporal sin-cos term
(timestamps in 0.1 s units; zero for still images) and the frames of one group (1-6) are
concatenated along the key axis, so a whole group costs `query_num` tokens.

Attention is torch's `nn.MultiheadAttention`: HF stores a packed `in_proj_weight` [3D, D]
(q, k, v order, with bias); `sanitize` splits it into three Linears (quantisable, and the same
names the GGUF mmproj uses). Heads = D // 128 as in HF, floored at 1 so tiny test configs with
D < 128 still work (HF would build 0 heads there and fail).

Position tables are computed on demand for the crop actually used, with numpy float32 exactly
as the reference builds the full 70x70 table (every entry depends only on its own coordinate,
so a crop equals the same slice of the full table).
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from framecast import kernels

HEAD_DIM = 128
LN_EPS = 1e-6


def _omega(n: int, embed_dim: int) -> np.ndarray:
    """1 / 10000^(i / (embed_dim/2)) for i < n, in float32 like the numpy reference."""
    omega = np.arange(n, dtype=np.float32)
    omega /= np.float32(embed_dim / 2.0)
    return (np.float32(1.0) / np.float32(10000) ** omega).astype(np.float32)


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """pos float32 [...] -> [..., embed_dim]: sin half then cos half."""
    out = pos[..., None].astype(np.float32) * _omega(embed_dim // 2, embed_dim)
    return np.concatenate([np.sin(out), np.cos(out)], axis=-1)


@lru_cache(maxsize=256)
def sincos_2d(embed_dim: int, h: int, w: int) -> np.ndarray:
    """[h, w, D] float32: first half encodes the column (w), second half the row (h)."""
    grid_w, grid_h = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return np.concatenate([_sincos_1d(embed_dim // 2, grid_w), _sincos_1d(embed_dim // 2, grid_h)], axis=-1)


def sincos_temporal(embed_dim: int, temporal_ids: list[int]) -> np.ndarray:
    """[N, D] float32 rows of the temporal table (id -1 = still image = zeros)."""
    ids = np.asarray(temporal_ids, dtype=np.int64)
    rows = _sincos_1d(embed_dim, np.maximum(ids, 0).astype(np.float32))
    rows[ids < 0] = 0.0
    return rows


def temporal_ids_from_seconds(timestamps: list[float]) -> list[int]:
    """Frame times (s) -> temporal ids in 0.1 s units (nearest tenth), as 4.5's video path uses."""
    return [int(round(t * 10.0)) for t in timestamps]


def resampler_heads(embed_dim: int) -> int:
    return max(1, embed_dim // HEAD_DIM)


class ResamplerAttention(nn.Module):
    """torch.nn.MultiheadAttention (batch of keys, shared queries), in-projection split."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.scale = (dim // n_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def __call__(self, q: mx.array, k: mx.array, v: mx.array, valid: mx.array | None) -> mx.array:
        b, l, d = k.shape  # q [Q, D]; k, v [B, L, D]; valid [B, L] (True = real key)
        nq = q.shape[0]
        qh = self.q_proj(q).reshape(1, nq, self.n_heads, -1).transpose(0, 2, 1, 3)
        qh = mx.broadcast_to(qh, (b, *qh.shape[1:]))  # [B, H, Q, Dh]
        kh = self.k_proj(k).reshape(b, l, self.n_heads, -1).transpose(0, 2, 1, 3)
        vh = self.v_proj(v).reshape(b, l, self.n_heads, -1).transpose(0, 2, 1, 3)
        mask = None if valid is None else valid[:, None, None, :]  # [B, 1, 1, L]
        if kernels.gpu() == "cuda":
            # MLX 0.32.4's CUDA SDPA (cuDNN) refuses this attention for a batch of several views
            # (Q=64 queries onto 1024 keys, head 128: "stride for the last dimension ... should
            # be 1 for output_names::O" on an H200, with or without a mask, broadcast queries or
            # copied): there it is plain matmuls, the softmax in fp32 as the fused path does
            s = (qh * self.scale) @ kh.swapaxes(-1, -2)  # [B, H, Q, L]
            if mask is not None:
                s = mx.where(mask, s, mx.array(-mx.inf, s.dtype))
            o = mx.softmax(s, axis=-1, precise=True) @ vh
        else:
            o = mx.fast.scaled_dot_product_attention(qh, kh, vh, scale=self.scale, mask=mask)
        return self.out_proj(o.transpose(0, 2, 1, 3).reshape(b, nq, d))  # [B, Q, D]


class Resampler(nn.Module):
    """Vision hidden states [B, L, Dv] of B views -> [B (or groups), query_num, D]."""

    def __init__(self, *, embed_dim: int, kv_dim: int, num_queries: int = 64, num_heads: int | None = None):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_queries = num_queries
        self.query = mx.zeros((num_queries, embed_dim))
        if kv_dim != embed_dim:  # HF uses nn.Identity (no weight) when the widths agree
            self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False)
        self.attn = ResamplerAttention(embed_dim, num_heads or resampler_heads(embed_dim))
        self.ln_q = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.ln_post = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.proj = mx.zeros((embed_dim, embed_dim))  # applied as x @ proj (not a Linear)

    def _key_positions(self, tgt_sizes: list[tuple[int, int]], max_len: int,
                       dtype: mx.Dtype) -> tuple[mx.array, mx.array, bool]:
        """(pos [B, L, D] in `dtype`, valid [B, L], all valid) on the device, cached by shape.

        Built per call, the table was a fresh [B, L, D] float32 numpy array (16 MB for one
        448-px view at D = 4096) filled and copied to the device on every frame: most of the
        resampler's time. A stream repeats the same view sizes, so it is built once.
        """
        return _key_positions(self.embed_dim, tuple(tuple(t) for t in tgt_sizes), max_len, dtype)

    def __call__(self, x: mx.array, tgt_sizes: list[tuple[int, int]], *,
                 temporal_ids: list[int] | None = None, group_sizes: list[int] | None = None) -> mx.array:
        """x [B, L, Dv] (padded views), tgt_sizes [(nh, nw)] per view.

        temporal_ids: one per view (0.1 s units, -1 for images) -> temporal key term (3D).
        group_sizes: consecutive views merged along the key axis (sum = B) -> [G, Q, D].
        """
        b, l, _ = x.shape
        if "kv_proj" in self:
            x = self.kv_proj(x)
        x = self.ln_kv(x)  # [B, L, D]
        pos, valid, all_valid = self._key_positions(tgt_sizes, l, x.dtype)
        k = x + pos
        if temporal_ids is not None and max(temporal_ids) > -1:
            k = k + mx.array(sincos_temporal(self.embed_dim, temporal_ids)).astype(x.dtype)[:, None, :]
        v = x
        if group_sizes is not None:
            k, v, valid = _merge_groups(k, v, valid, group_sizes)
        q = self.ln_q(self.query)  # [Q, D], no position on queries
        out = self.attn(q, k, v, None if all_valid else valid)
        return self.ln_post(out) @ self.proj  # [B or G, Q, D]

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """HF names (without `resampler.`) -> ours: split the packed q/k/v in-projection."""
        out = {}
        for name, value in weights.items():
            if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = name.rsplit("_", 1)[1]  # weight | bias
                for part, chunk in zip(("q_proj", "k_proj", "v_proj"), mx.split(value, 3, axis=0)):
                    out[f"attn.{part}.{kind}"] = chunk
            else:
                out[name] = value
        return out


@lru_cache(maxsize=16)
def _key_positions(embed_dim: int, tgt_sizes: tuple, max_len: int, dtype: mx.Dtype) -> tuple[mx.array, mx.array, bool]:
    pos = np.zeros((len(tgt_sizes), max_len, embed_dim), np.float32)
    valid = np.zeros((len(tgt_sizes), max_len), bool)
    for i, (h, w) in enumerate(tgt_sizes):
        pos[i, : h * w] = sincos_2d(embed_dim, h, w).reshape(h * w, -1)
        valid[i, : h * w] = True
    pos_mx, valid_mx = mx.array(pos).astype(dtype), mx.array(valid)
    mx.eval(pos_mx, valid_mx)
    return pos_mx, valid_mx, bool(valid.all())


def _merge_groups(k: mx.array, v: mx.array, valid: mx.array, group_sizes: list[int]):
    """Concatenate consecutive views along the key axis: [B, L, D] -> [G, n*L (padded), D].

    Padded keys of each frame stay in place and stay masked, so the result equals dropping them.
    """
    b, l, d = k.shape
    if sum(group_sizes) != b:
        raise ValueError(f"group sizes {group_sizes} do not add up to {b} views")
    if len(set(group_sizes)) == 1:
        n = group_sizes[0]
        return k.reshape(-1, n * l, d), v.reshape(-1, n * l, d), valid.reshape(-1, n * l)
    longest = max(group_sizes) * l
    ks, vs, ms, start = [], [], [], 0
    for n in group_sizes:
        pad = longest - n * l
        ks.append(mx.pad(k[start:start + n].reshape(n * l, d), [(0, pad), (0, 0)]))
        vs.append(mx.pad(v[start:start + n].reshape(n * l, d), [(0, pad), (0, 0)]))
        ms.append(mx.pad(valid[start:start + n].reshape(n * l), [(0, pad)], constant_values=False))
        start += n
    return mx.stack(ks), mx.stack(vs), mx.stack(ms)
