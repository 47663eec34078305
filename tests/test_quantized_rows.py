"""The few-rows quantised matmul (`framecast.kernels.quantized_rows`): the reference and the
dispatch on this machine, both kernel bodies executed on the CPU by an emulator whose 32 lanes
run as threads in lockstep (the warp reduction is real), the CUDA body through nvcc where
installed, and the GPU kernel against MLX's op on a GPU machine."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import framecast.kernels as kernels
from framecast.errors import UserError
from framecast.kernels import quantized_rows as qr

CUDA = mx.cuda.is_available() if hasattr(mx, "cuda") else False
METAL = mx.metal.is_available()
GPU_KINDS = [k for k, ok in (("cuda", CUDA), ("metal", METAL)) if ok]


@pytest.fixture(autouse=True)
def fresh_switch():
    """`mode()` reads FRAMECAST_QMM_ROWS once per process: forget it around each test."""
    qr.mode.cache_clear()
    yield
    qr.mode.cache_clear()


def _quantised(n: int, k: int, *, bits: int, group: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = mx.array(rng.standard_normal((n, k)).astype(np.float32))
    return mx.quantize(w, group_size=group, bits=bits)


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 64])
@pytest.mark.parametrize("bits,group", [(4, 64), (8, 32), (2, 128)])
def test_reference_equals_dequantised_matmul(rows, bits, group):
    if CUDA and bits == 2 and rows == 64:
        pytest.xfail("MLX 0.32.4 CUDA: 2-bit quantized_matmul with 64 rows raises 'cuGraphAddKernelNode "
                     "... invalid argument' (seen on an H200, 2026-12-01)")
    wq, s, b = _quantised(24, 256, bits=bits, group=group)
    x = mx.array(np.random.default_rng(1).standard_normal((rows, 256)).astype(np.float32))
    want = np.array(x) @ np.array(mx.dequantize(wq, s, b, group_size=group, bits=bits)).T
    got = qr.reference(x, wq, s, b, group_size=group, bits=bits)
    # a GPU's fp32 matmul may round its inputs (TF32 on CUDA): compare against the largest output there
    tol = 1e-4 if kernels.backend() == "reference" else 2e-3 * float(np.abs(want).max())
    np.testing.assert_allclose(np.array(got), want, rtol=1e-4, atol=tol)


def test_public_op_is_the_reference_here_and_keeps_leading_axes(monkeypatch):
    monkeypatch.setenv(qr.ENV_VAR, "kernel")  # asked for, but this machine's backend is the reference
    wq, s, b = _quantised(16, 128, bits=4, group=64)
    x = mx.array(np.random.default_rng(2).standard_normal((3, 1, 128)).astype(np.float32))  # [B, L, K]
    got = qr.quantized_rows_matmul(x, wq, s, b, group_size=64, bits=4)
    assert got.shape == (3, 1, 16)
    if kernels.backend() == "reference":
        assert mx.array_equal(got, qr.reference(x, wq, s, b, group_size=64, bits=4))


def test_env_switch_is_checked(monkeypatch):
    monkeypatch.setenv(qr.ENV_VAR, "fast")
    with pytest.raises(UserError, match="FRAMECAST_QMM_ROWS='fast'"):
        qr.wanted()
    monkeypatch.setenv(qr.ENV_VAR, "Pad_Large")  # named as it was set
    qr.mode.cache_clear()
    with pytest.raises(UserError, match="FRAMECAST_QMM_ROWS='Pad_Large': expected one of"):
        qr.wanted()
    monkeypatch.setenv(qr.ENV_VAR, "")
    qr.mode.cache_clear()
    assert qr.wanted() is False and qr.mode() == "mlx"
    for choice in ("pad", " Kernel ", "PAD-large"):
        monkeypatch.setenv(qr.ENV_VAR, choice)
        qr.mode.cache_clear()
        assert qr.wanted() is True and qr.mode() == choice.strip().lower()


@pytest.mark.parametrize("rows", [2, 3, 7, 15])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_padded_rows_equal_the_reference_and_keep_leading_axes(rows, dtype):
    wq, s, b = _quantised(40, 256, bits=4, group=64)
    s, b = s.astype(dtype), b.astype(dtype)
    x = mx.array(np.random.default_rng(rows).standard_normal((rows, 1, 256)).astype(np.float32)).astype(dtype)
    got = qr.padded(x, wq, s, b, group_size=64, bits=4)  # [B, L, K] -> [B, L, N]
    want = qr.reference(x, wq, s, b, group_size=64, bits=4)
    assert got.shape == want.shape == (rows, 1, 40) and got.dtype == want.dtype
    tol = 1e-5 if dtype == mx.float32 else 2e-2
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)), atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="16 rows cannot be padded to 16"):
        qr.padded(mx.zeros((16, 256), dtype=dtype), wq, s, b, group_size=64, bits=4)


def test_pad_mode_pads_only_few_rows_on_a_gpu(monkeypatch):
    wq, s, b = _quantised(8, 128, bits=4, group=64)
    seen = []
    monkeypatch.setattr(qr, "padded", lambda x, *a, **k: seen.append(x.shape) or qr.reference(x, *a, **k))
    monkeypatch.setenv(qr.ENV_VAR, "pad")
    for m in (1, 2, 15, 16):
        qr.quantized_rows_matmul(mx.zeros((m, 128)), wq, s, b, group_size=64, bits=4)
    assert seen == ([] if kernels.backend() == "reference" else [(2, 128), (15, 128)])
    monkeypatch.setattr(qr, "backend", lambda: "cuda")  # as on the GPU machine
    seen.clear()
    for m in (1, 2, 15, 16):
        qr.quantized_rows_matmul(mx.zeros((m, 128)), wq, s, b, group_size=64, bits=4)
    assert seen == [(2, 128), (15, 128)]


def test_quantized_linear_equals_the_layer_and_the_decoder_helper_uses_it(monkeypatch):
    from framecast.model.compiled import linear

    layer = nn.QuantizedLinear(128, 24, bias=True, group_size=64, bits=4)
    x = mx.array(np.random.default_rng(3).standard_normal((4, 1, 128)).astype(np.float32))
    want = layer(x)
    assert mx.allclose(qr.quantized_linear(layer, x), want, atol=1e-5)
    import framecast.model.compiled as compiled
    from framecast.model.gguf.model import PrefillDequantLinear

    calls = []
    monkeypatch.setattr(qr, "quantized_linear", lambda lyr, v: calls.append(1) or lyr(v))
    monkeypatch.setenv(qr.ENV_VAR, "kernel")
    qr.mode.cache_clear()  # on a GPU machine the first call above read the (unset) switch
    monkeypatch.setattr(compiled, "backend", lambda: "reference")  # as on the CPU (CI), also on a GPU machine
    linear(layer, x)
    assert calls == []  # on the CPU the layer keeps its own path
    monkeypatch.setattr(compiled, "backend", lambda: "cuda")  # as on the GPU machine
    assert mx.allclose(linear(layer, x), want, atol=1e-5) and calls == [1]
    sub = PrefillDequantLinear(128, 24, bias=False, group_size=64, bits=4)  # what the loaders make
    linear(sub, x)
    assert calls == [1, 1]
    monkeypatch.setenv(qr.ENV_VAR, "mlx")
    qr.mode.cache_clear()
    linear(layer, x)
    assert calls == [1, 1]  # the default leaves nn.QuantizedLinear as it is


def test_pad_large_mode_pads_only_large_weights(monkeypatch):
    # the H200 figures behind the line: a 3584 -> 3584 4-bit weight stays with MLX's op, 3584 -> 18944 is padded
    assert 3584 * 3584 // 2 < qr.PAD_LARGE_MIN_BYTES <= 18944 * 3584 // 2
    small = _quantised(8, 128, bits=4, group=64)
    seen = []
    monkeypatch.setattr(qr, "padded", lambda x, w, *a, **k: seen.append(w.shape) or qr.reference(x, w, *a, **k))
    monkeypatch.setattr(qr, "backend", lambda: "cuda")  # as on the GPU machine
    monkeypatch.setenv(qr.ENV_VAR, "pad-large")
    monkeypatch.setattr(qr, "PAD_LARGE_MIN_BYTES", small[0].nbytes + 1)  # this weight is small
    for m in (1, 2, 15, 16):
        qr.quantized_rows_matmul(mx.zeros((m, 128)), *small, group_size=64, bits=4)
    assert seen == []
    monkeypatch.setattr(qr, "PAD_LARGE_MIN_BYTES", small[0].nbytes)  # now it is large enough
    for m in (1, 2, 15, 16):
        qr.quantized_rows_matmul(mx.zeros((m, 128)), *small, group_size=64, bits=4)
    assert seen == [small[0].shape] * 2


def test_a_bad_switch_stops_the_load_in_one_line(monkeypatch):
    from framecast.model.compiled import compile_layers

    monkeypatch.setenv(qr.ENV_VAR, "bogus")
    with pytest.raises(UserError, match="FRAMECAST_QMM_ROWS='bogus'"):
        compile_layers(nn.Linear(2, 2))
    for choice in ("pad", "pad-large", "kernel"):  # a shapeless decoder trace would keep its first row count
        monkeypatch.setenv(qr.ENV_VAR, choice)
        qr.mode.cache_clear()
        with pytest.raises(UserError, match=f"FRAMECAST_QMM_ROWS={choice} cannot be used with FRAMECAST_COMPILE=on"):
            compile_layers(nn.Linear(2, 2), on=True)
        assert compile_layers(nn.Linear(2, 2), on="tower") == 0  # the default on a GPU: decoder layers eager


def test_kernel_rejects_what_it_cannot_compute():
    wq, s, b = _quantised(8, 128, bits=4, group=64)
    x = mx.zeros((65, 128))
    with pytest.raises(ValueError, match="65 rows"):
        qr.kernel("cuda", x, wq, s, b, group_size=64, bits=4)
    with pytest.raises(ValueError, match="does not match"):
        qr.kernel("cuda", mx.zeros((2, 64)), wq, s, b, group_size=64, bits=4)
    with pytest.raises(ValueError, match="bits=3"):
        qr.kernel("cuda", mx.zeros((2, 128)), wq, s, b, group_size=64, bits=3)


def test_row_buckets_cover_every_count():
    assert [qr.rows_bucket(m) for m in (1, 2, 3, 4, 5, 9, 33, 64)] == [1, 2, 4, 4, 8, 16, 64, 64]
    assert set(qr.COLS_BY_ROWS) == set(qr.ROW_BUCKETS)


def test_kernel_sources_are_bodies_that_name_their_parameters():
    for src in (qr.cuda(), qr.metal()):
        for name in (*qr.INPUT_NAMES, *qr.OUTPUT_NAMES, "T", "BITS", "GROUP", "WORDS", "ROWS", "WARPS",
                     "x_shape", "w_shape"):
            assert name in src, name
        assert "scales_shape" not in src and "_strides" not in src
        assert src.count("{") == src.count("}") and "#include" not in src and "__global__" not in src


# ---------------------------------------------------------------- the bodies on the CPU

_EMULATOR = r"""
#include <array>
#include <barrier>
#include <cstdint>
#include <thread>
#include <vector>
typedef unsigned int uint;
struct U3 { uint x, y, z; };
using Shape = std::array<int32_t, 10>;
typedef float T;

// One warp / SIMD group at a time: its 32 lanes are threads meeting at a barrier, so a
// shuffle or a SIMD sum sees every lane's value as the hardware would.
static std::barrier<>* lanes_meet = nullptr;
static float lane_value[32];
static thread_local uint my_lane = 0;

static float __shfl_down_sync(unsigned, float v, int off) {
  lanes_meet->arrive_and_wait();
  lane_value[my_lane] = v;
  lanes_meet->arrive_and_wait();
  float got = my_lane + off < 32 ? lane_value[my_lane + off] : v;
  lanes_meet->arrive_and_wait();
  return got;
}

static float simd_sum(float v) {
  lanes_meet->arrive_and_wait();
  lane_value[my_lane] = v;
  lanes_meet->arrive_and_wait();
  float s = 0.0f;
  for (int i = 0; i < 32; ++i) s += lane_value[i];
  lanes_meet->arrive_and_wait();
  return s;
}

template <int BITS, int ROWS, int COLS>
static void cuda_body(U3 blockIdx, U3 threadIdx, const T* x, const Shape x_shape, const uint32_t* w,
    const Shape w_shape, const T* scales, const T* biases, T* y, const int GROUP, const int WORDS,
    const int WARPS) {
CUDA_BODY
}

template <int BITS, int ROWS, int COLS>
static void metal_body(U3 threadgroup_position_in_grid, uint thread_index_in_simdgroup,
    uint simdgroup_index_in_threadgroup, const T* x, const int* x_shape, const uint32_t* w,
    const int* w_shape, const T* scales, const T* biases, T* y, const int GROUP, const int WORDS,
    const int WARPS) {
#define device
METAL_BODY
#undef device
}

template <int BITS, int ROWS, int COLS>
static void launch(int cuda, int M, int N, int K, const float* x, const uint32_t* w, const float* s,
                   const float* b, float* y, int GROUP, int WARPS) {
  const int WORDS = K * BITS / 32;
  Shape xs{}, ws{};
  xs[0] = M; xs[1] = K; ws[0] = N; ws[1] = WORDS;
  int xi[2] = {M, K}, wi[2] = {N, WORDS};
  int groups = (N + WARPS * COLS - 1) / (WARPS * COLS);
  for (int g = 0; g < groups; ++g) {
    for (int warp = 0; warp < WARPS; ++warp) {
      std::barrier<> meet(32);
      lanes_meet = &meet;
      std::vector<std::thread> lanes;
      for (int lane = 0; lane < 32; ++lane) {
        lanes.emplace_back([=, &xs, &ws, &xi, &wi] {
          my_lane = lane;
          if (cuda) {
            cuda_body<BITS, ROWS, COLS>(U3{uint(g), 0, 0}, U3{uint(warp * 32 + lane), 0, 0}, x, xs, w, ws, s, b, y,
                                  GROUP, WORDS, WARPS);
          } else {
            metal_body<BITS, ROWS, COLS>(U3{uint(g), 0, 0}, uint(lane), uint(warp), x, xi, w, wi, s, b, y, GROUP,
                                   WORDS, WARPS);
          }
        });
      }
      for (auto& t : lanes) t.join();
    }
  }
}

extern "C" void run(int cuda, int bits, int rows_bucket, int cols, int M, int N, int K, const float* x,
                    const uint32_t* w, const float* s, const float* b, float* y, int GROUP, int WARPS) {
#define CASE(B, R, C) if (bits == B && rows_bucket == R && cols == C) { \
    launch<B, R, C>(cuda, M, N, K, x, w, s, b, y, GROUP, WARPS); return; }
  CASE(4, 1, 4) CASE(4, 2, 4) CASE(4, 4, 4) CASE(4, 8, 4) CASE(8, 4, 4) CASE(8, 64, 1) CASE(2, 16, 2)
#undef CASE
}
"""


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """Both bodies compiled by g++ (C++20 threads and barrier) into one CPU library (fp32)."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed: kernel bodies cannot be executed on this machine")
    d = tmp_path_factory.mktemp("qmm_rows_emulator")
    (d / "emu.cpp").write_text(_EMULATOR.replace("CUDA_BODY", qr.cuda()).replace("METAL_BODY", qr.metal()))
    proc = subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wall", "-Werror",
                           "-Wno-unused-variable", "-Wno-unknown-pragmas", "-o", str(d / "emu.so"), str(d / "emu.cpp")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ctypes.CDLL(str(d / "emu.so"))


@pytest.mark.parametrize("kind", ["cuda", "metal"])
@pytest.mark.parametrize("bits,group,rows,n,k", [
    (4, 64, 1, 30, 256),    # one row (decode): 4 columns a warp, the last warp's columns 28-29 of 4
    (4, 64, 2, 24, 256),    # 24 columns: with 2 warps of 4 columns, 3 thread groups
    (4, 64, 3, 13, 512),    # rows past M skipped (bucket 4), columns past N skipped (13 = 3 x 4 + 1)
    (4, 32, 7, 9, 64),      # K smaller than a warp's words: idle lanes
    (8, 128, 4, 5, 1024),   # 8-bit, several words per lane
    (8, 64, 64, 3, 128),    # the most rows
    (2, 128, 11, 4, 384),   # 2-bit
])
def test_kernel_bodies_executed_on_cpu_equal_the_reference(emulator, kind, bits, group, rows, n, k):
    wq, s, b = _quantised(n, k, bits=bits, group=group, seed=rows)
    x = np.random.default_rng(k).standard_normal((rows, k)).astype(np.float32)
    y = np.full((rows, n), np.nan, dtype=np.float32)
    arrays = [np.ascontiguousarray(a) for a in (x, np.array(wq), np.array(s), np.array(b))]
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    warps = 2  # fewer lanes to start on the CPU; the body reads WARPS like any template value
    bucket = qr.rows_bucket(rows)
    emulator.run(ctypes.c_int(kind == "cuda"), ctypes.c_int(bits), ctypes.c_int(bucket), ctypes.c_int(qr.COLS_BY_ROWS[bucket]),
                 ctypes.c_int(rows), ctypes.c_int(n), ctypes.c_int(k), *[ptr(a) for a in arrays], ptr(y),
                 ctypes.c_int(group), ctypes.c_int(warps))
    want = np.array(qr.reference(mx.array(x), wq, s, b, group_size=group, bits=bits))
    assert not np.isnan(y).any(), "some output element was never written"
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


def test_cuda_body_compiles_with_nvcc_in_every_dtype(tmp_path):
    from tests.test_kernels import CUDA_TYPES, _cuda_wrap, _nvcc

    src = [_cuda_wrap(f"quantized_rows_{i}_{bits}_{rows}", qr.cuda(),
                      [("x", ctype), ("w", "uint32_t"), ("scales", ctype), ("biases", ctype)], [("y", ctype)],
                      [("T", ctype), ("BITS", str(bits)), ("GROUP", "64"), ("WORDS", str(4096 * bits // 32)),
                       ("ROWS", str(rows)), ("WARPS", str(qr.WARPS)), ("COLS", str(qr.COLS_BY_ROWS[rows]))])
           for i, ctype in enumerate(CUDA_TYPES) for bits, rows in ((4, 1), (4, 16), (8, 64))]
    _nvcc(tmp_path, "\n".join(src))


# ---------------------------------------------------------------- the real GPU kernel


@pytest.mark.skipif(not GPU_KINDS, reason="no CUDA/Metal GPU on this machine: the kernel runs only there")
@pytest.mark.parametrize("kind", GPU_KINDS)
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("rows,n,k,bits,group", [(1, 4096, 4096, 4, 64), (2, 4096, 4096, 4, 64), (16, 1000, 3584, 4, 64),
                                                 (64, 512, 4096, 8, 64), (5, 37, 128, 4, 32)])
def test_gpu_kernel_equals_reference(kind, dtype, rows, n, k, bits, group):
    wq, s, b = _quantised(n, k, bits=bits, group=group)
    s, b = s.astype(dtype), b.astype(dtype)
    x = mx.array(np.random.default_rng(5).standard_normal((rows, k)).astype(np.float32)).astype(dtype)
    got = qr.kernel(kind, x, wq, s, b, group_size=group, bits=bits).astype(mx.float32)
    want = qr.reference(x, wq, s, b, group_size=group, bits=bits).astype(mx.float32)
    err = float(mx.max(mx.abs(got - want)).item()) / float(mx.max(mx.abs(want)).item())
    assert err <= qr.SELF_CHECK_TOLERANCE[dtype], err


def test_bench_script_times_the_rows_op(tmp_path):
    """scripts/bench_kernels.py --op quantized_rows: median and p95 per row count, a ratio
    against MLX's op measured in the same run."""
    import json
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_kernels.py"
    r = subprocess.run([sys.executable, str(script), "--op", "quantized_rows", "--iters", "2", "--warmup", "1",
                        "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])["rows"]
    QMM_ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)
    assert [row["variant"] for row in rows if row["impl"] == "reference"] == [f"{m} rows" for m in QMM_ROWS]
    assert {row["variant"] for row in rows if row["impl"] == "pad16"} == {f"{m} rows" for m in QMM_ROWS if 2 <= m < 16}
    assert all(row["op"] == "quantized_rows" and row["p95_ms"] >= row["ms"] > 0 for row in rows)
    assert all(row["speedup_vs_reference"] == 1.0 for row in rows if row["impl"] == "reference")


def test_device_measure_script_writes_every_part(tmp_path):
    """scripts/device_measure_rows.sh (issue 15's GPU measurements in one device call), as a
    smoke run on this machine: the kernel table and four bench_streams runs, mlx/pad-large alternated."""
    import os
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "SHAPES": "tiny", "ITERS": "2", "OUT": str(tmp_path), "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(root / "scripts" / "device_measure_rows.sh")], cwd=root, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "pad16" in (tmp_path / "bench_qmm_rows.txt").read_text()
    for name in ("streams_mlx_1", "streams_pad-large_1", "streams_mlx_2", "streams_pad-large_2"):
        assert "frames/s" in (tmp_path / f"{name}.txt").read_text(), name
    assert r.stdout.count("== bench_streams") == 4
