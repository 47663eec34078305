"""Build a `tokenizers.Tokenizer` from a GGUF file's `tokenizer.ggml.*` metadata.

A llama.cpp GGUF carries its whole vocabulary (tokens, merges or scores, token types, special
ids, the pre-tokenizer's name and the chat template), so a GGUF pair needs no other file. We
rebuild the tokenizer llama.cpp would run:

  - `tokenizer.ggml.model = "gpt2"` (byte-level BPE): BPE over the stored tokens/merges; the
    pre-tokenizer is the regex list llama.cpp uses for the stored `tokenizer.ggml.pre` name,
    applied in sequence (each regex splits the previous pieces further), then the GPT-2
    byte-to-unicode mapping;
  - `tokenizer.ggml.model = "llama"` (SentencePiece BPE with byte fallback): llama.cpp merges
    the adjacent pair whose merged piece has the highest score, leftmost first. A BPE whose
    merge ranks follow the merged piece's score makes the same choices, so every split of every
    scored piece into two vocabulary pieces becomes a merge, ordered by that score; characters
    outside the vocabulary fall back to `<0xXX>` byte tokens. Spaces become `▁` and each text
    run (the start, and after every special token, as llama.cpp does) gets a `▁` prefix unless
    `tokenizer.ggml.add_space_prefix` is false;
  - added tokens: CONTROL, USER_DEFINED and UNKNOWN tokens are matched verbatim in text
    (llama.cpp's `parse_special=True`), so `<|im_start|>` is one id.

Supported: `gpt2` vocabularies with pre-tokenizers gpt-2 (and its aliases), smollm (and the
starcoder family that shares its regex), qwen2 (Qwen2/2.5/3, MiniCPM-V 2.6 / o-2.6 / 4.5) and
llama-bpe (Llama 3); `llama` (SentencePiece) vocabularies (Llama 2, MiniCPM). Unsupported, with
one error naming the value: WordPiece (`bert`), `t5` (Unigram), `rwkv`, `plamo2`, and every
other pre-tokenizer name (deepseek, falcon, chatglm, ...).
"""

from __future__ import annotations

from typing import Any

from framecast.errors import ModelLoadError

# llama.cpp token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The regexes llama.cpp's llama-vocab.cpp applies for each pre-tokenizer family.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3 = _QWEN2.replace(r"|\p{N}|", r"|\p{N}{1,3}|")

# pre-tokenizer name -> (regex list, ignore_merges). `ignore_merges`: llama.cpp (like
# tiktoken) takes a whole pre-token that is itself in the vocabulary without merging it.
PRE_TOKENIZERS: dict[str, tuple[list[str], bool]] = {
    **{name: ([_GPT2], False) for name in ("gpt-2", "phi-2", "mpt", "olmo", "jais")},
    **{name: ([r"\p{N}", _GPT2], False)
       for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone")},
    **{name: ([_QWEN2], False)
       for name in ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "hunyuan")},
    **{name: ([_LLAMA3], True)
       for name in ("llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral")},
}


def _field(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    value = meta.get(key, default)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / mx scalars
        value = value.item()
    return value


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if hasattr(value, "tolist"):
        return value.tolist()
    return list(value)


def tokenizer_config_from_gguf(meta: dict[str, Any]) -> dict[str, Any]:
    """HF `tokenizer_config.json`-style fields (special tokens, chat template, BOS/EOS use)."""
    tokens = _as_list(meta.get("tokenizer.ggml.tokens"))

    def token(key: str) -> str | None:
        idx = _field(meta, f"tokenizer.ggml.{key}_token_id")
        return tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None

    eos_ids = {int(_field(meta, f"tokenizer.ggml.{k}_token_id"))
               for k in ("eos", "eot", "eom") if _field(meta, f"tokenizer.ggml.{k}_token_id") is not None}
    # Chat models end a turn with <|im_end|>; llama.cpp marks it end-of-generation by name too.
    for name in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"):
        if name in tokens:
            eos_ids.add(tokens.index(name))
    return {
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        # llama.cpp's defaults when the key is absent: SentencePiece vocabularies add BOS.
        "add_bos_token": bool(_field(meta, "tokenizer.ggml.add_bos_token",
                                     _field(meta, "tokenizer.ggml.model") == "llama")),
        "add_eos_token": bool(_field(meta, "tokenizer.ggml.add_eos_token", False)),
        "chat_template": _field(meta, "tokenizer.chat_template"),
        "eos_token_ids": sorted(eos_ids),
    }


def build_tokenizer(meta: dict[str, Any], *, source: str = "gguf"):
    """A `tokenizers.Tokenizer` equivalent to llama.cpp's for this GGUF's vocabulary.

    `meta`: the GGUF key/value metadata (strings, numbers, lists). `source` names the file in
    errors. Raises ModelLoadError naming the unsupported model / pre-tokenizer.
    """
    from tokenizers import AddedToken, processors

    kind = _field(meta, "tokenizer.ggml.model")
    if kind is None:
        raise ModelLoadError(f"{source}: no tokenizer.ggml.model key (the GGUF carries no tokenizer)")
    if kind not in ("gpt2", "llama"):
        raise ModelLoadError(
            f"{source}: tokenizer.ggml.model {kind!r} is not supported (byte-level BPE 'gpt2' and "
            "SentencePiece BPE 'llama' are; 'bert', 't5', 'rwkv' are not)")
    tokens = [str(t) for t in _as_list(meta.get("tokenizer.ggml.tokens"))]
    types = [int(t) for t in _as_list(meta.get("tokenizer.ggml.token_type"))] or [NORMAL] * len(tokens)
    if not tokens or len(types) != len(tokens):
        raise ModelLoadError(f"{source}: tokenizer.ggml.tokens/token_type are missing or differ in length")
    if kind == "llama":
        tok = _sentencepiece_bpe(meta, tokens, types, source)
    else:
        tok = _byte_level_bpe(meta, tokens, types, source)

    # Tokens matched verbatim before BPE. CONTROL/UNKNOWN are "special" (skippable on decode);
    # USER_DEFINED are plain text pieces that happen to be single tokens.
    added = [AddedToken(tokens[i], special=types[i] != USER_DEFINED, normalized=False)
             for i in range(len(tokens)) if types[i] in (CONTROL, USER_DEFINED, UNKNOWN) and tokens[i]]
    tok.add_tokens(added)

    cfg = tokenizer_config_from_gguf(meta)
    single, specials = "$A", []
    for which, key in (("bos", "add_bos_token"), ("eos", "add_eos_token")):
        name = cfg[f"{which}_token"]
        if cfg[key] and name is not None:
            single = f"{name} {single}" if which == "bos" else f"{single} {name}"
            specials.append((name, tok.token_to_id(name)))
    if specials:
        tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
    return tok


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str], types: list[int], source: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = _field(meta, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ModelLoadError(
            f"{source}: tokenizer.ggml.pre {pre!r} is not supported "
            f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    regexes, ignore_merges = PRE_TOKENIZERS[pre]
    merges = [str(m) for m in _as_list(meta.get("tokenizer.ggml.merges"))]

    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # a duplicated piece keeps its first id (as llama.cpp's lookup)
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")  # byte-level pieces never contain a raw space
        if not sep:
            raise ModelLoadError(f"{source}: tokenizer.ggml.merges entry {m!r} is not 'left right'")
        pairs.append((left, right))

    tok = Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False,
                               ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(meta: dict[str, Any], tokens: list[str], types: list[int], source: str):
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = [float(x) for x in _as_list(meta.get("tokenizer.ggml.scores"))]
    if len(scores) != len(tokens):
        raise ModelLoadError(f"{source}: tokenizer.ggml.scores is missing or differs in length from the tokens")
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    # Every split of a mergeable piece into two vocabulary pieces, ranked by the piece's score
    # (highest first), ties by id: the order llama.cpp's bigram queue would merge them in.
    ranked = []
    for i, piece in enumerate(tokens):
        if types[i] not in (NORMAL, USER_DEFINED) or len(piece) < 2 or vocab.get(piece) != i:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, left, right))
    ranked.sort()
    merges = [(left, right) for _s, _i, left, right in ranked]
    unk_id = _field(meta, "tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Replace(" ", "\u2581")]
    if bool(_field(meta, "tokenizer.ggml.add_space_prefix", True)):
        steps.insert(0, normalizers.Prepend("\u2581"))  # each run between special tokens
    tok.normalizer = normalizers.Sequence(steps)
    # Decoding drops the one space the prefix added at the start (as SentencePiece does).
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok
