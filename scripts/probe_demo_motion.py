"""Is motion readable from the demo model's frame features? A linear read-out of each occupied
slot's centre (RMS-normalised resampled feature + the slot's one-hot, ridge regression fitted on
two thirds of the streams), then the direction of travel of the same object between two frames
`gap` frames apart on the held-out third, against the true centres and the majority class.

    python scripts/probe_demo_motion.py [--streams 30] [--model DIR]

Fresh streams (seeds 2,000,000+), 24 frames each, JPEG codec, the trainer's own vision path.
If the read-out finds the direction and the decoder does not, the features carry motion and the
decoder has not learned to compare frames (issue 11).
"""
import argparse
import time
from pathlib import Path

import framecast  # noqa: F401  (OpenBLAS preload before mlx)
import mlx.core as mx
import numpy as np
import framecast.stages.demo_training.train as T
from framecast.stages.demo_training import heads as TH, spec as TS
from framecast.model.load import DEMO_MODEL_DIR
from framecast.stages.sources.scene import MOTIONS

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--streams", type=int, default=30)
ap.add_argument("--model", default=str(DEMO_MODEL_DIR))
args = ap.parse_args()
t0 = time.time()
tok = TS.model_tokenizer(args.model)  # the model's own numbering of tokens
cfg = T.model_config(tok)
model = T.DemoVLM(cfg, T.word_ids(tok))
T.load_hf_weights(model, Path(args.model), tok)
N_STREAMS, F = args.streams, 24
jobs = [(2_000_000 + i, F, 0, "jpeg") for i in range(N_STREAMS)]
data = T.generate_streams(jobs, 1)
print(f"data {time.time() - t0:.0f}s", flush=True)
rows = []  # (stream, frame, slot, feat, x, y, oid, motion)
for si, d in enumerate(data):
    views = mx.array(d["views"])
    feats = []
    for i in range(0, F, 8):
        f = TH.encode_views(model, views[i:i + 8]); mx.eval(f); feats.append(np.array(f))
    feats = np.concatenate(feats)  # [F, Q, D]
    x = feats / np.sqrt((feats ** 2).mean(-1, keepdims=True) + 1e-6)
    for f in range(F):
        for k in np.flatnonzero(d["slots"][f, :, 0] > 0.5):
            s = d["slots"][f, k]
            rows.append((si, f, k, x[f, k], s[3], s[4], int(s[5]), int(s[6])))
print(f"encoded {len(rows)} occupied slots in {time.time() - t0:.0f}s", flush=True)
S = np.array([r[0] for r in rows]); Fr = np.array([r[1] for r in rows]); K = np.array([r[2] for r in rows])
X = np.stack([r[3] for r in rows]); XY = np.array([[r[4], r[5]] for r in rows]); OID = np.array([r[6] for r in rows])
MOT = np.array([r[7] for r in rows])
train = S < N_STREAMS * 2 // 3
onehot = np.eye(TS.QUERY_NUM)[K]
A = np.concatenate([X, onehot, np.ones((len(X), 1))], 1)
W = np.linalg.solve(A[train].T @ A[train] + 1e-1 * np.eye(A.shape[1]), A[train].T @ XY[train])
pred = A @ W
err = np.sqrt(((pred - XY) ** 2).sum(1))
print(f"linear centre readout (feature + slot one-hot): RMS error train {np.sqrt((err[train]**2).mean()):.4f} "
      f"held-out {np.sqrt((err[~train]**2).mean()):.4f} (frame sizes); slot-centre-only baseline "
      f"{np.sqrt(((np.stack([(K % 3 + .5) / 3, (K // 3 + .5) / 3], 1) - XY) ** 2).sum(1)[~train].mean()):.4f}")
# motion from the readout: pairs of the same object `gap` frames apart, held-out streams only
still = MOTIONS.index("still")
for gap in (2, 5, 10, 20):
    truth_p, said_p, said_t = [], [], []
    index = {(s, f, o): i for i, (s, f, o) in enumerate(zip(S, Fr, OID))}
    for i in np.flatnonzero(~train):
        j = index.get((S[i], Fr[i] + gap, OID[i]))
        if j is None:
            continue
        for src, out in ((pred, said_p), (XY, said_t)):
            dx, dy = src[j] - src[i]
            thr = 0.02
            if max(abs(dx), abs(dy)) < thr:
                out.append(still)
            elif abs(dx) >= abs(dy):
                out.append(MOTIONS.index("right" if dx > 0 else "left"))
            else:
                out.append(MOTIONS.index("down" if dy > 0 else "up"))
        truth_p.append(MOT[i])
    if not truth_p:
        print(f"gap {gap:2d} frames: no pairs")
        continue
    truth_p, said_p, said_t = map(np.array, (truth_p, said_p, said_t))
    maj = max(np.mean(truth_p == c) for c in range(len(MOTIONS)))
    print(f"gap {gap:2d} frames: {len(truth_p)} pairs; direction from the read-out centres {np.mean(said_p == truth_p):.2f}, "
          f"from the true centres {np.mean(said_t == truth_p):.2f}, majority {maj:.2f}")
