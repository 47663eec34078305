"""llama.cpp GGUF interop: language-model GGUFs (+ an optional mmproj GGUF) as framecast models.

Language-model archs: `qwen2` (MiniCPM-V 2.6, MiniCPM-o 2.6), `qwen3` (4.5), `llama` and
`minicpm` (4.0). Hyper-parameters come from the `<arch>.*` metadata and become an HF-style
config dict, tensors are renamed onto our HF-named modules, and the model is built by the same
`framecast.model.lm` family code that loads HF checkpoints. Quantised tensors stay quantised
(`nn.QuantizedLinear` / `nn.QuantizedEmbedding`, per-tensor bits; see `gguf_file.py`).

RoPE layout: llama.cpp's converter permutes the q/k projection rows of `llama`/`minicpm`
files so that its "normal" (interleaved, GPT-J style) RoPE computes what HF's rotate-half RoPE
computed. We undo that permutation at load time instead of switching to interleaved RoPE:
  - the permutation is a pure row gather, and rows are quantised independently (groups run
    along the input dim), so it commutes with Q4/Q8 blocks and costs nothing at run time;
  - the model then uses the exact HF weights, so one RoPE implementation serves every source,
    a GGUF converts to an HF-equivalent MLX directory, and the round-trip tests can compare a
    GGUF against the HF checkpoint it came from tensor for tensor.
`qwen2`/`qwen3` files are not permuted (llama.cpp runs them with NEOX = rotate-half RoPE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from framecast.errors import ModelLoadError
from framecast.model.gguf.file import GROUP_SIZE, GGUFHeader, cast_floats, default_dtype, read_header, read_tensors
from framecast.model.load import TextOnlyModel

LM_ARCHS = ("qwen2", "qwen3", "llama", "minicpm")
PERMUTED_ARCHS = ("llama", "minicpm")  # q/k rows interleaved by convert_hf_to_gguf.py

# CPU only: inputs with at least this many rows (prompt prefill) run as dequantise + BLAS GEMM.
PREFILL_DEQUANT_MIN_ROWS = 8

# llama.cpp's built-in MiniCPM constants, used when an old `minicpm` file lacks the keys.
MINICPM_DEFAULTS = {"scale_emb": 12.0, "scale_depth": 1.4, "dim_model_base": 256}

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Tensors read into the RoPE set-up rather than loaded as parameters.
_ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


# -- hyper-parameters ---------------------------------------------------------------------------


def lm_config_from_gguf(header: GGUFHeader) -> dict[str, Any]:
    """HF-style config dict (`model_type` = arch) from a language-model GGUF's metadata."""
    arch = header.arch
    if arch == "clip":
        raise ModelLoadError(f"{header.path}: this is an mmproj (vision) GGUF; pass it with --mmproj "
                             "next to a language-model GGUF")
    if arch not in LM_ARCHS:
        raise ModelLoadError(f"{header.path}: general.architecture {arch!r} is not supported "
                             f"(supported: {', '.join(LM_ARCHS)})")

    def key(name: str, default: Any = None) -> Any:
        return header.get(f"{arch}.{name}", default)

    def need(name: str) -> Any:
        return header.require(f"{arch}.{name}")

    emb = header.tensors.get("token_embd.weight")
    if emb is None:
        raise ModelLoadError(f"{header.path}: tensor token_embd.weight is missing")
    hidden, n_heads = int(need("embedding_length")), int(need("attention.head_count"))
    n_kv = key("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):  # per-layer lists exist for some archs; ours use one value
        if len(set(n_kv)) != 1:
            raise ModelLoadError(f"{header.path}: {arch}.attention.head_count_kv varies per layer")
        n_kv = n_kv[0]
    cfg: dict[str, Any] = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": int(need("block_count")),
        "intermediate_size": int(need("feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length", 4096)),
        "vocab_size": int(emb.shape[0]),
        "tie_word_embeddings": "output.weight" not in header.tensors,
        "head_dim": int(key("attention.key_length", hidden // n_heads)),
    }
    rope_dims = key("rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != cfg["head_dim"]:
        raise ModelLoadError(f"{header.path}: {arch}.rope.dimension_count {rope_dims} != head_dim "
                             f"{cfg['head_dim']} (partial RoPE is not supported)")
    scaling = key("rope.scaling.type")
    if scaling == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
    elif scaling not in (None, "none"):
        raise ModelLoadError(f"{header.path}: {arch}.rope.scaling.type {scaling!r} is not supported")
    if arch in ("llama", "minicpm"):
        cfg["attention_bias"] = "blk.0.attn_q.bias" in header.tensors
    if arch == "minicpm":
        layers = cfg["num_hidden_layers"]
        cfg["scale_emb"] = float(key("embedding_scale", MINICPM_DEFAULTS["scale_emb"]))
        residual = key("residual_scale")
        cfg["scale_depth"] = (float(residual) * math.sqrt(layers) if residual is not None
                              else MINICPM_DEFAULTS["scale_depth"])
        logit = key("logit_scale")
        cfg["dim_model_base"] = (hidden / float(logit) if logit is not None
                                 else MINICPM_DEFAULTS["dim_model_base"])
    return cfg


# -- tensors -----------------------------------------------------------------------------------


def _hf_name(gguf_name: str, path: str) -> str:
    """`blk.3.attn_q.scales` -> `model.layers.3.self_attn.q_proj.scales`."""
    stem, _, part = gguf_name.rpartition(".")
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{part}"
    bits = stem.split(".")
    if len(bits) == 3 and bits[0] == "blk" and bits[2] in _LAYER_NAMES:
        return f"model.layers.{bits[1]}.{_LAYER_NAMES[bits[2]]}.{part}"
    raise ModelLoadError(f"{path}: unexpected tensor {gguf_name!r} in a language-model GGUF")


def unpermute_rows(x: mx.array, n_heads: int) -> mx.array:
    """Undo convert_hf_to_gguf's q/k permutation along rows (axis 0).

    Per head, HF stores rotate-half pairs as rows (i, i + d/2); the converter reorders them to
    (2i, 2i+1). Rows [n_heads * d, ...] -> same shape, HF order.
    """
    rows = x.shape[0]
    half = rows // n_heads // 2
    rest = x.shape[1:]
    return x.reshape(n_heads, half, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def lm_weights_from_gguf(header: GGUFHeader, tensors: dict[str, mx.array], cfg: dict[str, Any]
                         ) -> tuple[dict[str, mx.array], dict[str, mx.array]]:
    """(HF-named weights, RoPE tensors) from a GGUF's tensors (quantised parts included)."""
    permute = cfg["model_type"] in PERMUTED_ARCHS
    heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
    weights, rope = {}, {}
    for name, value in tensors.items():
        if name in _ROPE_TENSORS:
            rope[name] = value
            continue
        if permute:
            layer_part = name.split(".")[2] if name.startswith("blk.") else ""
            if layer_part in heads:
                value = unpermute_rows(value, heads[layer_part])
        weights[_hf_name(name, header.path)] = value
    return weights, rope


def rope_scaling_from_tensors(header: GGUFHeader, cfg: dict[str, Any], rope: dict[str, mx.array]) -> None:
    """llama.cpp stores RoPE frequency factors as tensors; we put them back into the config.

    Both kinds become an HF `longrope` rope_scaling (periods multiplied by per-frequency
    factors), which the LM families build natively, and which survives `framecast convert`:
      - `rope_factors_long/short.weight` (MiniCPM4's LongRoPE): as stored, with the original
        context from `<arch>.rope.scaling.original_context_length` (default: the context);
      - `rope_freqs.weight` (Llama 3's frequency smoothing): one factor list used at every
        length (original context = context, so no long/short switch and no attention scale).
    """
    if not rope:
        return
    half = cfg["head_dim"] // 2
    for name, value in rope.items():
        if value.shape != (half,):
            raise ModelLoadError(f"{header.path}: tensor {name} has shape {tuple(value.shape)}, expected ({half},)")
    context = cfg["max_position_embeddings"]
    if "rope_freqs.weight" in rope:
        factors = rope["rope_freqs.weight"].astype(mx.float32).tolist()
        long, short, original = factors, factors, context
    else:
        short_t = rope.get("rope_factors_short.weight", rope.get("rope_factors_long.weight"))
        long_t = rope.get("rope_factors_long.weight", short_t)
        long, short = long_t.astype(mx.float32).tolist(), short_t.astype(mx.float32).tolist()
        original = int(header.get(f"{cfg['model_type']}.rope.scaling.original_context_length", context))
    cfg["rope_scaling"] = {"rope_type": "longrope", "long_factor": long, "short_factor": short,
                           "original_max_position_embeddings": original}


class PrefillDequantLinear(nn.QuantizedLinear):
    """`nn.QuantizedLinear` that runs multi-token inputs on the CPU as dequantise + GEMM.

    Why: MLX's CPU `quantized_matmul` is a plain loop, fine for one decode row but ~10x slower
    than dequantising the weight and calling the (OpenBLAS) GEMM once a prompt chunk has 8+
    rows (measured on this 2-core box: 37 rows x 576->1536 Q4: 48 ms vs 4 ms). Decode (one row)
    keeps the quantised kernel, which reads 8x less memory. Same parameters, same results.
    """

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1]
        if rows < PREFILL_DEQUANT_MIN_ROWS or mx.default_device() != mx.cpu or self.mode != "affine":
            return super().__call__(x)
        w = mx.dequantize(self.weight, self.scales, self.biases, group_size=self.group_size, bits=self.bits)
        y = x @ w.astype(x.dtype).T  # [..., in] @ [in, out]
        return y + self["bias"] if "bias" in self else y


def quantize_like(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """Turn every Linear/Embedding that has `<path>.scales` into its quantised twin (per-tensor bits)."""
    params: dict[str, dict] = {}
    for key, scales in weights.items():
        if key.endswith(".scales"):
            path = key.removesuffix(".scales")
            packed = weights[f"{path}.weight"]
            in_features = scales.shape[-1] * GROUP_SIZE
            params[path] = {"group_size": GROUP_SIZE, "bits": packed.shape[-1] * 32 // in_features,
                            "mode": "affine"}
    if params:
        nn.quantize(model, class_predicate=lambda path, _m: dict(params[path]) if path in params else False)
        for _path, module in model.named_modules():
            if type(module) is nn.QuantizedLinear:
                module.__class__ = PrefillDequantLinear  # same fields; only the CPU prefill path differs


def build_lm_from_gguf(header: GGUFHeader, *, dtype=None):
    """(language model with weights, HF-style config) from a language-model GGUF."""
    from framecast.model.lm import build_lm

    cfg = lm_config_from_gguf(header)
    weights, rope = lm_weights_from_gguf(header, read_tensors(header), cfg)
    rope_scaling_from_tensors(header, cfg, rope)
    weights = cast_floats(weights, default_dtype(dtype, header))
    model = build_lm(cfg)
    quantize_like(model, weights)
    weights = model.sanitize(weights)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise ModelLoadError(f"{header.path}: tensors do not fit the {cfg['model_type']} model: "
                             f"{str(e).splitlines()[0]}") from None
    mx.eval(model.parameters())
    return model, cfg


class GGUFChatTemplate:
    """Renders the GGUF's own `tokenizer.chat_template` (Jinja, as llama.cpp and HF do).

    Only `chat_prompt` is offered: what `framecast generate` asks a text-only model's processor.
    The template runs in Jinja's sandbox (it comes from a downloaded file).
    """

    def __init__(self, template: str, *, bos_token: str | None = None, eos_token: str | None = None):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = self._raise
        self.template = env.from_string(template)
        self.special = {"bos_token": bos_token or "", "eos_token": eos_token or ""}

    @staticmethod
    def _raise(message: str):
        raise ModelLoadError(f"chat template: {message}")

    def chat_prompt(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True,
                    system: str | None = None) -> str:
        msgs = list(messages)
        if system is not None:
            msgs = [{"role": "system", "content": system}] + [m for m in msgs if m["role"] != "system"]
        return self.template.render(messages=msgs, add_generation_prompt=add_generation_prompt,
                                    **self.special)


def gguf_chat_template(header: GGUFHeader) -> GGUFChatTemplate | None:
    """The file's chat template, or None (no template, or Jinja is not installed)."""
    template = header.get("tokenizer.chat_template")
    if not template:
        return None
    try:
        tokens = header.get("tokenizer.ggml.tokens") or []

        def tok(key: str) -> str | None:
            idx = header.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[idx] if idx is not None and idx < len(tokens) else None

        return GGUFChatTemplate(template, bos_token=tok("bos"), eos_token=tok("eos"))
    except ImportError:  # jinja2 is optional: generate falls back to the family's ChatML
        return None
    except Exception as e:  # a template Jinja cannot parse
        raise ModelLoadError(f"{header.path}: tokenizer.chat_template does not parse: {str(e).splitlines()[0]}") from None


@dataclass
class GGUFLanguageModel(TextOnlyModel):
    """A text-only model from a language-model GGUF: what `framecast generate` needs.

    `processor` renders the GGUF's chat template (None: generate uses the family's ChatML).
    """

    path: str = ""


def load_gguf_tokenizer(header: GGUFHeader):
    """Our `Tokenizer` wrapper over the GGUF's embedded vocabulary."""
    from framecast.model.gguf.tokenizer import build_tokenizer, tokenizer_config_from_gguf
    from framecast.model.tokenizer import Tokenizer

    raw = build_tokenizer(header.metadata, source=header.path)
    return Tokenizer(raw, tokenizer_config_from_gguf(header.metadata))


def load_gguf(path: str | Path, mmproj: str | Path | None = None, dtype=None):
    """Load a language-model GGUF, plus its mmproj GGUF if given, as a framecast model.

    Without `mmproj`: a `GGUFLanguageModel` (text only). With it: a `MiniCPMV`.
    """
    header = read_header(path)
    lm, cfg = build_lm_from_gguf(header, dtype=dtype)
    tokenizer = load_gguf_tokenizer(header)
    if mmproj is None:
        return GGUFLanguageModel(lm, tokenizer, cfg, processor=gguf_chat_template(header), path=str(path))
    from framecast.model.gguf.mmproj import load_mmproj_model

    return load_mmproj_model(read_header(mmproj), lm, cfg, tokenizer, header, dtype=dtype)
