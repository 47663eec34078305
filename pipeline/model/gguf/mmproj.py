"""llama.cpp mmproj GGUF (`clip` arch, `resampler` projector) -> MiniCPM-V vision tower + resampler.

What llama.cpp's MiniCPM-V surgery/encoder scripts write, and how each piece maps back:
  - `clip.minicpmv_version`: 3 = MiniCPM-V 2.6, 4 = MiniCPM-o 2.6, 5 = MiniCPM-V 4.0,
    6 = MiniCPM-V 4.5 (same tensors; framecast adds its 3D resampler's temporal term, which has
    no weights). Others (2 = Llama3-V 2.5, 100045 = MiniCPM-o 4.5, ...) are refused by name.
  - `v.patch_embd.*`, `v.position_embd.weight`, `v.blk.N.{ln1,ln2,attn_q,attn_k,attn_v,attn_out}`,
    `v.post_ln.*` -> `vpm.*` (HF names), then the tower's own sanitize.
  - `v.blk.N.ffn_up` / `ffn_down`: the legacy converter stored fc1 as `ffn_down` and fc2 as
    `ffn_up`; names cannot be trusted, so the tensor whose output width is the MLP width is fc1.
  - `resampler.attn.{q,k,v}`: split copies of the packed in-projection -> `in_proj_*`.
  - `resampler.proj.weight`: the [D, D] matrix stored transposed (ggml multiplies weight @ x);
    for `minicpm`-arch language models the surgery also divided it by `scale_emb` (llama.cpp's
    minicpm graph scales every input embedding, image features included; ours never scales
    vision features), so we multiply it back.
  - `resampler.pos_embed_k`: llama.cpp's precomputed 2D sin-cos table; framecast computes it.
  - `clip.vision.block_count`: the legacy encoder script writes all 27 SigLIP layers but says
    26 (so llama.cpp skips the last one); the HF checkpoints run all 27
    (`drop_vision_last_layer: false`), so we run every layer the file holds.
The vision side is small next to the LLM and runs batched prefill GEMMs, so quantised mmproj
tensors are dequantised to float here.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from framecast.errors import ModelLoadError
from framecast.model.gguf.file import GGUFHeader, cast_floats, default_dtype, dequantize_entry, read_tensors

# clip.minicpmv_version -> (config.json model_type, version, LM archs it pairs with)
MINICPMV_VERSIONS = {
    3: ("minicpmv", 2.6, ("qwen2",)),
    4: ("minicpmo", 2.6, ("qwen2",)),
    5: ("minicpmv", 4.0, ("llama", "minicpm")),
    6: ("minicpmv", 4.5, ("qwen3",)),
}
_VISION_PARTS = {"ln1": "layer_norm1", "ln2": "layer_norm2", "attn_q": "self_attn.q_proj",
                 "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_out": "self_attn.out_proj"}
_RESAMPLER_SAME = {"resampler.query", "resampler.attn.out.weight", "resampler.attn.out.bias",
                   *(f"resampler.ln_{n}.{p}" for n in ("q", "kv", "post") for p in ("weight", "bias"))}


def mmproj_config(mm: GGUFHeader, lm_cfg: dict[str, Any], lm_path: str) -> dict[str, Any]:
    """config.json-style dict (HF names) for the MiniCPM-V a GGUF pair describes."""
    if mm.arch != "clip":
        raise ModelLoadError(f"{mm.path}: general.architecture {mm.arch!r} is not an mmproj ('clip')")
    projector = mm.get("clip.projector_type", mm.get("clip.vision.projector_type"))
    if projector != "resampler":
        raise ModelLoadError(f"{mm.path}: clip.projector_type {projector!r} is not supported "
                             "(MiniCPM-V files use 'resampler')")
    version = mm.get("clip.minicpmv_version")
    if version not in MINICPMV_VERSIONS:
        raise ModelLoadError(f"{mm.path}: clip.minicpmv_version {version!r} is not supported "
                             "(3 = MiniCPM-V 2.6, 4 = MiniCPM-o 2.6, 5 = MiniCPM-V 4.0, 6 = MiniCPM-V 4.5)")
    model_type, hf_version, archs = MINICPMV_VERSIONS[version]
    if lm_cfg["model_type"] not in archs:
        raise ModelLoadError(f"{lm_path}: a {lm_cfg['model_type']} language model does not pair with "
                             f"{mm.path} (clip.minicpmv_version {version} expects {' or '.join(archs)})")
    for name in ("v.position_embd.weight", "v.patch_embd.weight", "resampler.query"):
        if name not in mm.tensors:
            raise ModelLoadError(f"{mm.path}: tensor {name} is missing")
    query_num, width = mm.tensors["resampler.query"].shape
    stated = mm.get("clip.minicpmv_query_num")  # newer files say it; legacy ones imply 64
    if stated and int(stated) != query_num:
        raise ModelLoadError(f"{mm.path}: clip.minicpmv_query_num {stated} does not match tensor "
                             f"resampler.query ({query_num} rows)")
    if width != lm_cfg["hidden_size"]:
        raise ModelLoadError(f"{mm.path}: resampler width {width} does not match the language model's "
                             f"hidden size {lm_cfg['hidden_size']} ({lm_path})")
    patch = int(mm.require("clip.vision.patch_size"))
    side = round(mm.tensors["v.position_embd.weight"].shape[0] ** 0.5)
    layers = sum(1 for n in mm.tensors if n.startswith("v.blk.") and n.endswith(".ln1.weight"))
    scale_resolution = int(mm.get("clip.vision.image_size", 448))
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": int(mm.require("clip.vision.embedding_length")),
        "intermediate_size": int(mm.require("clip.vision.feed_forward_length")),
        "num_attention_heads": int(mm.require("clip.vision.attention.head_count")),
        "num_hidden_layers": layers,
        "patch_size": patch,
        "image_size": side * patch,  # the learned position grid (70 x 70 for 980 / 14)
        "layer_norm_eps": float(mm.get("clip.vision.attention.layer_norm_epsilon", 1e-6)),
    }
    mean, std = mm.get("clip.vision.image_mean"), mm.get("clip.vision.image_std")
    cfg = {
        **{k: v for k, v in lm_cfg.items() if k != "model_type"},
        "model_type": model_type,
        "version": hf_version,
        "lm_model_type": lm_cfg["model_type"],
        "query_num": int(query_num),
        "image_size": scale_resolution,
        "patch_size": patch,
        "slice_mode": True,
        "slice_config": {"max_slice_nums": 9, "patch_size": patch, "scale_resolution": scale_resolution},
        "use_image_id": True,
        "drop_vision_last_layer": False,  # the file holds exactly the layers to run
        "batch_vision_input": True,
        "vision_config": vision,
        "gguf": {"model": lm_path, "mmproj": mm.path},
    }
    if hf_version == 4.5:
        cfg["batch_3d_resampler"] = True
    if mean is not None and std is not None:
        cfg["norm_mean"], cfg["norm_std"] = list(mean), list(std)
    return cfg


def _float(tensors: dict[str, mx.array], name: str) -> mx.array:
    return dequantize_entry(tensors, name) if name.endswith(".weight") else tensors[name]


def mmproj_weights(mm: GGUFHeader, cfg: dict[str, Any], *, scale_emb: float | None) -> dict[str, mx.array]:
    """HF-named (`vpm.*`, `resampler.*`) float tensors from an mmproj GGUF."""
    tensors = read_tensors(mm)
    ff = cfg["vision_config"]["intermediate_size"]
    names = sorted(n for n in tensors if not n.endswith((".scales", ".biases")))
    out: dict[str, mx.array] = {}
    qkv: dict[str, mx.array] = {}
    for name in names:
        value = _float(tensors, name)
        parts = name.split(".")
        if name.startswith("v.patch_embd."):
            out[f"vpm.embeddings.patch_embedding.{parts[-1]}"] = value
        elif name == "v.position_embd.weight":
            out["vpm.embeddings.position_embedding.weight"] = value
        elif name.startswith("v.post_ln."):
            out[f"vpm.post_layernorm.{parts[-1]}"] = value
        elif name.startswith("v.blk.") and len(parts) == 5:
            _, _, layer, kind, part = parts
            pre = f"vpm.encoder.layers.{layer}"
            if kind in _VISION_PARTS:
                out[f"{pre}.{_VISION_PARTS[kind]}.{part}"] = value
            elif kind in ("ffn_up", "ffn_down"):
                weight_rows = mm.tensors[f"v.blk.{layer}.{kind}.weight"].shape[0]
                fc = "fc1" if weight_rows == ff else "fc2"  # by shape: names were swapped by old tools
                out[f"{pre}.mlp.{fc}.{part}"] = value
            else:
                raise ModelLoadError(f"{mm.path}: unexpected tensor {name!r}")
        elif name in _RESAMPLER_SAME:
            out[name.replace("resampler.attn.out.", "resampler.attn.out_proj.")] = value
        elif name == "resampler.kv.weight":
            out["resampler.kv_proj.weight"] = value
        elif name.startswith("resampler.attn.") and parts[2] in ("q", "k", "v"):
            qkv[f"{parts[2]}.{parts[3]}"] = value
        elif name == "resampler.proj.weight":
            proj = value.T  # stored transposed: back to the [D, D] matrix applied as x @ proj
            # (in float32: an f16 multiply would round the restored values a second time)
            out["resampler.proj"] = proj.astype(mx.float32) * scale_emb if scale_emb else proj
        elif name in ("resampler.pos_embed_k", "resampler.pos_embed"):
            continue  # precomputed sin-cos table; ours is computed from the grid size
        else:
            raise ModelLoadError(f"{mm.path}: unexpected tensor {name!r}")
    for part in ("weight", "bias"):
        missing = [k for k in "qkv" if f"{k}.{part}" not in qkv]
        if missing:
            raise ModelLoadError(f"{mm.path}: tensor resampler.attn.{missing[0]}.{part} is missing")
        out[f"resampler.attn.in_proj_{part}"] = mx.concatenate([qkv[f"{k}.{part}"] for k in "qkv"], axis=0)
    return out


def load_mmproj_model(mm: GGUFHeader, lm, lm_cfg: dict[str, Any], tokenizer, lm_header: GGUFHeader, *, dtype=None):
    """A `MiniCPMV` whose language model is the (possibly quantised) GGUF one."""
    from framecast.model.processor import MiniCPMVProcessor
    from framecast.model.vlm import MiniCPMV, VLMArgs

    cfg = mmproj_config(mm, lm_cfg, lm_header.path)
    scale_emb = lm_cfg.get("scale_emb") if lm_cfg["model_type"] == "minicpm" else None
    weights = cast_floats(mmproj_weights(mm, cfg, scale_emb=scale_emb), default_dtype(dtype, lm_header))
    args = VLMArgs.from_config(cfg, origin=mm.path)
    pre = {"norm_mean": cfg.get("norm_mean", [0.5] * 3), "norm_std": cfg.get("norm_std", [0.5] * 3)}
    model = MiniCPMV(args, processor=MiniCPMVProcessor.from_configs(args.version, cfg, pre), tokenizer=tokenizer)
    # The float LM MiniCPMV built is never evaluated (MLX is lazy): swap in the GGUF one.
    model.language_model = lm
    ours = {k: v for k, v in model.sanitize(weights).items()}
    for prefix, module in (("vpm.", model.vpm), ("resampler.", model.resampler)):
        part = {k[len(prefix):]: v for k, v in ours.items() if k.startswith(prefix)}
        try:
            module.load_weights(list(part.items()), strict=True)
        except ValueError as e:
            raise ModelLoadError(f"{mm.path}: {prefix.rstrip('.')} tensors do not fit: "
                                 f"{str(e).splitlines()[0]}") from None
    mx.eval(model.vpm.parameters(), model.resampler.parameters())
    return model
