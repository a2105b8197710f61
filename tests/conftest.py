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



@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny models gain little from more, and on a shared CPU a
    thread whose core is busy stalls every parallel region (tens of times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(capsys, *argv):
    """Runs `imm-kernels ARGV` in this process; returns what it printed (capsys.readouterr())."""
    from imm_kernels.cli import main

    main(list(argv))
    return capsys.readouterr()


def cli_fails(capsys, *argv) -> str:
    """Runs `imm-kernels ARGV`, which must exit with status 2 (a bad argument); returns its stderr."""
    from imm_kernels.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err
