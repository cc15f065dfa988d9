"""countdown: contextual FFN activation sparsity for Hugging Face causal LMs.

    import countdown
    countdown.sparsify(model, "m-countdown", 0.7, calibration=texts, tokenizer=tok)
    countdown.perplexity(model, token_ids)
    countdown.save_sparsity(model, "smollm2-mcd70.safetensors")
"""

from .api import (
    AlreadySparsifiedError,
    calibrate,
    calibrate_methods,
    is_sparsified,
    load_sparsity,
    save_sparsity,
    sparsify,
    unsparsify,
)
from .calibrate import Calibration
from .evaluate import PerplexityResult, perplexity
from .kernel_path import set_kernels
from .methods import METHODS, get_method
from .models import SUPPORTED_MODEL_TYPES, UnsupportedModelError, ffn_sites, fingerprint

__all__ = [
    "AlreadySparsifiedError",
    "Calibration",
    "METHODS",
    "PerplexityResult",
    "SUPPORTED_MODEL_TYPES",
    "UnsupportedModelError",
    "calibrate",
    "calibrate_methods",
    "ffn_sites",
    "fingerprint",
    "get_method",
    "is_sparsified",
    "load_sparsity",
    "perplexity",
    "save_sparsity",
    "set_kernels",
    "sparsify",
    "unsparsify",
]
__version__ = "0.1.0"
