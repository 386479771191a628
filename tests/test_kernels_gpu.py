"""The compiled Triton kernels on a CUDA device against their torch twins (skipped without a GPU).

tests/conftest.py puts the whole test session under the Triton interpreter, so the compiled kernels are checked
in a fresh process without TRITON_INTERPRET (``fastsupmae.kernels.checks.check``, also reachable as
``fastsupmae bench kernels --check``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_kernels_match_torch_on_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import sys, torch; from fastsupmae.kernels import checks; sys.exit(checks.check(torch.device('cuda')))"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 failure(s)" in res.stdout
