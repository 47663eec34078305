"""GGUF tensor types: native Q4_0/Q4_1/Q8_0 kept exactly, everything else re-quantised.

- `repack_native` (our numpy path, used when a file also holds non-native types) must give the
  very arrays `mx.load` gives for Q4_0 / Q4_1 / Q8_0.
- Q5_0/Q5_1/Q4_K/Q5_K are affine per 32 values: repacked exactly (same values as the gguf
  package's dequantiser); Q6_K and the rest are re-quantised within one step of the new grid.
- A tiny LM stored in Q5_0 (reader path end to end) gives the logits of its dequantised twin.
"""

from __future__ import annotations

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf.quants import dequantize, quantize

from framecast.model.gguf.file import REQUANT_BITS, dequantize_entry, read_header, read_tensors, repack_native

T = gguf.GGMLQuantizationType


def _write(path, tensors: dict[str, tuple[np.ndarray, int | None]]) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    for name, (data, raw) in tensors.items():
        if raw is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _random_kquant_blocks(rng, qtype, rows: int, cols: int) -> np.ndarray:
    """Valid-looking raw K-quant blocks: random bits with sane fp16 super-block scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    if qtype in (T.Q4_K, T.Q5_K):  # d, dmin lead the block
        raw[..., 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        raw[..., 2:4] = np.frombuffer(np.float16(0.004).tobytes(), np.uint8)
    elif qtype == T.Q6_K:  # d closes the block
        raw[..., -2:] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0])
def test_repack_matches_mx_load(tmp_path, qtype):
    x = np.random.default_rng(0).standard_normal((48, 96)).astype(np.float32)
    raw = quantize(x, qtype)
    _write(tmp_path / "n.gguf", {"a.weight": (raw, qtype)})
    ref = mx.load(str(tmp_path / "n.gguf"))
    ours = repack_native(raw, int(qtype), 48, 96)
    for part, mine in zip(("weight", "scales", "biases"), ours):
        np.testing.assert_array_equal(np.array(ref[f"a.{part}"]), mine)


def test_non_native_types_are_requantised(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 256)).astype(np.float32)
    tensors = {
        "k4.weight": (_random_kquant_blocks(rng, T.Q4_K, 32, 256), T.Q4_K),
        "k5.weight": (_random_kquant_blocks(rng, T.Q5_K, 32, 256), T.Q5_K),
        "q51.weight": (quantize(x, T.Q5_1), T.Q5_1),
        "k6.weight": (_random_kquant_blocks(rng, T.Q6_K, 32, 256), T.Q6_K),
        "q5.weight": (quantize(x, T.Q5_0), T.Q5_0),
        "q8.weight": (quantize(x, T.Q8_0), T.Q8_0),  # native, but repacked on the reader path
        "h.weight": (x.astype(np.float16), None),
        "norm.weight": (x[0], None),
    }
    path = tmp_path / "mixed.gguf"
    _write(path, tensors)
    header = read_header(path)
    assert header.tensors["k4.weight"].type_name == "Q4_K"
    got = read_tensors(header)
    for name, (data, raw) in tensors.items():
        ref = dequantize(data, raw).reshape(32, 256) if raw is not None else data.astype(np.float32)
        mine = np.array(dequantize_entry(got, name).astype(mx.float32))
        if raw in (T.Q8_0, None):
            np.testing.assert_array_equal(mine, ref.reshape(mine.shape))
            continue
        if raw in (T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K):  # exact repack (fp32 rounding aside)
            np.testing.assert_allclose(mine, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
            continue
        bits = got[name].shape[-1] * 32 // 256
        assert bits == REQUANT_BITS[gguf.GGMLQuantizationType(raw).name], name
        step = np.abs(np.repeat(np.array(got[name.replace("weight", "scales")]), 32, axis=-1))  # MLX may flip the sign
        assert np.all(np.abs(mine - ref) <= step + 1e-6), name  # MLX snaps zero to the grid: < 1 step


def test_q5_language_model_matches_its_dequantised_twin(tmp_path):
    import json

    from gguf_fixtures import write_gguf_pair
    from test_gguf_roundtrip import IDS, _logits, hf_language_model
    from framecast.testing import make_tiny_minicpmv

    from framecast.model.gguf.model import load_gguf

    hf = make_tiny_minicpmv(tmp_path / "hf", "2.6")
    lm_path, _mm, equiv = write_gguf_pair(hf, tmp_path / "g", "Q5_0", version="2.6")
    assert json.loads((equiv / "config.json").read_text())["model_type"] == "minicpmv"
    ours = load_gguf(lm_path)
    assert ours.language_model.layers[0].mlp.up_proj.bits == 5
    ref = _logits(hf_language_model(equiv, "qwen2"), IDS)
    got = _logits(ours.language_model, IDS)
    np.testing.assert_allclose(got, ref, atol=2e-4 * np.abs(ref).max(), rtol=1e-4)


def test_bf16_language_model_matches_its_twin(tmp_path):
    from gguf_fixtures import write_gguf_pair
    from test_gguf_roundtrip import IDS, _logits, hf_language_model
    from framecast.testing import make_tiny_minicpmv

    from framecast.model.gguf.model import load_gguf
    from framecast.model.gguf.file import read_header

    hf = make_tiny_minicpmv(tmp_path / "hf", "4.5")
    lm_path, _mm, equiv = write_gguf_pair(hf, tmp_path / "g", "BF16", version="4.5")
    assert read_header(lm_path).tensors["blk.0.ffn_up.weight"].type_name == "BF16"
    ref = _logits(hf_language_model(equiv, "qwen3"), IDS)
    got = _logits(load_gguf(lm_path).language_model, IDS)  # CPU: float32 compute
    np.testing.assert_allclose(got, ref, atol=2e-4 * np.abs(ref).max(), rtol=1e-4)


@pytest.mark.parametrize("bits", [3, 4, 5, 6, 8])
def test_pack_bits_is_mlx_packing(bits):
    from framecast.model.gguf.file import pack_bits

    rng = np.random.default_rng(bits)
    q = rng.integers(0, 2**bits, size=(6, 96)).astype(np.uint32)
    scales, biases = mx.ones((6, 3)), mx.zeros((6, 3))
    back = mx.dequantize(mx.array(pack_bits(q, bits)), scales, biases, group_size=32, bits=bits)
    np.testing.assert_array_equal(np.array(back), q.astype(np.float32))


def test_numpy_reader_path_equals_mx_load_on_a_real_file():
    """SmolLM2 Q4_1 + Q8_0 + F32: our block repacking gives mx.load's arrays bit for bit."""
    from gguf_fixtures import smollm_path

    header = read_header(smollm_path())
    fast = read_tensors(header)
    slow = read_tensors(header, use_mx_load=False)
    assert sorted(fast) == sorted(slow)
    for name in fast:
        np.testing.assert_array_equal(np.array(fast[name]), np.array(slow[name]), err_msg=name)
