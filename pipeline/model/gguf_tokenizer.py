"""Build a `tokenizers.Tokenizer` from a GGUF file's `tokenizer.ggml.*` metadata.

A llama.cpp GGUF carries its whole vocabulary (tokens, merges, token types, special ids, the
pre-tokenizer's name and the chat template), so a GGUF pair needs no other file. We rebuild
the tokenizer llama.cpp would run:

  - model: byte-level BPE (`tokenizer.ggml.model = "gpt2"`) over the stored tokens/merges;
  - pre-tokenizer: the regex list llama.cpp uses for the stored `tokenizer.ggml.pre` name,
    applied in sequence (each regex splits the previous pieces further), then the GPT-2
    byte-to-unicode mapping;
  - added tokens: CONTROL, USER_DEFINED and UNKNOWN tokens are matched verbatim in text
    (llama.cpp's `parse_special=True`), so `<|im_start|>` is one id.

Supported: `gpt2`-model vocabularies with pre-tokenizers gpt-2 (and its aliases), smollm
(and the starcoder family that shares its regex), qwen2 (Qwen2/2.5/3, MiniCPM-V 2.6 / o-2.6 /
4.5) and llama-bpe (Llama 3). Unsupported, with one error naming the value: SentencePiece
vocabularies (`tokenizer.ggml.model = "llama"`: Llama 1/2, Mistral v1, MiniCPM 1/2/4 as
converted by llama.cpp), WordPiece (`bert`), `t5`, `rwkv`, and every other pre-tokenizer
name (deepseek, falcon, chatglm, ...).
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import ModelLoadError

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
        "add_bos_token": bool(_field(meta, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(meta, "tokenizer.ggml.add_eos_token", False)),
        "chat_template": _field(meta, "tokenizer.chat_template"),
        "eos_token_ids": sorted(eos_ids),
    }


def build_tokenizer(meta: dict[str, Any], *, source: str = "gguf"):
    """A `tokenizers.Tokenizer` equivalent to llama.cpp's for this GGUF's vocabulary.

    `meta`: the GGUF key/value metadata (strings, numbers, lists). `source` names the file in
    errors. Raises ModelLoadError naming the unsupported model / pre-tokenizer.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _field(meta, "tokenizer.ggml.model")
    if kind is None:
        raise ModelLoadError(f"{source}: no tokenizer.ggml.model key (the GGUF carries no tokenizer)")
    if kind != "gpt2":
        raise ModelLoadError(
            f"{source}: tokenizer.ggml.model {kind!r} is not supported (only byte-level BPE 'gpt2'; "
            "SentencePiece 'llama', 'bert', 't5', 'rwkv' vocabularies are not)")
    pre = _field(meta, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ModelLoadError(
            f"{source}: tokenizer.ggml.pre {pre!r} is not supported "
            f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    regexes, ignore_merges = PRE_TOKENIZERS[pre]

    tokens = [str(t) for t in _as_list(meta.get("tokenizer.ggml.tokens"))]
    types = [int(t) for t in _as_list(meta.get("tokenizer.ggml.token_type"))] or [NORMAL] * len(tokens)
    merges = [str(m) for m in _as_list(meta.get("tokenizer.ggml.merges"))]
    if not tokens or len(types) != len(tokens):
        raise ModelLoadError(f"{source}: tokenizer.ggml.tokens/token_type are missing or differ in length")

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

    # Tokens matched verbatim before BPE. CONTROL/UNKNOWN are "special" (skippable on decode);
    # USER_DEFINED are plain text pieces that happen to be single tokens.
    added = [AddedToken(tokens[i], special=types[i] != USER_DEFINED, normalized=False)
             for i in range(len(tokens)) if types[i] in (CONTROL, USER_DEFINED, UNKNOWN) and tokens[i]]
    tok.add_tokens(added)

    cfg = tokenizer_config_from_gguf(meta)
    single, specials = "$A", []
    if cfg["add_bos_token"] and cfg["bos_token"] is not None:
        single = f"{cfg['bos_token']} {single}"
        specials.append((cfg["bos_token"], vocab[cfg["bos_token"]]))
    if cfg["add_eos_token"] and cfg["eos_token"] is not None:
        single = f"{single} {cfg['eos_token']}"
        specials.append((cfg["eos_token"], vocab[cfg["eos_token"]]))
    if specials:
        tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
    return tok
