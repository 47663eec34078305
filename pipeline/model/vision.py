"""SigLIP vision tower, NaViT variant (MiniCPM-V 2.6 / o-2.6 / 4.0 / 4.5).

Views of different sizes are batched: each view is cut into 14x14 patches (row-major), the
batch is padded to the longest view and padded patches are masked as attention keys. Position
ids come from a learned side x side table (70 x 70 for the 980-pixel SigLIP) through HF's
fractional bucketing, which we reproduce bit for bit (see `navit_position_ids`).

Weights follow HF names under `vpm.`; `sanitize` turns the Conv2d patch embedding
[D, 3, p, p] into a Linear over flattened (row, col, channel) patches [D, p*p*3].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from framecast.model.compiled import linear


# HF `hidden_act` names of the tower's MLP. Every MiniCPM-V checkpoint uses the tanh GELU; the
# embedded demo model uses ReLU because MLX's CPU transcendental ops (tanh, exp) are scalar and
# made the GELU 40 % of its tower's time on a 2-core CPU (4 layers x 8.7 ms of 83 ms a frame).
ACTIVATIONS = {
    "gelu_pytorch_tanh": nn.gelu_approx,
    "gelu": nn.gelu,
    "relu": nn.relu,
}


@dataclass
class VisionArgs:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_attention_heads: int = 16
    num_hidden_layers: int = 27
    patch_size: int = 14
    image_size: int = 980
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"  # HF name; the MLP's activation (see ACTIVATIONS)

    @classmethod
    def from_dict(cls, d: dict) -> "VisionArgs":
        args = cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})
        if not isinstance(args.hidden_act, str) or args.hidden_act not in ACTIVATIONS:
            raise ValueError(f"vision_config.hidden_act {args.hidden_act!r} is not one of "
                             f"{', '.join(sorted(ACTIVATIONS))}")
        return args

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size


# ---------------------------------------------------------------- NaViT position ids


def _torch_arange_f32(start: float, end: float, step: float) -> np.ndarray:
    """What `torch.arange(start, end, step)` returns in float32 on CPU (torch 2.x), bit for bit.

    torch computes in double but its vectorised kernel runs in blocks of 16 as two 8-lane
    vectors: each vector's first value is `float(start + i*step)` and its lanes add `k*step` to
    that ROUNDED base; the tail after the last full block of 16 is computed element by element.
    The rounding of the base is what moves a few coordinates across bucket boundaries.
    """
    count = max(math.ceil((end - start) / step), 0)
    out = np.empty(count, np.float32)
    n_vec = count // 16 * 16
    lanes = np.arange(8, dtype=np.float64) * step
    for i in range(0, n_vec, 8):
        out[i:i + 8] = (float(np.float32(start + i * step)) + lanes).astype(np.float32)
    for i in range(n_vec, count):
        out[i] = np.float32(start + i * step)
    return out


@lru_cache(maxsize=512)
def navit_bucket_coords(n: int, num_side: int = 70) -> np.ndarray:
    """Bucket (0..num_side-1) of each of n patch rows (or columns), as HF computes it:
    `torch.bucketize(arange(0, 1-1e-6, 1/n), arange(1/side, 1, 1/side), right=True)` with n a
    tensor, so the step is the float32 reciprocal. Differs from floor(side*i/n) at exact ties
    (side 70: n = 25, 49, 50, 55, 58)."""
    step = float(np.float32(1.0) / np.float32(n))
    coords = _torch_arange_f32(0.0, 1.0 - 1e-6, step)
    boundaries = _torch_arange_f32(1.0 / num_side, 1.0, 1.0 / num_side)
    return np.searchsorted(boundaries, coords, side="right").astype(np.int32)


def navit_position_ids(nh: int, nw: int, num_side: int = 70) -> np.ndarray:
    """Position-table rows for an nh x nw patch grid, row-major: bucket(i)*side + bucket(j)."""
    rows, cols = navit_bucket_coords(nh, num_side), navit_bucket_coords(nw, num_side)
    return (rows[:, None] * num_side + cols[None, :]).reshape(-1)


def patchify(view: np.ndarray, patch_size: int) -> np.ndarray:
    """float32 [H, W, C] -> [H/p * W/p, p*p*C]: patches row-major, each flattened (row, col, channel)."""
    h, w, c = view.shape
    nh, nw = h // patch_size, w // patch_size
    x = view[: nh * patch_size, : nw * patch_size].reshape(nh, patch_size, nw, patch_size, c)
    return x.transpose(0, 2, 1, 3, 4).reshape(nh * nw, patch_size * patch_size * c)


def batch_views(views: list[np.ndarray], patch_size: int, num_side: int):
    """Pad views' patches to one batch: (patches [B, L, p*p*3], position ids [B, L],
    valid [B, L] bool, tgt_sizes [(nh, nw)])."""
    sizes = [(v.shape[0] // patch_size, v.shape[1] // patch_size) for v in views]
    max_len = max(nh * nw for nh, nw in sizes)
    dim = patch_size * patch_size * views[0].shape[2]
    patches = np.zeros((len(views), max_len, dim), np.float32)
    pos = np.zeros((len(views), max_len), np.int32)
    valid = np.zeros((len(views), max_len), bool)
    for b, (view, (nh, nw)) in enumerate(zip(views, sizes)):
        n = nh * nw
        patches[b, :n] = patchify(view, patch_size)
        pos[b, :n] = navit_position_ids(nh, nw, num_side)
        valid[b, :n] = True
    return patches, pos, valid, sizes


# ---------------------------------------------------------------- modules


class VisionAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.scale = (dim // n_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array, mask: mx.array | None) -> mx.array:
        # x [B, L, D]; unflatten / flatten and `linear`: the tower may be compiled shapeless
        def heads(proj):  # -> [B, heads, L, head_dim]
            return mx.unflatten(linear(proj, x), -1, (self.n_heads, -1)).transpose(0, 2, 1, 3)
        q, k, v = heads(self.q_proj), heads(self.k_proj), heads(self.v_proj)
        # mx.fast SDPA accumulates the softmax in fp32 (HF upcasts to fp32 too).
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return linear(self.out_proj, mx.flatten(o.transpose(0, 2, 1, 3), -2, -1))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu_pytorch_tanh"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = ACTIVATIONS[act]

    def __call__(self, x: mx.array) -> mx.array:
        return linear(self.fc2, self.act(linear(self.fc1, x)))


class VisionLayer(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        d = args.hidden_size
        self.layer_norm1 = nn.LayerNorm(d, eps=args.layer_norm_eps)
        self.self_attn = VisionAttention(d, args.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(d, eps=args.layer_norm_eps)
        self.mlp = VisionMLP(d, args.intermediate_size, args.hidden_act)

    def __call__(self, x: mx.array, mask: mx.array | None) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class VisionEmbeddings(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        p = args.patch_size
        # HF's Conv2d(k = stride = p) is a Linear over flattened patches (see sanitize).
        self.patch_embedding = nn.Linear(p * p * args.num_channels, args.hidden_size)
        self.position_embedding = nn.Embedding(args.num_patches_per_side ** 2, args.hidden_size)

    def __call__(self, patches: mx.array, position_ids: mx.array) -> mx.array:
        return self.patch_embedding(patches) + self.position_embedding(position_ids)


class VisionEncoder(nn.Module):
    def __init__(self, args: VisionArgs, n_layers: int):
        super().__init__()
        self.layers = [VisionLayer(args) for _ in range(n_layers)]


class SiglipVisionTower(nn.Module):
    """patches [B, L, p*p*3] + position ids [B, L] + valid [B, L] -> hidden states [B, L, D]."""

    def __init__(self, args: VisionArgs, *, drop_last_layer: bool = False):
        super().__init__()
        self.args = args
        n_layers = args.num_hidden_layers - (1 if drop_last_layer else 0)
        self.embeddings = VisionEmbeddings(args)
        self.encoder = VisionEncoder(args, n_layers)
        self.post_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)

    def __call__(self, patches: mx.array, position_ids: mx.array, valid: mx.array | None = None) -> mx.array:
        dtype = self.embeddings.position_embedding.weight.dtype  # the tower's compute dtype
        x = self.embeddings(patches.astype(dtype), position_ids)
        mask = None
        if valid is not None and not bool(mx.all(valid)):
            mask = valid[:, None, None, :]  # [B, 1, 1, L]: padded patches never serve as keys
        if self.compiled:  # inference on a GPU (framecast.model.compiled)
            if self._layers is None:
                # one trace per batch shape (a stream's frames: one); shapeless fused less (H200)
                self._layers = mx.compile(self._run_layers, inputs=self)
            return self._layers(x, mask)
        return self._run_layers(x, mask)

    compiled = False
    _layers = None  # the compiled body, made at the first compiled call

    def _run_layers(self, x: mx.array, mask: mx.array | None) -> mx.array:
        for layer in self.encoder.layers:  # x [B, L, D]
            x = layer(x, mask)
        return self.post_layernorm(x)  # [B, L, D]

    def encode_views(self, views: list[np.ndarray]) -> tuple[mx.array, list[tuple[int, int]]]:
        """Normalised float32 views [H, W, 3] -> (hidden [B, L_max, D], tgt_sizes (nh, nw))."""
        patches, pos, valid, sizes = batch_views(views, self.args.patch_size, self.args.num_patches_per_side)
        out = self(mx.array(patches), mx.array(pos), mx.array(valid))
        return out, sizes

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """HF names (without the `vpm.` prefix) -> ours: Conv2d patch kernel to a Linear."""
        out = {}
        for k, v in weights.items():
            if k == "embeddings.patch_embedding.weight" and v.ndim == 4:
                if v.shape[-1] != 3:  # torch [D, C, p, p] (ours / MLX conv is [D, p, p, C])
                    v = v.transpose(0, 2, 3, 1)
                v = v.reshape(v.shape[0], -1)
            out[k] = v
        return out
