"""MiniCPM-V image processing and prompt layout: LLaVA-UHD slicing, resize, normalise, chat templates.

Ground truth is the checkpoints' `image_processing_minicpmv.py`: the same grid choice, the same
resize targets (Python `round`, i.e. half to even), PIL BICUBIC resampling (we use PIL itself:
its bicubic filter antialiases when shrinking, which no OpenCV mode reproduces exactly), and
`(x / 255 - 0.5) / 0.5` in float32.

One image becomes an overview view plus (when sliced) `cols x rows` slice views in row-major
order; each view is a float32 [H, W, 3] array with H and W multiples of the patch size.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import threading
from dataclasses import dataclass, field

import numpy as np

from framecast.errors import UserError

DEFAULT_SCALE_RESOLUTION = 448
DEFAULT_MAX_SLICE_NUMS = 9
DEFAULT_PATCH_SIZE = 14
DEFAULT_SYSTEM_CHATML = "You are a helpful assistant."  # what the 2.6 / o-2.6 chat template inserts

# Prompt tokens (same strings in every supported version).
IM_START, IM_END = "<image>", "</image>"
SLICE_START, SLICE_END = "<slice>", "</slice>"
IM_ID_START, IM_ID_END = "<image_id>", "</image_id>"
UNK = "<unk>"


# ---------------------------------------------------------------- slicing geometry


def ensure_divide(length: float, patch_size: int) -> int:
    """Nearest multiple of `patch_size` (Python round: half to even), at least one patch."""
    return max(round(length / patch_size) * patch_size, patch_size)


def find_best_resize(size: tuple[float, float], scale_resolution: int, patch_size: int, *,
                     allow_upscale: bool = False) -> tuple[int, int]:
    """(width, height) keeping the aspect ratio with area ~scale_resolution^2, patch multiples."""
    width, height = size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        r = width / height
        height = int(scale_resolution / math.sqrt(r))
        width = int(height * r)
    return ensure_divide(width, patch_size), ensure_divide(height, patch_size)


def get_refine_size(size: tuple[int, int], grid: tuple[int, int], scale_resolution: int,
                    patch_size: int, *, allow_upscale: bool = False) -> tuple[int, int]:
    """Size of the image that is cut into the grid: per-cell best size times cols/rows."""
    width, height = size
    cols, rows = grid
    cell = (ensure_divide(width, cols) / cols, ensure_divide(height, rows) / rows)
    best_w, best_h = find_best_resize(cell, scale_resolution, patch_size, allow_upscale=allow_upscale)
    return best_w * cols, best_h * rows


def get_sliced_grid(size: tuple[int, int], max_slice_nums: int, scale_resolution: int) -> tuple[int, int] | None:
    """(cols, rows) for an image of (width, height), or None when it is not sliced."""
    width, height = size
    log_ratio = math.log(width / height)
    ratio = width * height / (scale_resolution * scale_resolution)
    multiple = min(math.ceil(ratio), max_slice_nums)
    if multiple <= 1:
        return None
    candidates = []
    for n in (multiple - 1, multiple, multiple + 1):
        if n == 1 or n > max_slice_nums:
            continue
        candidates += [(m, n // m) for m in range(1, n + 1) if n % m == 0]
    best, best_err = (1, 1), float("inf")
    for cols, rows in candidates:  # strict `<`: the first candidate wins ties, as in HF
        err = abs(log_ratio - math.log(cols / rows))
        if err < best_err:
            best, best_err = (cols, rows), err
    return best


# ---------------------------------------------------------------- processor


@dataclass
class ProcessedImage:
    views: list[np.ndarray]  # float32 [H, W, 3] each; overview first, then slices row-major
    grid: tuple[int, int] | None  # (cols, rows) of the slices, None when not sliced
    patch_size: int = DEFAULT_PATCH_SIZE

    @property
    def tgt_sizes(self) -> list[tuple[int, int]]:
        """(patch rows, patch cols) per view."""
        return [(v.shape[0] // self.patch_size, v.shape[1] // self.patch_size) for v in self.views]


@dataclass
class MiniCPMVProcessor:
    version: str = "2.6"
    query_num: int = 64
    scale_resolution: int = DEFAULT_SCALE_RESOLUTION
    max_slice_nums: int = DEFAULT_MAX_SLICE_NUMS
    patch_size: int = DEFAULT_PATCH_SIZE
    slice_mode: bool = True
    use_image_id: bool = True
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    chat_template: str | None = None  # the checkpoint's Jinja template (tokenizer_config.json)
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token / eos_token for it

    @classmethod
    def from_configs(cls, version: str, config: dict, preprocessor: dict | None = None,
                     tokenizer_config: dict | None = None) -> "MiniCPMVProcessor":
        """From config.json (and preprocessor_config.json / tokenizer_config.json when present)."""
        pre = preprocessor or {}
        tok_cfg = tokenizer_config or {}
        template = tok_cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in tok_cfg.items()
                   if k in ("bos_token", "eos_token") and v}
        slice_cfg = config.get("slice_config") or {}
        return cls(
            version=version,
            query_num=int(pre.get("image_feature_size", config.get("query_num", 64))),
            scale_resolution=int(pre.get("scale_resolution", slice_cfg.get("scale_resolution",
                                                                               config.get("image_size", 448)))),
            max_slice_nums=int(pre.get("max_slice_nums", slice_cfg.get("max_slice_nums", 9))),
            patch_size=int(pre.get("patch_size", config.get("patch_size", 14))),
            slice_mode=bool(pre.get("slice_mode", config.get("slice_mode", True))),
            use_image_id=bool(pre.get("use_image_id", config.get("use_image_id", True))),
            mean=tuple(pre.get("norm_mean", (0.5, 0.5, 0.5))),
            std=tuple(pre.get("norm_std", (0.5, 0.5, 0.5))),
            chat_template=template if isinstance(template, str) else None,
            special_tokens=special,
        )

    # ------------------------------------------------------------ images

    def grid_for(self, width: int, height: int, max_slice_nums: int | None = None) -> tuple[int, int] | None:
        n = self.max_slice_nums if max_slice_nums is None else max_slice_nums
        if not self.slice_mode:
            return None
        return get_sliced_grid((width, height), n, self.scale_resolution)

    def slice_image(self, image, max_slice_nums: int | None = None):
        """PIL image -> (overview PIL image, [[slice PIL images] per row], grid or None)."""
        from PIL import Image

        size = image.size
        grid = self.grid_for(*size, max_slice_nums)
        bicubic = Image.Resampling.BICUBIC
        if grid is None:  # not sliced: the overview may be upscaled
            best = find_best_resize(size, self.scale_resolution, self.patch_size, allow_upscale=True)
            return image.resize(best, resample=bicubic), [], None
        best = find_best_resize(size, self.scale_resolution, self.patch_size)
        overview = image.resize(best, resample=bicubic)
        refine = get_refine_size(size, grid, self.scale_resolution, self.patch_size, allow_upscale=True)
        refined = image.resize(refine, resample=bicubic)
        cell_w, cell_h = refine[0] // grid[0], refine[1] // grid[1]
        rows = [[refined.crop((x, y, x + cell_w, y + cell_h)) for x in range(0, refine[0], cell_w)]
                for y in range(0, refine[1], cell_h)]
        return overview, rows, grid

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> float32 [H, W, 3], (x/255 - mean) / std.

        Through a 256-entry table per channel holding exactly that float32 arithmetic, looked up
        by OpenCV's `cv2.LUT` (all channels in one vectorised pass): the same bits as computing
        it per pixel, 448 px in ~0.5 ms instead of ~5 (2-core VM; a frame's CPU preprocessing is
        on the path from frame arrival to first token, issue 14)."""
        if not (pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == len(self.mean) == len(self.std)
                and pixels.shape[2] <= 4):  # cv2.LUT: 1-4 channels
            return self._arithmetic(pixels)  # anything else: the arithmetic itself
        import cv2

        return cv2.LUT(np.ascontiguousarray(pixels), self._normalize_table())  # [H, W, C] float32

    def _arithmetic(self, pixels: np.ndarray) -> np.ndarray:
        x = pixels.astype(np.float32) / np.float32(255.0)
        return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)

    def _normalize_table(self) -> np.ndarray:
        key = (tuple(self.mean), tuple(self.std))  # by value: a list changed in place is a new table
        if getattr(self, "_lut_key", None) != key:
            table = self._arithmetic(np.arange(256, dtype=np.uint8)[:, None])  # [256, C]: every value
            self._lut, self._lut_key = np.ascontiguousarray(table[None]), key  # [1, 256, C], as cv2.LUT takes
        return self._lut

    def preprocess(self, image: np.ndarray, *, max_slice_nums: int | None = None) -> ProcessedImage:
        """RGB uint8 [H, W, 3] -> normalised views (overview first, then slices row-major)."""
        from PIL import Image

        if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3):
            raise ValueError(f"expected an RGB uint8 array [H, W, 3], got {getattr(image, 'shape', type(image))}")
        if image.shape[0] < 1 or image.shape[1] < 1:
            raise ValueError(f"expected an RGB uint8 array [H, W, 3], got an empty frame {image.shape}")
        if image.dtype != np.uint8:  # integers that fit are taken as they are; anything else would be garbage
            ok = image.dtype.kind in "iu" and int(image.min()) >= 0 and int(image.max()) <= 255
            if not ok:
                raise ValueError(f"expected an RGB uint8 array [H, W, 3], got {image.dtype} "
                                 f"(values {image.min()}..{image.max()}): scale to 0-255 and convert first")
        pil = Image.fromarray(np.ascontiguousarray(image.astype(np.uint8, copy=False)), "RGB")
        overview, rows, grid = self.slice_image(pil, max_slice_nums)
        views = [overview] + [cell for row in rows for cell in row]
        return ProcessedImage([self.normalize(np.asarray(v)) for v in views], grid, self.patch_size)

    # ------------------------------------------------------------ prompt layout

    def image_placeholder(self, grid: tuple[int, int] | None, *, image_id: int | None = None) -> str:
        """`<image>` + `<unk>`*query_num + `</image>` [+ slice rows]; `<image_id>i</image_id>` first
        when `image_id` is given and the model uses image ids (streaming passes none)."""
        unks = UNK * self.query_num
        text = f"{IM_START}{unks}{IM_END}"
        if image_id is not None and self.use_image_id:
            text = f"{IM_ID_START}{image_id}{IM_ID_END}" + text
        if self.slice_mode and grid is not None:
            cols, rows = grid
            cell = f"{SLICE_START}{unks}{SLICE_END}"
            text += "\n".join(cell * cols for _ in range(rows))
        return text

    # ------------------------------------------------------------ chat templates

    @property
    def assistant_prefix(self) -> str:
        """What opens the assistant turn (Qwen3 / 4.5 non-thinking appends an empty think block)."""
        prefix = "<|im_start|>assistant\n"
        if self.version == "4.5":
            prefix += "<think>\n\n</think>\n\n"
        return prefix

    @property
    def stop_tokens(self) -> tuple[str, ...]:
        return ("<|im_end|>", "</s>") if self.version == "4.0" else ("<|im_end|>", "<|endoftext|>")

    def chat_prompt(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True,
                    system: str | None = None) -> str:
        """Render [{role, content}] (content may hold image placeholders) for this model.

        With the checkpoint's own Jinja template (and jinja2 installed) that template decides
        (4.5 rendered with enable_thinking=False). Otherwise built-in ChatML: 2.6 / o-2.6 insert
        "You are a helpful assistant." when no system message is given (the Qwen2 template);
        4.0 and 4.5 do not. An explicit `system` replaces any system message.
        """
        msgs = list(messages)
        if system is not None:
            msgs = [{"role": "system", "content": system}] + [m for m in msgs if m["role"] != "system"]
        rendered = self._render_template(msgs, add_generation_prompt)
        if rendered is not None:
            return rendered
        if system is None and self.version in ("2.6", "o-2.6") and (not msgs or msgs[0]["role"] != "system"):
            msgs = [{"role": "system", "content": DEFAULT_SYSTEM_CHATML}] + msgs
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
        if add_generation_prompt:
            text += self.assistant_prefix
        return text

    def _render_template(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str | None:
        if not self.chat_template:
            return None
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:  # optional: fall back to the built-in ChatML
            return None
        def raise_exception(message):
            raise ValueError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, enable_thinking=False,
                **{"bos_token": "", "eos_token": "", **self.special_tokens})
        except Exception as e:  # a template that does not parse or rejects the messages
            raise UserError(f"tokenizer_config.json chat_template: {str(e).splitlines()[0]}") from None


# language-model family -> the MiniCPM-V version whose chat layout it speaks
FAMILY_VERSIONS = {"qwen2": "2.6", "qwen3": "4.5", "llama": "4.0", "minicpm": "4.0"}


def family_processor(model_type: str) -> MiniCPMVProcessor:
    """The prompt side for a language model alone (a text-only GGUF without a chat template):
    the ChatML of the MiniCPM-V version built on that family (2.6 for an unknown one)."""
    return MiniCPMVProcessor(version=FAMILY_VERSIONS.get(model_type, "2.6"))


# ---------------------------------------------------------------- several frames at once

PREPROCESS_THREADS = max(1, min(8, (os.cpu_count() or 1) - 1))  # at most; never more than frames
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def preprocess_many(processor: MiniCPMVProcessor, images: list[np.ndarray], *,
                    max_slice_nums: int | None = None) -> list[ProcessedImage]:
    """`processor.preprocess` of several RGB uint8 [H, W, 3] frames, in parallel on a small
    persistent thread pool: PIL's resize and numpy's table lookup release the GIL, and with
    several streams a tick's frames were preprocessed one after another on the model's worker
    thread (16 frames: most of a 131 ms vision call on the H200 host, issue 15). Same results
    as one by one, in order; the first frame's error is raised as `preprocess` raises it.
    No MLX runs in these threads."""
    global _pool
    if len(images) < 2 or PREPROCESS_THREADS < 2:
        return [processor.preprocess(img, max_slice_nums=max_slice_nums) for img in images]
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(PREPROCESS_THREADS, thread_name_prefix="framecast-preprocess")
    return list(_pool.map(lambda img: processor.preprocess(img, max_slice_nums=max_slice_nums), images))
