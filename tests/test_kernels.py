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

import framecast.kernels as kernels
from framecast.errors import UserError
from framecast.kernels import dequantize_kv as dq
from framecast.kernels import rope_shift as rs
from framecast.kernels.rope_shift import RopeSpec, reference, rope_shift

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
    # On the CPU stream: the GPU's mx.fast.rope uses fast sin/cos, too coarse at position 9000
    # for this tolerance (seen on an H200); the kernels are compared to the reference below.
    with mx.stream(mx.cpu):
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


def _numpy_dequant(q: tuple, end: int, bits: int, group: int) -> np.ndarray:
    """Independent unpacking: value j of a word sits at bits [bits*j, bits*(j+1)), LSB first."""
    packed = np.array(q[0])[:, :, :end].astype(np.uint64)
    scales = np.array(q[1].astype(mx.float32))[:, :, :end].astype(np.float64)
    biases = np.array(q[2].astype(mx.float32))[:, :, :end].astype(np.float64)
    per = 32 // bits
    vals = np.stack([(packed >> (bits * j)) & ((1 << bits) - 1) for j in range(per)], axis=-1)
    vals = vals.reshape(*packed.shape[:-1], packed.shape[-1] * per).astype(np.float64)
    g = np.arange(vals.shape[-1]) // group
    return scales[..., g] * vals + biases[..., g]


@pytest.mark.parametrize("bits,group", [(8, 128), (8, 64), (4, 64), (4, 32)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_dequantize_reference_matches_numpy_unpacking_of_the_live_prefix(bits, group, dtype):
    k = _keys((1, 2, 10, 128), seed=11, dtype=dtype)
    v = _keys((1, 2, 10, 128), seed=12, dtype=dtype)
    qk = tuple(mx.quantize(k, group_size=group, bits=bits))
    qv = tuple(mx.quantize(v, group_size=group, bits=bits))
    got_k, got_v = dq.reference(qk, qv, end=6, bits=bits, group_size=group, dtype=dtype)
    assert got_k.shape == got_v.shape == (1, 2, 6, 128) and got_k.dtype == dtype
    tol = 1e-6 if dtype == mx.float32 else 4e-3  # MLX computes scale*q+bias in the output dtype
    for got, q in ((got_k, qk), (got_v, qv)):
        want = _numpy_dequant(q, 6, bits, group)
        np.testing.assert_allclose(np.array(got.astype(mx.float32)), want, rtol=tol, atol=tol)


def test_public_dequantize_equals_reference_on_this_machine():
    k, v = _keys((1, 2, 20, 64), seed=13), _keys((1, 2, 20, 64), seed=14)
    qk, qv = tuple(mx.quantize(k, group_size=64, bits=4)), tuple(mx.quantize(v, group_size=64, bits=4))
    got = dq.dequantize_kv(qk, qv, end=11, bits=4, group_size=64, dtype=mx.float32)
    want = dq.reference(qk, qv, end=11, bits=4, group_size=64, dtype=mx.float32)
    for a, b in zip(got, want):
        assert float(mx.abs(a - b).max()) < 1e-5


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


OPS = {  # module, template names, inputs whose `_shape` / `_strides` the body reads
    "rope_shift": (rs, ("T", "D", "HALF", "TRAD"), {"keys", "shift"}, set()),
    "dequantize_kv": (dq, ("T", "BITS", "GROUP", "WORDS"), {"kq"}, set(dq.INPUT_NAMES)),
}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("kind", ["metal", "cuda"])
def test_kernel_sources_name_their_inputs_outputs_and_templates(op, kind):
    mod, templates, shaped, strided = OPS[op]
    src = mod.metal() if kind == "metal" else mod.cuda()
    assert isinstance(src, str) and src.strip()
    words = set(re.findall(r"[A-Za-z_][A-Za-z_0-9]*", src))
    for name in (*mod.INPUT_NAMES, *mod.OUTPUT_NAMES, *templates):
        assert name in words, name
    # mx.fast adds `<input>_shape` / `_strides` parameters only for the names the body mentions
    assert {w[: -len("_shape")] for w in words if w.endswith("_shape")} == shaped
    assert {w[: -len("_strides")] for w in words if w.endswith("_strides")} == strided
    assert src.count("{") == src.count("}") and src.count("(") == src.count(")")
    thread_id = "thread_position_in_grid" if kind == "metal" else "blockIdx"
    assert thread_id in words
    assert "#include" not in src and "__global__" not in src and "kernel void" not in src  # a body only


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
#define device  // Metal address space qualifier
using Shape = std::array<int32_t, 10>;
using Strides = std::array<int64_t, 10>;
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

template <int BITS>
static void metal_dq_thread(U3 thread_position_in_grid,
    const uint32_t* kq, const int* kq_shape, const int64_t* kq_strides, const T* ks, const int64_t* ks_strides,
    const T* kb, const int64_t* kb_strides, const uint32_t* vq, const int64_t* vq_strides,
    const T* vs, const int64_t* vs_strides, const T* vb, const int64_t* vb_strides,
    T* k_out, T* v_out, const int GROUP, const int WORDS) {
DQ_METAL_BODY
}

template <int BITS>
static void cuda_dq_thread(U3 blockIdx, U3 blockDim, U3 threadIdx,
    const uint32_t* kq, const Shape kq_shape, const Strides kq_strides, const T* ks, const Strides ks_strides,
    const T* kb, const Strides kb_strides, const uint32_t* vq, const Strides vq_strides,
    const T* vs, const Strides vs_strides, const T* vb, const Strides vb_strides,
    T* k_out, T* v_out, const int GROUP, const int WORDS) {
DQ_CUDA_BODY
}

// One launch of dequantize_kv over views [B, H, n, W] of buffers with their own strides
// (int64 x4 each, in elements, in the order kq ks kb vq vs vb).
extern "C" void run_dq(int cuda, long threads, int block, const int* shape4, const int64_t* strides,
                       const uint32_t* kq, const float* ks, const float* kb, const uint32_t* vq,
                       const float* vs, const float* vb, float* k_out, float* v_out,
                       int BITS, int GROUP, int WORDS) {
  int shp[4] = {shape4[0], shape4[1], shape4[2], shape4[3]};
  Shape S{};
  Strides st[6]{};
  for (int i = 0; i < 4; ++i) {
    S[i] = shape4[i];
    for (int a = 0; a < 6; ++a) st[a][i] = strides[4 * a + i];
  }
  long blocks = (threads + block - 1) / block;
  for (long b = 0; b < blocks; ++b) {
    for (int t = 0; t < block; ++t) {
      // BITS is a template argument in MLX too (PER = 32 / BITS must be a constant)
      auto cuda_fn = BITS == 8 ? cuda_dq_thread<8> : BITS == 4 ? cuda_dq_thread<4> : cuda_dq_thread<2>;
      auto metal_fn = BITS == 8 ? metal_dq_thread<8> : BITS == 4 ? metal_dq_thread<4> : metal_dq_thread<2>;
      if (cuda) {
        cuda_fn(U3{uint(b), 0, 0}, U3{uint(block), 1, 1}, U3{uint(t), 0, 0}, kq, S, st[0], ks, st[1],
                kb, st[2], vq, st[3], vs, st[4], vb, st[5], k_out, v_out, GROUP, WORDS);
      } else if (b * block + t < threads) {
        metal_fn(U3{uint(b * block + t), 0, 0}, kq, shp, strides, ks, strides + 4, kb, strides + 8,
                 vq, strides + 12, vs, strides + 16, vb, strides + 20, k_out, v_out, GROUP, WORDS);
      }
    }
  }
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
    """Every kernel body compiled by g++ into one CPU library (fp32)."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed: kernel bodies cannot be executed on this machine")
    d = tmp_path_factory.mktemp("kernel_emulator")
    src = (_EMULATOR.replace("DQ_METAL_BODY", dq.metal()).replace("DQ_CUDA_BODY", dq.cuda())
           .replace("METAL_BODY", rs.metal()).replace("CUDA_BODY", rs.cuda()))
    (d / "emu.cpp").write_text(src)
    proc = subprocess.run(["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-Wall", "-Werror", "-Wno-unused-variable",
                           "-o", str(d / "emu.so"), str(d / "emu.cpp")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
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


def _emulate_dq(lib, kind, keys: tuple, values: tuple, end: int, bits: int, group: int):
    """Run the dequantize_kv body over the first `end` tokens of buffers with spare capacity."""
    arrays = [np.ascontiguousarray(np.array(a if a.dtype == mx.uint32 else a.astype(mx.float32)))
              for a in (*keys, *values)]
    B, H, _, W = arrays[0].shape
    strides = np.array([[st // a.itemsize for st in a.strides] for a in arrays], dtype=np.int64).reshape(-1)
    shape = np.array([B, H, end, W], dtype=np.int32)
    D = W * 32 // bits
    k_out = np.full((B, H, end, D), np.nan, dtype=np.float32)
    v_out = np.full((B, H, end, D), np.nan, dtype=np.float32)
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    threads = 2 * B * H * end * W
    lib.run_dq(ctypes.c_int(kind == "cuda"), ctypes.c_long(threads), ctypes.c_int(dq.THREADGROUP), ptr(shape),
               ptr(strides), *[ptr(a) for a in arrays], ptr(k_out), ptr(v_out),
               ctypes.c_int(bits), ctypes.c_int(group), ctypes.c_int(W))
    return k_out, v_out


@pytest.mark.parametrize("kind", ["metal", "cuda"])
@pytest.mark.parametrize("bits,group,head_dim", [(8, 128, 128), (8, 32, 64), (4, 64, 128), (4, 32, 64)])
def test_dequantize_bodies_executed_on_cpu_equal_the_reference(emulator, kind, bits, group, head_dim):
    k = _keys((2, 3, 13, head_dim), seed=9)
    v = _keys((2, 3, 13, head_dim), seed=10) * 3
    qk = tuple(mx.quantize(k, group_size=group, bits=bits))
    qv = tuple(mx.quantize(v, group_size=group, bits=bits))
    end = 9  # capacity 13: the views are strided, as in the cache
    got = _emulate_dq(emulator, kind, qk, qv, end, bits, group)
    want = dq.reference(qk, qv, end=end, bits=bits, group_size=group, dtype=mx.float32)
    for g, w in zip(got, want):
        assert not np.isnan(g).any(), "some output element was never written"
        np.testing.assert_allclose(g, np.array(w), rtol=1e-6, atol=1e-6)


_NVCC_PRELUDE = ("#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n#include <cuda/std/array>\n"
                 "#include <cooperative_groups.h>\n#include <cstdint>\n"
                 "namespace mlx::core::cu {\nusing Shape = cuda::std::array<int32_t, 10>;\n"
                 "using Strides = cuda::std::array<int64_t, 10>;\n}\n")


def _cuda_wrap(fn_name: str, body: str, inputs: list[tuple[str, str]], outputs: list[tuple[str, str]],
               template: list[tuple[str, str]]) -> str:
    """The kernel `mx.fast.cuda_kernel` would generate: `const T* name` per input, plus
    `name_shape` / `name_strides` when the body mentions them, outputs, then template args as
    `using` / `constexpr` lines ahead of the body."""
    params = []
    for name, ctype in inputs:
        params.append(f"const {ctype}* {name}")
        if f"{name}_shape" in body:
            params.append(f"const __grid_constant__ Shape {name}_shape")
        if f"{name}_strides" in body:
            params.append(f"const __grid_constant__ Strides {name}_strides")
    params += [f"{ctype}* {name}" for name, ctype in outputs]
    lines = []
    for name, value in template:
        if value in ("float", "__half", "__nv_bfloat16"):
            lines.append(f"  using {name} = {value};")
        elif value in ("true", "false"):
            lines.append(f"  constexpr bool {name} = {value};")
        else:
            lines.append(f"  constexpr int {name} = {value};")
    return ("namespace mlx::core::cu {\nnamespace cg = cooperative_groups;\n"
            f"__global__ void {fn_name}(\n    " + ",\n    ".join(params) + ") {\n"
            + "\n".join(lines) + "\n" + body + "\n}\n}\n")


def _nvcc(tmp_path, source: str) -> None:
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed: the CUDA source is compiled only on the GPU machine")
    path = tmp_path / "kernel.cu"
    path.write_text(_NVCC_PRELUDE + source)
    proc = subprocess.run(["nvcc", "-c", "-arch=sm_90", "-std=c++17", "-o", str(tmp_path / "k.o"), str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


CUDA_TYPES = ["float", "__half", "__nv_bfloat16"]


def test_all_cuda_bodies_compile_with_nvcc_in_every_dtype(tmp_path):
    """Both ops' CUDA bodies, wrapped the way `mx.fast.cuda_kernel` wraps them, compiled for
    sm_90 (the H100) in fp32/fp16/bf16, in one nvcc run (no GPU needed)."""
    src = []
    for i, ctype in enumerate(CUDA_TYPES):
        d, half, trad = [(128, 64, "false"), (64, 16, "true"), (128, 64, "false")][i]
        src.append(_cuda_wrap(
            f"rope_shift_{i}", rs.cuda(),
            [("keys", ctype), ("src_token", "int32_t"), ("shift", "int32_t"), ("inv_freq", "float")],
            [("out", ctype)], [("T", ctype), ("D", str(d)), ("HALF", str(half)), ("TRAD", trad)]))
        for bits, group in ((8, 128), (4, 64)):
            src.append(_cuda_wrap(
                f"dequantize_kv_{i}_{bits}", dq.cuda(),
                [("kq", "uint32_t"), ("ks", ctype), ("kb", ctype), ("vq", "uint32_t"), ("vs", ctype), ("vb", ctype)],
                [("k_out", ctype), ("v_out", ctype)],
                [("T", ctype), ("BITS", str(bits)), ("GROUP", str(group)), ("WORDS", str(128 * bits // 32))]))
    _nvcc(tmp_path, "\n".join(src))


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


DQ_GPU_CASES = [  # (B, H, capacity, end, head_dim)
    (1, 4, 8448, 8192, 128),  # the real model's 8k cache inside a grown buffer
    (1, 4, 256, 256, 128),    # full buffer: the views are contiguous
    (2, 2, 300, 77, 64),      # batch, odd prefix
]


@pytest.mark.skipif(not GPU_KINDS, reason="no CUDA/Metal GPU on this machine: the fused kernels run only "
                                          "on the GPU machine (the reference is tested above)")
@pytest.mark.parametrize("kind", GPU_KINDS or ["none"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("bits,group", [(8, 128), (8, 64), (4, 64), (4, 32)])
@pytest.mark.parametrize("case", DQ_GPU_CASES)
def test_gpu_dequantize_equals_reference(kind, dtype, bits, group, case):
    B, H, cap, end, D = case
    if D % group:
        pytest.skip(f"head_dim {D} is not a multiple of group {group}")
    with mx.stream(mx.gpu):
        qk = tuple(mx.quantize(_keys((B, H, cap, D), seed=15, dtype=dtype), group_size=group, bits=bits))
        qv = tuple(mx.quantize(_keys((B, H, cap, D), seed=16, dtype=dtype), group_size=group, bits=bits))
        got = dq.kernel(kind, qk, qv, end=end, bits=bits, group_size=group, dtype=dtype)
        want = dq.reference(qk, qv, end=end, bits=bits, group_size=group, dtype=dtype)
        mx.eval(got, want)
    for g, w in zip(got, want):
        assert g.shape == w.shape == (B, H, end, D) and g.dtype == dtype
        scale = float(mx.abs(w.astype(mx.float32)).max())
        err = float(mx.abs(g.astype(mx.float32) - w.astype(mx.float32)).max()) / scale
        assert err <= dq.SELF_CHECK_TOLERANCE[dtype], err


@pytest.mark.skipif(not GPU_KINDS, reason="no CUDA/Metal GPU on this machine")
def test_gpu_quantized_cache_fetch_uses_the_kernel():
    from framecast.model.cache import QuantizedKVCache

    kernels.backend.cache_clear()
    try:
        kind = kernels.backend()
        for bits in (8, 4):
            assert dq._kernel_ok(kind, mx.float16, 128, bits, 128 if bits == 8 else 64), bits
            cache = QuantizedKVCache(bits=bits, group_size=128 if bits == 8 else 64)
            k = _keys((1, 4, 300, 128), seed=17, dtype=mx.float16)
            got_k, got_v = cache.update_and_fetch(k, k * 2)
            want_k, want_v = dq.reference(cache.keys, cache.values, end=300, bits=bits,
                                          group_size=cache.group_size, dtype=mx.float16)
            tol = dq.SELF_CHECK_TOLERANCE[mx.float16]
            assert float(mx.abs(got_k - want_k).max()) <= tol * float(mx.abs(want_k).max())
            assert float(mx.abs(got_v - want_v).max()) <= tol * float(mx.abs(want_v).max())
    finally:
        kernels.backend.cache_clear()
