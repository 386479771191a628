"""The Triton-interpreter fix for NumPy >= 2.4 (kernels/triton_compat.py).

The installed Triton may or may not need it (3.6 does, 3.8 does not), so the fallback is exercised against
stand-ins for the two styles of the interpreter's ``_patch_lang_tensor``, and a kernel with a runtime loop bound
runs under the real interpreter whichever Triton is installed.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from fastsupmae.kernels import ops, triton_compat  # importing ops applies the fix under TRITON_INTERPRET=1
from triton.runtime import interpreter


def _numpy_rejects_1elem_int() -> bool:
    try:
        int(np.array([1]))
    except TypeError:
        return True
    return False


def _old_style(tensor, scope):
    """Triton 3.6's way: int() of the 1-element array itself."""
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))
    scope.set_attr(tensor, "__repr__", lambda self: repr(self.handle.data))


def _new_style(tensor, scope):
    """Later releases: squeeze first."""
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))


class _Handle:
    def __init__(self, v: int) -> None:
        self.data = np.array([v], dtype=np.int32)


def _index_after_patch(value: int) -> int:
    class T:
        pass

    scope = interpreter._LangPatchScope()
    interpreter._patch_lang_tensor(T, scope)
    t = T()
    t.handle = _Handle(value)
    try:
        return T.__index__(t)
    finally:
        scope.restore()
        assert not hasattr(T, "__index__")  # the scope takes the patched attribute away again


def test_old_style_interpreter_is_fixed_exactly_when_numpy_is_strict(monkeypatch):
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", _old_style)
    strict = _numpy_rejects_1elem_int()
    assert triton_compat.fix_interpreter_index() is strict
    if strict:
        assert interpreter._patch_lang_tensor is not _old_style
        assert _index_after_patch(7) == 7
        wrapped = interpreter._patch_lang_tensor
        assert triton_compat.fix_interpreter_index() is True  # idempotent: not wrapped twice
        assert interpreter._patch_lang_tensor is wrapped
    else:
        assert interpreter._patch_lang_tensor is _old_style


def test_working_interpreter_is_left_alone(monkeypatch):
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", _new_style)
    assert triton_compat.fix_interpreter_index() is False
    assert interpreter._patch_lang_tensor is _new_style
    assert _index_after_patch(5) == 5


def test_changed_internals_or_no_triton_are_a_no_op(monkeypatch):
    monkeypatch.delattr(interpreter, "_patch_lang_tensor")
    assert triton_compat.fix_interpreter_index() is False
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "triton.runtime", None)  # `from triton.runtime import ...` raises ImportError
    assert triton_compat.fix_interpreter_index() is False


@triton.jit
def _row_sum_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for r0 in range(0, N + 1, BLOCK):  # a runtime loop bound: what Triton 3.6 + NumPy 2.4 broke
        r = r0 + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + r, mask=r < N + 1, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))


@pytest.mark.parametrize("n", [0, 5, 16])
def test_runtime_loop_bound_runs_under_the_interpreter(n):
    assert ops._INTERPRET  # conftest sets TRITON_INTERPRET=1 before the kernels are imported
    x = torch.arange(n + 1, dtype=torch.float32)
    out = torch.zeros(1)
    _row_sum_kernel[(1,)](x, out, n, BLOCK=8)
    assert out.item() == float(x.sum())
