"""The demo model's shape, tokenizer and training constants (issue 11): one place for the
numbers every part of the trainer shares (`train` is the entry point and its docstring the why)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import framecast.stages.demo_training.data as D
from framecast.engine.layout import DEFAULT_ASSISTANT_PREFIX, DEFAULT_SYSTEM_PROMPT
from framecast.stages.sources.scene import COLOURS, MOTIONS, SHAPES

SPECIAL_TOKENS = [
    "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>",
    "<image>", "</image>", "<slice>", "</slice>", "<image_id>", "</image_id>",
    "<think>", "</think>", "<ref>", "</ref>", "<box>", "</box>",
]
# the session's streaming layout, token for token (one definition: framecast.engine.layout)
SESSION_SYSTEM_PROMPT = DEFAULT_SYSTEM_PROMPT
ASSISTANT_PREFIX = DEFAULT_ASSISTANT_PREFIX

# model shape (tiny: CPU inference must beat real time)
VOCAB_SIZE = 768
SCALE_RESOLUTION = 252  # 18 x 18 patches for a square frame: a small object spans ~2 patches
GRID = D.GRID  # slot grid: query k <-> cell (k // GRID, k % GRID) of the frame (`data.grid_cell`)
QUERY_NUM = GRID * GRID
VISION = dict(hidden_size=192, intermediate_size=768, num_attention_heads=3, num_hidden_layers=4,
              patch_size=14, image_size=SCALE_RESOLUTION,  # 18 x 18 learned position grid
              hidden_act="relu")  # MLX's CPU GELU is scalar: ReLU keeps the CPU tower faster than real time
LLM = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4,
           num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=8192,
           rms_norm_eps=1e-6, tie_word_embeddings=True)
DEMO_MAX_CACHE_TOKENS = 1024  # session budget shipped in config.json = the longest training clip

# training recipe
DEFAULT_BATCH = 24  # clips per step in the long phase (the short phase uses 3x as many)
DEFAULT_STREAMS = 1600
DEFAULT_FRAMES = 64  # frames rendered per stream; clips are windows of them
DEFAULT_LR = 1e-3
DEFAULT_VISION_LR_SCALE = 0.5
DEFAULT_VISION_PHASE = 0.3  # share of the run training the vision side alone (dense + slot targets)
DEFAULT_SHORT_PHASE = 0.25  # then this share on 1-3 frame clips with dense questions (the decoder learns to read)
VISION_BATCH = 768  # frames per step in the vision phase
SHORT_FRAMES = 3  # longest clip of the short phase
DEFAULT_MOTION_PHASE = 0.0  # share on MOTION_PHASE_FRAMES-frame clips with the motion probe as the only decoder loss
MOTION_PHASE_FRAMES = 24  # frames of a motion-phase clip (a mover shows MOTION_MIN_SHIFT within 0.3-1 s)
DEFAULT_GAP_PHASE = 0.0  # share on 2-frame clips whose frames lie GAP_FRAMES apart (motion questions)
GAP_FRAMES = (5, 10)  # frames between the two frames of a gap clip: shifts the features show
DEFAULT_GAP_MIX = 0.0  # after the phases, the chance that a step is a gap step (motion not forgotten)
# After the vision phase the tower is frozen (its dense targets taught it; the decoder's gradient
# through 4 layers x 1000 frames a step would cost most of a step): the resampler, its slot targets
# and the decoder train. The long phase's longest clip grows from SHORT_FRAMES to --max-clip over
# the first LONG_RAMP of that phase, so the decoder keeps finding the image tokens as they thin out.
LONG_RAMP = 0.5
STREAMS_PER_DATA_SEED = 100_000  # training stream seeds: 1,000,000 + data_seed * this + i
REFRESH_PER_STEP = 64  # --refresh: most new streams swapped in before one step (each costs a host->device copy)
MAX_SEED = 1000  # --seed and --data-seed are below this
MIN_CLIP_TOKENS = 256  # --max-tokens: the smallest session budget framecast accepts
TRAIN_CACHE_LIMIT_GB = 16  # MLX's buffer cache while training, at most (its default is the whole device)
TEXT_ROWS = 8  # text-only conversations (title, summary, question from a log) per step
PATCH_WEIGHT = 1.0
SLOT_WEIGHT = 1.0
TEXT_WEIGHT = 0.3
MAX_LOSS_WEIGHT = 100.0  # --motion-weight / --text-weight above this only make the loss overflow
MAX_TEXT_ROWS = 512
OBJECT_PATCH_WEIGHT = 4.0
CONTENT_WEIGHT = 3.0  # reply tokens naming a colour, shape, count, place or motion  # object patches are rare next to background ones
N_COL, N_SHP = len(COLOURS), len(SHAPES)
SLOT_DIM = 1 + N_COL + N_SHP + 2  # objectness, colour, shape, centre (x, y)
SLOT_COLS = 7  # slot labels: objectness, colour id, shape id, x, y, object id, motion id
N_MOT = len(MOTIONS)
MOTION_LAYER = 4  # the motion probe reads the decoder's residual stream after this many layers
MOTION_WEIGHT = 1.0
# frame sizes an object must have moved in the clip before its motion is a probe target: about
# twice the features' own centre error (slot read-out 0.035-0.04 on training clips, a linear
# read-out 0.065 on held-out ones), since a shift under the noise is a target nothing can learn
# (scripts/check_decoder_motion.py with centre noise 0.035: 0.75 at 12 frames, 0.92 at 24)
MOTION_MIN_SHIFT = 0.08
# held-out streams (seeds after the report's) whose MOTION_PHASE_FRAMES-frame clips the motion
# probe is measured on at each report, one clip a stream: the report's 12 clips held 37 objects
# with a target (the sample that counts); 64 streams x 24 frames held 127 (1,384 targets)
PROBE_STREAMS = 64
SLOT_SCALE = 10.0  # cosine -> logit: a small scale asks for a wide cosine margin (~0.5 for a low loss)
PATCH_Y = 6  # colour, shape, own x, y, object centre x, y
PATCH_OUT = 1 + N_COL + 1 + N_SHP + 4

# reply words by attribute: the content tokens the log scores separately
CONTENT_WORDS = {
    "colour": set(COLOURS),
    "shape": set(SHAPES),
    "count": set(D.NUMBER_WORDS) | {"yes", "no", "nothing"},
    "position": {"top", "bottom", "left", "right", "center"},
    "motion": {"left", "right", "up", "down", "upward", "downward", "still", "place", "not", "appears",
               "vanishes", "disappears", "gone", "shows", "comes"},
}


# ---------------------------------------------------------------- tokenizer and config


def build_tokenizer(seed: int):
    """Byte-level BPE (any text encodes) fitted on the grammar's text + the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    rng = np.random.default_rng((seed, 3))
    texts = D.corpus(6000, seed) + [SESSION_SYSTEM_PROMPT] + list(D.SYSTEM_PROMPTS)
    for _ in range(300):
        texts += list(D.title_example(rng)) + list(D.summary_example(rng))
    tok.train_from_iterator(texts, trainer)
    return tok


def model_tokenizer(directory):
    """The tokenizer a model directory was trained with (its `tokenizer.json`). A model must be
    read with its own: `build_tokenizer` fits the grammar's current text, so a change of the
    grammar (even of word order) renumbers tokens. Raises ValueError (one line) if it is missing."""
    from tokenizers import Tokenizer

    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{directory}: no tokenizer.json there")
    return Tokenizer.from_file(str(path))


TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=1, num_hidden_layers=1)
TINY_LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1)


def model_config(tok, *, tiny: bool = False) -> dict:
    """The shipped shape; `tiny` = a toy of the same layout for CPU tests of the trainer."""
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab = -(-tok.get_vocab_size() // 64) * 64  # rows for every id, padded for the kernels
    return {
        "architectures": ["MiniCPMV"],
        "model_type": "minicpmv",
        "version": 2.6,
        **LLM, **(TINY_LLM if tiny else {}),
        "vocab_size": vocab,
        "query_num": QUERY_NUM,
        "image_size": SCALE_RESOLUTION,
        "patch_size": 14,
        "slice_mode": True,
        "slice_config": {"max_slice_nums": 1, "patch_size": 14, "scale_resolution": SCALE_RESOLUTION,
                         "model_type": "minicpmv"},
        "batch_vision_input": True,
        "drop_vision_last_layer": False,
        "use_image_id": False,
        "vision_config": {"model_type": "siglip_vision_model", "num_channels": 3, "layer_norm_eps": 1e-6,
                          **VISION, **(TINY_VISION if tiny else {})},
        "torch_dtype": "float16",
        "bos_token_id": None,
        "eos_token_id": ids["<|im_end|>"],
        "framecast_demo": True,
        # the longest clip training saw: `framecast run` keeps its cache within it (sinks + window)
        "framecast_session": {"max_cache_tokens": DEMO_MAX_CACHE_TOKENS},
    }


def write_tokenizer_files(out: Path, tok, cfg: dict) -> None:
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": "<unk>", "model_max_length": LLM["max_position_embeddings"],
    }, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"],
    }, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "MiniCPMVImageProcessor", "max_slice_nums": 1,
        "scale_resolution": SCALE_RESOLUTION, "patch_size": 14, "use_image_id": False,
        "image_feature_size": QUERY_NUM, "slice_mode": True, "im_start": "<image>", "im_end": "</image>",
        "slice_start": "<slice>", "slice_end": "</slice>", "unk": "<unk>",
        "norm_mean": [0.5, 0.5, 0.5], "norm_std": [0.5, 0.5, 0.5], "version": 2.6,
    }, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def train_cache_limit() -> int:
    """MLX's buffer cache bound while training, in bytes: `TRAIN_CACHE_LIMIT_GB`, or a quarter of
    MLX's memory limit where that is less. On a CPU machine the cache shares RAM with the rendered
    streams: 16 GB of cache beside ~8 GB of a 448-stream pool was killed for memory on a 24 GB VM
    (measured), so a small machine gets a small cache."""
    import mlx.core as mx

    return min(TRAIN_CACHE_LIMIT_GB << 30, mx.get_memory_limit() // 4)
