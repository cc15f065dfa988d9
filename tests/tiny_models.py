"""Tiny random-weight models of every supported architecture, built from a config (no download)."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 97
HIDDEN = 32
INTER = 72  # not a power of two on purpose

_COMMON = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4)
_GATED_COMMON = dict(_COMMON, hidden_size=HIDDEN, intermediate_size=INTER, num_key_value_heads=2,
                     max_position_embeddings=256)

CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**_GATED_COMMON),
    "mistral": lambda: tf.MistralConfig(**_GATED_COMMON, sliding_window=None),
    "qwen2": lambda: tf.Qwen2Config(**_GATED_COMMON),
    "qwen3": lambda: tf.Qwen3Config(**_GATED_COMMON, head_dim=8),
    "gemma": lambda: tf.GemmaConfig(**_GATED_COMMON, head_dim=8),
    "gemma2": lambda: tf.Gemma2Config(**_GATED_COMMON, head_dim=8),
    # one sliding-window layer and one full-attention layer, as Gemma 3 alternates them (5:1 in 270M)
    "gemma3": lambda: tf.Gemma3TextConfig(**_GATED_COMMON, head_dim=8, sliding_window=8,
                                          layer_types=["sliding_attention", "full_attention"]),
    "phi3": lambda: tf.Phi3Config(**_GATED_COMMON, pad_token_id=0),
    "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_inner=INTER, n_layer=2, n_head=4, n_positions=256),
    "opt": lambda: tf.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=INTER, num_hidden_layers=2,
                                num_attention_heads=4, word_embed_proj_dim=HIDDEN, max_position_embeddings=256),
    "gpt_neox": lambda: tf.GPTNeoXConfig(**_COMMON, hidden_size=HIDDEN, intermediate_size=INTER,
                                         max_position_embeddings=256),
}

ARCHS = tuple(CONFIGS)


def tiny_model(arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(CONFIGS[arch]())
    return model.eval()


def tokens(n_windows: int = 4, seq_len: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (n_windows, seq_len), generator=g)
