"""Where each supported architecture keeps its FFN.

This is the only module that knows attribute names of Hugging Face models. Everything else sees an
`FFNSite`: the module to replace, how to read its weights as `[I, H]` / `[H, I]` matrices, and the
activation. Two FFN shapes exist:

* gated: ``y = W_down (act(W_gate x) * (W_up x))`` (Llama, Mistral, Qwen2/3, Gemma/Gemma2/Gemma3, Phi-3 fused)
* plain: ``y = W_out act(W_in x)`` (GPT-2, OPT, GPT-NeoX); the coefficient vector is ``act(W_in x)``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .parallel import leading_rows

# model_type -> (path of the decoder-layer list, FFN layout)
# gemma3_text: Gemma3ForCausalLM, the text-only Gemma 3 (270M, 1B, and what a Gemma 3 GGUF loads as)
_GATED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"}
_PLAIN = {"gpt2", "opt", "gpt_neox"}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_GATED | _PLAIN))


# activation names used by transformers configs -> the names the Triton kernels implement
_KERNEL_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
}


class UnsupportedModelError(ValueError):
    """The model has no FFN layout that countdown knows."""


@dataclass
class FFNSite:
    """One decoder layer's FFN, seen through a layout-independent lens.

    ``parent`` and ``name`` locate the module that ``countdown`` replaces (``parent.<name>``); for plain
    FFNs that module is the activation, because the activation's output is the coefficient vector.
    """

    layer: int
    kind: str  # "gated" | "plain"
    parent: nn.Module
    name: str
    act: Callable[[torch.Tensor], torch.Tensor]
    act_name: str
    # gated: gate_proj/up_proj/down_proj (or gate_up_proj for Phi-3); plain: in_proj/out_proj
    modules: dict[str, nn.Module]
    act_attr: str = "act_fn"  # the activation's attribute name on a gated MLP

    @property
    def kernel_act(self) -> str | None:
        """The kernels' name for this FFN's activation, or None when no kernel implements it."""
        return _KERNEL_ACTIVATIONS.get(self.act_name)

    @property
    def module(self) -> nn.Module:
        return getattr(self.parent, self.name)

    def gated_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W_gate [I, H], W_up [I, H], W_down [H, I]) as views of the model's parameters."""
        if "gate_up_proj" in self.modules:  # Phi-3 stores gate and up stacked: rows [0, I) are gate
            w = self.modules["gate_up_proj"].weight
            half = w.shape[0] // 2
            return w[:half], w[half:], self.modules["down_proj"].weight
        return (
            self.modules["gate_proj"].weight,
            self.modules["up_proj"].weight,
            self.modules["down_proj"].weight,
        )

    def plain_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_in [I, H], W_out [H, I]); GPT-2's Conv1D stores the transpose."""
        w_in, w_out = self.modules["in_proj"].weight, self.modules["out_proj"].weight
        if type(self.modules["in_proj"]).__name__ == "Conv1D":
            return w_in.t(), w_out.t()
        return w_in, w_out

    @property
    def input_module(self) -> nn.Module:
        """The module whose input is the FFN input x."""
        return self.module if self.kind == "gated" else self.modules["in_proj"]

    def coefficient(self, x: torch.Tensor) -> torch.Tensor:
        """The dense coefficient vector t for FFN input x (biases included)."""
        if self.kind == "plain":
            return self.act(self.modules["in_proj"].forward(x))  # .forward: skip hooks on in_proj
        if "gate_up_proj" in self.modules:
            gate, up = self.modules["gate_up_proj"](x).chunk(2, dim=-1)
        else:
            gate, up = self.modules["gate_proj"](x), self.modules["up_proj"](x)
        return self.act(gate) * up

    @property
    def intermediate_size(self) -> int:
        if self.kind == "gated":
            return self.gated_weights()[0].shape[0]
        return self.plain_weights()[0].shape[0]

    @property
    def hidden_size(self) -> int:
        if self.kind == "gated":
            return self.gated_weights()[0].shape[1]
        return self.plain_weights()[0].shape[1]


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", type(model).__name__)


def _decoder_layers(model: nn.Module, model_type: str) -> list[nn.Module]:
    if model_type == "gpt2":
        return list(model.transformer.h)
    if model_type == "opt":
        return list(model.model.decoder.layers)
    if model_type == "gpt_neox":
        return list(model.gpt_neox.layers)
    return list(model.model.layers)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers (blocks), in order."""
    return _decoder_layers(model, _model_type(model))


def _act_name(config, model_type: str) -> str:
    if model_type == "gpt2":
        return config.activation_function
    if model_type == "opt":
        return config.activation_function
    if model_type in ("gemma2", "gemma3_text"):
        return config.hidden_activation
    if model_type == "gemma":
        # Gemma checkpoints name gelu but the reference implementation uses the tanh approximation
        return getattr(config, "hidden_activation", None) or "gelu_pytorch_tanh"
    return config.hidden_act


def _site(layer_idx: int, layer: nn.Module, model_type: str, act_name: str) -> FFNSite:
    if model_type in _GATED:
        mlp = layer.mlp
        if model_type == "phi3":
            mods = {"gate_up_proj": mlp.gate_up_proj, "down_proj": mlp.down_proj}
            act_attr = "activation_fn"
        else:
            mods = {"gate_proj": mlp.gate_proj, "up_proj": mlp.up_proj, "down_proj": mlp.down_proj}
            act_attr = "act_fn"
        return FFNSite(layer_idx, "gated", layer, "mlp", getattr(mlp, act_attr), act_name, mods, act_attr)
    if model_type == "gpt2":
        mods = {"in_proj": layer.mlp.c_fc, "out_proj": layer.mlp.c_proj}
        return FFNSite(layer_idx, "plain", layer.mlp, "act", layer.mlp.act, act_name, mods)
    if model_type == "gpt_neox":
        mods = {"in_proj": layer.mlp.dense_h_to_4h, "out_proj": layer.mlp.dense_4h_to_h}
        return FFNSite(layer_idx, "plain", layer.mlp, "act", layer.mlp.act, act_name, mods)
    # OPT keeps fc1 / activation_fn / fc2 directly on the decoder layer
    mods = {"in_proj": layer.fc1, "out_proj": layer.fc2}
    return FFNSite(layer_idx, "plain", layer, "activation_fn", layer.activation_fn, act_name, mods)


def ffn_sites(model: nn.Module) -> list[FFNSite]:
    """Every decoder layer's FFN, in order. Raises `UnsupportedModelError` naming what is supported."""
    model_type = _model_type(model)
    if model_type not in _GATED | _PLAIN:
        raise UnsupportedModelError(
            f"countdown does not know the FFN layout of model_type={model_type!r} "
            f"({type(model).__name__}). Supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    try:
        layers = _decoder_layers(model, model_type)
        act_name = _act_name(model.config, model_type)
        return [_site(i, layer, model_type, act_name) for i, layer in enumerate(layers)]
    except AttributeError as err:
        raise UnsupportedModelError(
            f"{type(model).__name__} claims model_type={model_type!r} but does not have the expected "
            f"FFN modules ({err}). Pass the causal-LM model (e.g. AutoModelForCausalLM), not a submodule."
        ) from err


def fingerprint(model: nn.Module) -> dict:
    """What identifies a model for a calibration artifact: architecture, sizes and a weight digest.

    The digest hashes the sign pattern of a few FFN rows so that thresholds calibrated on one
    checkpoint are not silently applied to another checkpoint of the same shape; signs survive a cast
    to bf16/fp16 and a move to another device, so the same model in another dtype still matches. A
    tensor-parallel model has its unsharded model's fingerprint (sizes are global); there every rank
    must call this together (`countdown.parallel.leading_rows` broadcasts).
    """
    sites = ffn_sites(model)
    config = model.config
    digest = hashlib.sha256()
    for site in (sites[0], sites[-1]):
        w = site.gated_weights()[0] if site.kind == "gated" else site.plain_weights()[0]
        signs = (leading_rows(w, 4) > 0).cpu()  # under TP rank 0 owns these rows and broadcasts them
        digest.update(signs.numpy().tobytes())
    return {
        "architecture": type(model).__name__,
        "model_type": _model_type(model),
        "hidden_size": sites[0].hidden_size,
        "intermediate_size": sites[0].intermediate_size,
        "num_layers": len(sites),
        "vocab_size": int(getattr(config, "vocab_size", 0) or 0),
        "weight_digest": digest.hexdigest()[:16],
    }


ATTENTION_SITES = ("qkv", "o")  # q/k/v share one input; o reads the attention output


@dataclass
class AttentionSite:
    """One decoder layer's attention projections: ``qkv`` share one input (q, k, v, or Phi-3's fused
    qkv_proj), ``o`` reads the attention output."""

    layer: int
    qkv: list[nn.Linear]
    o: nn.Linear


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """Every decoder layer's attention projections, for input sparsity (gated-FFN families only)."""
    model_type = _model_type(model)
    if model_type not in _GATED:
        raise UnsupportedModelError(
            f"attention sparsity knows the projections of {', '.join(sorted(_GATED))}; "
            f"model_type={model_type!r} is not one of them")
    sites = []
    for i, layer in enumerate(_decoder_layers(model, model_type)):
        attn = layer.self_attn
        qkv = [attn.qkv_proj] if model_type == "phi3" else [attn.q_proj, attn.k_proj, attn.v_proj]
        sites.append(AttentionSite(i, qkv, attn.o_proj))
    return sites


def step_weight_bytes(model: nn.Module) -> int:
    """Weight bytes one decode step reads: every parameter once (tied weights count once), the input
    embedding excluded unless it is the LM head (a step reads one of its rows per token)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb_in, emb_out = model.get_input_embeddings(), model.get_output_embeddings()
    if emb_out is None or emb_in.weight is not emb_out.weight:
        total -= emb_in.weight.numel() * emb_in.weight.element_size()
    return total
