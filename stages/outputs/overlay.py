"""Text drawn onto frames: burned-in captions (annotated video) and the preview's subtitle and
heads-up lines.

Pillow draws the text (a TrueType font: DejaVu Sans when the system has it, else Pillow's own
scalable default), because OpenCV's Hershey fonts know only ASCII. Text sits on a darkened band
so it stays readable on any picture; `alpha` (0..1) fades band and text together.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: caption text height as a fraction of the frame height (and its bounds, pixels)
CAPTION_SCALE = 0.05
MIN_FONT_PX, MAX_FONT_PX = 11, 48
#: how much the band under the text darkens the picture (0 = not at all, 1 = black)
BAND_DARKEN = 0.65
MAX_CAPTION_LINES = 3


@functools.lru_cache(maxsize=16)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    for name in ("DejaVuSans.ttf", "Arial.ttf", "Helvetica.ttc"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def font_px(height: int, scale: float = CAPTION_SCALE) -> int:
    return int(min(max(round(height * scale), MIN_FONT_PX), MAX_FONT_PX))


def wrap(text: str, fnt, max_width: int, *, max_lines: int = MAX_CAPTION_LINES) -> list[str]:
    """Greedy word wrap to `max_width` pixels; words wider than a line are cut; more than
    `max_lines` lines keep the last ones (the newest words of a growing partial text)."""
    lines: list[str] = []
    for para in text.strip().splitlines() or [""]:
        cur = ""
        for word in para.split():
            trial = f"{cur} {word}" if cur else word
            if cur and fnt.getlength(trial) > max_width:
                lines.append(cur)
                trial = word
            while fnt.getlength(trial) > max_width and len(trial) > 1:  # one very long word
                cut = max(1, int(len(trial) * max_width / fnt.getlength(trial)))
                lines.append(trial[:cut])
                trial = trial[cut:]
            cur = trial
        lines.append(cur)
    lines = [ln for ln in lines if ln] or [""]
    return lines[-max_lines:]


@functools.lru_cache(maxsize=64)
def text_mask(lines: tuple[str, ...], width: int, height: int, size: int, pad: int, line_h: int) -> np.ndarray:
    """The coverage (0..1, anti-aliased) of `lines` centred in a `width` x `height` band:
    float32 [height, width]. Cached: a caption stays up for many frames."""
    fnt = font(size)
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        x = max(pad, (width - int(fnt.getlength(line))) // 2)
        draw.text((x, pad + i * line_h), line, font=fnt, fill=255)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def draw_band(img: np.ndarray, lines: list[str], *, bottom: bool = True, size: int | None = None,
              colour: tuple[int, int, int] = (255, 255, 255), alpha: float = 1.0,
              offset: int = 0) -> tuple[int, int]:
    """Draw `lines` centred on a darkened band at the bottom (or top) of `img`, in place.

    img: RGB uint8 [H, W, 3]. `offset` moves the band away from its edge (pixels). Returns the
    band's rows (y0, y1); (0, 0) when nothing was drawn (`alpha` <= 0 or no text).
    """
    h, w = img.shape[:2]
    if alpha <= 0 or not any(ln.strip() for ln in lines):
        return (0, 0)
    size = size or font_px(h)
    line_h = int(size * 1.25)
    pad = max(2, size // 3)
    band_h = min(h, line_h * len(lines) + 2 * pad)
    y0 = max(0, h - band_h - offset) if bottom else max(0, min(offset, h - band_h))
    y1 = y0 + band_h
    mask = text_mask(tuple(lines), w, band_h, size, pad, line_h)[..., None]  # [band_h, W, 1]
    region = img[y0:y1]
    before = region.astype(np.float32)
    drawn = before * (1 - BAND_DARKEN) * (1 - mask) + np.asarray(colour, np.float32) * mask
    if alpha < 1:
        drawn = before * (1 - alpha) + drawn * alpha
    region[...] = np.clip(drawn + 0.5, 0, 255).astype(np.uint8)
    return (y0, y1)


def draw_caption(img: np.ndarray, text: str, *, alpha: float = 1.0, size: int | None = None,
                 colour: tuple[int, int, int] = (255, 255, 255), offset: int = 0,
                 max_lines: int = MAX_CAPTION_LINES) -> tuple[int, int]:
    """A subtitle: `text` wrapped to 90% of the width at the bottom of `img` (RGB [H, W, 3], in place)."""
    h, w = img.shape[:2]
    size = size or font_px(h)
    lines = wrap(text, font(size), int(w * 0.9), max_lines=max_lines)
    return draw_band(img, lines, bottom=True, size=size, colour=colour, alpha=alpha, offset=offset)


def even_size(width: int, height: int) -> tuple[int, int]:
    """H.264 in 4:2:0 needs even sides."""
    return width - width % 2, height - height % 2
