"""Fused kernels (`pipeline/kernels/`): the reference against independent computations on CPU,
the kernel sources checked, compiled and executed here as far as this machine allows, and the
GPU kernels against the reference on the machine that has them.

What runs where:
  - everywhere: reference vs `mx.fast.rope` at old/new positions and vs a float64 numpy
    rotation; dispatch and the FRAMECAST_KERNELS override; source/name checks;
  - with g++: both kernel bodies compiled as C++ and run thread by thread (fp32) over the
    same inputs as the reference, so the indexing and the rotation are executed, not read;
  - with nvcc: the CUDA body wrapped in the signature `mx.fast.cuda_kernel` generates,
    compiled for sm_90 in fp32/fp16/bf16 (no GPU needed);
  - with a GPU (`mx.cuda.is_available()` / `mx.metal.is_available()`): the real kernel vs the
    reference over shapes, dtypes, shifts, layouts and gathers, and the dispatch picks it.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest

import pipeline.kernels as kernels
from pipeline.errors import UserError
from pipeline.kernels import rope_shift as rs
from pipeline.kernels.rope_shift import RopeSpec, reference, rope_shift

CUDA = mx.cuda.is_available()
METAL = mx.metal.is_available()
GPU_KINDS = [k for k, ok in (("cuda", CUDA), ("metal", METAL)) if ok]


def _keys(shape, seed=0, dtype=mx.float32):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return mx.array(x).astype(dtype)


def _fast_rope(spec: RopeSpec, base: float):
    def rope(x, offset):
        return mx.fast.rope(x, spec.dims, traditional=spec.traditional, base=base, scale=1.0, offset=offset)
    return rope


def _numpy_shift(keys: np.ndarray, shift: np.ndarray, spec: RopeSpec, index=None) -> np.ndarray:
    """Independent float64 version: an explicit 2x2 rotation per pair, pairs listed by index."""
    x = keys.astype(np.float64)
    if index is not None:
        x = x[:, :, index]
    out = x.copy()
    half = spec.dims // 2
    freq = np.array(spec.inv_freq, dtype=np.float64)
    for i in range(half):
        a, b = (2 * i, 2 * i + 1) if spec.traditional else (i, i + half)
        ang = shift.astype(np.float64) * freq[i]  # [T]
        c, s = np.cos(ang), np.sin(ang)
        out[..., a] = x[..., a] * c - x[..., b] * s
        out[..., b] = x[..., a] * s + x[..., b] * c
    return out


LAYOUTS = [(64, 64, False), (64, 64, True), (64, 32, False), (64, 32, True), (128, 128, False)]


# ---------------------------------------------------------------- reference (CPU)


@pytest.mark.parametrize("head_dim,dims,traditional", LAYOUTS)
def test_reference_equals_rope_reapplied_at_the_new_positions(head_dim, dims, traditional):
    base = 1e4
    spec = RopeSpec.from_base(dims, base=base, traditional=traditional)
    rope = _fast_rope(spec, base)
    raw = _keys((2, 3, 7, head_dim), seed=1)  # un-rotated keys
    for old, shift in [(0, 0), (500, -480), (40, 1000), (9000, -8990)]:
        cached = rope(raw, offset=old)
        want = rope(raw, offset=old + shift)
        got = reference(cached, shift, spec)
        tol = 2e-5 + 2e-7 * (old + abs(shift))  # fp32 RoPE: angle ulp grows with the position
        assert float(mx.abs(got - want).max()) < tol, (old, shift)


@pytest.mark.parametrize("head_dim,dims,traditional", LAYOUTS)
def test_reference_matches_float64_rotation_with_per_token_shift_and_gather(head_dim, dims, traditional):
    spec = RopeSpec.from_base(dims, base=1e6, traditional=traditional)
    keys = _keys((1, 4, 12, head_dim), seed=2)
    index = np.array([0, 1, 5, 6, 7, 11], dtype=np.int32)
    shift = np.array([0, 0, -4, -4, -4, -8], dtype=np.int32)
    got = reference(keys, mx.array(shift), spec, index=mx.array(index))
    want = _numpy_shift(np.array(keys), shift, spec, index)
    assert got.shape == (1, 4, 6, head_dim)
    np.testing.assert_allclose(np.array(got), want, atol=2e-6)
    if dims < head_dim:  # the unrotated tail is copied bit for bit
        np.testing.assert_array_equal(np.array(got)[..., dims:], np.array(keys)[:, :, index, dims:])


def test_int_shift_equals_per_token_array_and_shifts_compose():
    spec = RopeSpec.from_base(64, base=1e4)
    keys = _keys((1, 2, 5, 64), seed=3)
    a = reference(keys, -37, spec)
    b = reference(keys, mx.full((5,), -37, dtype=mx.int32), spec)
    np.testing.assert_array_equal(np.array(a), np.array(b))
    twice = reference(reference(keys, 300, spec), -1000, spec)
    once = reference(keys, -700, spec)
    assert float(mx.abs(twice - once).max()) < 1e-4


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_reference_keeps_the_cache_dtype_and_rounds_once(dtype):
    spec = RopeSpec.from_base(64, base=1e4)
    keys = _keys((1, 2, 6, 64), seed=4, dtype=dtype)
    got = reference(keys, -123, spec)
    assert got.dtype == dtype
    want = reference(keys.astype(mx.float32), -123, spec).astype(dtype)  # fp32 math, one rounding
    np.testing.assert_array_equal(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)))


def test_reference_rejects_bad_shapes():
    spec = RopeSpec.from_base(64, base=1e4)
    with pytest.raises(ValueError, match="shift has shape"):
        reference(_keys((1, 1, 4, 64)), mx.zeros((3,), dtype=mx.int32), spec)
    with pytest.raises(ValueError, match="does not fit head_dim"):
        reference(_keys((1, 1, 4, 32)), 1, spec)
    with pytest.raises(ValueError, match=r"\[B, H, T, D\]"):
        reference(_keys((4, 64)), 1, spec)


# ---------------------------------------------------------------- dispatch


def test_backend_is_chosen_once_and_the_env_forces_the_reference(monkeypatch):
    kernels.backend.cache_clear()
    try:
        monkeypatch.setenv(kernels.ENV_VAR, "reference")
        assert kernels.backend() == "reference"
        monkeypatch.setenv(kernels.ENV_VAR, "auto")
        assert kernels.backend() == "reference"  # cached: chosen once per process
        kernels.backend.cache_clear()
        expected = "cuda" if CUDA and mx.default_device() == mx.gpu else (
            "metal" if METAL and mx.default_device() == mx.gpu else "reference")
        assert kernels.backend() == expected
        kernels.backend.cache_clear()
        monkeypatch.setenv(kernels.ENV_VAR, "triton")
        with pytest.raises(UserError, match="FRAMECAST_KERNELS"):
            kernels.backend()
    finally:
        kernels.backend.cache_clear()


def test_public_op_equals_reference_on_this_machine():
    spec = RopeSpec.from_base(64, base=1e4)
    keys = _keys((1, 2, 10, 64), seed=5)
    index = mx.array([0, 3, 4, 9], dtype=mx.int32)
    got = rope_shift(keys, mx.array([0, -3, -3, -5], dtype=mx.int32), spec, index=index)
    want = reference(keys, mx.array([0, -3, -3, -5], dtype=mx.int32), spec, index=index)
    assert float(mx.abs(got - want).max()) < 1e-5


# ---------------------------------------------------------------- kernel sources


@pytest.mark.parametrize("kind", ["metal", "cuda"])
def test_kernel_sources_name_their_inputs_outputs_and_templates(kind):
    src = rs.metal() if kind == "metal" else rs.cuda()
    assert isinstance(src, str) and src.strip()
    words = set(re.findall(r"[A-Za-z_][A-Za-z_0-9]*", src))
    for name in (*rs.INPUT_NAMES, *rs.OUTPUT_NAMES, "T", "D", "HALF", "TRAD"):
        assert name in words, name
    # mx.fast passes shapes only for the `<input>_shape` names the body mentions
    assert {w[: -len("_shape")] for w in words if w.endswith("_shape")} == {"keys", "shift"}
    assert src.count("{") == src.count("}") and src.count("(") == src.count(")")
    thread_id = "thread_position_in_grid" if kind == "metal" else "blockIdx"
    assert thread_id in words
    assert "cudaMalloc" not in src and "#include" not in src  # a body only: MLX writes the rest


_EMULATOR = r"""
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
typedef unsigned int uint;
struct U3 { uint x, y, z; };
namespace metal { namespace precise {
inline float sin(float a) { return std::sin(a); }
inline float cos(float a) { return std::cos(a); }
} }
// sincos(double, double*, double*): glibc's, same signature as CUDA's device function
using Shape = std::array<int32_t, 10>;
typedef float T;

static void metal_thread(U3 thread_position_in_grid, const T* keys, const int* keys_shape,
    const int32_t* src_token, const int32_t* shift, const int* shift_shape, const float* inv_freq,
    T* out, const int D, const int HALF, const bool TRAD) {
METAL_BODY
}

static void cuda_thread(U3 blockIdx, U3 blockDim, U3 threadIdx, const T* keys, const Shape keys_shape,
    const int32_t* src_token, const int32_t* shift, const Shape shift_shape, const float* inv_freq,
    T* out, const int D, const int HALF, const bool TRAD) {
CUDA_BODY
}

// Runs every thread of the launch the Python side would make (Metal: exactly `threads`;
// CUDA: whole blocks, so the kernel's own bound check is exercised too).
extern "C" void run(int cuda, long threads, int block, const float* keys, const int* kshape,
                    const int32_t* src_token, const int32_t* shift, int n_out,
                    const float* inv_freq, float* out, int D, int HALF, int TRAD) {
  int ks[4] = {kshape[0], kshape[1], kshape[2], kshape[3]};
  int ss[1] = {n_out};
  Shape kS{}, sS{};
  for (int i = 0; i < 4; ++i) kS[i] = ks[i];
  sS[0] = n_out;
  long blocks = (threads + block - 1) / block;
  for (long b = 0; b < blocks; ++b) {
    for (int t = 0; t < block; ++t) {
      if (cuda) {
        cuda_thread(U3{uint(b), 0, 0}, U3{uint(block), 1, 1}, U3{uint(t), 0, 0}, keys, kS,
                    src_token, shift, sS, inv_freq, out, D, HALF, TRAD != 0);
      } else if (b * block + t < threads) {
        metal_thread(U3{uint(b * block + t), 0, 0}, keys, ks, src_token, shift, ss, inv_freq, out,
                     D, HALF, TRAD != 0);
      }
    }
  }
}
"""


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """Both kernel bodies compiled by g++ into one CPU library (fp32)."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed: kernel bodies cannot be executed on this machine")
    d = tmp_path_factory.mktemp("kernel_emulator")
    (d / "emu.cpp").write_text(_EMULATOR.replace("METAL_BODY", rs.metal()).replace("CUDA_BODY", rs.cuda()))
    subprocess.run(["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-Wall", "-Werror", "-Wno-unused-variable",
                    "-o", str(d / "emu.so"), str(d / "emu.cpp")], check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(d / "emu.so"))


def _emulate(lib, kind, keys: np.ndarray, index: np.ndarray, shift: np.ndarray, spec: RopeSpec) -> np.ndarray:
    B, H, _, D = keys.shape
    n = index.shape[0]
    out = np.full((B, H, n, D), np.nan, dtype=np.float32)
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    kshape = np.array(keys.shape, dtype=np.int32)
    index = np.ascontiguousarray(index, dtype=np.int32)
    shift = np.ascontiguousarray(shift, dtype=np.int32)
    freq = np.ascontiguousarray(np.array(spec.inv_freq), dtype=np.float32)
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    threads = B * H * n * (D // 2)
    lib.run(ctypes.c_int(kind == "cuda"), ctypes.c_long(threads), ctypes.c_int(rs.THREADGROUP), ptr(keys),
            ptr(kshape), ptr(index), ptr(shift), ctypes.c_int(n), ptr(freq), ptr(out),
            ctypes.c_int(D), ctypes.c_int(spec.dims // 2), ctypes.c_int(int(spec.traditional)))
    return out


@pytest.mark.parametrize("kind", ["metal", "cuda"])
@pytest.mark.parametrize("head_dim,dims,traditional", LAYOUTS)
def test_kernel_bodies_executed_on_cpu_equal_the_reference(emulator, kind, head_dim, dims, traditional):
    spec = RopeSpec.from_base(dims, base=1e4, traditional=traditional)
    keys = _keys((2, 3, 11, head_dim), seed=6)
    index = np.array([0, 1, 2, 6, 7, 10], dtype=np.int32)  # a gather, as in eviction
    shift = np.array([0, 0, 0, -3, -3, -40_000], dtype=np.int32)
    got = _emulate(emulator, kind, np.array(keys), index, shift, spec)
    want = np.array(reference(keys, mx.array(shift), spec, index=mx.array(index)))
    assert not np.isnan(got).any(), "some output element was never written"
    np.testing.assert_allclose(got, want, atol=3e-6)


def test_cuda_body_compiles_with_nvcc_in_every_dtype(tmp_path):
    """The body wrapped the way `mx.fast.cuda_kernel` wraps it (inputs as `const T*`, shapes as
    `__grid_constant__ Shape`, template args as constexpr/using), compiled for sm_90."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed: the CUDA source is compiled only on the GPU machine")
    prelude = ("#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n#include <cuda/std/array>\n"
               "#include <cooperative_groups.h>\n#include <cstdint>\n"
               "namespace mlx::core::cu {\nusing Shape = cuda::std::array<int32_t, 10>;\n}\n")
    kernels_src = []
    for i, (ctype, d, half, trad) in enumerate([("float", 128, 64, "false"), ("__half", 64, 16, "true"),
                                                ("__nv_bfloat16", 128, 64, "false")]):
        kernels_src.append(
            f"namespace mlx::core::cu {{\nnamespace cg = cooperative_groups;\n"
            f"__global__ void custom_kernel_framecast_rope_shift_{i}(\n"
            f"    const {ctype}* keys,\n    const __grid_constant__ Shape keys_shape,\n"
            f"    const int32_t* src_token,\n    const int32_t* shift,\n"
            f"    const __grid_constant__ Shape shift_shape,\n    const float* inv_freq,\n"
            f"    {ctype}* out) {{\n  using T = {ctype};\n  constexpr int D = {d};\n"
            f"  constexpr int HALF = {half};\n  constexpr bool TRAD = {trad};\n\n{rs.cuda()}\n}}\n}}\n")
    path = tmp_path / "rope_shift.cu"
    path.write_text(prelude + "\n".join(kernels_src))
    proc = subprocess.run(["nvcc", "-c", "-arch=sm_90", "-std=c++17", "-o", str(tmp_path / "k.o"), str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ---------------------------------------------------------------- the real GPU kernels

GPU_CASES = [  # (shape [B, H, T_src, D], dims, traditional, with gather)
    ((1, 4, 300, 128), 128, False, False),   # the real model's head, a short cache
    ((1, 4, 8192, 128), 128, False, True),   # 8k tokens, eviction gather
    ((2, 2, 33, 64), 32, False, True),       # partial rotary, odd token count
    ((1, 3, 17, 64), 64, True, False),       # interleaved pairs
    ((1, 2, 257, 96), 64, True, True),       # interleaved + partial, crosses a threadgroup
]


@pytest.mark.skipif(not GPU_KINDS, reason="no CUDA/Metal GPU on this machine: the fused kernels run only "
                                          "on the GPU machine (the reference is tested above)")
@pytest.mark.parametrize("kind", GPU_KINDS or ["none"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("shape,dims,traditional,gather", GPU_CASES)
@pytest.mark.parametrize("shift", [0, -64, -5000, "per_token"])
def test_gpu_kernel_equals_reference(kind, dtype, shape, dims, traditional, gather, shift):
    spec = RopeSpec.from_base(dims, base=1e6, traditional=traditional)
    keys = _keys(shape, seed=7, dtype=dtype)
    t_src = shape[2]
    index = None
    n = t_src
    if gather:  # keep the first quarter and the last half, like sinks + window
        keep = list(range(t_src // 4)) + list(range(t_src // 2, t_src))
        index, n = mx.array(keep, dtype=mx.int32), len(keep)
    if shift == "per_token":
        shift = mx.array(np.random.default_rng(8).integers(-20_000, 20_000, n).astype(np.int32))
    with mx.stream(mx.gpu):
        got = rs.kernel(kind, keys, shift, spec, index=index)
        want = reference(keys, shift, spec, index=index)
        mx.eval(got, want)
    assert got.shape == want.shape and got.dtype == dtype
    scale = float(mx.abs(keys.astype(mx.float32)).max())
    err = float(mx.abs(got.astype(mx.float32) - want.astype(mx.float32)).max()) / scale
    assert err <= rs.SELF_CHECK_TOLERANCE[dtype], err


@pytest.mark.skipif(not GPU_KINDS, reason="no CUDA/Metal GPU on this machine")
def test_gpu_dispatch_uses_the_kernel_and_it_passes_its_self_check():
    kernels.backend.cache_clear()
    try:
        kind = kernels.backend()
        assert kind in GPU_KINDS
        for dtype in (mx.float32, mx.float16, mx.bfloat16):
            assert rs._kernel_ok(kind, dtype, 128, RopeSpec.from_base(128, base=1e6)), dtype
    finally:
        kernels.backend.cache_clear()
