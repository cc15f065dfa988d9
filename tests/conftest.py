"""Shared fixtures: the real SmolLM2 tokenizer and model (loaded once per session), and a counter of
input-sparse kernel launches."""

from __future__ import annotations

import os

import pytest
import torch

# Triton chooses compiled or interpreted kernels when first imported (transformers may import it):
# without a GPU, the kernel tests run in the interpreter, so say so before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from countdown import assets
    from countdown.loading import builtin_smollm2_path

    if not assets.installed("smollm2") and os.environ.get("COUNTDOWN_REQUIRE_REAL_MODELS") != "1":
        # a GPU machine with only the package (make test sets the variable: there the model must be present)
        pytest.skip("the real SmolLM2 is not installed (countdown install-model smollm2)")

    path = builtin_smollm2_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="session")
def smollm2(smollm2_tokenizer):
    """(model, tokenizer): the real SmolLM2-135M-Instruct in float32 on the CPU."""
    from countdown.loading import load

    model, _ = load("smollm2", device="cpu", dtype="float32")
    return model, smollm2_tokenizer


@pytest.fixture
def launches(monkeypatch):
    """The number of weights of every input-sparse prefetch-kernel launch (3: one fused q/k/v), counted
    at run time inside the op."""
    from countdown.kernels import input_sparse_prefetch

    seen: list[int] = []
    real = input_sparse_prefetch.launch
    monkeypatch.setattr(input_sparse_prefetch, "launch", lambda *a, **kw: seen.append(len(a[1])) or real(*a, **kw))
    return seen
