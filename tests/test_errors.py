"""Bad input gets a clear error and leaves the model unchanged."""

from __future__ import annotations

import pytest
import torch

import countdown
from tiny_models import tiny_model, tokens


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_unchanged(model, before):
    state, types = before
    assert [type(m) for m in model.modules()] == types
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    assert not countdown.is_sparsified(model)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(method="magic", sparsity=0.5), ValueError, "unknown method 'magic'"),
        (dict(method="cats", sparsity=1.0), ValueError, "[0, 1)"),
        (dict(method="cats", sparsity=-0.1), ValueError, "[0, 1)"),
        (dict(method="cats", sparsity="half"), TypeError, "number"),
        (dict(method="cats", sparsity=0.5, mode="median"), ValueError, "unknown mode"),
        (dict(method="cats", sparsity=0.5, mode="threshold"), ValueError, "needs calibration"),
        (dict(method="cats", sparsity=0.5, calibration=""), ValueError, "calibration text is empty"),
        (dict(method="cats", sparsity=0.5, calibration=[]), ValueError, "calibration text is empty"),
        (dict(method="cats", sparsity=0.5, calibration="some words"), ValueError, "needs tokenizer"),
        (dict(method="cats", sparsity=0.5, calibration=torch.rand(2, 8)), TypeError, "integer token ids"),
        (dict(method="d-countdown", sparsity=0.5), ValueError, "needs trained predictors"),
    ],
)
def test_bad_sparsify_arguments(kwargs, error, words):
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(error) as info:
        countdown.sparsify(model, **kwargs)
    assert words in str(info.value)
    assert_unchanged(model, before)


def test_calibration_shorter_than_one_window(smollm2_tokenizer):
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match="fewer than one window"):
        countdown.sparsify(model, "cats", 0.5, calibration="Too short.", tokenizer=smollm2_tokenizer, seq_len=64)
    assert_unchanged(model, before)


def test_unsupported_model_lists_supported():
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(
        transformers.BloomConfig(vocab_size=50, hidden_size=16, n_layer=1, n_head=2)
    )
    with pytest.raises(countdown.UnsupportedModelError, match="Supported model types: .*llama"):
        countdown.sparsify(model, "cats", 0.5)


def test_already_sparsified():
    model = tiny_model("llama")
    countdown.sparsify(model, "cats", 0.5, mode="topk")
    with pytest.raises(countdown.AlreadySparsifiedError):
        countdown.sparsify(model, "teal", 0.5, mode="topk")
    assert countdown.ffn_sites  # the first sparsification is still in place
    assert all(m.method.name == "cats" for m in countdown.ffn.sparse_modules(model))


def test_artifact_from_another_model(tmp_path):
    a = tiny_model("llama", seed=0)
    countdown.sparsify(a, "cats", 0.5, calibration=tokens())
    path = countdown.save_sparsity(a, tmp_path / "a.safetensors")
    for other in (tiny_model("qwen2"), tiny_model("llama", seed=1)):
        before = snapshot(other)
        with pytest.raises(ValueError, match="made for another model"):
            countdown.load_sparsity(other, path)
        assert_unchanged(other, before)


def test_same_model_in_another_dtype_still_matches(tmp_path):
    a = tiny_model("llama")
    countdown.sparsify(a, "cats", 0.5, calibration=tokens())
    path = countdown.save_sparsity(a, tmp_path / "a.safetensors")
    countdown.load_sparsity(tiny_model("llama").to(torch.bfloat16), path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign"])
def test_corrupt_artifact(tmp_path, damage):
    from safetensors.torch import save_file

    a = tiny_model("llama")
    countdown.sparsify(a, "cats", 0.5, calibration=tokens())
    path = countdown.save_sparsity(a, tmp_path / "a.safetensors")
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 64)
    else:
        save_file({"x": torch.zeros(2)}, str(path))
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError):
        countdown.load_sparsity(model, path)
    assert_unchanged(model, before)


def test_missing_artifact(tmp_path):
    with pytest.raises(FileNotFoundError):
        countdown.load_sparsity(tiny_model("llama"), tmp_path / "nope.safetensors")


def test_bad_dtype_and_device_names():
    from countdown.loading import resolve_device, resolve_dtype

    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda")
