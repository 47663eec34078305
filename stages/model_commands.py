"""The `generate` and `convert` subcommands (model tools; no video involved)."""

from __future__ import annotations

import sys
import time

import mlx.core as mx

from framecast.engine.generate import DEFAULT_MAX_TOKENS, generate_tokens
from framecast.errors import UserError
from framecast.model.convert import GROUP_SIZE, convert_model
from framecast.model.protocol import TextModel


def convert_main(src: str, out: str, *, mmproj: str | None = None, bits: int | None = None,
                 dtype: str | None = None) -> int:
    t0 = time.perf_counter()
    out_dir, size_mb, n_quant = convert_model(src, out, mmproj=mmproj, bits=bits, dtype=dtype)
    quant = f", {n_quant} linear layers at {bits} bits (group {GROUP_SIZE})" if bits else ""
    print(f"framecast: wrote {out_dir} ({size_mb:.1f} MB{quant}) in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)
    return 0


def _prompt_text(model: TextModel, prompt: str, chat: bool) -> str:
    return model.chat_prompt([{"role": "user", "content": prompt}]) if chat else prompt


def generate_main(model: str, prompt: str, *, max_tokens: int = DEFAULT_MAX_TOKENS, temperature: float = 0.0,
                  seed: int = 0, chat: bool = True, mmproj: str | None = None, out=None, err=None) -> int:
    """Load `model`, stream the completion of `prompt` to stdout (text only), timings to stderr."""
    from framecast.model.load import load_model
    from framecast.engine.sampling import make_sampler

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
