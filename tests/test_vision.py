"""SigLIP NaViT tower vs transformers (fixed size) and vs a torch NaViT reference (padded batch)."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
import torch

from framecast.model.vision import SiglipVisionTower, VisionArgs, batch_views, navit_bucket_coords, navit_position_ids
from framecast.testing import TINY_VISION, tiny_config, tiny_weights


def _hf_buckets(n: int, side: int) -> np.ndarray:
    # Exactly as modeling_navit_siglip.py: n comes from the tgt_sizes tensor.
    boundaries = torch.arange(1 / side, 1.0, 1 / side)
    coords = torch.arange(0, 1 - 1e-6, 1 / torch.tensor(n))
    return torch.bucketize(coords, boundaries, right=True).numpy()


@pytest.mark.parametrize("side", [70, 10])
def test_bucket_coords_equal_torch_bucketize_for_every_n(side):
    for n in [*range(1, 71), 97, 128, 314, 1001]:  # long sides of elongated images exceed 70
        np.testing.assert_array_equal(navit_bucket_coords(n, side), _hf_buckets(n, side), err_msg=f"n={n}")


def test_tie_cases_differ_from_floor_where_hf_does():
    # llama.cpp's floor(70*i/n) disagrees with HF's float32 bucketing at exact ties.
    diff = {n for n in range(1, 71)
            if any(math.floor(70 * i / n) != b for i, b in enumerate(navit_bucket_coords(n, 70)))}
    assert diff == {25, 49, 50, 55, 58}
    assert navit_bucket_coords(25, 70)[15] == 41  # floor gives 42


def test_position_ids_full_grid_is_identity():
    np.testing.assert_array_equal(navit_position_ids(70, 70, 70), np.arange(4900))
    np.testing.assert_array_equal(navit_position_ids(10, 10, 10), np.arange(100))


def _args_and_weights(image_size: int):
    cfg = tiny_config("2.6", vision={"image_size": image_size})
    w = {k[4:]: v for k, v in tiny_weights(cfg, "2.6", seed=1).items() if k.startswith("vpm.")}
    return cfg["vision_config"], w


def _ours(vcfg, w) -> SiglipVisionTower:
    tower = SiglipVisionTower(VisionArgs.from_dict(vcfg))
    tower.load_weights(list(SiglipVisionTower.sanitize({k: mx.array(v) for k, v in w.items()}).items()))
    return tower


def _hf_model(vcfg, w):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    conf = SiglipVisionConfig(**{k: v for k, v in vcfg.items() if k != "model_type"},
                              vision_use_head=False, attn_implementation="eager")
    model = SiglipVisionModel(conf).eval()
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in model.state_dict()) else ""
    missing, unexpected = model.load_state_dict(
        {f"{prefix}{k}": torch.from_numpy(v) for k, v in w.items()}, strict=False)
    assert not unexpected and all("position_ids" in m for m in missing), (missing, unexpected)
    return model


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_other_hf_activations_match_transformers_siglip(act):
    """`vision_config.hidden_act` is honoured (the demo model's tower uses ReLU)."""
    vcfg, w = _args_and_weights(140)
    vcfg = {**vcfg, "hidden_act": act}
    view = np.random.default_rng(3).uniform(-1, 1, size=(140, 140, 3)).astype(np.float32)
    with torch.no_grad():
        ref = _hf_model(vcfg, w)(torch.from_numpy(view).permute(2, 0, 1)[None]).last_hidden_state.numpy()
    out, _ = _ours(vcfg, w).encode_views([view])
    assert np.abs(np.array(out) - ref).max() <= 1e-4


@pytest.mark.parametrize("act", ["swish2", "GELU", "", None, 123, ["relu"], {"a": 1}])
def test_unknown_activation_is_one_clear_error(act):
    from framecast.errors import ModelLoadError
    from framecast.model.vlm import VLMArgs

    cfg = tiny_config("2.6")
    cfg["vision_config"]["hidden_act"] = act
    with pytest.raises(ModelLoadError, match=r"config.json: vision_config.hidden_act .* is not one of gelu, "):
        VLMArgs.from_config(cfg)
    with pytest.raises(ValueError, match="hidden_act"):
        VisionArgs.from_dict(cfg["vision_config"])


@pytest.mark.parametrize("size", [140, 980])
def test_fixed_size_matches_transformers_siglip(size):
    # 10 x 10 and the real 70 x 70 patches: NaViT ids = standard ids there (asserted above)
    vcfg, w = _args_and_weights(size)
    rng = np.random.default_rng(0)
    view = rng.uniform(-1, 1, size=(size, size, 3)).astype(np.float32)
    with torch.no_grad():
        ref = _hf_model(vcfg, w)(torch.from_numpy(view).permute(2, 0, 1)[None]).last_hidden_state.numpy()
    out, sizes = _ours(vcfg, w).encode_views([view])
    assert sizes == [(size // 14, size // 14)]
    diff = np.abs(np.array(out) - ref).max()
    print(f"vision fixed-size {size}px max abs diff vs transformers: {diff:.2e}")
    assert diff <= 1e-4


def test_padded_navit_batch_matches_torch_reference():
    vcfg, w = _args_and_weights(980)  # the real 70 x 70 position grid
    rng = np.random.default_rng(1)
    shapes = [(3 * 14, 5 * 14), (4 * 14, 4 * 14), (2 * 14, 7 * 14), (5 * 14, 5 * 14)]  # (25 -> tie rows)
    views = [rng.uniform(-1, 1, size=(h, wd, 3)).astype(np.float32) for h, wd in shapes]
    out, sizes = _ours(vcfg, w).encode_views(views)
    out = np.array(out)

    hf = _hf_model(vcfg, w)
    hf = getattr(hf, "vision_model", hf)
    side = 70
    lens = [nh * nw for nh, nw in sizes]
    max_len = max(lens)
    with torch.no_grad():
        emb = torch.zeros(len(views), max_len, vcfg["hidden_size"])
        for b, (v, (nh, nw)) in enumerate(zip(views, sizes)):
            x = hf.embeddings.patch_embedding(torch.from_numpy(v).permute(2, 0, 1)[None])  # [1, D, nh, nw]
            x = x.flatten(2).transpose(1, 2)[0]
            ids = (torch.from_numpy(_hf_buckets(nh, side))[:, None] * side
                   + torch.from_numpy(_hf_buckets(nw, side))[None, :]).flatten()
            emb[b, : nh * nw] = x + hf.embeddings.position_embedding(ids)
        keep = torch.zeros(len(views), max_len, dtype=torch.bool)
        for b, n in enumerate(lens):
            keep[b, :n] = True
        mask = torch.zeros(len(views), 1, max_len, max_len)
        mask.masked_fill_(~keep[:, None, None, :], torch.finfo(torch.float32).min)
        ref = hf.post_layernorm(hf.encoder(inputs_embeds=emb, attention_mask=mask).last_hidden_state).numpy()
    diffs = [np.abs(out[b, :n] - ref[b, :n]).max() for b, n in enumerate(lens)]
    print(f"vision padded NaViT batch max abs diff vs torch: {max(diffs):.2e}")
    assert max(diffs) <= 1e-4


def test_batch_views_pads_and_masks():
    views = [np.zeros((28, 42, 3), np.float32), np.ones((14, 14, 3), np.float32)]
    patches, pos, valid, sizes = batch_views(views, 14, 70)
    assert patches.shape == (2, 6, 588) and sizes == [(2, 3), (1, 1)]
    assert valid.sum(1).tolist() == [6, 1] and pos[1, 1:].tolist() == [0] * 5


def test_patch_embedding_sanitize_matches_conv():
    vcfg = dict(TINY_VISION)
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((vcfg["hidden_size"], 3, 14, 14)).astype(np.float32)
    conv = torch.nn.Conv2d(3, vcfg["hidden_size"], 14, 14, bias=False)
    conv.weight.data = torch.from_numpy(weight)
    img = rng.standard_normal((28, 14, 3)).astype(np.float32)
    ref = conv(torch.from_numpy(img).permute(2, 0, 1)[None]).flatten(2).transpose(1, 2)[0].detach().numpy()
    lin = SiglipVisionTower.sanitize({"embeddings.patch_embedding.weight": mx.array(weight)})
    patches, *_ = batch_views([img], 14, 70)
    ours = patches[0] @ np.array(lin["embeddings.patch_embedding.weight"]).T
    np.testing.assert_allclose(ours, ref, atol=1e-4)
