"""Shared pytest setup.

TRITON_INTERPRET must be set before any module defining a ``@triton.jit`` kernel is imported (Triton reads it
when the kernel is defined), so it is the first thing this file does: the kernels then run on CPU tensors.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_torch_rng():
    """Every test draws fresh random inputs, and a failing test prints the seed that replays it
    (``torch.manual_seed(<seed>)`` at its start)."""
    seed = torch.seed()
    yield
    print(f"torch seed of this test: {seed}")


# The setup failures already reported in full, by exception: a module-scoped fixture that fails (a 2-rank launch,
# say) is re-raised by pytest for every test that uses it; the first test shows the whole report (every rank's
# log), the others one line that points to it, so the one failure is not read as a dozen.
_SETUP_FAILURES: dict[int, str] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if call.when != "setup" or call.excinfo is None or not rep.failed:
        return
    exc = call.excinfo.value
    first = _SETUP_FAILURES.setdefault(id(exc), item.nodeid)
    if first != item.nodeid:
        head = (call.excinfo.exconly().splitlines() or ["?"])[0][:300]
        rep.longrepr = f"the same fixture failure as {first} (reported in full there): {head}"
