"""Whole tiny MiniCPM-V per version: image + prompt -> logits, vs a torch/transformers pipeline."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from framecast.errors import ModelLoadError, UserError
from framecast.model.load import load_model
from framecast.model.resampler import resampler_heads
from framecast.model.vlm import MiniCPMV, resolve_version
from test_resampler import TorchResampler
from test_vision import _hf_buckets, _hf_model
from framecast.testing import make_tiny_minicpmv, random_image, tiny_config, tiny_weights

HF_LM = {"2.6": "Qwen2ForCausalLM", "o-2.6": "Qwen2ForCausalLM", "4.0": "LlamaForCausalLM",
         "4.5": "Qwen3ForCausalLM"}
HF_CONF = {"Qwen2ForCausalLM": "Qwen2Config", "LlamaForCausalLM": "LlamaConfig", "Qwen3ForCausalLM": "Qwen3Config"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for v in ("2.6", "o-2.6", "4.0", "4.5"):
        d = make_tiny_minicpmv(tmp_path_factory.mktemp(f"tiny{v}"), v, seed=7, shards=2 if v == "2.6" else 1)
        out[v] = (d, load_model(d))
    return out


class TorchMiniCPMV:
    """Reference: transformers SigLIP encoder (NaViT ids, key masks) + MHA resampler + HF LM."""

    def __init__(self, version: str):
        import transformers

        cfg = tiny_config(version)
        w = {k: torch.from_numpy(v) for k, v in tiny_weights(cfg, version, seed=7).items()}
        self.cfg = cfg
        self.vision = _hf_model(cfg["vision_config"], {k[4:]: v.numpy() for k, v in w.items() if k.startswith("vpm.")})
        self.vision = getattr(self.vision, "vision_model", self.vision)
        d = cfg["hidden_size"]
        self.resampler = TorchResampler(d, cfg["vision_config"]["hidden_size"], cfg["query_num"], resampler_heads(d))
        self.resampler.load_state_dict({k[10:]: v for k, v in w.items() if k.startswith("resampler.")})
        lm_name = HF_LM[version]
        conf = getattr(transformers, HF_CONF[lm_name])(**{k: v for k, v in cfg.items() if k not in (
            "model_type", "architectures", "vision_config", "slice_config", "audio_config", "tts_config")})
        conf._attn_implementation = "eager"
        self.lm = getattr(transformers, lm_name)(conf).eval()
        missing, unexpected = self.lm.load_state_dict({k[4:]: v for k, v in w.items() if k.startswith("llm.")},
                                                      strict=False)
        assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
        if cfg.get("tie_word_embeddings"):
            self.lm.tie_weights()

    @torch.no_grad()
    def view_features(self, views, temporal=None, groups=None) -> torch.Tensor:
        side = self.cfg["vision_config"]["image_size"] // 14
        sizes = [(v.shape[0] // 14, v.shape[1] // 14) for v in views]
        lens = [h * w for h, w in sizes]
        dv = self.cfg["vision_config"]["hidden_size"]
        emb = torch.zeros(len(views), max(lens), dv)
        for b, (v, (nh, nw)) in enumerate(zip(views, sizes)):
            x = self.vision.embeddings.patch_embedding(torch.from_numpy(v).permute(2, 0, 1)[None])
            ids = (torch.from_numpy(_hf_buckets(nh, side))[:, None] * side
                   + torch.from_numpy(_hf_buckets(nw, side))[None, :]).flatten()
            emb[b, : nh * nw] = x.flatten(2).transpose(1, 2)[0] + self.vision.embeddings.position_embedding(ids)
        keep = torch.zeros(len(views), max(lens), dtype=torch.bool)
        for b, n in enumerate(lens):
            keep[b, :n] = True
        mask = torch.zeros(len(views), 1, max(lens), max(lens))
        mask.masked_fill_(~keep[:, None, None, :], torch.finfo(torch.float32).min)
        hidden = self.vision.post_layernorm(self.vision.encoder(inputs_embeds=emb, attention_mask=mask).last_hidden_state)
        return self.resampler(hidden, sizes, temporal, groups)  # [B or G, Q, D]

    @torch.no_grad()
    def logits(self, ids: list[int], feats: torch.Tensor, positions: np.ndarray) -> np.ndarray:
        ids_t = torch.tensor([ids])
        emb = self.lm.get_input_embeddings()(ids_t)
        emb[0, torch.from_numpy(positions).long()] = feats.reshape(-1, feats.shape[-1])
        return self.lm(inputs_embeds=emb).logits.numpy()


def _prompt(model: MiniCPMV, feats, question="What is shown?") -> list[int]:
    content = "\n".join(model.image_placeholder(f, image_id=i) for i, f in enumerate(feats)) + "\n" + question
    return model.tokenizer.encode(model.processor.chat_prompt([{"role": "user", "content": content}]))


@pytest.mark.parametrize("version", ["2.6", "o-2.6", "4.0", "4.5"])
def test_image_prompt_logits_match_torch_pipeline(models, version):
    _, model = models[version]
    images = [random_image(90, 160, seed=1), random_image(60, 50, seed=2)]  # sliced (3x1) + not sliced
    feats = model.encode_images(images, max_slice_nums=4)
    assert [f.grid for f in feats] == [(3, 1), None]
    ids = _prompt(model, feats)
    logits = np.array(model.forward(mx.array([ids]), model.make_cache(), feats))
    again = np.array(model.forward(mx.array([ids]), model.make_cache(), model.encode_images(images, max_slice_nums=4)))
    assert np.array_equal(logits, again)  # deterministic

    ref = TorchMiniCPMV(version)
    views = [v for img in images for v in model.processor.preprocess(img, max_slice_nums=4).views]
    positions = model._feature_positions(np.array(ids))
    want = ref.logits(ids, ref.view_features(views), positions)
    diff = np.abs(logits - want).max()
    print(f"{version}: end-to-end logits max abs diff vs torch {diff:.2e} (|logits| max {np.abs(want).max():.1f})")
    assert diff <= 1e-4


def test_45_frame_group_matches_torch_3d(models):
    _, model = models["4.5"]
    frames = [random_image(70, 70, seed=s) for s in range(3)]
    temporal = [0, 3, 7]
    feat = model.encode_frame_group(frames, temporal)
    assert feat.features.shape == (1, 8, 64) and feat.grid is None
    ids = _prompt(model, [feat])
    logits = np.array(model.forward(mx.array([ids]), model.make_cache(), [feat]))
    ref = TorchMiniCPMV("4.5")
    views = [model.processor.preprocess(f, max_slice_nums=1).views[0] for f in frames]
    want = ref.logits(ids, ref.view_features(views, temporal, [3]), model._feature_positions(np.array(ids)))
    diff = np.abs(logits - want).max()
    print(f"4.5 frame group of 3: logits max abs diff vs torch {diff:.2e}")
    assert diff <= 1e-4
    with pytest.raises(UserError):
        models["2.6"][1].encode_frame_group(frames, temporal)


def test_prompt_layouts_per_version(models):
    m26, m45, m40 = models["2.6"][1], models["4.5"][1], models["4.0"][1]
    feat = m26.encode_images([random_image(90, 160)], max_slice_nums=4)[0]
    unk8 = "<unk>" * 8
    assert m26.image_placeholder(feat) == (f"<image>{unk8}</image>" + f"<slice>{unk8}</slice>" * 3)
    assert m26.image_placeholder(feat, image_id=2).startswith("<image_id>2</image_id><image>")
    two_rows = m26.processor.image_placeholder((2, 2))
    cell = f"<slice>{unk8}</slice>"
    assert two_rows == f"<image>{unk8}</image>" + cell * 2 + "\n" + cell * 2
    chat = m26.processor.chat_prompt([{"role": "user", "content": "hi"}])
    assert chat == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert m45.processor.chat_prompt([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert m40.processor.stop_tokens == ("<|im_end|>", "</s>")
    for m in (m26, m45, m40):
        assert m.tokenizer.token_id("<|im_end|>") in m.tokenizer.eos_ids


def test_embed_scatters_unscaled_features_in_order(models):
    _, model = models["2.6"]
    feats = model.encode_images([random_image(40, 40, seed=3), random_image(40, 90, seed=4)])
    ids = mx.array([_prompt(model, feats)])
    h = model.embed(ids, feats)
    pos = model._feature_positions(np.array(ids[0]))
    want = mx.concatenate([f.features.reshape(-1, 64) for f in feats])
    assert mx.array_equal(h[0, mx.array(pos)], want)
    text = np.setdiff1d(np.arange(ids.shape[1]), pos)
    assert mx.array_equal(h[0, mx.array(text)], model.language_model.embed_tokens(ids)[0, mx.array(text)])
    with pytest.raises(UserError, match="placeholder"):
        model.embed(ids, feats[:1])


def test_streaming_prefill_on_cache_equals_one_pass(models):
    """The session's pattern: system prefix, then one frame at a time, then the question."""
    _, model = models["4.5"]
    tok, proc = model.tokenizer, model.processor
    frames = model.encode_images([random_image(56, 56, seed=s) for s in range(2)], max_slice_nums=1)
    parts = ["<|im_start|>system\nNarrate.<|im_end|>\n<|im_start|>user\n"]
    parts += [model.image_placeholder(f) + "\n" for f in frames]
    parts += ["What now?<|im_end|>\n" + proc.assistant_prefix]
    chunks = [tok.encode(p) for p in parts]
    cache = model.make_cache()
    outs = [model.forward(mx.array([chunks[0]]), cache)]
    outs += [model.forward(mx.array([c]), cache, [f]) for c, f in zip(chunks[1:3], frames)]
    outs.append(model.forward(mx.array([chunks[3]]), cache))
    stepwise = np.concatenate([np.array(o) for o in outs], axis=1)
    whole = np.array(model.forward(mx.array([sum(chunks, [])]), model.make_cache(), frames))
    assert np.abs(stepwise - whole).max() <= 1e-4
    assert cache[0].offset == sum(len(c) for c in chunks)


def test_minicpm_lm_keeps_vision_features_unscaled(tmp_path):
    """A MiniCPM (muP) LM multiplies text embeddings by scale_emb but never vision features."""
    extra = {"scale_emb": 12.0, "scale_depth": 1.4, "dim_model_base": 32, "tie_word_embeddings": True}
    d = make_tiny_minicpmv(tmp_path / "m", "4.0", llm=extra)
    cfg_path = d / "config.json"
    import json

    cfg = json.loads(cfg_path.read_text())
    cfg["lm_model_type"] = "minicpm"
    cfg_path.write_text(json.dumps(cfg))
    model = load_model(d)
    feats = model.encode_images([random_image(40, 40)])
    ids = mx.array([_prompt(model, feats)])
    h = model.embed(ids, feats)
    pos = model._feature_positions(np.array(ids[0]))
    assert mx.array_equal(h[0, mx.array(pos)], feats[0].features.reshape(-1, 64))
    raw = model.language_model.model.embed_tokens(ids[:, :1]) if hasattr(model.language_model, "model") else None
    if raw is not None:
        np.testing.assert_allclose(np.array(h[0, 0]), 12.0 * np.array(raw[0, 0]), rtol=1e-6)


def test_unknown_version_and_model_type_fail_clearly():
    assert resolve_version({"model_type": "minicpmv", "version": 4}) == "4.0"
    assert resolve_version({"model_type": "minicpmo", "version": 2.6}) == "o-2.6"
    with pytest.raises(ModelLoadError, match="unsupported MiniCPM-V version 2.5"):
        resolve_version({"model_type": "minicpmv", "version": 2.5})
    with pytest.raises(ModelLoadError, match="model_type = 'llava'"):
        resolve_version({"model_type": "llava"})


@pytest.mark.parametrize("dtype,tol", [("bfloat16", 0.25), ("float16", 0.05)])
def test_half_precision_runs_and_stays_close(models, dtype, tol):
    d, ref_model = models["4.5"]
    model = load_model(d, dtype=dtype)
    frames = [random_image(56, 56, seed=i) for i in range(3)]
    feats = [model.encode_images([random_image(90, 160)], max_slice_nums=4)[0], model.encode_frame_group(frames, [0, 5, 9])]
    assert all(f.features.dtype == getattr(mx, dtype) for f in feats)
    ids = _prompt(model, feats)
    got = model.forward(mx.array([ids]), model.make_cache(), feats).astype(mx.float32)
    ref_feats = [ref_model.encode_images([random_image(90, 160)], max_slice_nums=4)[0],
                 ref_model.encode_frame_group(frames, [0, 5, 9])]
    want = ref_model.forward(mx.array([ids]), ref_model.make_cache(), ref_feats)
    gap = float(mx.abs(got - want).max())
    print(f"{dtype} vs fp32 logits: max abs gap {gap:.4f} (max |logit| {float(mx.abs(want).max()):.2f})")
    assert gap < tol
