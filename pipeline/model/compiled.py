"""Compiled layer bodies for inference: fewer kernel launches per layer (issue 14).

On the CUDA backend a warm forward pass is launch-bound: a 67-token frame prefill through the
36 layers of a Qwen3-8B costs ~20 ms of non-attention work against ~3.5 ms to read the weights
once, and the SigLIP tower ~11-14 ms for one 448-px view. `mx.compile` fuses the elementwise
work (norms, residuals, activations) between the matmuls and replays the traced graph instead
of rebuilding it from Python each call.

What can be compiled, per model:
  - the vision tower's layers and final norm (`SiglipVisionTower`), one body traced once per
    batch shape (a stream's frames: one shape);
  - each decoder layer (`TransformerBlock`) as two bodies around its attention: input norm +
    q/k/v projections (+ q/k norm), then o_proj + residual + norm + MLP + residual. RoPE at the
    cache offset, the cache write and the attention stay eager: their shapes change every step.
    These are traced shapeless: one trace serves every token count and batch, so a question of
    a new length pays no trace or kernel build (the per-shape set-up this issue found in SDPA);
    they reshape only through `mx.unflatten` / `mx.flatten` and add biases with `linear` below.
The parameters are the compiled functions' tracked inputs (`mx.compile(..., inputs=module)`),
so loading other weights into the same modules is seen.

Measured on one H200 at 5 minutes of context (README, GPU fast path): the tower compiled took
the first token from 49.8 to 48.3 ms (p95 69.6 to 49.8); compiling the decoder layers as well
gave 49.5 ms and no clear decode gain. So `FRAMECAST_COMPILE=auto` (default) compiles the tower
on a GPU and nothing on the CPU (where tests run the eager code); `on` compiles the tower and
the decoder layers, `off` nothing. The demo trainer never calls this: its gradients run through
the eager layers.
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn

from framecast.errors import UserError
from framecast.kernels import backend, gpu, quantized_rows

ENV_VAR = "FRAMECAST_COMPILE"
CHOICES = {"auto": None, "on": True, "1": True, "off": False, "0": False}


def wanted() -> bool | str:
    """What inference compiles here: $FRAMECAST_COMPILE `on` (True: tower and decoder layers),
    `off` (False), `auto` (the default: "tower" on a GPU, False on the CPU).

    Raises UserError for a value other than auto / on / off / 1 / 0."""
    raw = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if raw not in CHOICES:
        raise UserError(f"{ENV_VAR}={raw!r}: expected one of auto, on, off")
    choice = CHOICES[raw]
    return ("tower" if gpu() is not None else False) if choice is None else choice


def compile_layers(model, on: bool | str | None = None) -> int:
    """Switch the compiled bodies of `model`'s vision tower and decoder layers: `on=True` both,
    False neither, "tower" the tower only, None as $FRAMECAST_COMPILE says (`wanted()`).
    Returns how many modules were switched."""
    from framecast.model.lm.base import TransformerBlock
    from framecast.model.vision import SiglipVisionTower

    choice = wanted() if on is None else on
    # a bad FRAMECAST_QMM_ROWS is one line at load time, not silence; and a shapeless trace of a
    # decoder layer would keep its first row count: padding or the kernel cannot run inside one
    if quantized_rows.wanted() and choice is True:
        raise UserError(f"{quantized_rows.ENV_VAR}={quantized_rows.mode()} cannot be used with {ENV_VAR}=on "
                        "(compiled decoder layers keep the row count of their first call); "
                        "unset one of them")
    # a MiniCPMV is a Module; a text-only wrapper (a lone LM GGUF) holds its modules as fields
    roots = [model] if isinstance(model, nn.Module) else [v for v in vars(model).values() if isinstance(v, nn.Module)]
    n = 0
    for root in roots:
        for _, module in root.named_modules():
            if isinstance(module, SiglipVisionTower):
                module.compiled = bool(choice)
            elif isinstance(module, TransformerBlock):
                module.compiled = choice is True
            else:
                continue
            n += 1
    return n


def linear(layer: nn.Module, x: mx.array) -> mx.array:
    """`layer(x)` for a body that may be compiled shapeless: a float `nn.Linear`'s bias is added
    after the matmul, since `mx.addmm` (what nn.Linear uses) keeps its traced output shape.
    x [..., in] -> [..., out]."""
    if type(layer) is nn.Linear and "bias" in layer:
        return x @ layer["weight"].T + layer["bias"]
    # opt-in: a batch of decode rows padded for MLX's op, or through our kernel (issue 15). Any
    # QuantizedLinear (the loaders' PrefillDequantLinear included), on a GPU only: the CPU keeps
    # the layer's own path.
    if isinstance(layer, nn.QuantizedLinear) and getattr(layer, "mode", "affine") == "affine" and "biases" in layer \
            and quantized_rows.wanted() and backend() != "reference":
        return quantized_rows.quantized_linear(layer, x)
    return layer(x)
