"""countdown: contextual FFN activation sparsity for Hugging Face causal LMs.

    import countdown
    model, tok = countdown.load("smollm2")
    countdown.sparsify(model, "m-countdown", 0.7, calibration=texts, tokenizer=tok)
    countdown.perplexity(model, token_ids)
    countdown.save_sparsity(model, "smollm2-mcd70.safetensors")
    model.save_pretrained("smollm2-mcd70")  # weights + the sparsity beside them
    model = countdown.from_pretrained("smollm2-mcd70")  # sparse again (plain transformers: the dense model)

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
    from_pretrained,
    load_sparsity,
    save_sparsity,
    set_kernels,
    sparsify,
    unsparsify,
)
from .allocation import Allocation
from .attention import fuse_qkv, unfuse_qkv
from .calibrate import Calibration
from .decode import Decoder
from .evaluate import PerplexityResult, perplexity
from .ffn import DenseForwardWarning, is_sparsified, sparsity_spec
from .generation import generate
from .loading import load
from .methods import METHODS, get_method
from .options import DecodeOptions, KernelPolicy
from .models import SUPPORTED_MODEL_TYPES, UnsupportedModelError, ffn_sites, fingerprint
from .offload import offload, unoffload
from .predictor import Predictors, load_predictors, save_predictors, train_predictors
from .spec import OFFICIAL_PROTOCOL, Protocol, SparsitySpec

__all__ = [
    "AlreadySparsifiedError",
    "Allocation",
    "Calibration",
    "DecodeOptions",
    "Decoder",
    "DenseForwardWarning",
    "KernelPolicy",
    "METHODS",
    "OFFICIAL_PROTOCOL",
    "PerplexityResult",
    "Predictors",
    "Protocol",
    "SUPPORTED_MODEL_TYPES",
    "SparsitySpec",
    "UnsupportedModelError",
    "calibrate",
    "calibrate_methods",
    "ffn_sites",
    "fingerprint",
    "from_pretrained",
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
