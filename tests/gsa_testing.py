"""Shared test constants: the kernels' error bars and packed-document segment ids. (Random inputs, references and
error measures are `gsa_jax.ops.testing`'s, which benchmarks use too.)"""

from __future__ import annotations

import numpy as np

# Relative L2 error vs float64 that every fast path must meet (the issues' bars; float16, whose outputs are rounded
# to 11 bits, gets the bfloat16 bar scaled by their precisions, rounded up).
KERNEL_TOL = {"float32": 1e-4, "bfloat16": 2.5e-3, "float16": 1e-3}
# Documents of length 1, padding inside a document and at the end, documents crossing chunk borders (t = 96).
SEGMENTS = np.array([
    [1] * 13 + [2] + [3] * 30 + [0] * 3 + [3] * 5 + [4] * 20 + [5] + [0] * 23,
    [7] + [0] * 4 + [7] * 40 + [8] * 20 + [9] * 15 + [10] * 16,
], np.int32)
