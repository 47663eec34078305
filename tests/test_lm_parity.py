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

from pipeline.errors import ModelLoadError
from pipeline.model.cache import KVCache
from pipeline.model.lm import build_lm, get_lm_class

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
    model_cls, args_cls = get_lm_class("qwen2")
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
