"""Tokenizer over `tokenizers` (tokenizer.json + tokenizer_config.json) and streaming detokenizer.

Special tokens written in text (`<|im_start|>`, `<image>`, `<unk>`, ...) encode as single ids:
every token the config lists in `added_tokens_decoder` is registered with the backend's added
vocabulary, which is split out of the text before the model's pre-tokenizer runs.
Chat templates and prompt layout are the processor's job, not this module's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from framecast.errors import ModelLoadError

# Turn terminators of the supported chat models; each counts as EOS when the vocab has it.
TERMINATORS = ("<|im_end|>", "<|endoftext|>", "</s>")


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    def __init__(self, backend: Backend, config: dict[str, Any] | None = None):
        self.backend = backend
        self.config = dict(config or {})
        self._register_added_tokens()

        self.bos_id = self._special_id("bos_token")
        self.pad_id = self._special_id("pad_token")
        self.unk_id = self._special_id("unk_token")
        self.im_start_id = self.token_id("<|im_start|>")
        self.im_end_id = self.token_id("<|im_end|>")
        self.eos_ids: set[int] = self._collect_eos_ids()

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path, config: dict[str, Any] | None = None) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"{path}: tokenizer file not found")
        try:
            backend = Backend.from_file(str(path))
        except Exception as exc:  # the backend raises a bare Exception on bad JSON
            raise ModelLoadError(f"{path}: not a valid tokenizer.json ({exc})") from None
        return cls(backend, config)

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        """tokenizer.json plus, when present, tokenizer_config.json and generation_config.json
        (whose `eos_token_id` adds stop ids)."""
        directory = Path(directory)
        config = _read_json(directory / "tokenizer_config.json")
        generation = _read_json(directory / "generation_config.json")
        if "eos_token_id" in generation:
            config.setdefault("eos_token_ids", generation["eos_token_id"])
        return cls.from_file(directory / "tokenizer.json", config)

    def _register_added_tokens(self) -> None:
        """Make every configured added token split out of text as one id (never a new id)."""
        decoder = self.config.get("added_tokens_decoder") or {}
        wanted = []
        for id_text, entry in decoder.items():
            content = _token_text(entry)
            if not content:
                continue
            if self.backend.token_to_id(content) != int(id_text):
                raise ModelLoadError(
                    f"tokenizer_config.json: added token {content!r} has id {id_text} in the "
                    f"config but {self.backend.token_to_id(content)} in tokenizer.json"
                )
            special = bool(entry.get("special", True)) if isinstance(entry, dict) else True
            wanted.append(AddedToken(content, special=special, normalized=False))
        if wanted:
            # Tokens already in the vocabulary keep their ids; this only marks them for splitting.
            self.backend.add_tokens(wanted)

    def _special_id(self, key: str) -> int | None:
        text = _token_text(self.config.get(key))
        return self.token_id(text) if text else None

    def _collect_eos_ids(self) -> set[int]:
        ids: set[int] = set()
        configured = self.config.get("eos_token_ids", self.config.get("eos_token_id"))
        if isinstance(configured, int):
            ids.add(configured)
        elif isinstance(configured, (list, tuple)):
            ids.update(int(i) for i in configured)
        eos = self._special_id("eos_token")
        if eos is not None:
            ids.add(eos)
        ids.update(i for i in map(self.token_id, TERMINATORS) if i is not None)
        return ids

    # -- API -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        """Id of one token string, None if the vocabulary lacks it."""
        return self.backend.token_to_id(token)

    def encode(self, text: str, *, add_special: bool = False) -> list[int]:
        """Ids for `text`; special-token strings in it become single ids. `add_special` runs
        the tokenizer's post-processor (e.g. a BOS for Llama-style vocabularies)."""
        return self.backend.encode(text, add_special_tokens=add_special).ids

    def decode(self, ids, *, skip_special: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def detokenizer(self, *, skip_special: bool = True) -> StreamingDetokenizer:
        return StreamingDetokenizer(self, skip_special=skip_special)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_ids={sorted(self.eos_ids)})"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from None


class StreamingDetokenizer:
    """Text deltas from ids added one at a time, never half a UTF-8 character.

    Decodes a short window of recent ids (so tokenizers that drop a leading space when a
    token is decoded alone still get it right) and holds text back while the window ends in
    U+FFFD, i.e. in the middle of a multi-byte character split across byte-level tokens.
    Work per token is bounded by the window, not the generation length.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.reset()

    def reset(self) -> None:
        self.ids: list[int] = []
        self.text = ""  # everything emitted so far
        self._prefix = 0  # window start: context ids already emitted
        self._read = 0  # ids before this are fully emitted

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special=self.skip_special)

    def add(self, token_id: int) -> str:
        """Add one id; returns the newly complete text (often "")."""
        self.ids.append(int(token_id))
        context = self._decode(self._prefix, self._read)
        window = self._decode(self._prefix, len(self.ids))
        if len(window) <= len(context) or window.endswith("\ufffd"):
            return ""  # nothing new yet, or a character still incomplete
        delta = window[len(context) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta

    def add_many(self, token_ids) -> str:
        return "".join(self.add(t) for t in token_ids)

    def finalize(self) -> str:
        """Flush what is held back (an incomplete character at the very end stays U+FFFD)."""
        context = self._decode(self._prefix, self._read)
        window = self._decode(self._prefix, len(self.ids))
        delta = window[len(context) :] if len(window) > len(context) else ""
        self._prefix = self._read = len(self.ids)
        self.text += delta
        return delta
