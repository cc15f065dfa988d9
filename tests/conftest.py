"""Shared fixtures: the real SmolLM2 tokenizer and model (loaded once per session)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from countdown.loading import builtin_smollm2_path

    path = builtin_smollm2_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="session")
def smollm2(smollm2_tokenizer):
    """(model, tokenizer): the real SmolLM2-135M-Instruct in float32 on the CPU."""
    from countdown.loading import load

    model, _ = load("smollm2", device="cpu", dtype="float32")
    return model, smollm2_tokenizer
