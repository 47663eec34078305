"""Language models: one decoder (`decoder.py`), families as rows of its `FAMILIES` table.

`model_type` (HF config) or `general.architecture` (GGUF) picks the row: qwen2, qwen3, llama,
minicpm. Shared pieces (RoPE variants, attention, MLP, block) live in `base.py`.
"""

from __future__ import annotations

from framecast.model.lm.decoder import FAMILIES, Model, ModelArgs, family

__all__ = ["FAMILIES", "Model", "ModelArgs", "build_lm", "get_lm_class"]


def get_lm_class(model_type: str) -> tuple[type, type]:
    """(Model, ModelArgs) for a model_type; ModelLoadError for an unknown one."""
    family(model_type)
    return Model, ModelArgs


def build_lm(config: dict) -> Model:
    """Instantiate the LM described by an HF config dict (uses its `model_type`)."""
    model_cls, args_cls = get_lm_class(config.get("model_type", ""))
    return model_cls(args_cls.from_dict(config))
