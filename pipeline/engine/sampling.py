"""Next-token sampling: greedy, temperature, top-k, top-p, repetition penalty; seeded.

The filters follow transformers' semantics and order (repetition penalty, then temperature,
then top-k, then top-p), so a reference run with the same settings keeps the same candidate
set. Everything stays on the device: no host sync until the caller reads the token.
"""

from __future__ import annotations

import mlx.core as mx

DEFAULT_TEMPERATURE = 0.0  # 0 = greedy
DEFAULT_REPETITION_CONTEXT = None  # tokens of history the penalty looks at; None = all


class Sampler:
    """Callable: `sampler(logits, history) -> token ids [B]`.

    `logits` is [B, V] (or [B, T, V]: the last position is used). `history` is the token ids
    seen so far (for the repetition penalty), a list or a [B, N] / [N] array; B > 1 with a
    plain list applies the same history to every row. A `seed` makes the sequence of draws
    reproducible and independent of MLX's global random state.
    """

    def __init__(
        self,
        *,
        temperature: float = DEFAULT_TEMPERATURE,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        repetition_context: int | None = DEFAULT_REPETITION_CONTEXT,
        seed: int | None = None,
    ):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if repetition_penalty is not None and repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p if top_p is not None and top_p < 1.0 else None
        self.repetition_penalty = repetition_penalty if repetition_penalty != 1.0 else None
        self.repetition_context = repetition_context
        self._key = mx.random.key(seed) if seed is not None else None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    # -- logits processing -------------------------------------------------------------------

    def apply_repetition_penalty(self, logits: mx.array, history) -> mx.array:
        """CTRL-style: seen tokens' logits are divided by the penalty if positive, else multiplied."""
        if self.repetition_penalty is None or history is None or len(history) == 0:
            return logits
        seen = history if isinstance(history, mx.array) else mx.array(list(history), dtype=mx.int32)
        if self.repetition_context is not None:
            seen = seen[..., -self.repetition_context :]
        if seen.ndim == 1:
            seen = mx.broadcast_to(seen[None], (logits.shape[0], seen.shape[0]))
        picked = mx.take_along_axis(logits, seen, axis=-1)  # [B, N]
        p = self.repetition_penalty
        picked = mx.where(picked < 0, picked * p, picked / p)
        # Repeated ids write the same value, so duplicates in `seen` are harmless.
        return mx.put_along_axis(logits, seen, picked, axis=-1)

    def filter_logits(self, logits: mx.array) -> mx.array:
        """Temperature, then top-k, then top-p; removed candidates become -inf.  [B, V]"""
        logits = logits / self.temperature if self.temperature not in (0, 1) else logits
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = mx.min(mx.topk(logits, self.top_k, axis=-1), axis=-1, keepdims=True)
            logits = mx.where(logits < kth, -mx.inf, logits)
        if self.top_p is not None:
            order = mx.argsort(logits, axis=-1)  # ascending
            sorted_probs = mx.take_along_axis(mx.softmax(logits, axis=-1), order, axis=-1)
            # Drop the low tail whose total mass is <= 1 - top_p; the top token always stays.
            drop_sorted = mx.cumsum(sorted_probs, axis=-1) <= (1 - self.top_p)
            drop_sorted[..., -1] = False
            drop = mx.put_along_axis(mx.zeros(logits.shape, dtype=mx.bool_), order, drop_sorted, axis=-1)
            logits = mx.where(drop, -mx.inf, logits)
        return logits

    def process(self, logits: mx.array, history=None) -> mx.array:
        """The logits actually sampled from (greedy: only the repetition penalty applies)."""
        if logits.ndim == 3:
            logits = logits[:, -1, :]  # [B, T, V] -> [B, V]
        logits = self.apply_repetition_penalty(logits.astype(mx.float32), history)
        return logits if self.greedy else self.filter_logits(logits)

    # -- drawing -----------------------------------------------------------------------------

    def _next_key(self):
        if self._key is None:
            return None  # MLX's global generator (seeded by the caller, if at all)
        self._key, key = mx.random.split(self._key)
        return key

    def sample(self, logits: mx.array, history=None, *, return_logprobs: bool = False):
        """Token ids [B] (uint32); with `return_logprobs`, also each chosen token's log
        probability under the model's own distribution (before any penalty or filter)."""
        squeeze = logits.ndim == 1
        raw = logits[None] if squeeze else (logits[:, -1, :] if logits.ndim == 3 else logits)
        processed = self.process(raw, history)
        if self.greedy:
            tokens = mx.argmax(processed, axis=-1)
        else:
            tokens = mx.random.categorical(processed, axis=-1, key=self._next_key())
        tokens = tokens.astype(mx.uint32)
        if squeeze:
            tokens = tokens[0]
        if not return_logprobs:
            return tokens
        raw = raw.astype(mx.float32)
        logprobs = raw - mx.logsumexp(raw, axis=-1, keepdims=True)
        chosen = mx.take_along_axis(logprobs, tokens.reshape(-1, 1).astype(mx.int32), axis=-1)[:, 0]
        return tokens, (chosen[0] if squeeze else chosen)

    __call__ = sample

    def __repr__(self) -> str:
        return (
            f"Sampler(temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p}, "
            f"repetition_penalty={self.repetition_penalty})"
        )


def make_sampler(
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    *,
    repetition_context: int | None = DEFAULT_REPETITION_CONTEXT,
    seed: int | None = None,
) -> Sampler:
    """A `Sampler` from the narration settings; temperature 0 is greedy."""
    return Sampler(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        repetition_context=repetition_context,
        seed=seed,
    )

