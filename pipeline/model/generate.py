"""Text generation: `generate_tokens` (a reusable token generator) and `framecast generate`.

`generate_tokens` prefills the prompt on a cache in chunks, then decodes one token per step.
The next step is queued (`mx.async_eval`) before the current token is handed out, so Python
overhead overlaps device work; when the handed-out token turns out to be a stop token, that
extra step is trimmed off the cache again. Contract: after the generator finishes, the cache
holds the prompt and every yielded token except a final stop token.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import mlx.core as mx

from pipeline.errors import UserError

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
    from pipeline.model.sampling import make_sampler

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


def _prompt_text(model, prompt: str, chat: bool) -> str:
    if not chat:
        return prompt
    proc = getattr(model, "processor", None)
    if proc is None:  # a text-only GGUF: pick the template from its language-model family
        from pipeline.model.processor import MiniCPMVProcessor

        family = (getattr(model, "config", {}) or {}).get("model_type", "qwen2")
        proc = MiniCPMVProcessor(version={"qwen3": "4.5", "llama": "4.0", "minicpm": "4.0"}.get(family, "2.6"))
    return proc.chat_prompt([{"role": "user", "content": prompt}])


def generate_main(model: str, prompt: str, *, max_tokens: int = DEFAULT_MAX_TOKENS, temperature: float = 0.0,
                  seed: int = 0, chat: bool = True, mmproj: str | None = None, out=None, err=None) -> int:
    """Load `model`, stream the completion of `prompt` to stdout (text only), timings to stderr."""
    from pipeline.model.load import load_model
    from pipeline.model.sampling import make_sampler

    out = out or sys.stdout
    err = err or sys.stderr
    if max_tokens < 1:
        raise UserError(f"--max-tokens {max_tokens}: must be at least 1")
    if temperature < 0:
        raise UserError(f"--temp {temperature}: must be >= 0")
    t_load = time.perf_counter()
    m = load_model(model, mmproj=mmproj)
    t_load = time.perf_counter() - t_load
    mx.random.seed(seed)
    tok = m.tokenizer
    # As HF's `tokenizer(text)`: the post-processor adds a BOS where the vocabulary wants one
    # (Llama-style 4.0); a template that already wrote one does not get a second.
    ids = tok.encode(_prompt_text(m, prompt, chat), add_special=True)
    bos = getattr(tok, "bos_id", None)
    if bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos:
        ids = ids[1:]
    detok = tok.detokenizer()
    sampler = make_sampler(temperature, seed=seed)
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    t_first = None
    n = 0
    for token in generate_tokens(m, ids, max_tokens=max_tokens, sampler=sampler):
        if t_first is None:
            t_first = time.perf_counter()
        n += 1
        if token in tok.eos_ids:
            break
        out.write(detok.add(token))
        out.flush()
    out.write(detok.finalize() + "\n")
    out.flush()
    t_end = time.perf_counter()
    ttft = (t_first or t_end) - t0
    rate = (n - 1) / (t_end - t_first) if t_first and n > 1 and t_end > t_first else 0.0
    print(f"framecast: load {t_load:.2f}s | prompt {len(ids)} tokens, TTFT {ttft * 1e3:.0f} ms "
          f"({len(ids) / max(ttft, 1e-9):.0f} tok/s) | generated {n} tokens, {rate:.1f} tok/s | "
          f"peak memory {mx.get_peak_memory() / 1e6:.0f} MB", file=err, flush=True)
    return 0
