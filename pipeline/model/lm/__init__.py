"""Language-model families, one module each: `model_type` -> module with `ModelArgs`, `Model`."""

from __future__ import annotations

import importlib
from types import ModuleType

from framecast.errors import ModelLoadError

# HF `model_type` (or GGUF `general.architecture`) -> module under pipeline.model.lm
LM_MODULES = {
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "llama": "llama",
    "minicpm": "minicpm",
}


def get_lm_module(model_type: str) -> ModuleType:
    name = LM_MODULES.get(model_type)
    if name is None:
        known = ", ".join(sorted(LM_MODULES))
        raise ModelLoadError(f"unsupported language model_type {model_type!r} (known: {known})")
    return importlib.import_module(f"{__name__}.{name}")


def get_lm_class(model_type: str) -> tuple[type, type]:
    """(Model, ModelArgs) for a model_type; ModelLoadError for an unknown one."""
    module = get_lm_module(model_type)
    return module.Model, module.ModelArgs


def build_lm(config: dict):
    """Instantiate the LM described by an HF config dict (uses its `model_type`)."""
    model_cls, args_cls = get_lm_class(config.get("model_type", ""))
    return model_cls(args_cls.from_dict(config))
