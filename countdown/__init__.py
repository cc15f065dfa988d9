"""countdown: contextual FFN activation sparsity for Hugging Face causal LMs.

    import countdown
    model, tok = countdown.load("smollm2")
    countdown.sparsify(model, "m-countdown", 0.7, calibration=texts, tokenizer=tok)
    countdown.perplexity(model, token_ids)
    countdown.save_sparsity(model, "smollm2-mcd70.safetensors")

    countdown.generate(model, input_ids, attention_mask, max_new_tokens=256)  # CUDA-graph decode loop
    predictors = countdown.train_predictors(model, 0.7, calibration=texts, tokenizer=tok)
    countdown.sparsify(model, "d-countdown", 0.7, calibration=texts, tokenizer=tok, predictors=predictors)
    freqs = countdown.hot.keep_frequencies(model, texts, tok)  # import countdown.hot
    countdown.offload(model, "cuda", gpu_budget="8GiB", frequencies=freqs)  # a model larger than the GPU
"""

from .api import (
    AlreadySparsifiedError,
    calibrate,
    calibrate_methods,
    load_sparsity,
    save_sparsity,
    set_kernels,
    sparsify,
    unsparsify,
)
from .attention import fuse_qkv, unfuse_qkv
from .calibrate import Calibration
from .decode import Decoder
from .evaluate import PerplexityResult, perplexity
from .ffn import OFFICIAL_PROTOCOL, SparsitySpec, is_sparsified, sparsity_spec
from .generation import generate
from .loading import load
from .methods import METHODS, get_method
from .models import SUPPORTED_MODEL_TYPES, UnsupportedModelError, ffn_sites, fingerprint
from .offload import offload, unoffload
from .predictor import Predictors, load_predictors, save_predictors, train_predictors

__all__ = [
    "AlreadySparsifiedError",
    "Calibration",
    "Decoder",
    "METHODS",
    "OFFICIAL_PROTOCOL",
    "PerplexityResult",
    "Predictors",
    "SUPPORTED_MODEL_TYPES",
    "SparsitySpec",
    "UnsupportedModelError",
    "calibrate",
    "calibrate_methods",
    "ffn_sites",
    "fingerprint",
    "fuse_qkv",
    "generate",
    "get_method",
    "is_sparsified",
    "load",
    "load_predictors",
    "load_sparsity",
    "offload",
    "perplexity",
    "save_predictors",
    "save_sparsity",
    "set_kernels",
    "sparsify",
    "sparsity_spec",
    "train_predictors",
    "unfuse_qkv",
    "unoffload",
    "unsparsify",
]
__version__ = "0.1.0"
