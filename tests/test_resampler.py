"""2D and 3D perceiver resamplers vs torch references written from the published formulas."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from framecast.model.resampler import Resampler, resampler_heads, sincos_2d, sincos_temporal, temporal_ids_from_seconds


# ---------------------------------------------------------------- reference (numpy + torch)


def _ref_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000 ** omega
    out = np.einsum("...,d->...d", pos.astype(np.float32), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=-1)


def _ref_table_70(dim: int) -> np.ndarray:
    """Full 70 x 70 table: [sin(w om), cos(w om), sin(h om), cos(h om)]."""
    gw, gh = np.meshgrid(np.arange(70, dtype=np.float32), np.arange(70, dtype=np.float32))
    return np.concatenate([_ref_1d(dim // 2, gw), _ref_1d(dim // 2, gh)], axis=-1)


class TorchResampler(torch.nn.Module):
    def __init__(self, dim: int, kv_dim: int, n_q: int, heads: int):
        super().__init__()
        self.query = torch.nn.Parameter(torch.zeros(n_q, dim))
        self.kv_proj = torch.nn.Linear(kv_dim, dim, bias=False) if kv_dim != dim else torch.nn.Identity()
        self.attn = torch.nn.MultiheadAttention(dim, heads)
        self.ln_q, self.ln_kv, self.ln_post = (torch.nn.LayerNorm(dim, eps=1e-6) for _ in range(3))
        self.proj = torch.nn.Parameter(torch.zeros(dim, dim))
        self.table = torch.from_numpy(_ref_table_70(dim))

    def forward(self, x, sizes, temporal=None, groups=None):
        """x [B, L, Dv]; keys of each view are its h*w real tokens only (padding dropped)."""
        dim = self.proj.shape[0]
        x = self.ln_kv(self.kv_proj(x))
        keys, vals = [], []
        for b, (h, w) in enumerate(sizes):
            xb = x[b, : h * w]
            k = xb + self.table[:h, :w].reshape(h * w, dim)
            if temporal is not None and temporal[b] >= 0:
                k = k + torch.from_numpy(_ref_1d(dim, np.array([temporal[b]], np.float32)))[0]
            keys.append(k)
            vals.append(xb)
        groups = groups or [1] * len(sizes)
        out, start = [], 0
        q = self.ln_q(self.query)
        for n in groups:
            k = torch.cat(keys[start:start + n])[:, None]  # [L, 1, D]
            v = torch.cat(vals[start:start + n])[:, None]
            out.append(self.attn(q[:, None], k, v, need_weights=False)[0][:, 0])
            start += n
        return self.ln_post(torch.stack(out)) @ self.proj


def _weights(dim, kv_dim, n_q, seed):
    rng = np.random.default_rng(seed)
    w = {
        "query": rng.standard_normal((n_q, dim)),
        "attn.in_proj_weight": rng.standard_normal((3 * dim, dim)) / np.sqrt(dim),
        "attn.in_proj_bias": 0.1 * rng.standard_normal(3 * dim),
        "attn.out_proj.weight": rng.standard_normal((dim, dim)) / np.sqrt(dim),
        "attn.out_proj.bias": 0.1 * rng.standard_normal(dim),
        "proj": rng.standard_normal((dim, dim)) / np.sqrt(dim),
    }
    if kv_dim != dim:
        w["kv_proj.weight"] = rng.standard_normal((dim, kv_dim)) / np.sqrt(kv_dim)
    for ln in ("ln_q", "ln_kv", "ln_post"):
        w[f"{ln}.weight"] = 1 + 0.1 * rng.standard_normal(dim)
        w[f"{ln}.bias"] = 0.1 * rng.standard_normal(dim)
    return {k: v.astype(np.float32) for k, v in w.items()}


def _pair(dim, kv_dim, n_q, seed=0):
    w = _weights(dim, kv_dim, n_q, seed)
    ours = Resampler(embed_dim=dim, kv_dim=kv_dim, num_queries=n_q)
    ours.load_weights(list(Resampler.sanitize({k: mx.array(v) for k, v in w.items()}).items()))
    ref = TorchResampler(dim, kv_dim, n_q, resampler_heads(dim)).eval()
    missing, unexpected = ref.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()}, strict=False)
    assert not unexpected and not missing
    return ours, ref


def _inputs(sizes, kv_dim, seed=0):
    rng = np.random.default_rng(seed)
    max_len = max(h * w for h, w in sizes)
    return rng.standard_normal((len(sizes), max_len, kv_dim)).astype(np.float32)  # padding is garbage


# ---------------------------------------------------------------- tests


def test_position_tables_match_full_table_crop():
    full = _ref_table_70(256)
    for h, w in [(1, 1), (3, 7), (32, 32), (70, 70), (16, 45)]:
        np.testing.assert_array_equal(sincos_2d(256, h, w), full[:h, :w])
    np.testing.assert_array_equal(sincos_temporal(64, [0, 5, 36000])[1:], _ref_1d(64, np.array([5, 36000.0])))
    assert not sincos_temporal(64, [-1]).any()
    assert temporal_ids_from_seconds([0.0, 0.34, 1.25, 12.0]) == [0, 3, 12, 120]


@pytest.mark.parametrize("dim,kv_dim,n_q", [(256, 48, 16), (64, 32, 8), (48, 48, 4)])
def test_2d_resampler_matches_torch(dim, kv_dim, n_q):
    # (256: 2 heads; 64: heads floored to 1; 48 = kv_dim: kv_proj is the identity as in HF)
    ours, ref = _pair(dim, kv_dim, n_q)
    sizes = [(4, 6), (5, 5), (2, 3), (7, 2)]
    x = _inputs(sizes, kv_dim)
    got = np.array(ours(mx.array(x), sizes))
    with torch.no_grad():
        want = ref(torch.from_numpy(x), sizes).numpy()
    diff = np.abs(got - want).max()
    print(f"2D resampler D={dim}: max abs diff {diff:.2e}")
    assert got.shape == (len(sizes), n_q, dim) and diff <= 1e-4


@pytest.mark.parametrize("sizes", [[(4, 6), (5, 5), (2, 3), (7, 2)], [(5, 5), (5, 5)], [(3, 3)]])
def test_cuda_matmul_attention_matches_torch(monkeypatch, sizes):
    """On CUDA the resampler attends with plain matmuls (MLX 0.32.4's cuDNN SDPA refused a batch
    of several views on an H200): that path equals the reference too, padded batch or not."""
    import framecast.model.resampler as R

    monkeypatch.setattr(R.kernels, "gpu", lambda: "cuda")

    def fused(*a, **k):
        raise AssertionError("the fused SDPA ran on the CUDA path")

    monkeypatch.setattr(R.mx.fast, "scaled_dot_product_attention", fused)
    dim, kv_dim, n_q = 256, 48, 16
    ours, ref = _pair(dim, kv_dim, n_q, seed=5)
    x = _inputs(sizes, kv_dim, seed=5)
    got = np.array(ours(mx.array(x), sizes))
    with torch.no_grad():
        want = ref(torch.from_numpy(x), sizes).numpy()
    assert got.shape == (len(sizes), n_q, dim) and np.abs(got - want).max() <= 1e-4


def test_3d_resampler_groups_match_torch():
    dim, kv_dim, n_q = 256, 48, 16
    ours, ref = _pair(dim, kv_dim, n_q, seed=3)
    # three groups: 3 frames, 1 frame, 2 frames; one still image (-1) inside the last group
    sizes = [(4, 4), (4, 4), (4, 4), (3, 5), (4, 4), (2, 6)]
    temporal = [10, 13, 17, 420, -1, 36005]
    groups = [3, 1, 2]
    x = _inputs(sizes, kv_dim, seed=4)
    got = np.array(ours(mx.array(x), sizes, temporal_ids=temporal, group_sizes=groups))
    with torch.no_grad():
        want = ref(torch.from_numpy(x), sizes, temporal, groups).numpy()
    diff = np.abs(got - want).max()
    print(f"3D resampler: max abs diff {diff:.2e}")
    assert got.shape == (3, n_q, dim) and diff <= 1e-4
    # equal-size groups take the reshape path: same answer as the padded path
    got2 = np.array(ours(mx.array(x[:4]), sizes[:4], temporal_ids=temporal[:4], group_sizes=[2, 2]))
    with torch.no_grad():
        want2 = ref(torch.from_numpy(x[:4]), sizes[:4], temporal[:4], [2, 2]).numpy()
    assert np.abs(got2 - want2).max() <= 1e-4


def test_images_have_no_temporal_term():
    ours, _ = _pair(64, 32, 8)
    sizes = [(3, 3), (2, 4)]
    x = mx.array(_inputs(sizes, 32))
    a = ours(x, sizes)
    b = ours(x, sizes, temporal_ids=[-1, -1])
    assert mx.array_equal(a, b)
