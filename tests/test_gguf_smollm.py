"""The real SmolLM2-135M-Instruct Q4_1 GGUF against transformers on the same (dequantised) weights.

llama.cpp is the end-to-end reference (test_gguf_llamacpp.py), but its CPU kernels quantise
activations to 8 bits, so it only agrees to correlation ~0.9994. transformers' LlamaForCausalLM
in float32, fed the exact values the GGUF holds (dequantised Q4_1 / Q8_0 blocks, q/k rows
un-permuted), pins down our loader plus quantised kernels much tighter: it needs the
permutation undone, the hyper-parameters read right and Q4_1/Q8_0 repacked exactly.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import torch

from gguf_fixtures import smollm_path


def test_smollm_gguf_matches_transformers_on_its_dequantised_weights():
    from transformers import LlamaConfig, LlamaForCausalLM

    from framecast.model.gguf.model import load_gguf, lm_config_from_gguf, lm_weights_from_gguf
    from framecast.model.gguf.file import dequantize_entry, read_header, read_tensors

    path = smollm_path()
    header = read_header(path)
    cfg = lm_config_from_gguf(header)
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_key_value_heads"]) == \
        ("llama", 30, 576, 3)
    assert cfg["tie_word_embeddings"] and cfg["rope_theta"] == 100000.0

    ours = load_gguf(path)
    layer = ours.language_model.layers[0]
    assert isinstance(layer.self_attn.q_proj, nn.QuantizedLinear) and layer.self_attn.q_proj.bits == 4
    assert isinstance(ours.language_model.model.embed_tokens, nn.QuantizedEmbedding)
    assert ours.language_model.model.embed_tokens.bits == 8  # the Q8_0 tied embedding

    weights, _rope = lm_weights_from_gguf(header, read_tensors(header), cfg)
    state = {k: torch.from_numpy(np.array(dequantize_entry(weights, k).astype(mx.float32)))
             for k in weights if not k.endswith((".scales", ".biases"))}
    ref = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})).eval()
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert unexpected == [] and missing == ["lm_head.weight"]  # tied: shares the embedding
    ref.tie_weights()

    text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis is"
    ids = ours.tokenizer.encode(text)
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].numpy()
    cache = ours.make_cache()
    prefill = ours.language_model(mx.array([ids[:-2]]), cache=cache)  # dequantise+GEMM path (CPU)
    steps = [ours.language_model(mx.array([[t]]), cache=cache) for t in ids[-2:]]  # quantised kernel
    got = np.array(mx.concatenate([prefill] + steps, axis=1)[0])
    np.testing.assert_allclose(got, expected, atol=2e-3, rtol=0)
    assert np.abs(got - expected).max() < 1e-3 * np.abs(expected).max()
