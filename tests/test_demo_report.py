"""The demo trainer's held-out motion-probe report (`framecast.stages.demo_training.report`):
accuracies with their baselines and the sample they rest on (clips, objects, targets)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np

import framecast.stages.demo_training.train as T
from framecast.stages.demo_training import report as TR


def test_motion_probe_report_counts_the_objects_its_targets_belong_to():
    tok = T.build_tokenizer(0)
    mx.random.seed(0)
    model = T.DemoVLM(T.model_config(tok, tiny=True), T.word_ids(tok))
    frames = 12
    pool = T.Pool(T.generate_streams(T.stream_jobs([900_000 + i for i in range(3)], frames, "jpeg"), 1))
    rng = np.random.default_rng(0)
    clips = pool.clips(rng, 3, frames)
    batch = T.make_batch(clips, frames, T.SequenceBuilder(tok), rng, dense=0.3, max_tokens=1024)
    rep = TR.motion_probe_report(model, [batch], frames)

    m = np.array(batch["motion_m"]) > 0  # [B*F, Q]
    ids = np.array(batch["slot_y"][..., 5]).astype(int)
    want = {(row // frames, oid) for row, q in zip(*np.nonzero(m)) for oid in [ids[row, q]]}
    assert rep["clips"] == len(clips) and rep["targets"] == int(m.sum()) and rep["objects"] == len(want)
    assert 0 < rep["objects"] <= rep["targets"]
    for k in ("acc_real", "acc_shuf", "baseline"):
        assert 0.0 <= rep[k] <= 1.0
    two = TR.motion_probe_report(model, [batch, batch], frames)  # batches add up: counts double, rates stay
    assert (two["clips"], two["objects"], two["targets"]) == (2 * rep["clips"], 2 * rep["objects"], 2 * rep["targets"])
    assert abs(two["acc_real"] - rep["acc_real"]) < 1e-6 and two["baseline"] == rep["baseline"]
    line = TR.format_motion_probe(rep)
    assert f"{len(clips)} held-out clips ({len(want)} objects" in line and "majority" in line


def test_trainer_logs_the_larger_probe_report(tmp_path, monkeypatch):
    rendered = []
    real = T.stream_jobs
    monkeypatch.setattr(T, "stream_jobs", lambda seeds, *a: rendered.append(list(seeds)) or real(seeds, *a))
    out = tmp_path / "model"
    assert T.main(["--tiny", "--out", str(out), "--streams", "2", "--frames", "12", "--max-clip", "12", "--batch", "1",
                   "--workers", "1", "--time-budget", "1000", "--vision-phase", "0", "--max-steps", "1",
                   "--log-every", "1"]) == 0
    last = json.loads((out / "training.json").read_text())["history"][-1]
    assert {"probe_acc_real", "probe_acc_shuf", "probe_baseline", "probe_objects", "probe_targets"} <= set(last)
    assert last["probe_clips"] == 4  # one clip from each probe stream, whatever its view size
    # its streams are held out and apart from the report's: 900,000-900,003 report, 900,004-900,007 probe
    assert sorted(s for s in rendered[0] if s < 1_000_000) == list(range(900_000, 900_008))
