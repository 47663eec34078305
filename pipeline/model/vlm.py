"""MiniCPM-V assembled: vision tower + resampler + language model, one class for every version.

    image (RGB uint8) -> processor (overview + slices) -> SigLIP NaViT (batched, key-masked)
      -> resampler (query_num tokens per view) -> scattered into the `<unk>` placeholders
      between `<image>`/`<slice>` tags of the prompt -> language model on a KV cache.

Versions (dispatch on config.json `model_type` + `version`):
  2.6   minicpmv 2.6, Qwen2 LM       o-2.6  minicpmo (vision + text only; audio/TTS skipped)
  4.0   minicpmv 4.0, Llama LM       4.5    minicpmv 4.5, Qwen3 LM, 3D resampler (video groups)
Vision features are never multiplied by a muP `scale_emb` (only text embeddings are).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from framecast.errors import ModelLoadError, UserError
from framecast.model.lm import get_lm_class
from framecast.model.processor import IM_END, IM_START, SLICE_END, SLICE_START, MiniCPMVProcessor, preprocess_many
from framecast.model.resampler import Resampler
from framecast.model.vision import SiglipVisionTower, VisionArgs

log = logging.getLogger("framecast.model")

VISION_BATCH = 16  # views per vision-tower call (bounds activation memory for big images)
GROUP_FRAMES_3D = 3  # frames per 3D-resampler group a stream packs by default (4.5's video default)
MAX_GROUP_FRAMES_3D = 6  # the most frames one 3D-resampler group takes

# version -> (LM family, 3D resampler)
VERSION_LAYOUT = {"2.6": ("qwen2", False), "o-2.6": ("qwen2", False),
                  "4.0": ("llama", False), "4.5": ("qwen3", True)}
SKIPPED_PREFIXES = ("apm.", "tts.", "audio_projection_layer.", "audio_avg_pooler.", "audio_encoder.")


def resolve_version(config: dict, *, origin: str = "config.json") -> str:
    """'2.6' | 'o-2.6' | '4.0' | '4.5' from config.json, or one ModelLoadError line."""
    model_type = config.get("model_type")
    raw = config.get("version")
    try:
        version = None if raw is None else round(float(raw), 1)
    except (TypeError, ValueError):
        raise ModelLoadError(f"{origin}: version = {raw!r} is not a number") from None
    if model_type == "minicpmo":
        if version in (None, 2.6):
            return "o-2.6"
        raise ModelLoadError(f"{origin}: unsupported MiniCPM-o version {raw!r} (supported: 2.6)")
    if model_type != "minicpmv":
        raise ModelLoadError(f"{origin}: model_type = {model_type!r} is not a MiniCPM-V checkpoint "
                             "(expected 'minicpmv' or 'minicpmo')")
    if version in (2.6, 4.0, 4.5):
        return f"{version:.1f}"
    raise ModelLoadError(f"{origin}: unsupported MiniCPM-V version {raw!r} "
                         "(supported: 2.6, 4.0, 4.5 and MiniCPM-o 2.6)")


@dataclass
class VLMArgs:
    version: str
    model_type: str
    lm_type: str
    hidden_size: int
    query_num: int
    vision: VisionArgs
    drop_vision_last_layer: bool = False
    resampler_3d: bool = False
    config: dict = field(default_factory=dict, repr=False)  # the full config.json

    @classmethod
    def from_config(cls, config: dict, *, origin: str = "config.json") -> "VLMArgs":
        version = resolve_version(config, origin=origin)
        lm_type, is_3d = VERSION_LAYOUT[version]
        if "vision_config" not in config or "hidden_size" not in config:
            raise ModelLoadError(f"{origin}: missing key {'vision_config' if 'hidden_size' in config else 'hidden_size'!r}")
        try:
            vision = VisionArgs.from_dict(config["vision_config"])
        except ValueError as e:  # e.g. an unknown hidden_act
            raise ModelLoadError(f"{origin}: {e}") from None
        return cls(
            version=version,
            model_type=config["model_type"],
            lm_type=config.get("lm_model_type", lm_type),  # a GGUF pair may name another family
            hidden_size=int(config["hidden_size"]),
            query_num=int(config.get("query_num", 64)),
            vision=vision,
            drop_vision_last_layer=bool(config.get("drop_vision_last_layer", False)),
            resampler_3d=is_3d,
            config=config,
        )


@dataclass
class ImageFeatures:
    features: mx.array  # [n_views, query_num, D]: overview first, then slices row-major
    grid: tuple[int, int] | None  # (cols, rows) of the slices; None = one view
    temporal_ids: list[int] | None = None  # frames of a 4.5 video group (0.1 s units)

    @property
    def n_views(self) -> int:
        return int(self.features.shape[0])


class MiniCPMV(nn.Module):
    def __init__(self, args: VLMArgs, *, processor: MiniCPMVProcessor | None = None, tokenizer=None):
        super().__init__()
        self.args = args
        self.vpm = SiglipVisionTower(args.vision, drop_last_layer=args.drop_vision_last_layer)
        self.resampler = Resampler(embed_dim=args.hidden_size, kv_dim=args.vision.hidden_size,
                                   num_queries=args.query_num)
        lm_cls, lm_args_cls = get_lm_class(args.lm_type)
        self.language_model = lm_cls(lm_args_cls.from_dict({**args.config, "model_type": args.lm_type}))
        self.processor = processor or MiniCPMVProcessor.from_configs(args.version, args.config)
        self.tokenizer = tokenizer

    @classmethod
    def from_config(cls, config: dict, **kw) -> "MiniCPMV":
        return cls(VLMArgs.from_config(config), **kw)

    # ------------------------------------------------------------ what stages ask (model.protocol)

    @property
    def tokens_per_view(self) -> int:
        """Image tokens per view (overview or slice): the resampler's query count."""
        return self.args.query_num

    @property
    def default_group_frames(self) -> int:
        """Frames per encoder group by default: 3 with a 3D resampler (4.5), else 1."""
        return GROUP_FRAMES_3D if self.args.resampler_3d else 1

    @property
    def session_defaults(self) -> dict[str, Any]:
        """Session settings the checkpoint recommends (config.json `framecast_session`, e.g. the
        demo model's cache budget: it was trained on short streams); the user's settings win."""
        return dict(self.args.config.get("framecast_session") or {})

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        return self.processor.chat_prompt(messages)

    # ------------------------------------------------------------ vision

    def _encode_views(self, views: list[np.ndarray], *, temporal_ids: list[int] | None = None,
                      group_sizes: list[int] | None = None, batch: int = VISION_BATCH) -> mx.array:
        """Normalised views -> resampled features [n_views (or groups), Q, D]."""
        if group_sizes is not None:  # a group must go through the resampler in one call
            hidden, sizes = self.vpm.encode_views(views)
            return self.resampler(hidden, sizes, temporal_ids=temporal_ids, group_sizes=group_sizes)
        outs = []
        for i in range(0, len(views), batch):
            hidden, sizes = self.vpm.encode_views(views[i:i + batch])  # [b, L, Dv]
            outs.append(self.resampler(hidden, sizes))  # [b, Q, D]
        return outs[0] if len(outs) == 1 else mx.concatenate(outs)

    def encode_images(self, images: list[np.ndarray], *, max_slice_nums: int | None = None) -> list[ImageFeatures]:
        """RGB uint8 [H, W, 3] images -> one ImageFeatures each (all views batched together)."""
        if not images:
            return []
        processed = preprocess_many(self.processor, images, max_slice_nums=max_slice_nums)
        views = [v for p in processed for v in p.views]
        feats = self._encode_views(views)
        mx.eval(feats)
        out, start = [], 0
        for p in processed:
            n = len(p.views)
            out.append(ImageFeatures(feats[start:start + n], p.grid))
            start += n
        return out

    def encode_frame_group(self, images: list[np.ndarray], temporal_ids: list[int], *,
                           max_slice_nums: int = 1) -> ImageFeatures:
        """MiniCPM-V 4.5: 1-6 frames -> one ImageFeatures (query_num tokens per view index).

        temporal_ids: one per frame, in 0.1 s units (see resampler.temporal_ids_from_seconds).
        Frames must produce the same views (same size -> same grid); view k of every frame is
        merged along the key axis of one resampler call.
        """
        return self.encode_frame_groups([(images, temporal_ids)], max_slice_nums=max_slice_nums)[0]

    def encode_frame_groups(self, groups: list[tuple[list[np.ndarray], list[int]]], *,
                            max_slice_nums: int = 1) -> list[ImageFeatures]:
        """Several frame groups (e.g. one per stream) in one vision-tower and one resampler
        call: `[(images, temporal_ids), ...]` -> one ImageFeatures per group, each what
        `encode_frame_group` gives for it alone. Groups may differ in size and frame count."""
        if not self.args.resampler_3d:
            raise UserError(f"MiniCPM-V {self.args.version} has no 3D resampler (frame groups need 4.5)")
        views: list[np.ndarray] = []
        tids: list[int] = []
        sizes: list[int] = []
        layout: list[tuple[int, Any, list[int]]] = []  # (views per group, grid, temporal ids)
        for images, temporal_ids in groups:
            if not 1 <= len(images) <= MAX_GROUP_FRAMES_3D or len(temporal_ids) != len(images):
                raise UserError(f"a frame group needs 1-{MAX_GROUP_FRAMES_3D} frames with one temporal id each "
                                f"(got {len(images)} frames, {len(temporal_ids)} ids)")
        every = preprocess_many(self.processor, [img for images, _ in groups for img in images],
                                max_slice_nums=max_slice_nums)
        at = 0
        for images, temporal_ids in groups:
            processed, at = every[at:at + len(images)], at + len(images)
            grids = {p.grid for p in processed}
            shapes = {tuple(v.shape for v in p.views) for p in processed}
            if len(grids) != 1 or len(shapes) != 1:
                raise UserError("frames of one group must have the same size (their slicings differ)")
            n_frames, n_views = len(processed), len(processed[0].views)
            views += [processed[f].views[k] for k in range(n_views) for f in range(n_frames)]  # view-major
            ids = [int(t) for t in temporal_ids]
            tids += ids * n_views
            sizes += [n_frames] * n_views
            layout.append((n_views, processed[0].grid, ids))
        if not groups:
            return []
        feats = self._encode_views(views, temporal_ids=tids, group_sizes=sizes)  # [sum views, Q, D]
        mx.eval(feats)
        out, start = [], 0
        for n_views, grid, ids in layout:
            out.append(ImageFeatures(feats[start:start + n_views], grid, ids))
            start += n_views
        return out

    # ------------------------------------------------------------ prompt + language model

    def image_placeholder(self, feat: ImageFeatures, *, image_id: int | None = None) -> str:
        return self.processor.image_placeholder(feat.grid, image_id=image_id)

    def _feature_positions(self, ids: np.ndarray) -> np.ndarray:
        """Indices of the tokens strictly inside each <image>..</image> / <slice>..</slice> span."""
        tok = self.tokenizer
        opens = {tok.token_id(IM_START), tok.token_id(SLICE_START)}
        closes = {tok.token_id(IM_END), tok.token_id(SLICE_END)}
        positions, inside = [], False
        for i, t in enumerate(ids.tolist()):
            if t in opens:
                inside = True
            elif t in closes:
                inside = False
            elif inside:
                positions.append(i)
        return np.asarray(positions, np.int32)

    def embed(self, ids: mx.array, images: list[ImageFeatures] | tuple = ()) -> mx.array:
        """ids [1, T] -> [1, T, D]: text embeddings, vision features in the placeholder slots."""
        h = self.language_model.embed_tokens(ids)  # (minicpm: already times scale_emb)
        if not images:
            return h
        positions = self._feature_positions(np.asarray(ids[0]))
        feats = mx.concatenate([f.features.reshape(-1, f.features.shape[-1]) for f in images])
        if positions.size != feats.shape[0]:
            raise UserError(f"prompt has {positions.size} image placeholder tokens but the "
                            f"{len(images)} image(s) give {feats.shape[0]} features")
        h[0, mx.array(positions)] = feats.astype(h.dtype)  # unscaled: scale_emb is text-only
        return h

    def forward(self, ids: mx.array, cache: list | None = None, images: list[ImageFeatures] | tuple = ()) -> mx.array:
        """ids [1, T] -> logits [1, T, V] (positions continue from the cache)."""
        if not images:
            return self.language_model(ids, cache=cache)
        return self.language_model(None, cache=cache, input_embeddings=self.embed(ids, images))

    def __call__(self, ids: mx.array, cache: list | None = None, images=()) -> mx.array:
        return self.forward(ids, cache, images)

    def make_cache(self) -> list:
        return self.language_model.make_cache()

    # ------------------------------------------------------------ weights

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """HF names (`vpm.`, `resampler.`, `llm.`) -> this module's names; audio/TTS dropped."""
        vpm, res, llm, skipped, unknown = {}, {}, {}, [], []
        for name, value in weights.items():
            if name.endswith((".position_ids", ".inv_freq")):  # stray buffers some exports keep
                continue
            if name.startswith("vpm."):
                vpm[name[4:]] = value
            elif name.startswith("resampler."):
                if name != "resampler.pos_embed":  # a computed table, never a parameter here
                    res[name[10:]] = value
            elif name.startswith("llm."):
                llm[name[4:]] = value
            elif name.startswith(SKIPPED_PREFIXES):
                skipped.append(name)
            else:
                unknown.append(name)
        if skipped:
            prefixes = sorted({n.split(".", 1)[0] for n in skipped})
            print(f"framecast: skipping {len(skipped)} audio/TTS tensors ({', '.join(prefixes)}): "
                  "only the vision + text path runs", file=sys.stderr, flush=True)
        if unknown:
            log.warning("ignoring %d unknown tensors (first: %s)", len(unknown), unknown[0])
        if self.args.drop_vision_last_layer:
            last = f"encoder.layers.{self.args.vision.num_hidden_layers - 1}."
            vpm = {k: v for k, v in vpm.items() if not k.startswith(last)}
        out = {f"vpm.{k}": v for k, v in SiglipVisionTower.sanitize(vpm).items()}
        out.update({f"resampler.{k}": v for k, v in Resampler.sanitize(res).items()})
        out.update({f"language_model.{k}": v for k, v in self.language_model.sanitize(llm).items()})
        return out


def describe(model: MiniCPMV) -> dict[str, Any]:
    """A short summary for logs and benchmarks."""
    a = model.args
    return {"version": a.version, "lm": a.lm_type, "hidden": a.hidden_size, "query_num": a.query_num,
            "vision_layers": len(model.vpm.encoder.layers),
            "lm_layers": len(model.language_model.layers)}
