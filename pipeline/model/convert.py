"""`framecast convert SRC OUT [--bits 4|8] [--dtype D]`: write a fast-loading MLX directory.

SRC is anything `load_model` reads (HF directory, converted directory, repo id, GGUF pair). OUT
gets `config.json` (the source config plus `framecast_format` and, when quantised,
`quantization: {group_size, bits}`), one `model.safetensors` under our parameter names (no
sanitising needed at load), and the tokenizer / preprocessor files.

Quantisation: `mx.quantize` affine, group 64, on every Linear whose input width is a multiple
of 64 (the vision MLP's fc2 with 4304 inputs and the 588-wide patch embedding stay float).
Embedding tables stay float; layers a GGUF source already holds quantised are kept as they are.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from framecast.errors import UserError
from framecast.model.load import MLX_FORMAT_KEY, MLX_FORMAT_VERSION, TextOnlyModel, load_model, use_cpu_prefill_path

GROUP_SIZE = 64
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "preprocessor_config.json", "added_tokens.json")


def quantize_linears(model: nn.Module, bits: int, *, group_size: int = GROUP_SIZE) -> int:
    """Quantise float Linear layers with input width divisible by the group; returns the count."""
    chosen = []

    def pick(path: str, module: nn.Module) -> bool:
        ok = type(module) is nn.Linear and module.weight.shape[-1] % group_size == 0
        if ok:
            chosen.append(path)
        return ok

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=pick)
    use_cpu_prefill_path(model)
    return len(chosen)


def _config_of(model) -> dict:
    if isinstance(model, TextOnlyModel) or not hasattr(model, "args"):
        return dict(getattr(model, "config", {}))  # a text-only model (GGUF / converted LM)
    return dict(model.args.config)


def _write_tokenizer(model, src: Path | None, out: Path) -> None:
    copied = False
    if src is not None and src.is_dir():
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, out / name)
                copied = copied or name == "tokenizer.json"
    if copied:
        return
    tok = model.tokenizer  # a GGUF source: the vocabulary lives in its metadata
    backend = getattr(tok, "backend", tok)
    backend.save(str(out / "tokenizer.json"))
    config = dict(getattr(tok, "config", {}) or {})
    if getattr(tok, "eos_ids", None):
        config.setdefault("eos_token_ids", sorted(tok.eos_ids))
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, default=str))


def _write_preprocessor(model, out: Path) -> None:
    proc = getattr(model, "processor", None)
    if proc is None or (out / "preprocessor_config.json").is_file():
        return
    if not hasattr(proc, "scale_resolution"):  # a text-only GGUF: its "processor" is the chat template
        return
    (out / "preprocessor_config.json").write_text(json.dumps({
        "scale_resolution": proc.scale_resolution, "max_slice_nums": proc.max_slice_nums,
        "patch_size": proc.patch_size, "use_image_id": proc.use_image_id, "slice_mode": proc.slice_mode,
        "image_feature_size": proc.query_num, "norm_mean": list(proc.mean), "norm_std": list(proc.std),
    }, indent=2))


def convert_model(src: str, out: str, *, mmproj: str | None = None, bits: int | None = None,
                  dtype: str | None = None) -> tuple[Path, float, int]:
    """Write `src` as a converted MLX directory `out`; returns (out_dir, size in MB, quantised layer count).

    Raises UserError for bad bits or a non-empty output directory, ModelLoadError for a bad source.
    """
    if bits not in (None, 4, 8):
        raise UserError(f"--bits {bits}: choose 4 or 8")
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: output exists and is not a directory (give a new or empty directory)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir}: output directory exists and is not empty")
    model = load_model(src, mmproj=mmproj, dtype=dtype)
    module = model.language_model if isinstance(model, TextOnlyModel) or not isinstance(model, nn.Module) else model
    n_quant = quantize_linears(module, bits) if bits else 0
    weights = dict(tree_flatten(module.parameters()))
    mx.eval(weights)

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out_dir}: cannot create the output directory: {e.strerror or e}") from None
    config = _config_of(model)
    config[MLX_FORMAT_KEY] = MLX_FORMAT_VERSION
    config.pop("quantization", None)
    if bits:
        config["quantization"] = {"group_size": GROUP_SIZE, "bits": bits}
    if dtype:
        config["torch_dtype"] = dtype
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, default=str))
    src_path = Path(src)
    _write_tokenizer(model, src_path if src_path.is_dir() else None, out_dir)
    _write_preprocessor(model, out_dir)
    size_mb = (out_dir / "model.safetensors").stat().st_size / 1e6
    return out_dir, size_mb, n_quant
