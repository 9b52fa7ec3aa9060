"""Custom Pallas kernels, one sub-package per kernel.

Each kernel folder holds its public API (`api.py`), a plain-JAX reference
(`reference.py`), the Pallas implementation, a benchmark (`bench.py`) and a README;
tests live in `tests/kernels/`.
"""

from kernels.flash_attention import flash_attention

__all__ = ["flash_attention"]
