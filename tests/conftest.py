"""Test setup: with no GPU, Triton kernels run in its CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, so this runs
before anything imports imm_kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE

