"""Unsupported or broken GGUF input: one ModelLoadError line naming the file and the culprit."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from gguf_fixtures import add_tokenizer, write_gguf_pair, write_mmproj_gguf
from framecast.testing import make_tiny_minicpmv, tiny_config, tiny_weights

from framecast.errors import ModelLoadError


def _lm_file(path, *, arch="llama", tokenizer_model="gpt2", pre="gpt-2", weight_dtype=np.float32, extra=None):
    """A 1-layer LM GGUF with just enough metadata; knobs break one thing at a time."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in [("block_count", 1), ("embedding_length", 32), ("feed_forward_length", 64),
                       ("attention.head_count", 2), ("attention.head_count_kv", 2), ("context_length", 128)]:
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    for key, value in (extra or {}).items():
        w.add_string(key, value)
    w.add_string("tokenizer.ggml.model", tokenizer_model)
    w.add_string("tokenizer.ggml.pre", pre)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "<|im_end|>"] + [f"t{i}" for i in range(61)])
    w.add_array("tokenizer.ggml.token_type", [1, 1, 3] + [1] * 61)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (64, 32), "output_norm.weight": (32,), "blk.0.attn_norm.weight": (32,),
              "blk.0.ffn_norm.weight": (32,), "blk.0.attn_q.weight": (32, 32), "blk.0.attn_k.weight": (32, 32),
              "blk.0.attn_v.weight": (32, 32), "blk.0.attn_output.weight": (32, 32),
              "blk.0.ffn_gate.weight": (64, 32), "blk.0.ffn_up.weight": (64, 32), "blk.0.ffn_down.weight": (32, 64)}
    for name, shape in shapes.items():
        x = rng.standard_normal(shape).astype(np.float32)
        w.add_tensor(name, x.astype(weight_dtype) if name == "blk.0.attn_q.weight" else x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _load_error(*args, **kw) -> str:
    from framecast.model.gguf.model import load_gguf

    with pytest.raises(ModelLoadError) as info:
        load_gguf(*args, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_well_formed_file_loads(tmp_path):
    from framecast.model.gguf.model import load_gguf

    model = load_gguf(_lm_file(tmp_path / "ok.gguf"))
    assert model.tokenizer.encode("ab") == [0, 1]


def test_unsupported_architecture(tmp_path):
    path = _lm_file(tmp_path / "neox.gguf", arch="gptneox")
    msg = _load_error(path)
    assert str(path) in msg and "general.architecture 'gptneox' is not supported" in msg


def test_unsupported_tensor_type(tmp_path):
    msg = _load_error(_lm_file(tmp_path / "i32.gguf", weight_dtype=np.int32))
    assert "blk.0.attn_q.weight" in msg and "I32" in msg and "not supported" in msg


@pytest.mark.parametrize("model,pre,needle", [
    ("t5", "default", "tokenizer.ggml.model 't5' is not supported"),
    ("llama", "default", "tokenizer.ggml.scores is missing"),
    ("bert", "default", "tokenizer.ggml.model 'bert' is not supported"),
    ("gpt2", "deepseek-llm", "tokenizer.ggml.pre 'deepseek-llm' is not supported"),
])
def test_unsupported_tokenizer(tmp_path, model, pre, needle):
    assert needle in _load_error(_lm_file(tmp_path / "tok.gguf", tokenizer_model=model, pre=pre))


def test_unsupported_rope_scaling(tmp_path):
    path = _lm_file(tmp_path / "yarn.gguf", extra={"llama.rope.scaling.type": "yarn"})
    assert "llama.rope.scaling.type 'yarn' is not supported" in _load_error(path)


def test_split_gguf(tmp_path):
    path = _lm_file(tmp_path / "m-00001-of-00002.gguf", extra={"split.count": "2"})
    assert "split GGUF" in _load_error(path)


def test_not_a_gguf_and_truncated(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    assert "not a GGUF file" in _load_error(bad)
    good = _lm_file(tmp_path / "good.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good[:200])
    assert "truncated GGUF header" in _load_error(cut)
    assert "no such GGUF file" in _load_error(tmp_path / "missing.gguf")


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    hf = make_tiny_minicpmv(root / "hf", "2.6")
    lm, mm, _ = write_gguf_pair(hf, root / "g", "F32", version="2.6")
    return root, lm, mm


def test_mmproj_given_as_the_model(tiny_pair):
    _root, _lm, mm = tiny_pair
    assert "this is an mmproj (vision) GGUF; pass it with --mmproj" in _load_error(mm)


@pytest.mark.parametrize("version", [2, 100045])
def test_unsupported_minicpmv_version(tiny_pair, version):
    root, lm, _mm = tiny_pair
    cfg = tiny_config("2.6")
    path = root / f"mmproj-v{version}.gguf"
    write_mmproj_gguf(path, cfg, tiny_weights(cfg, "2.6"), "F32", version="2.6", minicpmv_version=version)
    msg = _load_error(lm, mmproj=path)
    assert f"clip.minicpmv_version {version} is not supported" in msg


def test_pair_with_the_wrong_language_model(tiny_pair):
    root, lm, _mm = tiny_pair
    cfg = tiny_config("4.5")
    path = root / "mmproj-45.gguf"
    write_mmproj_gguf(path, cfg, tiny_weights(cfg, "4.5"), "F32", version="4.5")
    msg = _load_error(lm, mmproj=path)
    assert "a qwen2 language model does not pair with" in msg and "expects qwen3" in msg


def test_non_resampler_projector(tmp_path, tiny_pair):
    _root, lm, _mm = tiny_pair
    w = gguf.GGUFWriter(str(tmp_path / "llava.gguf"), "clip")
    w.add_string("clip.projector_type", "mlp")
    w.add_tensor("mm.0.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert "clip.projector_type 'mlp' is not supported" in _load_error(lm, mmproj=tmp_path / "llava.gguf")


def test_add_tokenizer_helper_is_exercised(tmp_path):
    # the fixture writer itself: a tokenizer.json with merges round-trips through GGUF metadata
    from tokenizers import Tokenizer, models, pre_tokenizers

    from framecast.model.gguf.tokenizer import build_tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(alphabet)}
    vocab["he"], vocab["ll"], vocab["hell"] = len(vocab), len(vocab) + 1, len(vocab) + 2
    vocab["<|im_end|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, [("h", "e"), ("l", "l"), ("he", "ll")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(["<|im_end|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    add_tokenizer(w, tmp_path / "tokenizer.json")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    from framecast.model.gguf.file import read_header

    ours = build_tokenizer(read_header(tmp_path / "t.gguf").metadata)
    for text in ["hello", "shell hell<|im_end|>", "  hello\n"]:
        assert ours.encode(text).ids == tok.encode(text).ids
