"""Language models vs references, fp32, tiny random configs, offline.

The same random weights go into transformers' implementation (torch CPU, eager attention)
and ours; logits must agree to 1e-4 for a plain prefill, for a prefill split into two chunks
on the cache, and for several single-token decode steps on the cache. MiniCPM's muP variant
is checked against a small torch reference written here from the published formulas.
"""

from __future__ import annotations

import math
import zlib

import mlx.core as mx
import numpy as np
import pytest
import torch

from framecast.errors import ModelLoadError
from framecast.model.cache import KVCache
from framecast.model.lm import build_lm, get_lm_class

TOL = 1e-4
PROMPT, SPLIT, DECODE = 11, 5, 4  # prompt tokens, first chunk length, cached decode steps

TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=101,
    rms_norm_eps=1e-6,
    max_position_embeddings=256,
)

# name -> (transformers class name, config overrides)
HF_CASES = {  # llama-rope-linear also turns on HF Llama's attention/MLP biases
    "qwen2": ("Qwen2", dict(model_type="qwen2", rope_theta=1e6)),
    "qwen2-tied": ("Qwen2", dict(model_type="qwen2", rope_theta=1e4, tie_word_embeddings=True)),
    "qwen3": (
        "Qwen3",
        dict(model_type="qwen3", head_dim=32, rope_theta=1e6, num_key_value_heads=1),
    ),
    "llama": ("Llama", dict(model_type="llama", rope_theta=1e4, num_key_value_heads=4)),
    "llama-rope-llama3": (
        "Llama",
        dict(
            model_type="llama",
            rope_theta=5e5,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    # MiniCPM4-style LongRoPE with max_position == original (short factors, no attention
    # factor): where our fixed choice and transformers' length-dependent one agree.
    "llama-rope-longrope": (
        "Llama",
        dict(
            model_type="llama",
            rope_scaling=dict(
                rope_type="longrope",
                original_max_position_embeddings=256,
                short_factor=[1.0, 1.2, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0],
                long_factor=[2.0] * 8,
            ),
        ),
    ),
    "llama-rope-linear": (
        "Llama",
        dict(
            model_type="llama",
            rope_scaling=dict(rope_type="linear", factor=2.0),
            attention_bias=True,
            mlp_bias=True,
        ),
    ),
}
MAX_DIFFS: dict[str, dict[str, float]] = {}  # filled by the tests, printed with -s


def _randomize_(module: torch.nn.Module, seed: int) -> None:
    """Weights with O(1) activations so a 1e-4 tolerance means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def _to_mlx(model, state_dict: dict[str, torch.Tensor]) -> None:
    weights = {k: mx.array(v.detach().numpy()) for k, v in state_dict.items()}
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    mx.eval(model.parameters())


def _ids(n: int, vocab: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(1, n))


def _check_all_paths(ours, reference_logits: np.ndarray, ids: np.ndarray, name: str) -> None:
    """Prefill, chunked prefill and cached decode all match the reference at every position."""
    diffs = {}

    # 1. plain prefill of the prompt, no cache
    logits = ours(mx.array(ids[:, :PROMPT]))  # [1, PROMPT, V]
    diffs["prefill"] = float(np.abs(np.array(logits) - reference_logits[:, :PROMPT]).max())

    # 2. chunked prefill on a small-step cache (grows mid-prompt), then cached decode steps
    cache = [KVCache(step=8) for _ in ours.layers]
    first = ours(mx.array(ids[:, :SPLIT]), cache=cache)
    second = ours(mx.array(ids[:, SPLIT:PROMPT]), cache=cache)
    chunked = np.concatenate([np.array(first), np.array(second)], axis=1)
    diffs["chunked_prefill"] = float(np.abs(chunked - reference_logits[:, :PROMPT]).max())
    decode_diff = 0.0
    for t in range(PROMPT, PROMPT + DECODE):
        step = ours(mx.array(ids[:, t : t + 1]), cache=cache)  # [1, 1, V]
        decode_diff = max(decode_diff, float(np.abs(np.array(step) - reference_logits[:, t : t + 1]).max()))
    diffs["decode"] = decode_diff
    assert cache[0].offset == PROMPT + DECODE

    # 3. the model's own cache (default step) with input embeddings instead of ids
    cache = ours.make_cache()
    emb = ours.embed_tokens(mx.array(ids[:, :PROMPT]))  # [1, PROMPT, D]
    logits = ours(cache=cache, input_embeddings=emb)
    step = ours(mx.array(ids[:, PROMPT : PROMPT + 1]), cache=cache)
    diffs["embeddings+decode"] = max(
        float(np.abs(np.array(logits) - reference_logits[:, :PROMPT]).max()),
        float(np.abs(np.array(step) - reference_logits[:, PROMPT : PROMPT + 1]).max()),
    )

    # 4. last_only: the head runs on the last position only
    last = ours(mx.array(ids[:, :PROMPT]), last_only=True)  # [1, 1, V]
    assert last.shape == (1, 1, reference_logits.shape[-1])
    diffs["last_only"] = float(np.abs(np.array(last) - reference_logits[:, PROMPT - 1 : PROMPT]).max())

    MAX_DIFFS[name] = diffs
    print(f"\n{name}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    for path, diff in diffs.items():
        assert diff <= TOL, f"{name} {path}: max abs diff {diff:.3e} > {TOL}"


@pytest.mark.parametrize("case", list(HF_CASES))
def test_matches_transformers(case):
    import transformers

    family, overrides = HF_CASES[case]
    config = {**TINY, **overrides}
    torch.manual_seed(0)
    hf_config = getattr(transformers, f"{family}Config")(**config, attn_implementation="eager")
    hf = getattr(transformers, f"{family}ForCausalLM")(hf_config).float().eval()
    assert hf.config._attn_implementation == "eager"
    _randomize_(hf, seed=zlib.crc32(case.encode()))

    ids = _ids(PROMPT + DECODE, config["vocab_size"])
    with torch.no_grad():
        # Causal attention: the full-sequence forward gives every position's reference logits.
        reference = hf(torch.tensor(ids)).logits.numpy()

    ours = build_lm(config)  # the config.json form (top-level rope_theta / rope_scaling)  # transformers 5 nests rope settings: both parse
    _to_mlx(ours, hf.state_dict())
    _check_all_paths(ours, reference, ids, case)
    # transformers >= 5 nests the rope settings under `rope_parameters`: that form parses too.
    assert build_lm(hf_config.to_dict()).args == ours.args


def test_config_from_dict_ignores_unknown_and_names_missing_keys():
    _, args_cls = get_lm_class("qwen2")
    args = args_cls.from_dict({**TINY, "model_type": "qwen2", "some_future_key": 1})
    assert args.hidden_size == 64 and args.num_key_value_heads == 2
    with pytest.raises(ModelLoadError, match="hidden_size"):
        args_cls.from_dict({k: v for k, v in TINY.items() if k != "hidden_size"})
    with pytest.raises(ModelLoadError, match="mamba"):
        get_lm_class("mamba")
    with pytest.raises(ModelLoadError, match="rope_scaling"):
        build_lm({**TINY, "model_type": "qwen2", "rope_scaling": {"rope_type": "yarnish"}})


def test_sanitize_drops_rotary_buffers_and_tied_head():
    ours = build_lm({**TINY, "model_type": "qwen2", "tie_word_embeddings": True})
    weights = {"model.layers.0.self_attn.rotary_emb.inv_freq": mx.zeros(4), "lm_head.weight": mx.zeros(2)}
    assert ours.sanitize(weights) == {}


# -- MiniCPM muP: a torch reference written from the published formulas ----------------------

MINICPM = dict(
    TINY,
    model_type="minicpm",
    num_key_value_heads=1,
    rope_theta=1e4,
    scale_emb=12.0,
    scale_depth=1.4,
    dim_model_base=16,
)
MINICPM_LONGROPE = dict(
    MINICPM,
    max_position_embeddings=64,
    rope_scaling=dict(
        rope_type="longrope",
        original_max_position_embeddings=16,
        # 8 entries = head_dim/2; long factors are used since max_position > original
        long_factor=[1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0],
        short_factor=[1.0] * 8,
    ),
)


def _minicpm_weights(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    D, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = D // cfg["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (cfg["num_attention_heads"] * hd, D),
            p + "self_attn.k_proj.weight": (cfg["num_key_value_heads"] * hd, D),
            p + "self_attn.v_proj.weight": (cfg["num_key_value_heads"] * hd, D),
            p + "self_attn.o_proj.weight": (D, cfg["num_attention_heads"] * hd),
            p + "mlp.gate_proj.weight": (F, D),
            p + "mlp.up_proj.weight": (F, D),
            p + "mlp.down_proj.weight": (D, F),
            p + "input_layernorm.weight": (D,),
            p + "post_attention_layernorm.weight": (D,),
        }
    out = {}
    for name, shape in shapes.items():
        w = torch.randn(shape, generator=g)
        if "norm" in name:
            out[name] = 1 + 0.2 * w
        elif "embed_tokens" in name:
            out[name] = 0.1 * w  # muP: scale_emb=12 brings it back to O(1)
        else:
            out[name] = w / math.sqrt(shape[-1])
    return out


def _minicpm_reference(w: dict[str, torch.Tensor], cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """Full-sequence MiniCPM forward in plain torch (no cache): rotate-half RoPE with
    LongRoPE factors, GQA, causal softmax attention, SwiGLU, and the three muP scalars."""
    D, H, KV, L = (cfg[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers"))
    hd, eps, T = D // H, cfg["rms_norm_eps"], ids.shape[1]

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    inv_freq = 1.0 / cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    mscale = 1.0
    scaling = cfg.get("rope_scaling")
    if scaling:
        original, max_pos = scaling["original_max_position_embeddings"], cfg["max_position_embeddings"]
        factors = scaling["long_factor"] if max_pos > original else scaling["short_factor"]
        inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float64)
        ratio = max_pos / original
        mscale = math.sqrt(1 + math.log(ratio) / math.log(original)) if ratio > 1 else 1.0
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None]  # [T, hd/2]
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = (emb.cos() * mscale).float(), (emb.sin() * mscale).float()

    def rope(x):  # [1, heads, T, hd], rotate-half
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    residual_scale = cfg["scale_depth"] / math.sqrt(L)
    causal = torch.full((T, T), float("-inf")).triu(1)
    h = w["model.embed_tokens.weight"][ids] * cfg["scale_emb"]  # [1, T, D]
    for i in range(L):
        p = f"model.layers.{i}."
        x = rms(h, w[p + "input_layernorm.weight"])
        q = (x @ w[p + "self_attn.q_proj.weight"].T).view(1, T, H, hd).transpose(1, 2)
        k = (x @ w[p + "self_attn.k_proj.weight"].T).view(1, T, KV, hd).transpose(1, 2)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).view(1, T, KV, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + causal, dim=-1)
        o = (att @ v).transpose(1, 2).reshape(1, T, D) @ w[p + "self_attn.o_proj.weight"].T
        h = h + o * residual_scale
        x = rms(h, w[p + "post_attention_layernorm.weight"])
        gate = torch.nn.functional.silu(x @ w[p + "mlp.gate_proj.weight"].T)
        m = (gate * (x @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        h = h + m * residual_scale
    h = rms(h, w["model.norm.weight"])
    return (h @ w["lm_head.weight"].T) / (cfg["hidden_size"] / cfg["dim_model_base"])


@pytest.mark.parametrize("case", ["minicpm", "minicpm-longrope"])
def test_minicpm_mup_matches_torch_reference(case):
    cfg = MINICPM if case == "minicpm" else MINICPM_LONGROPE
    weights = _minicpm_weights(cfg, seed=zlib.crc32(case.encode()))
    ids = _ids(PROMPT + DECODE, cfg["vocab_size"])
    with torch.no_grad():
        reference = _minicpm_reference(weights, cfg, torch.tensor(ids)).numpy()
    ours = build_lm(cfg)
    _to_mlx(ours, weights)
    assert ours.args.residual_scale == pytest.approx(1.4 / math.sqrt(2))
    assert ours.args.logit_scale == pytest.approx(64 / 16)
    _check_all_paths(ours, reference, ids, case)
    # embed_tokens includes scale_emb (vision features scattered later are never scaled)
    raw = ours.model.embed_tokens(mx.array(ids[:, :3]))
    np.testing.assert_allclose(np.array(ours.embed_tokens(mx.array(ids[:, :3]))), np.array(raw) * 12.0, rtol=1e-6)


def test_untied_head_missing_from_checkpoint_falls_back_to_embeddings():
    ours = build_lm(dict(MINICPM, tie_word_embeddings=False))
    weights = {k: mx.array(v.numpy()) for k, v in _minicpm_weights(MINICPM, 0).items() if k != "lm_head.weight"}
    weights = ours.sanitize(weights)
    assert weights["lm_head.weight"] is weights["model.embed_tokens.weight"]
    ours.load_weights(list(weights.items()), strict=True)


@pytest.mark.parametrize("tied", [False, True])
def test_quantized_lm_runs_on_the_cache_and_stays_close(tied):
    """8-bit affine quantisation (as the converter writes) keeps logits near fp32."""
    import mlx.nn as nn

    config = {**TINY, "model_type": "qwen2", "tie_word_embeddings": tied}
    ours = build_lm(config)
    mx.eval(ours.parameters())
    ids = mx.array(_ids(PROMPT + 1, config["vocab_size"]))
    full = np.array(ours(ids))
    nn.quantize(ours, group_size=32, bits=8)
    cache = ours.make_cache()
    prefill = ours(ids[:, :PROMPT], cache=cache)
    step = ours(ids[:, PROMPT:], cache=cache)
    quant = np.concatenate([np.array(prefill), np.array(step)], axis=1)
    gap = float(np.abs(quant - full).max())
    print(f"\nqwen2 8-bit (tied={tied}): max abs logit gap {gap:.2e} (|logits| max {np.abs(full).max():.2f})")
    assert gap < 0.05 * np.abs(full).max()
