"""What the host CPU offers: its model name, the ISA flags the CPU paths care about, and whether bf16 is fast.

The one reader of ``/proc/cpuinfo`` in the project; it imports nothing of fastsupmae, so every layer may use it.
Hosts of one machine kind differ (one has AVX512-BF16, the next AVX2 only), and two choices follow from it:
``train.precision: auto`` on a CPU and the layout-aware bf16 ``Linear``. ``FASTSUPMAE_CPU_BF16=1`` / ``=0``
makes the project see the CPU as with / without fast bf16 whatever it has, so both answers can be tested on
any host (the bf16 arithmetic itself runs either way; only the choices change).
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

BF16_ENV = "FASTSUPMAE_CPU_BF16"
# The flags recorded with every CPU figure: they decide which matmul kernels torch runs.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
_FAST_BF16 = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class CpuFacts:
    """The host CPU as ``/proc/cpuinfo`` describes it (empty flags where it cannot be read)."""

    model: str
    cores: int
    flags: frozenset[str]

    def isa(self) -> dict[str, bool]:
        """``{flag: present}`` for :data:`ISA_FLAGS`."""
        return {f: f in self.flags for f in ISA_FLAGS}

    def isa_text(self) -> str:
        """The present ISA flags, space separated (``"avx2 fma"``), for a benchmark's header line."""
        return " ".join(f for f in ISA_FLAGS if f in self.flags) or "none of " + "/".join(ISA_FLAGS)


@functools.lru_cache(maxsize=1)
def cpu_facts() -> CpuFacts:
    """The host CPU's model name, core count and flags (read once per process)."""
    flags: frozenset[str] = frozenset()
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = frozenset(line.split(":", 1)[1].split())
                elif line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                if flags and model:
                    break
    except OSError:
        pass
    return CpuFacts(model=model or platform.processor(), cores=os.cpu_count() or 1, flags=flags)


def cpu_has_fast_bf16() -> bool:
    """True when torch's bf16 matrix products are fast on this CPU (AVX512-BF16 or AMX), or the switch says so.

    ``FASTSUPMAE_CPU_BF16`` (``1`` / ``0``) overrides the flags; it is read on every call so a test can set it.
    Without fast bf16 the bf16 arithmetic still runs, with emulated matrix products.
    """
    forced = os.environ.get(BF16_ENV, "").strip()
    if forced in ("1", "0"):
        return forced == "1"
    if forced:
        raise ValueError(f"{BF16_ENV}={forced!r}: use 1 (treat the CPU as having fast bf16), 0 (as not having it), "
                         "or leave it unset (read the CPU's flags)")
    return any(f in cpu_facts().flags for f in _FAST_BF16)
