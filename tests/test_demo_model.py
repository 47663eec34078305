"""The embedded demo model: shipped files, the default of `framecast run`, training/inference
parity, streaming == batch narration, the training data (codec switch, mid-scene clips, dense
labels, text-only turns), the trainer itself (tiny, resumable), the decoder-can-read check,
accuracy on held-out seeds, plain OpenCV MP4s, the demo run against its ground truth, speed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

from framecast.model.load import DEMO_MODEL_DIR  # noqa: E402
import framecast.stages.demo_training.data as D  # noqa: E402

DEMO_DIR = DEMO_MODEL_DIR


@pytest.fixture(scope="module")
def model():
    from framecast.model.load import load_model

    return load_model(DEMO_DIR)


# ---------------------------------------------------------------- grammar and files


def test_grammar_round_trips_through_the_parsers():
    rng = np.random.default_rng(0)
    stream = D.make_stream(3, 80, codec=False)
    turns = D.make_turns(stream.truths, stream.fps, rng)
    assert {t.kind for t in turns} == {"narration", "question"}
    for t in turns:
        if t.kind == "narration":
            said = D.parse_narration(t.reply)
            assert [(c.colour, c.shape, c.action) for c in said] == \
                   [(c.colour, c.shape, c.action) for c in t.clauses], t.reply
        else:
            assert D.answer_correct(t.qa, t.reply), (t.qa, t.reply)
    assert D.parse_narration("a red circle moves to the left.") == [D.Clause("red", "circle", "left")]
    assert D.parse_narration("a red blob moves to the left.") is None


def test_shipped_model_is_small_hf_layout_package_data():
    names = {p.name for p in DEMO_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    size = sum(p.stat().st_size for p in DEMO_DIR.iterdir())
    assert size < 40e6
    cfg = json.loads((DEMO_DIR / "config.json").read_text())
    assert (cfg["model_type"], cfg["version"]) == ("minicpmv", 2.6)
    # the session budget it ships with is the longest clip training saw
    training = json.loads((DEMO_DIR / "training.json").read_text())
    assert cfg["framecast_session"]["max_cache_tokens"] == training["max_tokens"]
    header = json.loads((DEMO_DIR / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (DEMO_DIR / "model.safetensors").read_bytes()[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}


def test_loader_computes_the_demo_model_in_float32(model):
    """Stored in float16 (half the package), computed in float32 (fast on CPU, as trained)."""
    from mlx.utils import tree_flatten

    import mlx.core as mx

    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.float32}
    assert '"framecast.demo_model" = ["*.json", "*.safetensors"]' in (ROOT / "pyproject.toml").read_text()


def test_demo_model_is_the_default_of_run():
    from framecast.stages.app import load_run_model
    from framecast.config import load_config

    m = load_run_model(load_config())
    assert m is not None and m.args.query_num == json.loads((DEMO_DIR / "config.json").read_text())["query_num"]
    assert m.tokenizer.token_id("<unk>") is not None


# ---------------------------------------------------------------- parity


def test_training_forward_equals_engine_inference(model):
    """The trainer's batched forward and the engine's path give the same features and logits."""
    import mlx.core as mx
    from tokenizers import Tokenizer

    import framecast.stages.demo_training.train as T
    from framecast.stages.demo_training import batches as TB, heads as TH, spec as TS, streams as TD  # noqa: F401

    cfg = json.loads((DEMO_DIR / "config.json").read_text())
    tok = Tokenizer.from_file(str(DEMO_DIR / "tokenizer.json"))
    trainer_model = T.DemoVLM(cfg, T.word_ids(tok))
    weights = model.sanitize(mx.load(str(DEMO_DIR / "model.safetensors")))
    loaded = [(k.replace("language_model.", "llm."), v.astype(mx.float32)) for k, v in weights.items()]
    trainer_model.load_weights(loaded, strict=False)  # only the training-time aux head is not shipped
    from mlx.utils import tree_flatten
    assert {k for k, _ in tree_flatten(trainer_model.parameters()) if not k.startswith("aux.")} == {k for k, _ in loaded}
    assert set(TH.hf_weights(trainer_model)) == set(mx.load(str(DEMO_DIR / "model.safetensors")))

    stream = D.make_stream(5, 6)
    views = mx.array(np.stack([TD.resize_like_processor(model.processor, f) for f in stream.frames]))
    ours = TH.encode_views(trainer_model, views)  # [F, Q, D]
    engine = model.encode_images(stream.frames)
    assert float(mx.abs(ours - mx.concatenate([e.features for e in engine])).max()) < 1e-4

    builder = T.SequenceBuilder(tok)
    turn = D.Turn(5, "narration", D.NARRATION_PROMPTS[0], "a red circle moves to the left.")
    ids, _ = builder.build(6, [turn], TS.SESSION_SYSTEM_PROMPT)
    inputs = mx.array([ids])
    is_img = inputs == builder.unk
    slot = mx.array(np.maximum(np.cumsum(np.array(is_img), axis=1) - 1, 0).astype(np.int32))
    h = mx.where(is_img[..., None], ours.reshape(-1, ours.shape[-1])[slot], trainer_model.llm.embed_tokens(inputs))
    ours_logits, _mid = TH.lm_forward(trainer_model, h)  # the trainer's forward with the motion probe's tap
    engine_logits = model.forward(inputs, model.make_cache(), engine)
    assert float(mx.abs(ours_logits - engine_logits).max()) < 1e-3
    assert float(mx.abs(trainer_model.llm(input_embeddings=h) - ours_logits).max()) < 1e-5


def _one_shot_greedy(model, frames, prompt: str, max_tokens: int = 40) -> str:
    """Batch narration: every frame's placeholder and the prompt in ONE prefill, then greedy."""
    import mlx.core as mx

    from framecast.engine.layout import DEFAULT_SYSTEM_PROMPT

    feats = model.encode_images(frames)
    text = f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
    text += "".join(model.image_placeholder(f) + "\n" for f in feats)
    text += prompt + "<|im_end|>\n<|im_start|>assistant\n"
    cache = model.make_cache()
    logits = model.forward(mx.array([model.tokenizer.encode(text)]), cache, feats)[:, -1]
    out = []
    stop = model.tokenizer.token_id("<|im_end|>")
    for _ in range(max_tokens):
        tok = int(mx.argmax(logits, axis=-1).item())
        if tok == stop:
            break
        out.append(tok)
        logits = model.forward(mx.array([[tok]]), cache)[:, -1]
    return model.tokenizer.decode(out)


def test_streaming_narration_equals_batch_narration(model):
    from framecast.engine.session import SessionCore

    stream = D.make_stream(11, 20)
    core = SessionCore(model)
    for f in stream.frames:  # frames prefilled one by one, as `framecast run` does
        core.add_image(f)
    streamed = core.generate(D.NARRATION_PROMPTS[0], max_tokens=40).text
    assert streamed and streamed == _one_shot_greedy(model, stream.frames, D.NARRATION_PROMPTS[0])


# ---------------------------------------------------------------- what it learned


@pytest.mark.slow
def test_heldout_accuracy(model):
    import framecast.stages.demo_training.evaluate as E

    scores = E.evaluate(model, [0, 1, 2, 3], 40)
    print(scores.report())
    assert scores.narrations >= 4 and sum(scores.qa.values()) >= 8
    assert scores.narration_accuracy >= NARRATION_FLOOR and scores.qa_accuracy >= QA_FLOOR


# Floors for the shipped weights. The goal of issue 11 is 0.9 for both. On these 4 seeds x 40
# frames (2-core CPU, 2026-11-30) run C answers 8 / 16 (0.50) and names 1 / 14 narration events;
# run B's weights answered 0.125, shuffled frames 0: the answer floor catches a blind model.
NARRATION_FLOOR = 0.0
QA_FLOOR = 0.3
BLIND = ("the shipped demo weights see colour and shape but not motion (README `demo`): the run works, "
         "the motion words are not right")


# ---------------------------------------------------------------- training data and trainer


def test_codec_switch_needs_no_pyav_for_jpeg():
    raw = D.make_stream(21, 4, codec="none")
    jpeg = D.make_stream(21, 4, codec="jpeg")
    assert jpeg.codec in ("jpeg", "none") and len(jpeg.frames) == 4
    if jpeg.codec == "jpeg":  # lossy but close: artefacts, not another picture
        diff = np.abs(jpeg.frames[0].astype(int) - raw.frames[0].astype(int))
        assert 0 < diff.mean() < 12
    with pytest.raises(ValueError, match="codec 'mp3'"):
        D.make_stream(21, 2, codec="mp3")


def test_mid_scene_clip_reports_no_news_on_its_first_frame():
    """A clip that starts mid-scene (as the cache after an eviction) has no appear/disappear
    clauses for its first frame: the viewer never saw the frame before it."""
    s = D.make_stream(4, 30, codec="none", start=57)
    assert s.truths[0].index == 57
    first = D.window_clauses(s.truths, 0, 0)
    assert all(c.action not in ("appear", "disappear") for c in first)
    assert [c.colour + c.shape for c in first] == [o.colour + o.shape for o in
                                                   sorted(s.truths[0].objects, key=lambda o: (o.x, o.y))][:3]


def test_dense_labels_sit_on_the_drawn_objects():
    import framecast.stages.demo_training.train as T
    from framecast.stages.demo_training import batches as TB, heads as TH, spec as TS, streams as TD  # noqa: F401
    from framecast.stages.sources.scene import COLOURS, SceneGenerator

    gen = SceneGenerator(seed=3, width=448, height=448, max_objects=3)
    img, truth = gen.frame(0)
    patch, slots = TD.frame_labels(truth, 448, 448, 14, 14)
    assert patch.shape == (196, TS.PATCH_Y) and slots.shape == (TS.QUERY_NUM, TS.SLOT_COLS)
    for o in truth.objects:
        r, c = min(int(o.y * 14), 13), min(int(o.x * 14), 13)  # the patch under the object's centre
        assert patch[r * 14 + c, 0] == list(COLOURS).index(o.colour) + 1
        k = min(int(o.y * 3), 2) * 3 + min(int(o.x * 3), 2)
        assert slots[k, 0] == 1 and abs(slots[k, 3] - o.x) < 1e-6
    assert slots[:, 0].sum() == len({(min(int(o.y * 3), 2), min(int(o.x * 3), 2)) for o in truth.objects})
    assert (patch[:, 0] > 0).sum() < 196 // 2  # mostly background


def test_slot_readout_reads_the_decoders_word_embeddings():
    """Colour and shape of a slot are cosines with the decoder's embeddings of " red", " circle",
    ...: a feature that is the sum of two word embeddings reads as those two words, at any scale
    (the decoder's RMS norm removes it), and a tokenizer that splits a word is refused."""
    import mlx.core as mx
    from tokenizers import Tokenizer

    import framecast.stages.demo_training.train as T
    from framecast.stages.demo_training import batches as TB, heads as TH, spec as TS, streams as TD  # noqa: F401
    from framecast.stages.sources.scene import COLOURS, SHAPES

    tok = Tokenizer.from_file(str(DEMO_DIR / "tokenizer.json"))
    colours, shapes = T.word_ids(tok)
    assert len(set(colours)) == TS.N_COL and len(set(shapes)) == TS.N_SHP
    cfg = T.model_config(tok, tiny=True)
    mx.random.seed(0)
    m = T.DemoVLM(cfg, (colours, shapes))
    emb = m.llm.model.embed_tokens.weight
    for c in range(TS.N_COL):
        s = (3 * c + 1) % TS.N_SHP
        feats = (emb[colours[c]] + emb[shapes[s]])[None, None] * (0.1 + c)  # [1, 1, D]
        sl = TH.slot_logits(m, feats)
        assert sl.shape == (1, 1, TS.SLOT_DIM)
        assert int(mx.argmax(sl[0, 0, 1:1 + TS.N_COL])) == c, list(COLOURS)[c]
        assert int(mx.argmax(sl[0, 0, 1 + TS.N_COL:1 + TS.N_COL + TS.N_SHP])) == s, SHAPES[s]

    class Splitting:  # a tokenizer that spells " orange" in two pieces
        def encode(self, text, add_special_tokens=False):
            return type("E", (), {"ids": [1, 2] if "orange" in text else [7]})()

    with pytest.raises(ValueError, match="orange"):
        T.word_ids(Splitting())


def test_title_and_summary_turns_round_trip():
    from framecast.engine.prompts import CHAPTER_TITLE_PROMPT, SUMMARY_PROMPT

    texts = ["a red circle moves to the left.", "the red circle vanishes and a blue square appears on the right.",
             "nothing is there."]
    assert D.title_of(texts) == "a red circle and a blue square"
    assert D.title_of(["the scene is empty."]) == D.EMPTY_TITLE
    summary = D.summary_of(["a red circle and a blue square", D.EMPTY_TITLE])
    assert D.parse_summary(summary) == [[("red", "circle"), ("blue", "square")], []]
    rng = np.random.default_rng(0)
    for _ in range(20):
        prompt, reply = D.title_example(rng)
        assert prompt.startswith(CHAPTER_TITLE_PROMPT.split("{")[0]) and "[" in prompt
        assert D.parse_title(reply) is not None and not reply.endswith(".")
        prompt, reply = D.summary_example(rng)
        assert prompt.startswith(SUMMARY_PROMPT.split("{")[0]) and D.parse_summary(reply) is not None


def test_trainer_runs_resumes_and_writes_a_loadable_model(tmp_path):
    """The real trainer on a toy model: vision phase, clips, text turns, a checkpoint, a resume,
    an HF-layout float16 directory that `load_model` reads and a session narrates with.
    (Step 1 is the vision-only phase, the next ones short clips with text turns.)"""
    import framecast.stages.demo_training.train as T
    from framecast.stages.demo_training import batches as TB, heads as TH, spec as TS, streams as TD  # noqa: F401
    from framecast.engine.session import SessionCore
    from framecast.model.load import load_model

    out, ckpt = tmp_path / "model", tmp_path / "ckpt"
    args = ["--tiny", "--out", str(out), "--ckpt", str(ckpt), "--streams", "4", "--frames", "4", "--max-clip", "4",
            "--batch", "2", "--workers", "1", "--log-every", "100", "--time-budget", "1000", "--vision-phase", "0.0001"]
    assert T.main(args + ["--max-steps", "2"]) == 0
    assert json.loads((ckpt / "state.json").read_text())["step"] == 2
    assert T.main(args + ["--max-steps", "3"]) == 0  # resumes at step 2
    info = json.loads((out / "training.json").read_text())
    assert info["steps"] == 3 and info["history"][0]["step"] == 1 and "ce_shuf" in info["history"][0]
    assert info["command"].startswith("python -m framecast.stages.demo_training.train --tiny")
    assert [r["run"] for r in info["lineage"]] == [str(out)] and info["lineage"][0]["steps"] == 3
    child = tmp_path / "child"  # a fine-tune keeps its parent's lineage, then adds itself
    assert T.main([*args[:2], str(child), "--streams", "2", "--frames", "4", "--max-clip", "4", "--batch", "1",
                   "--workers", "1", "--time-budget", "1000", "--vision-phase", "0", "--max-steps", "1",
                   "--init-from", str(out)]) == 0
    lineage = json.loads((child / "training.json").read_text())["lineage"]
    assert [r["run"] for r in lineage] == [str(out), str(child)] and lineage[1]["init_from"] == str(out)
    m = load_model(out)
    core = SessionCore(m, max_cache_tokens=json.loads((out / "config.json").read_text())["framecast_session"]["max_cache_tokens"])
    core.add_image(np.zeros((120, 160, 3), np.uint8))
    done = core.generate("what do you see?", max_tokens=3)
    assert done.stopped in ("eos", "max_tokens") and core.positions_contiguous()


@pytest.mark.parametrize("bad,says", [
    (["--init-from", "/nonexistent"], "--init-from /nonexistent: no config.json there"),
    (["--init-from", str(DEMO_DIR)], "hidden_size is 256, this model's is 64"),  # a full-size start for --tiny
    (["--time-budget", "0"], "--time-budget 0.0: must be above 0"),
    (["--streams", "0"], "--streams 0: must be at least 1"),
    (["--frames", "2"], "--frames 2: each stream needs at least --max-clip (4) and 3 frames"),
    (["--short-phase", "nan"], "--short-phase nan: a share of the run"),
    (["--vision-phase", "0.8", "--short-phase", "0.8"], "is more than the whole run"),
    (["--gap-phase", "0.5", "--short-phase", "0.6"], "is more than the whole run"),
    (["--gap-phase", "0.2"], "a --gap-phase clip needs more than 10 frames"),
    (["--gap-mix", "0.2"], "a --gap-mix clip needs more than 10 frames"),
    (["--gap-mix", "1.5"], "--gap-mix 1.5: a share of the run"),
    (["--motion-phase", "-0.1"], "--motion-phase -0.1: a share of the run"),
    (["--motion-phase", "0.6", "--short-phase", "0.6"], "is more than the whole run"),
    (["--motion-phase", "0.2", "--motion-weight", "0"], "--motion-phase trains the motion probe alone"),
    (["--data-seed", "-1"], "--data-seed -1: from 0 to 999"),
    (["--seed", "-5"], "--seed -5: from 0 to 999"),
    (["--max-steps", "0"], "--max-steps 0: must be at least 1"),
    (["--stop-after", "-1"], "--stop-after -1.0: must be above 0"),
    (["--vision-lr-scale", "nan"], "--vision-lr-scale nan: must be above 0"),
    (["--max-tokens", "1"], "--max-tokens 1: at least 256"),
    (["--streams", "100001"], "--streams 100001: at most 100000"),
    (["--motion-weight", "-1"], "--motion-weight -1.0: must be from 0 to 100"),
    (["--motion-weight", "inf"], "--motion-weight inf: must be from 0 to 100"),
    (["--text-weight", "1e300"], "--text-weight 1e+300: must be from 0 to 100"),
    (["--text-rows", "0"], "--text-rows 0: must be at least 1"),
    (["--text-rows", "100000000"], "--text-rows 100000000: at most 512 a step"),
    (["--deadline", "1"], "--deadline 1 is already past"),
    (["--refresh", "--refresh-workers", "0"], "--refresh-workers 0: must be at least 1"),
    (["--refresh-workers", "-3"], "--refresh-workers -3: must be at least 1"),
    (["--refresh-workers", "2"], "--refresh-workers 2: only with --refresh"),
    (["--refresh", "--refresh-workers", "100000"], "--refresh-workers 100000: at most"),
    (["--workers", "100000"], "--workers 100000: at most"),
])
def test_trainer_refuses_bad_options_in_one_line(tmp_path, capsys, bad, says):
    """Before a minute of data generation, with nothing written: one line and exit status 2."""
    import framecast.stages.demo_training.train as T
    from framecast.stages.demo_training import batches as TB, heads as TH, spec as TS, streams as TD  # noqa: F401

    out = tmp_path / "model"
    assert T.main(["--tiny", "--out", str(out), "--streams", "2", "--frames", "4", "--max-clip", "4", "--workers", "1",
                   *bad]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("train: ") and says in line, line
    assert not any(out.glob("*.safetensors"))


def test_trainer_refuses_an_out_or_ckpt_it_cannot_write_in_one_line(tmp_path, capsys):
    """--out / --ckpt naming a file, a place under a file or one that cannot be made: one line,
    exit status 2, before any data is made (a --ckpt file used to fail only at step 1)."""
    import framecast.stages.demo_training.train as T

    a_file = tmp_path / "clip.mp4"
    a_file.write_bytes(b"not a directory")
    base = ["--tiny", "--streams", "2", "--frames", "4", "--max-clip", "4", "--workers", "1"]
    for bad, says in [
        (["--out", str(a_file)], f"--out {a_file}: is a file, not a directory"),
        (["--out", str(a_file / "model")], f"--out {a_file / 'model'}: cannot be made: {a_file} is a file"),
        (["--out", str(tmp_path / "m"), "--ckpt", str(a_file)], f"--ckpt {a_file}: is a file, not a directory"),
        (["--out", "/proc/framecast-model"], "--out /proc/framecast-model: "),
    ]:
        assert T.main([*base, *bad]) == 2, bad
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("train: ") and says in line, line
    assert a_file.read_bytes() == b"not a directory" and not (tmp_path / "m").exists()


@pytest.mark.slow
@pytest.mark.xfail(reason="measured on the 2-core CPU: 26 % of colour/shape words after 250 steps of batch 32 "
                          "(the issue saw 100 % at step 250 only with batch 64 on an H200); not yet a fast check",
                   strict=False)
def test_decoder_can_read_an_attribute_code():
    """The decoder side alone: with a fixed code of the true colour and shape in the image
    positions, a small qwen2 should learn to name both (> 90 % of those words). If this fails
    with enough steps, blame the decoder or the layout, not the vision tower.
    Slow on CPU: runs only with FRAMECAST_DECODER_CHECK_STEPS set (e.g. 250)."""
    import os

    steps = int(os.environ.get("FRAMECAST_DECODER_CHECK_STEPS", "0"))
    if steps <= 0:
        pytest.skip("set FRAMECAST_DECODER_CHECK_STEPS (e.g. 250) to run the decoder-can-read check")

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from framecast.model.lm import build_lm

    import framecast.stages.demo_training.train as T
    from framecast.stages.demo_training import batches as TB, heads as TH, spec as TS, streams as TD  # noqa: F401
    from framecast.stages.sources.scene import COLOURS, SHAPES

    tok = T.build_tokenizer(0)
    builder = T.SequenceBuilder(tok)
    cfg = T.model_config(tok, tiny=True)
    cfg.update(hidden_size=64, num_hidden_layers=2, intermediate_size=128)
    mx.random.seed(0)
    lm = build_lm({**cfg, "model_type": "qwen2"})
    colours, shapes = list(COLOURS), list(SHAPES)
    table = T.content_table(tok)

    def batch(rng, n):
        seqs, codes = [], np.zeros((n, TS.QUERY_NUM, 64), np.float32)
        for b in range(n):
            c, s = int(rng.integers(len(colours))), int(rng.integers(len(shapes)))
            codes[b, int(rng.integers(TS.QUERY_NUM)), [c, 8 + s]] = 4.0  # the object's cell carries the code
            turn = D.Turn(0, "question", "what do you see?", f"{D.article(colours[c])} {colours[c]} {shapes[s]}.")
            seqs.append(builder.build(1, [turn], TS.SESSION_SYSTEM_PROMPT))
        a = TB.token_arrays(seqs, builder.pad, builder.unk, 1)
        return a, mx.array(codes)

    def logits(model, a, codes):
        h = mx.where(a["is_img"][..., None], codes.reshape(-1, 64)[a["slot"]], model.embed_tokens(a["inputs"]))
        return model(input_embeddings=h)

    def loss(model, a, codes):
        return TH.masked_ce(logits(model, a, codes), a["targets"], a["loss_mask"])

    opt, step = optim.Adam(learning_rate=3e-3), nn.value_and_grad(lm, loss)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        a, codes = batch(rng, 32)
        _, g = step(lm, a, codes)
        opt.update(lm, g)
        mx.eval(lm.parameters(), opt.state)
    a, codes = batch(np.random.default_rng(1), 64)
    content = mx.array(table[np.array(a["targets"])]) * a["loss_mask"]
    right = mx.argmax(logits(lm, a, codes), -1) == a["targets"]
    acc = float((right * content).sum() / content.sum())
    assert acc > 0.9, f"colour/shape words right {acc:.2f} with the true code in the image positions"


# ---------------------------------------------------------------- plain OpenCV videos


def write_shape_mp4(path: Path, *, shape: str = "circle", bgr: tuple[int, int, int] = (0, 0, 255),
                    direction: str = "left", background: int = 0, radius: int = 40, n: int = 30,
                    fps: int = 10) -> Path:
    """Plain OpenCV drawing of one filled shape moving on a flat background, 640x480, h264."""
    import av
    import cv2

    step = {"left": (-16, 0), "right": (16, 0), "up": (0, -10), "down": (0, 10), "still": (0, 0)}[direction]
    start = {"left": (560, 240), "right": (80, 240), "up": (320, 400), "down": (320, 80), "still": (320, 240)}[direction]
    frames = []
    for i in range(n):
        img = np.full((480, 640, 3), background, np.uint8)
        cx, cy = start[0] + step[0] * i, start[1] + step[1] * i
        if shape == "circle":
            cv2.circle(img, (cx, cy), radius, bgr, -1)
        elif shape == "square":
            cv2.rectangle(img, (cx - radius, cy - radius), (cx + radius, cy + radius), bgr, -1)
        elif shape == "triangle":
            pts = np.array([[cx, cy - radius], [cx + radius, cy + radius], [cx - radius, cy + radius]], np.int32)
            cv2.fillPoly(img, [pts], bgr)
        else:
            raise ValueError(shape)
        frames.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
    # OpenCV's own writer has no h264 encoder in the pip wheels: PyAV (libx264) encodes.
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = 640, 480, "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return path


def write_red_circle_mp4(path: Path, *, n: int = 30, fps: int = 10) -> Path:
    """Plain OpenCV drawing: a filled red circle sliding left on black, 640x480, h264."""
    return write_shape_mp4(path, n=n, fps=fps)


def _narrations(jsonl: Path) -> list[str]:
    return [e["text"] for e in _narration_events(jsonl)]


def _narration_events(jsonl: Path) -> list[dict]:
    events = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    return [e for e in events if e["type"] == "narration"]


def _run_and_check(video: Path, out: Path, want: tuple[str, str, str]) -> None:
    from framecast.stages.cli import main

    assert main(["run", "--source", str(video), "--jsonl", str(out), "--no-console"]) == 0
    texts = _narrations(out)
    assert texts, "no narration"  # a few seconds of video: one interval narration and one at the end
    for text in texts:
        said = D.parse_narration(text)
        assert said and any((c.colour, c.shape, c.action) == want for c in said), texts


@pytest.mark.xfail(reason=BLIND, strict=False)
def test_opencv_red_circle_mp4_is_narrated(tmp_path):
    video = write_red_circle_mp4(tmp_path / "circle.mp4")
    _run_and_check(video, tmp_path / "out.jsonl", ("red", "circle", "left"))


OPENCV_DRAWINGS = [  # other colours, shapes, directions, sizes and backgrounds
    dict(shape="square", bgr=(230, 80, 40), direction="right", background=235, radius=50, want=("blue", "square", "right")),
    dict(shape="triangle", bgr=(60, 180, 40), direction="up", background=120, radius=45, want=("green", "triangle", "up")),
    dict(shape="circle", bgr=(40, 220, 240), direction="still", background=20, radius=70, want=("yellow", "circle", "still")),
    dict(shape="square", bgr=(245, 245, 245), direction="down", background=20, radius=24, want=("white", "square", "down")),
]


@pytest.mark.xfail(reason=BLIND, strict=False)
@pytest.mark.parametrize("drawing", OPENCV_DRAWINGS, ids=lambda d: "-".join(d["want"]))
def test_other_opencv_drawings_are_narrated(tmp_path, drawing):
    spec = dict(drawing)
    want = spec.pop("want")
    video = write_shape_mp4(tmp_path / "shape.mp4", n=24, **spec)
    _run_and_check(video, tmp_path / "out.jsonl", want)


# ---------------------------------------------------------------- the demo source


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`framecast run --source demo --max-frames 120` once: (jsonl path, wall seconds)."""
    from framecast.stages.cli import main

    out = tmp_path_factory.mktemp("demo") / "out.jsonl"
    t0 = time.perf_counter()
    assert main(["run", "--source", "demo", "--max-frames", "120", "--jsonl", str(out), "--no-console"]) == 0
    return out, time.perf_counter() - t0


def test_demo_narrations_scorer_against_the_generator():
    """The scorer of demo-run narrations: the ground truth's own sentences score 100 %,
    sentences about another scene score (close to) nothing."""
    import framecast.stages.demo_training.evaluate as E
    from framecast.stages.sources.scene import SceneGenerator

    gen = SceneGenerator(seed=0, width=448, height=448, fps=10.0)
    truths = [gen.truth(i) for i in range(120)]
    rng = np.random.default_rng(0)
    events, prev = [], -1
    for end in range(20, 120, 20):
        events.append({"text": D.narration_text(D.window_clauses(truths, prev + 1, end), rng),
                       "pts_start": (prev if prev >= 0 else 0) / 10.0, "pts_end": end / 10.0, "pts": end / 10.0})
        prev = end
    assert E.score_narration_events(events, truths, 10.0).narration_accuracy == 1.0
    other = SceneGenerator(seed=99, width=448, height=448, fps=10.0)
    wrong = E.score_narration_events(events, [other.truth(i) for i in range(120)], 10.0)
    assert wrong.narration_accuracy < 0.5


@pytest.mark.xfail(reason=BLIND, strict=False)
def test_demo_run_narrates_the_drawn_scene(demo_run):
    import framecast.stages.demo_training.evaluate as E
    from framecast.stages.sources.scene import SceneGenerator

    out, _wall = demo_run
    gen = SceneGenerator(seed=0, width=448, height=448, fps=10.0)  # the demo source's defaults
    scores = E.score_narration_events(_narration_events(out), [gen.truth(i) for i in range(120)], 10.0)
    assert scores.narration_accuracy >= 0.9, scores.report()


def test_demo_run_is_faster_than_real_time(demo_run):
    out, wall = demo_run
    assert len(_narrations(out)) >= 5
    assert wall < 12.0 * 1.5, f"120 demo frames (12 s of video) took {wall:.1f}s"


@pytest.mark.xfail(reason="run D's weights write 2 of the 6 narrations of this scene as 'a white circle appears at "
                          "the bottom left, disappears.' (a clause without its subject); 0 of 52 on held-out seeds "
                          "0-11, run C 3 of 52", strict=False)
def test_demo_run_narrations_are_grammar_sentences(demo_run):
    out, _wall = demo_run
    bad = [t for t in _narrations(out) if D.parse_narration(t) is None]
    assert not bad, bad


def test_gap_clips_ask_about_motion_on_their_second_frame():
    """A gap clip: two frames 5-10 apart, questions (mostly about motion) on the second, the
    motion probe's targets on the second frame's objects once they have moved far enough."""
    import framecast.stages.demo_training.train as T
    from framecast.stages.demo_training import batches as TB, heads as TH, spec as TS, streams as TD  # noqa: F401

    tok = T.build_tokenizer(0)
    builder = T.SequenceBuilder(tok)
    data = T.generate_streams(T.stream_jobs([1_000_003, 1_000_004], 24, "none"), 1)
    pool = T.Pool(data[:1])
    rng = np.random.default_rng(0)
    clips = T.gap_clips(pool, rng, 6)
    assert all(T.GAP_FRAMES[0] <= idx[1] - idx[0] <= T.GAP_FRAMES[1] for _, idx in clips)
    batch = T.make_batch(clips, 2, builder, rng, dense=1.0, max_tokens=1024)
    assert batch["views"].shape[0] == 2 * len(clips) and batch["motion_y"].shape == (2 * len(clips), TS.QUERY_NUM)
    m = np.array(batch["motion_m"]).reshape(len(clips), 2, TS.QUERY_NUM)
    assert m[:, 0].sum() == 0  # nothing has moved yet on a clip's first frame
    rows = [tok.decode([int(i) for i in row]) for row in np.array(batch["inputs"])]
    assert sum(("move" in t or "going" in t or "moving" in t) for t in rows) >= len(rows) // 2
    for (d, idx), row in zip(clips, np.array(batch["slot_y"]).reshape(len(clips), 2, TS.QUERY_NUM, TS.SLOT_COLS)):
        assert np.array_equal(row, d["slots_np"][idx])


def test_trainer_leaves_an_existing_out_directory_alone_until_it_saves(tmp_path, capsys):
    """--out names an existing model (as `--out pipeline/demo_model` does): a run that fails
    before its first save (here the loss overflows at an absurd learning rate) changes none of
    its files, and says why in one line, exit status 1."""
    import shutil

    import framecast.stages.demo_training.train as T
    from framecast.stages.demo_training import batches as TB, heads as TH, spec as TS, streams as TD  # noqa: F401

    out = tmp_path / "model"
    shutil.copytree(DEMO_DIR, out)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    rc = T.main(["--tiny", "--out", str(out), "--streams", "2", "--frames", "4", "--max-clip", "4", "--batch", "1",
                 "--workers", "1", "--time-budget", "1000", "--vision-phase", "0", "--max-steps", "30",
                 "--lr", "1e30"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "the loss is" in err[0], err
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


@pytest.mark.parametrize("phases,key", [
    (["--gap-phase", "0.5"], "gap_phase"),  # the first steps, as a phase
    (["--gap-phase", "0", "--short-phase", "0", "--gap-mix", "1.0"], "gap_mix"),  # mixed into the long phase
])
def test_trainer_gap_steps_run(tmp_path, monkeypatch, phases, key):
    """--gap-phase and --gap-mix: steps train on gap clips (the toy model, two steps)."""
    import framecast.stages.demo_training.train as T
    from framecast.stages.demo_training import batches as TB, heads as TH, spec as TS, streams as TD  # noqa: F401

    calls = []
    real = T.gap_clips
    monkeypatch.setattr(T, "gap_clips", lambda *args: calls.append(1) or real(*args))
    out = tmp_path / "model"
    assert T.main(["--tiny", "--out", str(out), "--streams", "2", "--frames", "12", "--max-clip", "4", "--batch", "1",
                   "--workers", "1", "--time-budget", "1000", "--vision-phase", "0", *phases,
                   "--max-steps", "2", "--log-every", "1"]) == 0
    info = json.loads((out / "training.json").read_text())
    assert info[key] > 0 and info["steps"] == 2 and "motion_probe_acc_real" in info["history"][-1]
    assert len(calls) == 2
    assert info["data_seed"] == 0  # a new model: --seed's streams


def test_trainer_motion_phase_trains_the_probe_alone(tmp_path, monkeypatch):
    """--motion-phase: the steps' decoder loss is the motion probe (+ slot targets), replies and
    text turns weigh nothing; augmented clips of MOTION_PHASE_FRAMES (cut at --max-clip)."""
    import framecast.stages.demo_training.train as T
    from framecast.stages.demo_training import batches as TB, heads as TH, spec as TS, streams as TD  # noqa: F401

    seen = []
    real = T.loss_fn

    def spy(*args, **kw):
        total, parts = real(*args, **kw)
        ce, text_ce, _, slots, motion = parts
        seen.append((args[4].shape, float(total), float(slots + kw["motion_weight"] * motion),
                     float(ce), kw.get("reply_weight", 1.0)))
        return total, parts

    monkeypatch.setattr(T, "loss_fn", spy)
    out = tmp_path / "model"
    assert T.main(["--tiny", "--out", str(out), "--streams", "2", "--frames", "12", "--max-clip", "6", "--batch", "1",
                   "--workers", "1", "--time-budget", "1000", "--vision-phase", "0", "--motion-phase", "0.7",
                   "--motion-weight", "3", "--max-steps", "2", "--log-every", "100"]) == 0
    assert len(seen) == 2
    for inputs_shape, total, probe_and_slots, ce, reply_weight in seen:
        assert reply_weight == 0.0  # replies measured (when the clip has one), not trained on
        assert total == pytest.approx(probe_and_slots, rel=1e-5)
        assert inputs_shape[0] == 1  # --batch clips
    info = json.loads((out / "training.json").read_text())
    assert info["motion_phase"] == 0.7 and info["augment"] is True


def test_a_fine_tuning_run_trains_on_streams_its_lineage_never_saw(tmp_path, monkeypatch, capsys):
    """--init-from: the default --data-seed is --seed + the runs the model descends from, so
    each run of a lineage renders streams of its own (and --data-seed picks them by hand)."""
    import framecast.stages.demo_training.train as T
    from framecast.stages.demo_training import batches as TB, heads as TH, spec as TS, streams as TD  # noqa: F401

    rendered = []
    real = T.stream_jobs
    monkeypatch.setattr(T, "stream_jobs", lambda seeds, *a: rendered.append(sorted(seeds)) or real(seeds, *a))
    base = ["--tiny", "--streams", "2", "--frames", "12", "--max-clip", "4", "--batch", "1", "--workers", "1",
            "--time-budget", "1000", "--vision-phase", "0", "--max-steps", "1", "--log-every", "1"]
    first, second, third = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert T.main([*base, "--out", str(first)]) == 0
    assert T.main([*base, "--out", str(second), "--init-from", str(first)]) == 0
    assert T.main([*base, "--out", str(third), "--init-from", str(second), "--data-seed", "7"]) == 0
    train = [[s for s in seeds if s >= 1_000_000] for seeds in rendered]
    assert train == [[1_000_000, 1_000_001], [1_100_000, 1_100_001], [1_700_000, 1_700_001]]
    info = json.loads((second / "training.json").read_text())
    assert info["data_seed"] == 1 and len(info["lineage"]) == 2 and info["lineage"][-1]["data_seed"] == 1
    info = json.loads((third / "training.json").read_text())
    assert info["lineage"][-1]["data_seed"] == 7 and info["seed"] == 0
    # the next run after 7 renders seed 8's streams; another --seed than the model's is refused
    # (its tokenizer was fitted with seed 0, and a model's runs keep one seed)
    capsys.readouterr()
    assert T.main([*base, "--out", str(tmp_path / "d"), "--init-from", str(third), "--seed", "1"]) == 2
    assert "tokenizer was fitted with seed 0" in capsys.readouterr().err
    assert not (tmp_path / "d" / "model.safetensors").exists()


def test_motion_targets_start_once_the_clip_shows_the_motion():
    """The motion probe's targets: a mover counts once it has moved MOTION_MIN_SHIFT in the clip,
    a still object once the slowest mover would have; the first frame never counts; on a real
    stream every target agrees with the drawn object's motion and direction of travel."""
    import framecast.stages.demo_training.data as D
    import framecast.stages.demo_training.train as T
    from framecast.stages.demo_training import batches as TB, heads as TH, spec as TS, streams as TD  # noqa: F401
    from framecast.stages.sources.scene import MOTIONS

    F, fps = 12, 10.0
    slots = np.zeros((F, TS.QUERY_NUM, TS.SLOT_COLS), np.float32)
    for f in range(F):  # object 7 moves right 0.011 a frame in slot 4; object 9 stays in slot 0
        slots[f, 4] = (1, 0, 0, 0.5 + 0.011 * f, 0.5, 7, MOTIONS.index("right"))
        slots[f, 0] = (1, 1, 1, 0.1, 0.1, 9, MOTIONS.index("still"))
    y, m = TB.motion_targets(slots, fps)
    assert y[5, 4] == MOTIONS.index("right") and y[5, 0] == MOTIONS.index("still")
    assert not m[:8, 4].any() and m[8:, 4].all()  # MOTION_MIN_SHIFT (0.08) reached at frame 8
    need = TS.MOTION_MIN_SHIFT * fps / D.SPEED_RANGE[0]
    assert not m[: int(np.ceil(need)), 0].any() and m[int(np.ceil(need)):, 0].all()
    assert m[:, 1:4].sum() == 0  # empty slots never count

    s = D.make_stream(5, 40, codec="none")
    labels = np.stack([TD.frame_labels(t, s.width, s.height, 14, 14)[1] for t in s.truths])
    y, m = TB.motion_targets(labels, s.fps)
    assert m.sum() > 0
    for f, k in zip(*np.nonzero(m)):
        o = next(o for o in s.truths[f].objects if o.id == int(labels[f, k, 5]))
        assert MOTIONS[y[f, k]] == o.motion


def test_motion_probe_script_runs():
    """scripts/probe_demo_motion.py (the README's motion diagnosis) on 3 streams: it reads
    centres and prints a direction accuracy per gap."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "probe_demo_motion.py"), "--streams", "3"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "linear centre readout" in r.stdout and "gap  5 frames" in r.stdout


@pytest.mark.parametrize("args", [["--input", "code", "--tiny"],
                                  ["--input", "features", "--decoder", "shipped", "--streams", "2"]])
def test_decoder_motion_check_runs(args):
    """scripts/check_decoder_motion.py (can the decoder learn to compare frames?), a few steps
    of each input: it trains the motion probe and prints held-out accuracy and the majority."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_decoder_motion.py"), *args, "--steps", "2",
                        "--frames", "4", "--log-every", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("held-out probe") == 2 and "majority" in r.stdout


def test_decoder_colour_check_runs():
    """scripts/check_decoder_colour.py (can the decoder learn colour from frozen features?), a
    few steps of a toy model: the held-out content words before training and after each step."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_decoder_colour.py"), "--tiny", "--streams", "4",
                        "--held-out", "2", "--batch", "4", "--steps", "2", "--log-every", "1", "--workers", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("held-out content words real/shuffled") == 3 and " col " in r.stdout
    assert r.stdout.count("one objects: col ") == 3 and r.stdout.count("several objects: col ") == 3
    for args, says in ((["--batch", "0"], "--batch 0: at least 1"), (["--lr", "nan"], "--lr nan: must be above 0"),
                       (["--seconds", "0"], "--seconds 0.0: must be above 0"),
                       (["--model", "/nonexistent"], "--model /nonexistent: no tokenizer.json there"),
                       (["--tiny", "--model", "/x"], "--model and --tiny")):
        bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_decoder_colour.py"), *args],
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and bad.stderr.strip() == f"check_decoder_colour: {says}" or says in bad.stderr, args
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_grounding_by_length_script_runs(tmp_path):
    """scripts/demo_grounding_by_length.py on the shipped model, 2 clips of 1 and 2 frames: one
    line per length with every content word; a bad length or model is one line, exit 2."""
    import subprocess
    import sys

    script = str(ROOT / "scripts" / "demo_grounding_by_length.py")
    r = subprocess.run([sys.executable, script, "--clips", "2", "--lengths", "1", "2", "--workers", "1",
                        "--by-objects"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln for ln in r.stdout.splitlines() if " frames: " in ln]
    assert [ln.split()[0] for ln in lines] == ["1", "2"] and all("col " in ln and "mot " in ln for ln in lines)
    assert "1 frame, 1 object" in r.stdout and "1 frame, 2+ objects" in r.stdout
    for args, says in ((["--lengths", "49"], "--lengths 49: from 1 to 48"), (["--workers", "0"], "--workers 0: at least 1"),
                       (["--model", str(tmp_path)], f"--model {tmp_path}: no tokenizer.json there")):
        bad = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and says in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_replies_name_objects_in_reading_order():
    """A list answer (and a narration's clauses about objects already there) names objects row by
    row of the 3 x 3 grid, then left to right: the order of the resampler's image tokens."""
    import framecast.stages.demo_training.data as D
    from framecast.stages.sources.scene import FrameTruth, SceneObject

    def obj(i, colour, x, y):
        return SceneObject(i, "circle", colour, "small", "left", x, y, (0, 0, 1, 1))

    # left to right would be green, red, blue; by rows of the grid: red (top), blue, green (bottom)
    objs = (obj(1, "red", 0.5, 0.1), obj(2, "green", 0.1, 0.9), obj(3, "blue", 0.8, 0.5))
    assert [o.colour for o in D.reading_order(objs)] == ["red", "blue", "green"]
    # in one row of cells: left to right; in one cell: top first
    assert [o.colour for o in D.reading_order([obj(1, "a", 0.6, 0.2), obj(2, "b", 0.2, 0.3)])] == ["b", "a"]
    assert [o.colour for o in D.reading_order([obj(1, "a", 0.2, 0.3), obj(2, "b", 0.25, 0.1)])] == ["b", "a"]
    t = FrameTruth(0, 0.0, "black", False, objs, ())
    qa = D.make_question(t, np.random.default_rng(0), kind="list")
    assert qa.answer == "a red circle, a blue circle and a green circle."
    assert [c.colour for c in D.window_clauses([t, t], 0, 1)] == ["red", "blue", "green"]
    # appeared (in reading order, not by id), then gone (where last seen), then those already there
    from framecast.stages.sources.scene import SceneEvent

    new_low, new_high, gone_low, gone_high = (obj(7, "white", 0.5, 0.9), obj(8, "yellow", 0.5, 0.1),
                                              obj(4, "orange", 0.2, 0.8), obj(5, "purple", 0.9, 0.2))
    events = tuple(SceneEvent(k, 1, o) for k, o in (("appear", new_low), ("appear", new_high),
                                                     ("disappear", gone_low), ("disappear", gone_high)))
    t1 = FrameTruth(1, 0.1, "black", False, objs + (new_low, new_high), events)
    said = [(c.colour, c.action) for c in D.window_clauses([t, t1], 0, 1)]
    assert said == [("yellow", "appear"), ("white", "appear"), ("purple", "disappear"), ("orange", "disappear"),
                    ("red", "left"), ("blue", "left"), ("green", "left")][:len(said)]
    assert len(said) == min(7, D.MAX_CLAUSES)


def test_a_model_is_read_with_its_own_tokenizer(tmp_path):
    """`build_tokenizer` fits the grammar's current text, so a grammar change renumbers tokens:
    the shipped weights are read with their own tokenizer.json, and another numbering is refused
    in one line (the trainer's --init-from, the diagnosis scripts)."""
    import shutil

    import framecast.stages.demo_training.train as T
    from framecast.stages.demo_training import heads as TH, spec as TS

    tok = TS.model_tokenizer(DEMO_DIR)
    model = TH.DemoVLM(TS.model_config(tok), TH.word_ids(tok))
    TH.load_hf_weights(model, DEMO_DIR, tok)
    assert tok.get_vocab() == json.loads((DEMO_DIR / "tokenizer.json").read_text())["model"]["vocab"] | {
        t["content"]: t["id"] for t in json.loads((DEMO_DIR / "tokenizer.json").read_text())["added_tokens"]}
    # a copy whose tokenizer numbers two tokens the other way round
    other = tmp_path / "other"
    shutil.copytree(DEMO_DIR, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="numbers 2 of 667 tokens otherwise than this one"):
        TH.load_hf_weights(model, other, tok)
    with pytest.raises(ValueError, match="no tokenizer.json there"):
        TS.model_tokenizer(tmp_path)
    # the trainer starts from a model with that model's tokenizer (written again with the export)
    out = tmp_path / "model"
    (other / "tokenizer.json").unlink()
    assert T.main(["--out", str(out), "--init-from", str(other), "--streams", "2", "--frames", "4", "--max-clip", "4",
                   "--workers", "1"]) == 2
