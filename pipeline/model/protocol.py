"""What the engine and the stages need from a model: two `typing.Protocol`s.

`TextModel` is enough for `framecast generate` (a language model alone: `TextOnlyModel`, a
`GGUFLanguageModel`); `VisionLanguageModel` is what watching video needs (`MiniCPMV`, whatever
its version or file format). Code outside `framecast.model` asks these questions instead of
checking `model.args.version`: a version's peculiarities (3D resampler groups, think block, stop
tokens) are answered by the model and its processor.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import mlx.core as mx
import numpy as np


@runtime_checkable
class TextModel(Protocol):
    """A causal LM with its tokenizer."""

    language_model: Any  # `framecast.model.lm.Model`: `(ids [B, T] | None, cache, input_embeddings) -> logits`
    tokenizer: Any  # `framecast.model.tokenizer.Tokenizer` (encode, eos_ids, token_id, detokenizer)

    def make_cache(self) -> list:
        """A fresh KV cache, one entry per layer."""

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """[{role, content}] rendered with the model's chat template, generation prompt opened."""


@runtime_checkable
class VisionLanguageModel(TextModel, Protocol):
    """A `TextModel` that also sees images (MiniCPM-V): encode, then embed into a prompt."""

    processor: Any  # `framecast.model.processor.MiniCPMVProcessor` (slicing, placeholders, templates)

    @property
    def tokens_per_view(self) -> int:
        """Image tokens one view (the overview or one slice) adds to the prompt (query_num)."""

    @property
    def default_group_frames(self) -> int:
        """Frames a stream packs into one encoder group by default (1: no temporal groups)."""

    @property
    def session_defaults(self) -> dict[str, Any]:
        """Session settings the checkpoint recommends (`framecast_session` in config.json)."""

    def encode_images(self, images: list[np.ndarray], *, max_slice_nums: int | None = None) -> list:
        """RGB uint8 [H, W, 3] images -> one `ImageFeatures` each (features [n_views, Q, D])."""

    def encode_frame_group(self, images: list[np.ndarray], temporal_ids: list[int], *,
                           max_slice_nums: int = 1) -> Any:
        """Frames of one temporal group -> one `ImageFeatures` (UserError where unsupported)."""

    def image_placeholder(self, feat: Any) -> str:
        """The prompt text whose placeholder tokens `embed` fills with `feat`'s features."""

    def embed(self, ids: mx.array, images: list | tuple = ()) -> mx.array:
        """ids [1, T] -> input embeddings [1, T, D] with the images' features scattered in."""
