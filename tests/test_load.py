"""Loading errors (one line naming file and tensor), convert round trips, quantisation gap."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from framecast.stages.cli import main as cli_main
from framecast.errors import ModelLoadError, UserError
from framecast.stages.model_commands import convert_main
from framecast.model.load import load_model
from framecast.testing import make_tiny_minicpmv, random_image


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_minicpmv(tmp_path_factory.mktemp("tiny") / "m26", "2.6", seed=3)


def _copy(src, tmp_path, name="m"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _error(path) -> str:
    with pytest.raises(ModelLoadError) as e:
        load_model(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def _logits(model, image):
    feats = model.encode_images([image])
    text = model.processor.chat_prompt([{"role": "user", "content": model.image_placeholder(feats[0]) + "\nWhat?"}])
    ids = mx.array([model.tokenizer.encode(text)])
    return np.array(model.forward(ids, model.make_cache(), feats).astype(mx.float32))


def _rewrite(path, fn):
    w = dict(mx.load(str(path)))
    fn(w)
    mx.save_safetensors(str(path), w, metadata={"format": "pt"})


# ---------------------------------------------------------------- errors


def test_missing_config(tiny, tmp_path):
    d = _copy(tiny, tmp_path)
    (d / "config.json").unlink()
    assert _error(d) == f"{d / 'config.json'}: not found"


def test_missing_weights_and_missing_shard(tmp_path):
    d = make_tiny_minicpmv(tmp_path / "sharded", "2.6", shards=2)
    (d / "model-00002-of-00002.safetensors").unlink()
    msg = _error(d)
    assert "model-00002-of-00002.safetensors: missing shard (holds tensor " in msg
    for f in d.glob("*.safetensors*"):
        f.unlink()
    assert "no safetensors weights" in _error(d)


def test_truncated_safetensors_names_file_and_tensor(tiny, tmp_path):
    d = _copy(tiny, tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    msg = _error(d)
    assert msg.startswith(f"{f}: truncated: tensor ") and "needs bytes" in msg
    f.write_bytes(data[:5])
    assert "truncated safetensors file" in _error(d)


def test_garbage_file(tiny, tmp_path):
    d = _copy(tiny, tmp_path)
    (d / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    assert _error(d).startswith(f"{d / 'model.safetensors'}: not a safetensors file")
    (d / "config.json").write_text("{not json")
    assert _error(d).startswith(f"{d / 'config.json'}: not valid JSON")


def test_wrong_model_type(tiny, tmp_path):
    d = _copy(tiny, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llava"
    (d / "config.json").write_text(json.dumps(cfg))
    assert _error(d) == (f"{d / 'config.json'}: model_type = 'llava' is not a MiniCPM-V checkpoint "
                         "(expected 'minicpmv' or 'minicpmo')")
    cfg["model_type"], cfg["version"] = "minicpmv", 2.5
    (d / "config.json").write_text(json.dumps(cfg))
    assert "unsupported MiniCPM-V version 2.5" in _error(d)


def test_shape_mismatch_names_file_and_tensor(tiny, tmp_path):
    d = _copy(tiny, tmp_path)
    name = "llm.model.layers.1.mlp.up_proj.weight"
    _rewrite(d / "model.safetensors", lambda w: w.__setitem__(name, mx.zeros((5, 64))))
    assert _error(d) == (f"{d / 'model.safetensors'}: tensor {name} has shape (5, 64), "
                         "the config needs (128, 64)")
    d2 = _copy(tiny, tmp_path, "m2")
    _rewrite(d2 / "model.safetensors", lambda w: w.__setitem__("resampler.attn.in_proj_weight", mx.zeros((3, 64))))
    assert "tensor resampler.attn.in_proj_weight has shape" in _error(d2)


def test_stray_buffers_are_ignored(tiny, tmp_path):
    d = _copy(tiny, tmp_path)
    _rewrite(d / "model.safetensors", lambda w: w.update({
        "vpm.embeddings.position_ids": mx.arange(4900)[None], "resampler.pos_embed": mx.zeros((70, 70, 64)),
        "llm.model.layers.0.self_attn.rotary_emb.inv_freq": mx.zeros((8,))}))
    image = random_image(50, 50)
    assert np.array_equal(_logits(load_model(d), image), _logits(load_model(tiny), image))


def test_missing_tensor(tiny, tmp_path):
    d = _copy(tiny, tmp_path)
    _rewrite(d / "model.safetensors", lambda w: w.pop("vpm.post_layernorm.bias"))
    assert _error(d) == f"{d / 'model.safetensors'}: missing tensor vpm.post_layernorm.bias"


def test_bad_paths_and_offline_hub():
    with pytest.raises(ModelLoadError, match="no such model directory"):
        load_model("/nonexistent/model/dir")
    with pytest.raises(ModelLoadError, match="no such GGUF file"):
        load_model("/nonexistent/model.gguf")
    with pytest.raises(ModelLoadError, match="cannot download from the Hugging Face Hub") as e:
        load_model("framecast-test/definitely-not-a-repo")  # HF_HUB_OFFLINE=1 in conftest
    assert "\n" not in str(e.value)


def test_cli_prints_one_line(tiny, tmp_path, capsys):
    d = _copy(tiny, tmp_path)
    (d / "model.safetensors").write_bytes(b"garbage!" * 10)
    assert cli_main(["convert", str(d), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("framecast: ") and err.count("\n") == 0 and "not a safetensors file" in err


# ---------------------------------------------------------------- convert round trips


def test_convert_fp32_round_trip_same_logits(tiny, tmp_path):
    image = random_image(80, 120, seed=5)
    ref = _logits(load_model(tiny), image)
    out = tmp_path / "mlx"
    assert convert_main(str(tiny), str(out)) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["framecast_format"] == 1 and "quantization" not in cfg
    assert (out / "tokenizer.json").is_file() and (out / "preprocessor_config.json").is_file()
    got = _logits(load_model(out), image)
    assert np.array_equal(got, ref)
    with pytest.raises(UserError, match="not empty"):
        convert_main(str(tiny), str(out))


@pytest.mark.parametrize("bits,tol", [(8, 0.1), (4, 1.0)])
def test_quantized_logits_close_to_fp32(tiny, tmp_path, bits, tol):
    image = random_image(80, 120, seed=5)
    ref = _logits(load_model(tiny), image)
    out = tmp_path / f"q{bits}"
    assert cli_main(["convert", str(tiny), str(out), "--bits", str(bits)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 64, "bits": bits}
    model = load_model(out)
    assert isinstance(model.language_model.model.layers[0].mlp.gate_proj, nn.QuantizedLinear)
    assert type(model.vpm.encoder.layers[0].mlp.fc1).__name__ == "Linear"  # 32 inputs: not divisible by 64
    got = _logits(model, image)
    gap = np.abs(got - ref).max()
    rel = gap / np.abs(ref).max()
    print(f"{bits}-bit vs fp32 logits: max abs gap {gap:.4f} (max |logit| {np.abs(ref).max():.2f}, "
          f"relative {rel:.4f}); same argmax at {np.mean(got.argmax(-1) == ref.argmax(-1)):.0%} of positions")
    assert gap < tol
    # loading again gives exactly the same model
    assert np.array_equal(_logits(load_model(out), image), got)


def test_dtype_override(tiny):
    model = load_model(tiny, dtype="float16")
    assert model.language_model.model.embed_tokens.weight.dtype == mx.float16
    assert model.vpm.embeddings.patch_embedding.weight.dtype == mx.float16


def test_o26_skips_audio_and_tts(tmp_path, capfd):
    d = make_tiny_minicpmv(tmp_path / "o", "o-2.6")
    model = load_model(d)
    assert model.args.version == "o-2.6"
    assert "skipping 3 audio/TTS tensors (apm, audio_projection_layer, tts)" in capfd.readouterr().err
