"""Tokenizer and streaming detokenizer on small tokenizers trained here (no downloads)."""

from __future__ import annotations

import json

import pytest
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

from framecast.errors import ModelLoadError
from framecast.model.tokenizer import StreamingDetokenizer, Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "</image>", "<unk>"]
CORPUS = [
    "the camera shows a person walking across the street",
    "a red car stops at the light and a dog runs past",
    "narrate what happens now in one short sentence",
] * 20
# Multi-byte characters the tiny vocabulary never merged: they span several byte tokens.
MIXED = "a dog 🐕 runs 你好世界 past the café — 🎉👍🏽 ok ünïcödé"


@pytest.fixture(scope="module")
def byte_bpe(tmp_path_factory) -> tuple[Tokenizer, str]:
    """Qwen-style byte-level BPE with ChatML/MiniCPM-V special tokens, saved as files."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    directory = tmp_path_factory.mktemp("tok")
    backend.save(str(directory / "tokenizer.json"))
    config = {
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<unk>",
        "added_tokens_decoder": {
            str(backend.token_to_id(t)): {"content": t, "special": True} for t in SPECIALS
        },
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [0]}))
    return Tokenizer.from_dir(directory), str(directory)


@pytest.fixture(scope="module")
def sentencepiece_like() -> Tokenizer:
    """Llama/MiniCPM-style: metaspace pre-tokenizer, BPE with byte fallback (<0xNN> tokens)."""
    trained = Backend(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    trained.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    )
    # As in Llama's tokenizer.json, the 256 byte tokens live in the model vocabulary itself.
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    backend = Backend(models.BPE(vocab, merges, byte_fallback=True, unk_token="<unk>"))
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return Tokenizer(backend, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    detok = StreamingDetokenizer(tok)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.finalize())
    assert detok.text == "".join(deltas)
    return deltas


def test_special_tokens_in_text_are_single_ids(byte_bpe):
    tok, _ = byte_bpe
    text = "<|im_start|>user\n<image><unk><unk></image>\nhi<|im_end|>"
    ids = tok.encode(text)
    for special in ("<|im_start|>", "<image>", "</image>", "<|im_end|>"):
        assert ids.count(tok.token_id(special)) == 1
    assert ids.count(tok.token_id("<unk>")) == 2
    assert tok.decode(ids) == text
    assert tok.im_start_id == tok.token_id("<|im_start|>") and tok.im_end_id == tok.token_id("<|im_end|>")
    assert tok.unk_id == tok.token_id("<unk>") and tok.pad_id == tok.token_id("<|endoftext|>")
    # eos: config eos_token, generation_config's ids, and the known terminators in the vocab
    assert tok.eos_ids == {tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>"), 0}
    assert tok.token_id("<not a token>") is None
    assert tok.decode(ids, skip_special=True) == "user\n\nhi"


def test_encode_decode_round_trip_multibyte(byte_bpe):
    tok, _ = byte_bpe
    ids = tok.encode(MIXED)
    assert tok.decode(ids) == MIXED


def test_streaming_never_emits_half_a_character(byte_bpe):
    tok, _ = byte_bpe
    ids = tok.encode(MIXED)
    # The test is only meaningful if some token boundary falls inside a character.
    assert any(tok.decode(ids[:n]).endswith("\ufffd") for n in range(1, len(ids)))
    deltas = _stream(tok, ids)
    assert "".join(deltas) == MIXED
    assert all("\ufffd" not in d for d in deltas)
    assert sum(1 for d in deltas if d) > 5  # text really streams, not all at the end


def test_streaming_sentencepiece_byte_fallback_keeps_spaces(sentencepiece_like):
    tok = sentencepiece_like
    ids = tok.encode(MIXED)
    assert any(tok.backend.id_to_token(i).startswith("<0x") for i in ids)  # byte fallback used
    deltas = _stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == MIXED
    assert all("\ufffd" not in d for d in deltas)
    assert tok.encode("hi", add_special=False) == tok.encode("hi")


def test_streaming_skips_special_tokens_and_flushes_incomplete_tail(byte_bpe):
    tok, _ = byte_bpe
    ids = tok.encode("ok 你好<|im_end|>")
    assert "".join(_stream(tok, ids)) == "ok 你好"
    detok = tok.detokenizer()
    emoji = tok.encode("🐕")
    assert len(emoji) > 1
    assert detok.add_many(emoji[:-1]) == ""  # held back: incomplete character
    assert detok.finalize() == "\ufffd"  # a truncated stream flushes the replacement char
    detok.reset()
    assert detok.add_many(emoji) == "🐕"


def test_long_stream_matches_full_decode(byte_bpe):
    tok, _ = byte_bpe
    text = " ".join([MIXED] * 30)
    ids = tok.encode(text)
    assert "".join(_stream(tok, ids)) == text


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_file(bad)


def test_config_added_token_with_wrong_id_is_rejected(byte_bpe):
    _, directory = byte_bpe
    backend = Backend.from_file(f"{directory}/tokenizer.json")
    config = {"added_tokens_decoder": {"3": {"content": "<|im_end|>", "special": True}}}
    if backend.token_to_id("<|im_end|>") != 3:
        with pytest.raises(ModelLoadError, match="im_end"):
            Tokenizer(backend, config)


def test_unsplit_vocab_token_becomes_single_id_via_config():
    """A token that is in the vocab but not in the added vocabulary (as in some exports)
    still encodes as one id once tokenizer_config.json lists it."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(CORPUS, trainer)
    backend.add_tokens([AddedToken("<slice>", special=True)])
    slice_id = backend.token_to_id("<slice>")
    plain = Backend.from_str(backend.to_str())
    tok = Tokenizer(plain, {"added_tokens_decoder": {str(slice_id): {"content": "<slice>"}}})
    assert tok.encode("a<slice>b").count(slice_id) == 1
