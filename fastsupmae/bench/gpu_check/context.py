"""What every stage of the GPU self-test receives and how it reports.

A stage is a function ``stage(ctx: StageContext) -> dict``. It returns what it checked (max errors, steps, the
resumed step, images/s, ...) plus a one-line ``summary``; it raises :class:`Skip` when it cannot run here (with
the reason), and any other exception makes it FAIL with that exception as the reason. The runner executes each
stage in its own process with its own timeout, so a crash or hang in one stage never stops the next.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch


class Skip(Exception):  # noqa: N818 - a verdict, not an error
    """The stage cannot run on this machine; the message says why (shown in the table and the JSON)."""


class Problems(Exception):  # noqa: N818 - a verdict, not an error
    """FAIL with several problems, each one line naming the fix (the runner prints each under the table)."""

    def __init__(self, lines: list[str], details: dict | None = None) -> None:
        super().__init__("; ".join(lines))
        self.lines, self.details = list(lines), dict(details or {})


@dataclass
class StageContext:
    """Inputs of one stage.

    Attributes:
        cpu: ``--cpu``: the same checks at tiny sizes on the CPU (Triton interpreter, gloo with 2 ranks, DALI CPU
            operators); stages with no CPU twin raise :class:`Skip`.
        device: ``cuda:N`` on a GPU node, ``cpu`` with ``--cpu``.
        gpus: GPUs visible on this node (0 with ``--cpu``).
        workdir: an empty scratch directory that belongs to this stage.
        log: progress messages (stderr of the stage process; the runner shows them on failure).
        stages: the stages of this run, in order (the preflight checks what they need).
        quick: ``--quick``: the capped profile; stages do their reduced version (docs/gpu_check.md).
    """

    cpu: bool
    device: torch.device
    gpus: int
    workdir: Path
    log: Callable[[str], None] = field(default=print)
    stages: tuple[str, ...] = ()
    quick: bool = False


def need_gpu(ctx: StageContext) -> None:
    """Skip the stage on a machine without a GPU, unless it runs its CPU twin (``--cpu``)."""
    if not ctx.cpu and ctx.gpus < 1:
        raise Skip("no GPU visible (run with --cpu for the CPU twin)")
