"""Kernel tests run everywhere: compiled on a CUDA machine, in Triton's interpreter elsewhere.

Triton picks interpreted or compiled kernels when it is first imported, so TRITON_INTERPRET=1 is
set here, before any kernel module is imported, whenever there is no GPU. (pytest collects this
directory before the top-level test_*.py files, which may import transformers and, through it,
triton.)
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
