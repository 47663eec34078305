"""Checks of the demo trainer's options, each a one-line answer naming the option, made before
any data is rendered (a minute on the GPU machine), and the seeds a run settles on."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from framecast.stages.demo_training.spec import (
    GAP_FRAMES, MAX_LOSS_WEIGHT, MAX_SEED, MAX_TEXT_ROWS, MIN_CLIP_TOKENS, SHORT_FRAMES, STREAMS_PER_DATA_SEED,
)


def settle_seeds(a) -> str | None:
    """Fill in --seed and --data-seed (see --help); one line naming what is wrong, or None.
    Runs written before the lineage kept seeds count as seed 0 (runs A-E all were)."""
    parent_seed = None
    if a.init_from:
        info = json.loads((Path(a.init_from) / "training.json").read_text()) \
            if (Path(a.init_from) / "training.json").is_file() else {}
        parent_seed = int(info.get("seed", 0))
    if a.seed is None:
        a.seed = parent_seed if parent_seed is not None else 0
    if not 0 <= a.seed < MAX_SEED:
        return f"--seed {a.seed}: from 0 to {MAX_SEED - 1}"
    if parent_seed is not None and a.seed != parent_seed:
        return (f"--seed {a.seed}: {a.init_from}'s tokenizer was fitted with seed {parent_seed}, and a model's "
                "runs keep one seed (--data-seed picks other streams)")
    if a.data_seed is None:
        used = [int(e.get("data_seed", e.get("seed", 0)) or 0) for e in a.parent_lineage]
        a.data_seed = max(used) + 1 if a.init_from else a.seed
    if not 0 <= a.data_seed < MAX_SEED:
        return f"--data-seed {a.data_seed}: from 0 to {MAX_SEED - 1}"
    return None


def shape_mismatch(theirs: dict, ours: dict) -> str | None:
    """The first config field that makes a model directory's weights unusable here, or None."""
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "query_num"):
        if theirs.get(key) != ours[key]:
            return f"{key} is {theirs.get(key)!r}, this model's is {ours[key]!r} (another size: --tiny?)"
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "patch_size", "image_size"):
        if theirs.get("vision_config", {}).get(key) != ours["vision_config"][key]:
            return (f"vision_config.{key} is {theirs.get('vision_config', {}).get(key)!r}, "
                    f"this model's is {ours['vision_config'][key]!r}")
    return None


def check_args(a) -> str | None:
    """One line naming the first bad option, or None: checked before the data (a minute on the
    GPU machine) is generated."""
    for name in ("time_budget", "lr", "vision_lr_scale"):
        v = getattr(a, name)
        if not 0 < v < math.inf:  # NaN fails too
            return f"--{name.replace('_', '-')} {v}: must be above 0"
    if a.stop_after is not None and not 0 < a.stop_after < math.inf:
        return f"--stop-after {a.stop_after}: must be above 0 (seconds)"
    if a.max_steps < 1:
        return f"--max-steps {a.max_steps}: must be at least 1"
    if a.max_tokens < MIN_CLIP_TOKENS:  # the session budget it becomes: prefix, a frame, a reply
        return f"--max-tokens {a.max_tokens}: at least {MIN_CLIP_TOKENS} (the session budget the model ships with)"
    for name in ("streams", "frames", "max_clip", "batch", "workers", "max_tokens", "log_every", "text_rows"):
        v = getattr(a, name)
        if v < 1:
            return f"--{name.replace('_', '-')} {v}: must be at least 1"
    if a.refresh_workers is not None and a.refresh_workers < 1:
        return f"--refresh-workers {a.refresh_workers}: must be at least 1"
    if a.refresh_workers is not None and not a.refresh:
        return f"--refresh-workers {a.refresh_workers}: only with --refresh (it sets that option's renderers)"
    cpus = os.cpu_count() or 1
    for name in ("workers", "refresh_workers"):  # each a spawned process (and a CUDA context on the GPU machine)
        v = getattr(a, name)
        if v is not None and v > cpus:
            return f"--{name.replace('_', '-')} {v}: at most {cpus} (this machine's CPUs)"
    for name in ("motion_weight", "text_weight"):
        v = getattr(a, name)
        if not 0 <= v <= MAX_LOSS_WEIGHT:  # NaN and inf fail too
            return f"--{name.replace('_', '-')} {v}: must be from 0 to {MAX_LOSS_WEIGHT:g}"
    if a.text_rows > MAX_TEXT_ROWS:
        return f"--text-rows {a.text_rows}: at most {MAX_TEXT_ROWS} a step"
    if a.streams > STREAMS_PER_DATA_SEED:  # the next data seed's streams would be the same ones
        return f"--streams {a.streams}: at most {STREAMS_PER_DATA_SEED} (one data seed's block of stream seeds)"

    for name in ("vision_phase", "motion_phase", "gap_phase", "short_phase", "gap_mix"):
        v = getattr(a, name)
        if not 0.0 <= v <= 1.0:
            return f"--{name.replace('_', '-')} {v}: a share of the run, from 0 to 1"
    if a.frames < max(SHORT_FRAMES, a.max_clip):  # clips are windows of a stream's frames
        return f"--frames {a.frames}: each stream needs at least --max-clip ({a.max_clip}) and {SHORT_FRAMES} frames"
    if a.vision_phase + a.motion_phase + a.gap_phase + a.short_phase > 1.0:
        return (f"--vision-phase {a.vision_phase} + --motion-phase {a.motion_phase} + --gap-phase {a.gap_phase} "
                f"+ --short-phase {a.short_phase} is more than the whole run (1)")
    if a.motion_phase > 0 and a.motion_weight == 0:
        return "--motion-phase trains the motion probe alone: it needs --motion-weight above 0"
    for name in ("gap_phase", "gap_mix"):
        if getattr(a, name) > 0 and a.frames <= GAP_FRAMES[1]:
            return f"--frames {a.frames}: a --{name.replace('_', '-')} clip needs more than {GAP_FRAMES[1]} frames per stream"
    if a.deadline is not None and a.deadline <= time.time():
        return f"--deadline {a.deadline:.0f} is already past (now {time.time():.0f}, unix seconds)"
    if a.init_from is not None:
        init = Path(a.init_from)
        for f in ("config.json", "model.safetensors"):
            if not (init / f).is_file():
                return f"--init-from {init}: no {f} there (a model directory this trainer wrote)"
    for flag, path in (("--out", a.out), ("--ckpt", a.ckpt)):
        problem = directory_problem(Path(path)) if path is not None else None
        if problem:
            return f"{flag} {path}: {problem}"
    return None


def directory_problem(path: Path) -> str | None:
    """Why `path` cannot be (or become) a directory this process writes into, or None."""
    if path.exists():
        if not path.is_dir():
            return "is a file, not a directory"
        return None if os.access(path, os.W_OK | os.X_OK) else "is not writable"
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot be made: {parent} is a file"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be made: {parent} is not writable"
    return None
