"""Triton kernels run on CPU tensors through Triton's interpreter, so the CPU
tests compare each kernel with its PyTorch form. The interpreter is on for
sessions without a GPU (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``
before Triton is imported); with a GPU the compiled kernels are tested
instead, and where Triton is not installed these tests skip."""
from __future__ import annotations

import os

import pytest


def interpreted(module: str, name: str):
    """``(triton, kernel)``: the ``@triton.jit`` kernel ``name`` of ``module``,
    which Triton's interpreter runs on CPU tensors, loaded as shardwise loads
    it (``model.kernels.triton_kernel``, with its mends of the interpreter)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is on in sessions without a GPU (tests/conftest.py)")
    from shardwise.model.kernels import triton_kernel

    return triton_kernel(module, name)
