"""What a demo-training run reads and writes: the checkpoint it resumes from, the exported model
directory (HF layout, `training.json` with the recipe, the log and the lineage), and the seed a
resumed `--refresh` run renders from."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from framecast.stages.demo_training.spec import STREAMS_PER_DATA_SEED, write_tokenizer_files
from framecast.stages.demo_training.heads import DemoVLM, hf_weights


def save_checkpoint(path: Path, model: DemoVLM, opt, state: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    mx.save_safetensors(str(path / "optimizer.safetensors"),
                        {k: v for k, v in tree_flatten(opt.state) if isinstance(v, mx.array)})
    (path / "state.json").write_text(json.dumps(state))


def load_checkpoint(path: Path, model: DemoVLM, opt) -> dict | None:
    if not (path / "state.json").is_file():
        return None
    model.load_weights(list(mx.load(str(path / "model.safetensors")).items()), strict=True)
    if (path / "optimizer.safetensors").is_file():
        opt.state = tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items()))
    return json.loads((path / "state.json").read_text())


def export(out: Path, model: DemoVLM, a, state: dict, n_params: int, t_data: float, tok, cfg: dict) -> None:
    """The shipped files: config, tokenizer and processor files, float16 HF weights and
    training.json (recipe, time, the whole log). All are written to `out/.partial/` first, then
    each replaces its old self, so a crash never leaves a config of one model beside the
    weights of another (`--out pipeline/demo_model` overwrites the shipped model)."""
    staging = out / ".partial"
    staging.mkdir(parents=True, exist_ok=True)
    write_tokenizer_files(staging, tok, cfg)
    mx.save_safetensors(str(staging / "model.safetensors"), hf_weights(model, mx.float16), metadata={"format": "pt"})
    (staging / "training.json").write_text(json.dumps({
        "seed": a.seed, "data_seed": a.data_seed, "steps": state["step"], "batch": a.batch, "streams": a.streams, "frames": a.frames,
        "max_clip": a.max_clip, "max_tokens": a.max_tokens, "lr": a.lr, "vision_lr_scale": a.vision_lr_scale,
        "codec": a.codec, "init_from": a.init_from, "vision_phase": a.vision_phase,
        "motion_phase": a.motion_phase, "gap_phase": a.gap_phase,
        "gap_mix": a.gap_mix, "augment": a.augment, "refresh": a.refresh,
        "streams_refreshed": state.get("refreshed", 0),
        "short_phase": a.short_phase, "motion_weight": a.motion_weight, "text_weight": a.text_weight,
        "text_rows": a.text_rows,
        "params": n_params, "data_s": round(t_data, 1), "train_s": round(state["train_s"], 1),
        "time_budget": a.time_budget, "device": str(mx.default_device()), "command": a.command,
        # every run this model descends from (its --init-from chain), this one last
        "lineage": a.parent_lineage + [{"run": str(out), "command": a.command, "init_from": a.init_from,
                                        "seed": a.seed, "data_seed": a.data_seed, "steps": state["step"], "train_s": round(state["train_s"], 1),
                                        "data_s": round(t_data, 1), "device": str(mx.default_device())}],
        "history": state["history"],
    }, indent=1) + "\n")
    for f in sorted(staging.iterdir()):
        os.replace(f, out / f.name)
    staging.rmdir()


def resumed_next_seed(a, block: int) -> int:
    """--refresh: the first seed a run renders, `block` or, when --ckpt holds a stopped run of
    the same data seed, the seed after every one that run started."""
    state = Path(a.ckpt) / "state.json" if a.ckpt else None
    if state is None or not state.is_file():
        return block
    seed = json.loads(state.read_text()).get("next_seed")
    return seed if isinstance(seed, int) and block <= seed < block + STREAMS_PER_DATA_SEED else block


def parent_lineage(directory: Path) -> list[dict]:
    """The runs a model directory descends from, from its training.json (read once, before this
    run's exports can overwrite it): its `lineage`, or one entry for a file written without one."""
    f = directory / "training.json"
    if not f.is_file():
        return [{"run": str(directory), "note": "no training.json"}]
    info = json.loads(f.read_text())
    if info.get("lineage"):
        return list(info["lineage"])
    return [{"run": str(directory), **{k: info.get(k) for k in ("command", "init_from", "steps", "train_s", "data_s",
                                                                 "device")}}]
