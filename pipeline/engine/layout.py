"""The streaming prompt layout: the team contract's ChatML, cut into spans of the KV cache.

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n     prefix, prefilled once
    {image placeholder}\\n                                            one per frame
    {text}\\n                                                         one per added text line
    {prompt}<|im_end|>\\n<|im_start|>assistant\\n[think block]        a turn: generate ...
    ...<|im_end|>\\n<|im_start|>user\\n                               ... then close and reopen

The demo model is trained on exactly this (`framecast.stages.demo_training.train` imports these
constants), token for token. A `Span` is a run of cached tokens that is kept or evicted whole.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant watching a live video. Answer briefly."
DEFAULT_ASSISTANT_PREFIX = "<|im_start|>assistant\n"  # a processor may add a think block
TURN_END = "<|im_end|>\n"
CLOSE_TEXT = "<|im_end|>\n<|im_start|>user\n"  # closes a turn and reopens the user's


@dataclass
class Span:
    """A run of cached tokens that is kept or evicted whole."""

    kind: str  # prefix | frame | text | turn
    length: int
    pts: float | None = None


def prefix_text(system_prompt: str) -> str:
    """The system turn and the opened user turn: the session's first span."""
    return f"<|im_start|>system\n{system_prompt}<|im_end|>\n<|im_start|>user\n"


def turn_text(prompt: str, assistant_prefix: str = DEFAULT_ASSISTANT_PREFIX) -> str:
    """What a turn prefills before decoding: the prompt, the user turn closed, the answer opened."""
    return prompt + TURN_END + assistant_prefix


def frame_text(placeholder: str) -> str:
    return placeholder + "\n"


def line_text(text: str) -> str:
    return text + "\n"
