"""GGUF round trip: tiny checkpoints written in llama.cpp's layout load to the same logits as HF.

For every LM arch (qwen2, llama with the q/k permutation, minicpm with muP keys, qwen3 with
q/k norms) and storage type (F32, F16, Q8_0, Q4_0), the GGUF must give the logits of the HF
checkpoint that holds exactly the values the GGUF holds (dequantised blocks included).
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from gguf_fixtures import QTYPES, write_gguf_pair
from framecast.testing import make_tiny_minicpmv

CASES = {  # name -> (tiny version, gguf arch, LM family of the HF side, extra LM config)
    "qwen2": ("2.6", "qwen2", "qwen2", {}),
    "llama": ("4.0", "llama", "llama", {}),
    "minicpm": ("4.0", "minicpm", "minicpm", {"scale_emb": 12.0, "scale_depth": 1.4, "dim_model_base": 16}),
    "qwen3": ("4.5", "qwen3", "qwen3", {}),
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """(case, qtype) -> (lm gguf, mmproj gguf, HF-equivalent dir, LM family)."""
    out = {}
    for case, (version, arch, family, extra) in CASES.items():
        root = tmp_path_factory.mktemp(case)
        hf = make_tiny_minicpmv(root / "hf", version, llm=extra or None)
        for qtype in QTYPES:
            lm, mm, equiv = write_gguf_pair(hf, root / "gguf", qtype, version=version, arch=arch)
            out[case, qtype] = (lm, mm, equiv, family)
    return out


def hf_language_model(equiv_dir, family):
    from framecast.model.lm import build_lm

    cfg = json.loads((equiv_dir / "config.json").read_text())
    model = build_lm({**cfg, "model_type": family})
    weights = {k.removeprefix("llm."): v for k, v in mx.load(str(equiv_dir / "model.safetensors")).items()
               if k.startswith("llm.")}
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    return model


def _logits(model, ids):
    cache = model.make_cache()
    first = model(mx.array([ids[:-3]]), cache=cache)  # prefill
    rest = [model(mx.array([[t]]), cache=cache) for t in ids[-3:]]  # cached decode steps
    return np.array(mx.concatenate([first] + rest, axis=1)[0])


IDS = [2, 40, 41, 260, 70, 101, 33, 7, 99, 120, 3, 57, 200, 11]


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_lm_gguf_logits_match_hf(pairs, case, qtype):
    from framecast.model.gguf.model import load_gguf

    lm_path, _mm, equiv, family = pairs[case, qtype]
    ours = load_gguf(lm_path)
    ref = _logits(hf_language_model(equiv, family), IDS)
    got = _logits(ours.language_model, IDS)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=2e-4 * np.abs(ref).max(), rtol=1e-4)
    if qtype in ("Q8_0", "Q4_0"):  # kept quantised, not expanded
        import mlx.nn as nn

        assert isinstance(ours.language_model.layers[0].mlp.up_proj, nn.QuantizedLinear)


def test_gguf_lm_config_reads_metadata(pairs):
    from framecast.model.gguf.model import lm_config_from_gguf
    from framecast.model.gguf.file import read_header

    lm_path, _mm, equiv, _family = pairs["minicpm", "F32"]
    cfg = lm_config_from_gguf(read_header(lm_path))
    hf = json.loads((equiv / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size"):
        assert cfg[key] == hf[key], key
    assert cfg["model_type"] == "minicpm" and cfg["tie_word_embeddings"] is True
    assert cfg["scale_emb"] == pytest.approx(12.0)
    assert cfg["scale_depth"] == pytest.approx(1.4, rel=1e-6)
    assert cfg["dim_model_base"] == pytest.approx(16, rel=1e-6)


def test_unpermute_inverts_the_converter_permutation():
    from gguf_fixtures import permute_rows

    from framecast.model.gguf.model import unpermute_rows

    w = np.arange(4 * 16 * 3, dtype=np.float32).reshape(64, 3)  # 4 heads of head_dim 16
    back = np.array(unpermute_rows(mx.array(permute_rows(w, 4)), 4))
    np.testing.assert_array_equal(back, w)


def test_gguf_tokenizer_matches_checkpoint_tokenizer(pairs):
    from tokenizers import Tokenizer

    from framecast.model.gguf.model import load_gguf_tokenizer
    from framecast.model.gguf.file import read_header

    lm_path, _mm, equiv, _family = pairs["qwen2", "F32"]
    ref = Tokenizer.from_file(str(equiv / "tokenizer.json"))
    ours = load_gguf_tokenizer(read_header(lm_path))
    for text in ["Hello, world!", "<|im_start|>user\nhi<|im_end|>\n", "naïve 日本 🙂  x", "<image><unk></image>"]:
        assert ours.encode(text) == ref.encode(text).ids, text
        assert ours.decode(ours.encode(text)) == text
    assert ours.token_id("<|im_end|>") in ours.eos_ids


# ---------------------------------------------------------------- full pairs (vision + LM)


def _vlm_logits(model, image):
    feats = model.encode_images([image])
    text = model.processor.chat_prompt([{"role": "user", "content": model.image_placeholder(feats[0]) + "\nWhat?"}])
    ids = mx.array([model.tokenizer.encode(text)])
    logits = model.forward(ids, model.make_cache(), images=feats)
    return np.array(feats[0].features), np.array(logits[0])


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_gguf_pair_matches_hf_checkpoint(pairs, case, qtype):
    from framecast.testing import random_image

    from framecast.model.gguf.model import load_gguf
    from framecast.model.load import load_model

    lm_path, mm_path, equiv, _family = pairs[case, qtype]
    ours = load_gguf(lm_path, mmproj=mm_path)
    ref = load_model(equiv)
    assert ours.args.version == ref.args.version
    image = random_image(70, 100, seed=1)  # sliced: overview + slices, key-masked padding
    f_ours, l_ours = _vlm_logits(ours, image)
    f_ref, l_ref = _vlm_logits(ref, image)
    np.testing.assert_allclose(f_ours, f_ref, atol=1e-4 * np.abs(f_ref).max(), rtol=1e-4)
    np.testing.assert_allclose(l_ours, l_ref, atol=2e-4 * np.abs(l_ref).max(), rtol=1e-4)


def test_gguf_45_pair_runs_the_3d_resampler_like_hf(pairs):
    from framecast.testing import random_image

    from framecast.model.gguf.model import load_gguf
    from framecast.model.load import load_model

    lm_path, mm_path, equiv, _family = pairs["qwen3", "Q8_0"]
    ours, ref = load_gguf(lm_path, mmproj=mm_path), load_model(equiv)
    frames = [random_image(56, 56, seed=s) for s in range(3)]
    a = np.array(ours.encode_frame_group(frames, [0, 5, 10]).features)
    b = np.array(ref.encode_frame_group(frames, [0, 5, 10]).features)
    np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max(), rtol=1e-4)


def test_ffn_names_are_decided_by_shape(pairs, tmp_path):
    """Legacy files call fc1 `ffn_down`; newer ones `ffn_up`: both must load the same tower."""
    from gguf_fixtures import write_mmproj_gguf
    from framecast.testing import random_image

    from framecast.model.gguf.model import load_gguf

    lm_path, mm_swapped, equiv, _family = pairs["qwen2", "F32"]
    cfg = json.loads((equiv / "config.json").read_text())
    weights = {k: np.array(v) for k, v in mx.load(str(equiv / "model.safetensors")).items()}
    straight = tmp_path / "mmproj-straight.gguf"
    write_mmproj_gguf(straight, cfg, weights, "F32", version="2.6", swap_ffn=False)
    image = random_image(56, 56, seed=2)
    a = load_gguf(lm_path, mmproj=mm_swapped).encode_images([image])[0].features
    b = load_gguf(lm_path, mmproj=straight).encode_images([image])[0].features
    np.testing.assert_array_equal(np.array(a), np.array(b))


# ---------------------------------------------------------------- RoPE factors stored as tensors


def _llama3_factors(head_dim: int, base: float, scaling: dict) -> np.ndarray:
    """What convert_hf_to_gguf.py stores as `rope_freqs.weight` for a Llama-3 rope_scaling."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * np.pi * base ** (i / head_dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


@pytest.mark.parametrize("kind", ["llama3", "longrope-short", "longrope-long"])
def test_rope_factor_tensors(tmp_path, kind):
    from gguf_fixtures import write_lm_gguf
    from framecast.testing import tiny_config, tiny_weights

    from framecast.model.gguf.model import load_gguf
    from framecast.model.lm import build_lm

    rng = np.random.default_rng(0)
    if kind == "llama3":
        version, arch, extra = "4.0", "llama", {}
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8}
    else:
        version, arch = "4.0", "minicpm"
        extra = {"scale_emb": 12.0, "scale_depth": 1.4, "dim_model_base": 16}
        scaling = {"rope_type": "longrope", "long_factor": (1 + 3 * rng.random(8)).tolist(),
                   "short_factor": (1 + rng.random(8)).tolist(), "original_max_position_embeddings": 2048}
    max_pos = 4096 if kind == "longrope-long" else 2048
    cfg = {**tiny_config(version, llm={**extra, "rope_scaling": scaling, "max_position_embeddings": max_pos}),
           "model_type": arch}
    llm = {k.removeprefix("llm."): v for k, v in tiny_weights(cfg, version).items() if k.startswith("llm.")}
    if kind == "llama3":
        tensors, meta = {"rope_freqs.weight": _llama3_factors(16, cfg["rope_theta"], scaling)}, {}
    else:
        tensors = {"rope_factors_long.weight": scaling["long_factor"],
                   "rope_factors_short.weight": scaling["short_factor"]}
        meta = {"minicpm.rope.scaling.original_context_length": 2048}
    from framecast.testing import build_tokenizer

    build_tokenizer().save(str(tmp_path / "tokenizer.json"))
    path = tmp_path / "rope.gguf"
    held = write_lm_gguf(path, cfg, llm, "F32", arch=arch, extra_tensors=tensors, extra_uint32=meta,
                         tokenizer_json=tmp_path / "tokenizer.json")
    ref_model = build_lm(cfg)
    ref_model.load_weights([(k, mx.array(v)) for k, v in ref_model.sanitize(held).items()], strict=True)
    ours = load_gguf(path)
    ids = list(range(3, 40, 2))  # 19 positions: past the llama3 original context of 8
    np.testing.assert_allclose(_logits(ours.language_model, ids), _logits(ref_model, ids), atol=1e-4, rtol=1e-4)
