"""Text generation: `generate_tokens`, the one token loop (the `framecast generate` command is in
`framecast.stages.model_commands`).

`generate_tokens` prefills the prompt on a cache in chunks, then decodes one token per step.
The next step is queued (`mx.async_eval`) before the current token is handed out, so Python
overhead overlaps device work; when the handed-out token turns out to be a stop token, that
extra step is trimmed off the cache again. Contract: after the generator finishes, the cache
holds the prompt and every yielded token except a final stop token.
"""

from __future__ import annotations

from collections.abc import Iterator

import mlx.core as mx

from framecast.errors import UserError

PREFILL_STEP = 512  # prompt tokens per forward call during prefill
DEFAULT_MAX_TOKENS = 64


def _lm_step(model):
    """(ids [1,T] | None, cache, embeddings | None) -> logits, for a MiniCPMV or a bare LM holder."""
    lm = getattr(model, "language_model", model)

    def step(ids, cache, embeddings=None):
        if embeddings is not None:
            return lm(None, cache=cache, input_embeddings=embeddings)
        return lm(ids, cache=cache)

    return step


def generate_tokens(model, prompt_ids: list[int], *, max_tokens: int = DEFAULT_MAX_TOKENS, sampler=None,
                    cache: list | None = None, images=(), stop_ids: set[int] | None = None,
                    prefill_step: int = PREFILL_STEP) -> Iterator[int]:
    """Yield generated token ids (the last may be a stop token) for `prompt_ids` on `cache`.

    `images`: ImageFeatures whose placeholders are in the prompt (MiniCPMV only).
    `stop_ids`: default the tokenizer's eos ids. `sampler`: default greedy.
    """
    from framecast.engine.sampling import make_sampler

    if not prompt_ids:
        raise UserError("generate: the prompt is empty")
    sampler = sampler or make_sampler(0.0)
    cache = cache if cache is not None else model.make_cache()
    stops = stop_ids if stop_ids is not None else set(getattr(model.tokenizer, "eos_ids", set()))
    step = _lm_step(model)
    history = list(prompt_ids)

    ids = mx.array([prompt_ids])
    embeddings = model.embed(ids, images) if images else None  # [1, T, D]
    for start in range(0, len(prompt_ids) - 1, prefill_step):  # all but the last token
        end = min(start + prefill_step, len(prompt_ids) - 1)
        step(ids[:, start:end], cache, None if embeddings is None else embeddings[:, start:end])
        mx.eval([c.state for c in cache])  # the chunk's logits are never needed: not computed
    logits = step(ids[:, -1:], cache, None if embeddings is None else embeddings[:, -1:])
    y = sampler(logits[:, -1, :], history)
    mx.async_eval(y)
    for n in range(max_tokens):
        queued = n + 1 < max_tokens
        if queued:  # queue the next step before looking at y (overlaps device and host)
            next_logits = step(y.reshape(1, 1), cache)
        token = int(y.item())
        history.append(token)
        if queued:
            y_next = sampler(next_logits[:, -1, :], history)
            mx.async_eval(y_next)
        if token in stops:
            if queued:
                for c in cache:
                    c.trim(1)  # the stop token was fed ahead of time: take it back out
            yield token
            return
        yield token
        if queued:
            y = y_next
