"""Tiny random MiniCPM-V checkpoints in the Hugging Face layout, for tests (offline, fast).

`make_tiny_minicpmv(out_dir, version="2.6")` writes what a real checkpoint directory holds:
`config.json` (HF field names, `model_type`/`version` as the real ones), `preprocessor_config.json`,
safetensors (optionally sharded with `model.safetensors.index.json`), `tokenizer.json` (a byte-level
BPE built with `tokenizers`, so any text encodes, plus the MiniCPM-V special tokens),
`tokenizer_config.json` and `generation_config.json`.

Weights use the HF names (`vpm.*`, `resampler.*`, `llm.*`; MiniCPM-o also gets a few `apm.*`/`tts.*`
tensors that the loader must skip). They are random but scaled like an initialised network
(std ~ 1/sqrt(fan_in)), so logits differ between tokens and images — useful for parity tests.

Versions: "2.6" (qwen2 LM), "o-2.6" (MiniCPM-o, qwen2), "4.0" (llama LM, tied embeddings),
"4.5" (qwen3 LM with q/k norms, 3D resampler). Used by the engine, session, GGUF, MQTT and demo
tests: keep the signature stable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from framecast.events import Event
from framecast.runtime import Source

VERSIONS = ("2.6", "o-2.6", "4.0", "4.5")

# Order matters only for readability; ids follow the 256 byte symbols.
SPECIAL_TOKENS = [
    "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>",
    "<image>", "</image>", "<slice>", "</slice>", "<image_id>", "</image_id>",
    "<think>", "</think>", "<ref>", "</ref>", "<box>", "</box>",
]

TINY_VISION = {
    "model_type": "siglip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "patch_size": 14,
    "image_size": 980,  # keeps the real 70x70 position grid (bucketing ties included)
    "num_channels": 3,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu_pytorch_tanh",
}

TINY_LLM = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 4096,
    "hidden_act": "silu",
}

# version -> (config.json model_type, "version" field, LM family, extra LM fields)
_LAYOUT: dict[str, tuple[str, float, str, dict[str, Any]]] = {
    "2.6": ("minicpmv", 2.6, "qwen2", {"tie_word_embeddings": False}),
    "o-2.6": ("minicpmo", 2.6, "qwen2", {"tie_word_embeddings": False}),
    "4.0": ("minicpmv", 4.0, "llama", {"tie_word_embeddings": True, "attention_bias": False,
                                       "mlp_bias": False}),
    "4.5": ("minicpmv", 4.5, "qwen3", {"tie_word_embeddings": False, "attention_bias": False}),
}


# ---------------------------------------------------------------- tokenizer


def build_tokenizer():
    """A byte-level BPE over the 256 byte symbols (no merges) plus the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {sym: i for i, sym in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def tokenizer_vocab_size() -> int:
    return 256 + len(SPECIAL_TOKENS)


def _write_tokenizer(out: Path, version: str) -> dict[str, int]:
    tok = build_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    eos = "<|im_end|>"
    stops = ["<|im_end|>", "</s>"] if version == "4.0" else ["<|im_end|>", "<|endoftext|>"]
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>" if version == "4.0" else None,
        "eos_token": eos,
        "pad_token": "<|endoftext|>",
        "unk_token": "<unk>",
        "model_max_length": 4096,
    }, indent=2))
    (out / "generation_config.json").write_text(json.dumps({
        "eos_token_id": [ids[s] for s in stops],
        "pad_token_id": ids["<|endoftext|>"],
    }, indent=2))
    return ids


# ---------------------------------------------------------------- config


def tiny_config(version: str = "2.6", *, query_num: int = 8, scale_resolution: int = 56,
                max_slice_nums: int = 9, vision: dict | None = None, llm: dict | None = None) -> dict:
    """config.json for a tiny checkpoint of `version` (HF field names and nesting)."""
    if version not in _LAYOUT:
        raise ValueError(f"unknown tiny version {version!r} (choose from {VERSIONS})")
    model_type, vfield, _family, extra = _LAYOUT[version]
    cfg: dict[str, Any] = {
        "architectures": ["MiniCPMO" if model_type == "minicpmo" else "MiniCPMV"],
        "model_type": model_type,
        "version": vfield,
        **TINY_LLM,
        **extra,
        **(llm or {}),
        "vocab_size": tokenizer_vocab_size(),
        "query_num": query_num,
        "image_size": scale_resolution,
        "patch_size": 14,
        "slice_mode": True,
        "slice_config": {"max_slice_nums": max_slice_nums, "patch_size": 14,
                         "scale_resolution": scale_resolution, "model_type": "minicpmv"},
        "batch_vision_input": True,
        "drop_vision_last_layer": False,
        "use_image_id": True,
        "vision_config": {**TINY_VISION, **(vision or {})},
        "torch_dtype": "float32",
    }
    if version == "4.5":
        cfg["batch_3d_resampler"] = True
    if model_type == "minicpmo":
        cfg.update({"init_vision": True, "init_audio": True, "init_tts": True,
                    "audio_config": {"model_type": "whisper", "d_model": 16},
                    "tts_config": {"model_type": "conditional_chattts", "hidden_size": 16}})
    return cfg


def _preprocessor_config(cfg: dict) -> dict:
    q = cfg["query_num"]
    return {
        "image_processor_type": "MiniCPMVImageProcessor",
        "auto_map": {"AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor"},
        "max_slice_nums": cfg["slice_config"]["max_slice_nums"],
        "scale_resolution": cfg["image_size"],
        "patch_size": cfg["patch_size"],
        "use_image_id": cfg["use_image_id"],
        "image_feature_size": q,
        "slice_mode": cfg["slice_mode"],
        "im_start": "<image>", "im_end": "</image>", "slice_start": "<slice>", "slice_end": "</slice>",
        "unk": "<unk>", "im_id_start": "<image_id>", "im_id_end": "</image_id>",
        "norm_mean": [0.5, 0.5, 0.5],
        "norm_std": [0.5, 0.5, 0.5],
        "version": cfg["version"],
    }


# ---------------------------------------------------------------- weights


def _family(version: str) -> str:
    return _LAYOUT[version][2]


def tiny_weights(cfg: dict, version: str, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Random fp32 weights under the HF names for `cfg` (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    w: dict[str, np.ndarray] = {}

    def lin(name: str, n_out: int, n_in: int, bias: bool) -> None:
        w[f"{name}.weight"] = (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)
        if bias:
            w[f"{name}.bias"] = (0.1 * rng.standard_normal(n_out)).astype(np.float32)

    def norm(name: str, n: int, bias: bool = True) -> None:
        w[f"{name}.weight"] = (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)
        if bias:
            w[f"{name}.bias"] = (0.1 * rng.standard_normal(n)).astype(np.float32)

    v = cfg["vision_config"]
    dv, p, ff = v["hidden_size"], v["patch_size"], v["intermediate_size"]
    side = v["image_size"] // p
    w["vpm.embeddings.patch_embedding.weight"] = (
        rng.standard_normal((dv, 3, p, p)) / np.sqrt(3 * p * p)).astype(np.float32)
    w["vpm.embeddings.patch_embedding.bias"] = (0.1 * rng.standard_normal(dv)).astype(np.float32)
    w["vpm.embeddings.position_embedding.weight"] = (0.5 * rng.standard_normal((side * side, dv))).astype(np.float32)
    for i in range(v["num_hidden_layers"]):
        pre = f"vpm.encoder.layers.{i}"
        norm(f"{pre}.layer_norm1", dv)
        norm(f"{pre}.layer_norm2", dv)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            lin(f"{pre}.self_attn.{proj}", dv, dv, True)
        lin(f"{pre}.mlp.fc1", ff, dv, True)
        lin(f"{pre}.mlp.fc2", dv, ff, True)
    norm("vpm.post_layernorm", dv)

    d, q = cfg["hidden_size"], cfg["query_num"]
    w["resampler.query"] = (0.5 * rng.standard_normal((q, d))).astype(np.float32)
    if dv != d:  # HF uses nn.Identity when the widths agree (no weight stored)
        w["resampler.kv_proj.weight"] = (rng.standard_normal((d, dv)) / np.sqrt(dv)).astype(np.float32)
    w["resampler.attn.in_proj_weight"] = (rng.standard_normal((3 * d, d)) / np.sqrt(d)).astype(np.float32)
    w["resampler.attn.in_proj_bias"] = (0.1 * rng.standard_normal(3 * d)).astype(np.float32)
    lin("resampler.attn.out_proj", d, d, True)
    for ln in ("ln_q", "ln_kv", "ln_post"):
        norm(f"resampler.{ln}", d)
    w["resampler.proj"] = (d ** -0.5 * rng.standard_normal((d, d))).astype(np.float32)

    fam = _family(version)
    h, nl = cfg["hidden_size"], cfg["num_hidden_layers"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // nh
    inter, vocab = cfg["intermediate_size"], cfg["vocab_size"]
    qkv_bias = fam == "qwen2" or bool(cfg.get("attention_bias"))
    w["llm.model.embed_tokens.weight"] = rng.standard_normal((vocab, h)).astype(np.float32)
    for i in range(nl):
        pre = f"llm.model.layers.{i}"
        norm(f"{pre}.input_layernorm", h, bias=False)
        norm(f"{pre}.post_attention_layernorm", h, bias=False)
        lin(f"{pre}.self_attn.q_proj", nh * hd, h, qkv_bias)
        lin(f"{pre}.self_attn.k_proj", nkv * hd, h, qkv_bias)
        lin(f"{pre}.self_attn.v_proj", nkv * hd, h, qkv_bias)
        lin(f"{pre}.self_attn.o_proj", h, nh * hd, False)
        if fam == "qwen3":
            norm(f"{pre}.self_attn.q_norm", hd, bias=False)
            norm(f"{pre}.self_attn.k_norm", hd, bias=False)
        lin(f"{pre}.mlp.gate_proj", inter, h, False)
        lin(f"{pre}.mlp.up_proj", inter, h, False)
        lin(f"{pre}.mlp.down_proj", h, inter, False)
    norm("llm.model.norm", h, bias=False)
    if not cfg.get("tie_word_embeddings"):
        lin("llm.lm_head", vocab, h, False)

    if cfg["model_type"] == "minicpmo":  # parts framecast does not run: must be skipped
        w["apm.layers.0.fc1.weight"] = rng.standard_normal((8, 16)).astype(np.float32)
        w["audio_projection_layer.linear1.weight"] = rng.standard_normal((8, 16)).astype(np.float32)
        w["tts.emb_text.weight"] = rng.standard_normal((8, 16)).astype(np.float32)
    return w


def _save(out: Path, weights: dict[str, np.ndarray], *, shards: int, dtype: str) -> None:
    import framecast  # noqa: F401  (OpenBLAS preload before mlx)
    import mlx.core as mx

    names = sorted(weights)
    groups = [names[i::shards] for i in range(shards)]
    mx_dtype = getattr(mx, dtype)
    if shards == 1:
        mx.save_safetensors(str(out / "model.safetensors"),
                            {k: mx.array(weights[k]).astype(mx_dtype) for k in names}, metadata={"format": "pt"})
        return
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        mx.save_safetensors(str(out / fname),
                            {k: mx.array(weights[k]).astype(mx_dtype) for k in group}, metadata={"format": "pt"})
        weight_map.update({k: fname for k in group})
    total = sum(weights[k].size * (4 if dtype == "float32" else 2) for k in names)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def make_tiny_minicpmv(out_dir: str | Path, version: str = "2.6", *, seed: int = 0, shards: int = 1,
                       dtype: str = "float32", **config_overrides: Any) -> Path:
    """Write a tiny random HF-layout MiniCPM-V checkpoint for `version` into `out_dir`; return it.

    `config_overrides` go to `tiny_config` (query_num, scale_resolution, max_slice_nums, vision, llm).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(version, **config_overrides)
    ids = _write_tokenizer(out, version)
    cfg["bos_token_id"] = ids["<s>"] if version == "4.0" else None
    cfg["eos_token_id"] = ids["<|im_end|>"]
    cfg["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(cfg), indent=2))
    _save(out, tiny_weights(cfg, version, seed=seed), shards=shards, dtype=dtype)
    return out


# The real MiniCPM-V 4.5 shapes (Qwen3-8B language model, SigLIP-400M vision; see
# shared/reference/minicpm-v.md) for benchmarks with random weights: no download, same cost.
REAL_45 = {
    "model_type": "minicpmv", "version": 4.5, "hidden_size": 4096, "num_hidden_layers": 36,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "intermediate_size": 12288, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "vocab_size": 151748,
    "max_position_embeddings": 40960, "tie_word_embeddings": False, "attention_bias": False,
    "query_num": 64, "image_size": 448, "patch_size": 14, "slice_mode": True,
    "slice_config": {"max_slice_nums": 1, "patch_size": 14, "scale_resolution": 448},
    "batch_vision_input": True, "batch_3d_resampler": True, "drop_vision_last_layer": False,
    "use_image_id": False,
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "image_size": 980,
                      "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "layer_norm_eps": 1e-6},
}


def random_image(h: int, w: int, *, seed: int = 0) -> np.ndarray:
    """A smooth-ish random RGB uint8 image [h, w, 3] (gradients + noise, so resizes matter)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / max(w - 1, 1), yy / max(h - 1, 1), (xx + yy) / max(h + w - 2, 1)], -1) * 200
    noise = rng.integers(0, 56, size=(h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


class ListSource(Source):
    """A source that plays a fixed list of events (frames, narrations, statuses...) into a graph:
    for output tests and benchmarks that need no video."""

    name = "list"

    def __init__(self, events: list[Event]):
        super().__init__()
        self.events = events

    async def frames(self):
        for e in self.events:
            yield e
