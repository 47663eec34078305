"""Save and restore a session: its KV cache, spans and counters in one safetensors file.

The file holds `cache.<layer>.<i>` arrays (each layer's `state`) and, in the metadata key
`framecast_session`, JSON with the format tag, a fingerprint of the model (layers, KV heads,
head_dim, kv_bits and a digest of the weights: a cache only fits the model that wrote it), the
system prompt and the spans.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from framecast.engine.layout import Span
from framecast.errors import UserError

SAVE_FORMAT = "framecast-session-1"


def fingerprint(lm, kv_bits: int | None) -> dict[str, Any]:
    """What a saved cache must match: the cache's shape, and the weights themselves (a digest of
    the first two rows of the token embedding: two checkpoints of one shape, e.g. a retrained demo
    model, would otherwise accept each other's caches and answer from the wrong model's keys)."""
    attn = lm.layers[0].self_attn
    rows = np.array(lm.model.embed_tokens.weight[:2].astype(mx.float32))  # [2, D] (packed ints if quantised)
    return {"layers": len(lm.layers), "n_kv": attn.n_kv_heads, "head_dim": attn.head_dim,
            "kv_bits": kv_bits or 0, "weights": hashlib.sha256(rows.tobytes()).hexdigest()[:16]}


def fingerprint_difference(saved: dict[str, Any], ours: dict[str, Any]) -> str:
    """What keeps a saved cache from this session, in words (the first difference)."""
    def bits(v: Any) -> str:
        return f"kv_bits {v}" if v else "no KV quantisation"

    if saved.get("kv_bits") != ours.get("kv_bits") and all(saved.get(k) == ours.get(k) for k in ours if k != "kv_bits"):
        return f"saved with {bits(saved.get('kv_bits'))}, this run uses {bits(ours.get('kv_bits'))} (session.kv_bits)"
    for key in ("layers", "n_kv", "head_dim", "weights"):
        if saved.get(key) != ours.get(key):
            return (f"saved for a different model ({key} {saved.get(key)!r}, this model's {ours.get(key)!r})")
    return f"saved for a different model or kv_bits ({saved})"


def save_session(path: str | Path, cache: list, spans: list[Span], *, fingerprint: dict[str, Any],
                 system_prompt: str, evicted_total: int, frames_added: int) -> Path:
    path = Path(path)
    arrays = {f"cache.{i}.{j}": a for i, c in enumerate(cache) for j, a in enumerate(c.state)}
    meta = {
        "format": SAVE_FORMAT,
        "fingerprint": fingerprint,
        "system_prompt": system_prompt,
        "spans": [asdict(s) for s in spans],
        "evicted_total": evicted_total,
        "frames_added": frames_added,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # MLX adds `.safetensors` to a name without it: write beside, then put the file where it was
    # named (in one step: a run stopped mid-save leaves the previous state whole).
    partial = path.with_name(path.name + ".partial.safetensors")
    mx.save_safetensors(str(partial), arrays, metadata={"framecast_session": json.dumps(meta)})
    os.replace(partial, path)
    return path


def load_session(path: str | Path, new_cache: list, *, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Fill `new_cache` (fresh, of the session's kind) from `path`; returns the metadata with
    `spans` as `Span`s. UserError (one line naming the file) for anything that does not fit."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: session file not found")
    if zipfile.is_zipfile(path):  # what --save-session writes
        raise UserError(f"{path}: a --save-session archive, not a session state file: continue it with "
                        "--resume") from None
    try:
        arrays, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception:  # mlx says RuntimeError for anything it cannot parse
        raise UserError(f"{path}: not a framecast session file (not readable as safetensors)") from None
    try:
        meta = json.loads(metadata["framecast_session"])
    except Exception:
        raise UserError(f"{path}: not a framecast session file (no framecast_session metadata)") from None
    if meta.get("format") != SAVE_FORMAT:
        raise UserError(f"{path}: unsupported session format {meta.get('format')!r}")
    if meta["fingerprint"] != fingerprint:
        raise UserError(f"{path}: {fingerprint_difference(meta['fingerprint'], fingerprint)}")
    for i, c in enumerate(new_cache):
        n = sum(1 for k in arrays if k.startswith(f"cache.{i}."))
        c.state = tuple(arrays[f"cache.{i}.{j}"] for j in range(n))
    meta["spans"] = [Span(**s) for s in meta["spans"]]
    return meta
