"""Load a model from what the user points at: an HF checkpoint directory, a converted MLX
directory, an HF repo id, or a llama.cpp `.gguf` (with an optional mmproj `.gguf`).

Every failure is one `ModelLoadError` line naming the file (and tensor): a missing or truncated
safetensors file, garbage bytes, a wrong `model_type`, a tensor whose shape does not fit.
Safetensors headers are checked before MLX maps the data, because `mx.load` reads lazily and a
truncated file would otherwise fail much later, far from its cause.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from framecast.errors import ModelLoadError, UserError
from framecast.model.compiled import compile_layers

log = logging.getLogger("framecast.model")

MLX_FORMAT_KEY = "framecast_format"  # present in config.json of directories written by convert
MLX_FORMAT_VERSION = 1
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt"]  # no remote code: never executed here
_SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                       "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# The embedded demo model (HF layout), shipped as package data.
DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "demo_model"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class TextOnlyModel:
    """A language model alone (converted from a language-model GGUF): enough for `generate`
    (a `framecast.model.protocol.TextModel`).

    `processor`: what renders chat prompts (a GGUF's own template); None: the ChatML of the
    language-model family's MiniCPM-V version (`processor.family_processor`).
    """

    language_model: Any
    tokenizer: Any
    config: dict[str, Any]
    processor: Any = None

    def make_cache(self) -> list:
        return self.language_model.make_cache()

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        proc = self.processor
        if proc is None:
            from framecast.model.processor import family_processor

            proc = family_processor((self.config or {}).get("model_type", "qwen2"))
        return proc.chat_prompt(messages)


# ---------------------------------------------------------------- entry point


def load_model(path_or_id: str | Path, *, mmproj: str | Path | None = None, dtype: str | None = None):
    """A `MiniCPMV` (or a text-only model for a lone language-model GGUF / converted LM), its
    layers compiled for inference where `framecast.model.compiled.wanted()` says so (a GPU)."""
    model = _load(path_or_id, mmproj=mmproj, dtype=dtype)
    compile_layers(model)
    return model


def _load(path_or_id: str | Path, *, mmproj: str | Path | None, dtype: str | None):
    text = str(path_or_id)
    if text.lower().endswith(".gguf"):
        if not Path(text).is_file():
            raise ModelLoadError(f"{text}: no such GGUF file")
        from framecast.model.gguf.model import load_gguf  # owned by the GGUF work; imported lazily

        return load_gguf(text, mmproj=mmproj, dtype=dtype)
    if mmproj is not None:
        raise UserError(f"{mmproj}: --mmproj goes with a .gguf language model, not with {text}")
    path = Path(text).expanduser()
    if not path.exists():
        if _REPO_ID.match(text):
            path = download_from_hub(text)
        else:
            raise ModelLoadError(f"{text}: no such model directory (nor an HF repo id like org/name)")
    if not path.is_dir():
        raise ModelLoadError(f"{path}: expected a model directory or a .gguf file")
    config = read_json(path / "config.json", required=True)
    if dtype is None and config.get("framecast_demo"):
        # The demo model is stored in float16 (half the package size) but computes in float32:
        # half-precision matmuls are slow on CPU and it was trained in float32.
        dtype = "float32"
    if config.get(MLX_FORMAT_KEY):
        return load_mlx_dir(path, config, dtype=dtype)
    return load_hf_dir(path, config, dtype=dtype)


def download_from_hub(repo_id: str) -> Path:
    """Snapshot of the repo's config, tokenizer and safetensors files (huggingface_hub)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelLoadError(f"{repo_id}: not a local path, and huggingface_hub is not installed to "
                             "download it (pip install 'framecast[hub]')") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated repo, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"{repo_id}: cannot download from the Hugging Face Hub ({type(e).__name__}: "
                             f"{first[:200]})") from None


# ---------------------------------------------------------------- files


def read_json(path: Path, *, required: bool = False) -> dict:
    if not path.is_file():
        if required:
            raise ModelLoadError(f"{path}: not found")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def check_safetensors(path: Path) -> list[str]:
    """Validate the header and that every tensor's bytes lie inside the file; return the names."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelLoadError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise ModelLoadError(f"{path}: not a safetensors file (header length {n} "
                                     f"does not fit a {size}-byte file)")
            header = json.loads(f.read(n))
    except ModelLoadError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not a safetensors file ({str(e).splitlines()[0]})") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: not a safetensors file (header is not a JSON object)")
    data_size = size - 8 - n
    names = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            count = 1
            for d in info["shape"]:
                count *= int(d)
            width = _SAFETENSORS_DTYPES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(f"{path}: tensor {name}: malformed header entry") from None
        if end > data_size:
            raise ModelLoadError(f"{path}: truncated: tensor {name} needs bytes {start}..{end} "
                                 f"but the data section has {data_size}")
        if end - start != count * width:
            raise ModelLoadError(f"{path}: tensor {name}: {end - start} bytes for shape {info['shape']} "
                                 f"{info['dtype']}")
        names.append(name)
    return names


def weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index}: no weight_map")
        files = []
        for fname in dict.fromkeys(weight_map.values()):
            f = directory / fname
            if not f.is_file():
                tensor = next(k for k, v in weight_map.items() if v == fname)
                raise ModelLoadError(f"{f}: missing shard (holds tensor {tensor})")
            files.append(f)
        return files
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{directory}: no safetensors weights (model.safetensors or an index)")
    return files


def read_weights(directory: Path) -> tuple[dict[str, mx.array], dict[str, Path]]:
    """All tensors of the directory's safetensors files, and the file each came from."""
    weights: dict[str, mx.array] = {}
    origin: dict[str, Path] = {}
    for f in weight_files(directory):
        names = check_safetensors(f)
        try:
            loaded = mx.load(str(f))
        except Exception as e:
            raise ModelLoadError(f"{f}: cannot read safetensors ({str(e).splitlines()[0]})") from None
        for name in names:
            if name not in loaded:
                raise ModelLoadError(f"{f}: tensor {name} listed in the header but unreadable")
        weights.update(loaded)
        origin.update({k: f for k in loaded})
    return weights, origin


# ---------------------------------------------------------------- building


def _hf_name(name: str) -> str:
    """Our parameter name -> the HF checkpoint name it came from (for error messages)."""
    name = re.sub(r"^language_model\.", "llm.", name)
    return re.sub(r"^resampler\.attn\.[qkv]_proj\.(weight|bias)$", r"resampler.attn.in_proj_\1", name)


def _cast(weights: dict[str, mx.array], dtype: str | None) -> dict[str, mx.array]:
    if dtype is None:
        return weights
    target = getattr(mx, dtype)
    return {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}


def quantize_from_weights(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """Quantise exactly the layers stored quantised, with bits/group size read off their shapes
    (a converted directory may mix them: our `--bits` layers and GGUF-native Q4_0/Q8_0)."""
    params = {}
    for path, module in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        scales = weights.get(f"{path}.scales")
        if scales is None or not hasattr(module, "to_quantized"):
            continue
        in_dim = module.weight.shape[-1]
        packed = weights[f"{path}.weight"]
        params[path] = {"group_size": in_dim // scales.shape[-1], "bits": packed.shape[-1] * 32 // in_dim}
    if params:
        nn.quantize(model, class_predicate=lambda p, _m: dict(params[p]) if p in params else False)
        use_cpu_prefill_path(model)


def use_cpu_prefill_path(model: nn.Module) -> None:
    """Quantised Linears run many-row inputs (prefill, vision patches) as dequantise + GEMM on
    the CPU, where MLX's quantized_matmul is a slow loop; one-row decode keeps the quantised
    kernel. Same parameters and results (the GGUF loader's `PrefillDequantLinear`)."""
    from framecast.model.gguf.model import PrefillDequantLinear

    for _path, module in model.named_modules():
        if type(module) is nn.QuantizedLinear:
            module.__class__ = PrefillDequantLinear


def fill_weights(model: nn.Module, weights: dict[str, mx.array], origin: dict[str, Path], where: Path) -> None:
    """Strict load with one-line errors: missing tensor, unexpected tensor, shape mismatch."""
    expected = dict(tree_flatten(model.parameters()))
    for name, value in weights.items():
        src = origin.get(_hf_name(name), origin.get(name, where))
        if name not in expected:
            raise ModelLoadError(f"{src}: unexpected tensor {_hf_name(name)} {tuple(value.shape)}")
        if tuple(value.shape) != tuple(expected[name].shape):
            raise ModelLoadError(f"{src}: tensor {_hf_name(name)} has shape {tuple(value.shape)}, "
                                 f"the config needs {tuple(expected[name].shape)}")
    for name in expected:
        if name not in weights:
            raise ModelLoadError(f"{where}: missing tensor {_hf_name(name)}")
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())


def _attach_text_side(model, directory: Path, version: str, config: dict) -> None:
    from framecast.model.processor import MiniCPMVProcessor
    from framecast.model.tokenizer import Tokenizer

    model.tokenizer = Tokenizer.from_dir(directory)
    pre = read_json(directory / "preprocessor_config.json")
    tok_cfg = read_json(directory / "tokenizer_config.json")
    model.processor = MiniCPMVProcessor.from_configs(version, config, pre, tok_cfg)


def _build(config: dict, directory: Path):
    from framecast.model.vlm import MiniCPMV, VLMArgs

    args = VLMArgs.from_config(config, origin=str(directory / "config.json"))
    try:
        return MiniCPMV(args)
    except ModelLoadError as e:
        raise ModelLoadError(f"{directory / 'config.json'}: {e}") from None
    except (TypeError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{directory / 'config.json'}: cannot build the model ({e})") from None


def load_hf_dir(directory: Path, config: dict, *, dtype: str | None = None):
    """An HF MiniCPM-V / MiniCPM-o checkpoint directory."""
    model = _build(config, directory)
    raw, origin = read_weights(directory)
    weights = _cast(model.sanitize(raw), dtype)
    where = directory / ("model.safetensors.index.json" if (directory / "model.safetensors.index.json").is_file()
                         else "model.safetensors")
    fill_weights(model, weights, origin, where)
    _attach_text_side(model, directory, model.args.version, config)
    return model


def load_mlx_dir(directory: Path, config: dict, *, dtype: str | None = None):
    """A directory written by `framecast convert` (names already ours, maybe quantised)."""
    weights, origin = read_weights(directory)
    weights = _cast(weights, dtype)
    where = directory / "model.safetensors"
    if config.get("model_type") in ("minicpmv", "minicpmo"):
        model = _build(config, directory)
        quantize_from_weights(model, weights)
        fill_weights(model, weights, origin, where)
        _attach_text_side(model, directory, model.args.version, config)
        return model
    from framecast.model.lm import build_lm
    from framecast.model.tokenizer import Tokenizer

    lm = build_lm(config)  # a converted language model alone (from a text-only GGUF)
    quantize_from_weights(lm, weights)
    fill_weights(lm, weights, origin, where)
    return TextOnlyModel(lm, Tokenizer.from_dir(directory), config)
