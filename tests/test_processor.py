"""LLaVA-UHD slicing, resize targets and pixels vs a PIL-based reference of the HF processor."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from framecast.model.processor import MiniCPMVProcessor, ensure_divide, find_best_resize, get_sliced_grid
from framecast.testing import random_image

# ---------------------------------------------------------------- reference (image_processing_minicpmv.py)


def ref_grid(w, h, max_slices=9, scale=448):
    ratio = w * h / (scale * scale)
    multiple = min(math.ceil(ratio), max_slices)
    if multiple <= 1:
        return None
    cands = [i for i in (multiple - 1, multiple, multiple + 1) if i != 1 and i <= max_slices]
    grids = []
    for n in cands:
        m = 1
        while m <= n:
            if n % m == 0:
                grids.append([m, n // m])
            m += 1
    best, err = [1, 1], float("inf")
    for g in grids:
        e = abs(math.log(w / h) - math.log(g[0] / g[1]))
        if e < err:
            best, err = g, e
    return tuple(best)


def ref_divide(length, patch):
    return max(round(length / patch) * patch, patch)


def ref_best_resize(size, scale, patch, upscale=False):
    w, h = size
    if w * h > scale * scale or upscale:
        r = w / h
        h = int(scale / math.sqrt(r))
        w = int(h * r)
    return ref_divide(w, patch), ref_divide(h, patch)


def ref_refine(size, grid, scale, patch):
    w, h = size
    gw, gh = ref_divide(w, grid[0]) / grid[0], ref_divide(h, grid[1]) / grid[1]
    bw, bh = ref_best_resize((gw, gh), scale, patch, upscale=True)
    return bw * grid[0], bh * grid[1]


def ref_views(image: Image.Image, max_slices=9, scale=448, patch=14):
    grid = ref_grid(*image.size, max_slices, scale)
    if grid is None:
        return [image.resize(ref_best_resize(image.size, scale, patch, True), Image.Resampling.BICUBIC)], None
    views = [image.copy().resize(ref_best_resize(image.size, scale, patch), Image.Resampling.BICUBIC)]
    refine = image.resize(ref_refine(image.size, grid, scale, patch), Image.Resampling.BICUBIC)
    cw, ch = int(refine.size[0] / grid[0]), int(refine.size[1] / grid[1])
    for y in range(0, refine.size[1], ch):
        for x in range(0, refine.size[0], cw):
            views.append(refine.crop((x, y, x + cw, y + ch)))
    return views, grid


# ---------------------------------------------------------------- tests

SIZES = [(w, h) for w in range(17, 2600, 151) for h in range(13, 2600, 163)] + [
    (448, 448), (449, 448), (896, 448), (1344, 448), (4032, 3024), (3024, 4032), (1920, 1080),
    (1080, 1920), (640, 480), (100, 2000), (2000, 100), (5000, 50), (1, 1), (14, 14), (447, 449)]


def test_python_rounding_is_half_to_even():
    assert ensure_divide(21, 14) == 28  # 1.5 -> 2
    assert ensure_divide(35, 14) == 28  # 2.5 -> 2 (half to even)
    assert ensure_divide(49, 14) == 56  # 3.5 -> 4
    assert ensure_divide(3, 14) == 14  # never below one patch


@pytest.mark.parametrize("max_slices,scale", [(9, 448), (4, 448), (1, 448), (9, 56), (6, 112)])
def test_grid_and_resize_sizes_match_reference(max_slices, scale):
    proc = MiniCPMVProcessor(scale_resolution=scale, max_slice_nums=max_slices)
    for w, h in SIZES:
        grid = ref_grid(w, h, max_slices, scale)
        assert proc.grid_for(w, h) == grid == get_sliced_grid((w, h), max_slices, scale), (w, h)
        assert find_best_resize((w, h), scale, 14, allow_upscale=grid is None) == \
            ref_best_resize((w, h), scale, 14, grid is None), (w, h)
        if grid is not None:
            from framecast.model.processor import get_refine_size

            assert get_refine_size((w, h), grid, scale, 14, allow_upscale=True) == ref_refine((w, h), grid, scale, 14)


@pytest.mark.parametrize("h,w,max_slices", [(300, 900, 9), (1000, 700, 9), (200, 200, 9), (90, 160, 4),
                                             (480, 640, 1), (37, 1200, 9)])
def test_views_pixels_match_pil_reference(h, w, max_slices):
    image = random_image(h, w, seed=h + w)
    proc = MiniCPMVProcessor(max_slice_nums=max_slices)
    got = proc.preprocess(image)
    views, grid = ref_views(Image.fromarray(image), max_slices)
    assert got.grid == grid and len(got.views) == len(views)
    for ours, ref in zip(got.views, views):
        want = (np.asarray(ref, np.float32) / 255.0 - 0.5) / 0.5
        assert ours.shape == want.shape and ours.dtype == np.float32
        assert ours.shape[0] % 14 == 0 and ours.shape[1] % 14 == 0
        np.testing.assert_allclose(ours, want, atol=1e-6)
    assert got.tgt_sizes == [(v.shape[0] // 14, v.shape[1] // 14) for v in got.views]


def test_streaming_single_view_is_upscaled_to_scale_resolution():
    proc = MiniCPMVProcessor(max_slice_nums=1)
    got = proc.preprocess(random_image(120, 160))
    assert got.grid is None and got.views[0].shape == (392, 518, 3)  # area ~448^2, aspect 4:3


def test_bad_image_is_a_clear_error():
    with pytest.raises(ValueError, match="RGB uint8"):
        MiniCPMVProcessor().preprocess(np.zeros((10, 10), np.uint8))


def test_checkpoint_chat_template_is_rendered_when_present():
    qwen3_like = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n"
                  "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
                  "{% endif %}")
    proc = MiniCPMVProcessor.from_configs("4.5", {"query_num": 8}, None, {"chat_template": qwen3_like})
    msgs = [{"role": "user", "content": "hi"}]
    assert proc.chat_prompt(msgs) == MiniCPMVProcessor(version="4.5").chat_prompt(msgs)
    assert proc.chat_prompt(msgs, system="S").startswith("<|im_start|>system\nS<|im_end|>\n")
    bad = MiniCPMVProcessor(chat_template="{{ raise_exception('no system role') }}")
    from framecast.errors import UserError

    with pytest.raises(UserError, match="no system role"):
        bad.chat_prompt(msgs)


def test_normalize_table_gives_the_same_bits_as_the_arithmetic():
    """The per-channel lookup table holds (x/255 - mean)/std computed in float32: every uint8
    value, any mean/std, strided input, and a processor whose mean changes after first use."""
    import numpy as np

    from framecast.model.processor import MiniCPMVProcessor

    def arithmetic(p, x):
        return (x.astype(np.float32) / np.float32(255.0) - np.asarray(p.mean, np.float32)) / np.asarray(p.std, np.float32)

    p = MiniCPMVProcessor(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
    every = np.arange(256, dtype=np.uint8)[:, None, None].repeat(3, axis=2)  # [256, 1, 3]: all values
    img = np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for x in (every, img, img[::2, ::3], img[:, :, :]):
        got = p.normalize(x)
        assert got.dtype == np.float32 and np.array_equal(got, arithmetic(p, x))
    p.mean = (0.5, 0.5, 0.5)
    assert np.array_equal(p.normalize(img), arithmetic(p, img))


def test_preprocess_many_equals_one_by_one_in_order():
    """Several frames preprocessed on the thread pool: the same views (bit for bit) and grids
    as one by one, in order, mixed sizes and slicing included; a bad frame raises its error."""
    import numpy as np
    import pytest

    from framecast.model.processor import MiniCPMVProcessor, preprocess_many

    p = MiniCPMVProcessor(scale_resolution=112, patch_size=14, max_slice_nums=4)
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in
              [(56, 56), (120, 300), (300, 120), (64, 96), (224, 224), (33, 47)]]
    for slices in (1, 4):
        many = preprocess_many(p, images, max_slice_nums=slices)
        for img, got in zip(images, many, strict=True):
            one = p.preprocess(img, max_slice_nums=slices)
            assert got.grid == one.grid and len(got.views) == len(one.views)
            assert all(np.array_equal(a, b) for a, b in zip(got.views, one.views))
    with pytest.raises(ValueError, match="RGB uint8"):
        preprocess_many(p, [images[0], np.zeros((4, 4), np.uint8)])


def test_preprocess_refuses_frames_it_would_turn_into_garbage():
    """Floats, booleans, out-of-range integers and empty frames: one clear ValueError; integers
    within 0-255 are taken; normalize of other inputs keeps the arithmetic (floats, a mean of
    another length) and a mean list changed in place is seen."""
    import numpy as np
    import pytest

    from framecast.model.processor import MiniCPMVProcessor

    p = MiniCPMVProcessor(scale_resolution=56, patch_size=14, max_slice_nums=1)
    ok = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    for bad, says in [(ok / 255.0, "float64"), (ok > 100, "bool"), (ok.astype(np.int32) - 5, "int32"),
                      (ok.astype(np.uint16) * 256, "uint16"), (np.zeros((0, 0, 3), np.uint8), "empty frame")]:
        with pytest.raises(ValueError, match=says):
            p.preprocess(bad)
    same = p.preprocess(ok.astype(np.int64))
    assert np.array_equal(same.views[0], p.preprocess(ok).views[0])
    x = np.full((2, 2, 3), 0.5, np.float32)
    assert np.allclose(p.normalize(x), (0.5 / 255.0 - 0.5) / 0.5)
    q = MiniCPMVProcessor(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    img = np.full((1, 1, 3), 255, np.uint8)
    assert np.allclose(q.normalize(img), 1.0)
    q.mean[0] = 0.0
    assert np.allclose(q.normalize(img), [[[2.0, 1.0, 1.0]]])
    assert np.allclose(MiniCPMVProcessor(mean=(0.5,), std=(0.5,)).normalize(img), 1.0)
