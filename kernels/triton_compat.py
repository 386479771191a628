"""Compatibility of the Triton interpreter (``TRITON_INTERPRET=1``) with the NumPy it runs on.

Triton 3.6 (the version of torch 2.11's wheels) converts a runtime scalar to a Python int inside the interpreter
with ``int(handle.data)``, where ``handle.data`` is a 1-element 1-d array. NumPy 2.4 turned that deprecated
conversion into ``TypeError: only 0-dimensional arrays can be converted to Python scalars``
(triton-lang/triton#9171), so any kernel whose loop bound is a runtime value (``range(0, N, BLOCK)`` with ``N``
an argument) fails under the interpreter. Later Triton releases convert ``handle.data.squeeze()``.
Compiled GPU kernels never take this path; only CPU runs under the interpreter (tests, ``gpu_check --cpu``) do.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

log = logging.getLogger(__name__)

_PATCHED = "_fastsupmae_index_fix"


def _index_breaks(patch_lang_tensor, scope_cls) -> bool:
    """Whether ``patch_lang_tensor`` installs an ``__index__`` that fails on a 1-element scalar handle."""
    import numpy as np

    class _Probe:  # a stand-in for tl.tensor: _patch_lang_tensor only sets attributes on the class
        pass

    scope = scope_cls()
    try:
        patch_lang_tensor(_Probe, scope)
        probe = _Probe()
        probe.handle = SimpleNamespace(data=np.array([3], dtype=np.int32))  # how the interpreter holds a scalar
        try:
            return int(_Probe.__index__(probe)) != 3
        except TypeError:
            return True
    finally:
        scope.restore()


def fix_interpreter_index() -> bool:
    """Make the Triton interpreter's scalar ``__index__`` accept 1-element arrays when it does not already.

    Detects the problem by probing the installed interpreter (no version table to keep up to date) and wraps its
    ``_patch_lang_tensor`` so the patched ``__index__`` squeezes the array first, as later Triton releases do.
    Idempotent; a no-op when Triton is missing, the interpreter already copes, or its internals have changed.

    Returns:
        True when the fix is (now or already) installed, False when it was not needed or not applicable.
    """
    try:
        from triton.runtime import interpreter
    except Exception:  # no Triton (it is an optional extra), or one whose interpreter cannot import here
        return False
    orig = getattr(interpreter, "_patch_lang_tensor", None)
    scope_cls = getattr(interpreter, "_LangPatchScope", None)
    if orig is None or scope_cls is None:
        return False  # internals changed: a Triton new enough to have fixed this long ago
    if getattr(orig, _PATCHED, False):
        return True
    try:
        if not _index_breaks(orig, scope_cls):
            return False
    except Exception as e:  # never let a compatibility probe break kernel imports
        log.debug("Triton interpreter __index__ probe failed (%s); leaving the interpreter as it is", e)
        return False

    def _patch_lang_tensor(tensor, scope):
        orig(tensor, scope)
        # set after the original, so the scope restores ours first and then the original's attribute
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    setattr(_patch_lang_tensor, _PATCHED, True)
    interpreter._patch_lang_tensor = _patch_lang_tensor
    log.debug("Triton interpreter: scalar __index__ squeezes 1-element arrays (NumPy >= 2.4 with Triton 3.6)")
    return True
