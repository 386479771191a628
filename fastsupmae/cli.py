"""The ``fastsupmae`` command (also ``python -m fastsupmae``).

Subcommands import their task module only when run, so ``fastsupmae --help`` is instant and a missing optional
package only matters to the subcommand that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable

from .config import add_config_args, config_from_args, peak_tflops_env
from .errors import UserError

# Exit status of a run stopped early on request (SIGTERM / SIGINT / SIGUSR1, or the run directory's STOP file)
# after writing its checkpoint: EX_TEMPFAIL, "try again" - rerun with train.resume=auto to continue. A run that
# ends as planned (its steps, or the length train.time_limit_min planned) exits 0, and so does the safety stop of
# a planned run that overruns its limit badly ('time_limit', checkpointed); user errors exit 2.
EXIT_STOPPED_EARLY = 75

# name -> (module, help); each module provides add_args(parser) and run(args)
TASKS: dict[str, tuple[str, str]] = {
    "pretrain": ("fastsupmae.tasks.pretrain", "pretrain (supmae | mae | supervised | mim_supervised) with DeepSpeed"),
    "finetune": ("fastsupmae.tasks.finetune", "fine-tune a pretrained encoder (SupMAE/MAE recipe)"),
    "linprobe": ("fastsupmae.tasks.linprobe", "linear probe on a frozen encoder"),
    "knn": ("fastsupmae.tasks.knn", "k-NN classification on frozen features"),
    "eval": ("fastsupmae.tasks.evaluate", "top-1/top-5 and robustness sets (IN-A, -R, -Sketch, -V2, -C)"),
    "export": ("fastsupmae.tasks.export", "export weights to timm / plain PyTorch / torch.export"),
    "visualize": ("fastsupmae.tasks.visualize", "reconstruction pictures and loss curves"),
    "prepare": ("fastsupmae.tasks.prepare", "decode once: any source -> verified, pre-resized tar shards + manifest"),
    "gpu-check": ("fastsupmae.bench.gpu_check", "GPU self-test: env, kernels, attention, model, trainer, ... (--cpu)"),
}
BENCHES: dict[str, tuple[str, str]] = {
    "kernels": ("fastsupmae.bench.kernels", "fused kernels vs unfused MAE-style references"),
    "data": ("fastsupmae.bench.data", "input pipelines vs the torchvision baseline"),
    "model": ("fastsupmae.bench.perf_model", "PREDICTED step time / MFU / scaling on a named device"),
    "train": ("fastsupmae.bench.train", "training-step throughput vs the unfused reference path"),
}


# Commands whose whole config comes from --config / key=value: it is validated before their module (and torch,
# DeepSpeed) is imported, so a typo or an out-of-range value is answered in a fraction of a second.
CONFIG_FIRST = ("pretrain",)


def _validate_config_first(rest: list[str]) -> None:
    """Load (and so validate) the config named by ``rest`` (the arguments after the command); other flags are
    the command's own and are ignored here."""
    p = argparse.ArgumentParser(add_help=False, parents=[_global_options(default=False)])
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)
    add_config_args(p)
    if "-h" in rest or "--help" in rest:
        return
    try:
        known, _ = p.parse_known_args(rest)
    except SystemExit:  # a malformed argument: the command's own parser reports it, with the right usage line
        return
    config_from_args(known)


# Commands that read --checkpoint (finetune: also --init): a file that is missing, empty or not a checkpoint is
# answered before their module (and torch) is imported. Directories (DeepSpeed checkpoints, run folders) are
# left to the command.
CHECKPOINT_FIRST = ("knn", "linprobe", "finetune", "eval", "export", "visualize")


def _check_checkpoint_first(rest: list[str]) -> None:
    """Torch-free checks (:func:`fastsupmae.checkpoint_file.check_checkpoint_file`) of the checkpoint file named
    in ``rest`` (the arguments after the command)."""
    from pathlib import Path

    from .checkpoint_file import check_checkpoint_file

    for i, a in enumerate(rest):
        name, eq, value = a.partition("=")
        if name in ("--checkpoint", "--init"):
            path = value if eq else (rest[i + 1] if i + 1 < len(rest) else "")
            if path and not Path(path).is_dir():
                check_checkpoint_file(path)


def _lazy(module: str, what: str) -> tuple[Callable, Callable]:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("fastsupmae"):
            raise UserError(f"'{what}' is not available in this build of fastsupmae ({module} is missing)") from None
        raise
    return mod.add_args, mod.run


def _config_cmd(args: argparse.Namespace) -> int:
    from .config import describe, save_config

    if args.list:
        print("\n".join(describe()))
        return 0
    cfg = config_from_args(args)
    import tempfile

    with tempfile.NamedTemporaryFile("r", suffix=".yaml") as f:
        save_config(cfg, f.name)
        print(open(f.name).read(), end="")
    return 0


# Global options that take a value: skipped (with their value) when looking for the command word in argv.
GLOBAL_VALUE_OPTIONS = ("--log-level", "--local_rank", "--local-rank")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(value: str) -> str:
    """argparse type of ``--log-level``: a level name in any case."""
    if value.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"'{value}' is not a logging level; use one of {', '.join(LOG_LEVELS)}")
    return value.upper()


def _command_word(argv: list[str]) -> tuple[str | None, int]:
    """The first word of ``argv`` that is not an option or an option's value, and its index (-1 if none).

    Global options may stand before the command (``fastsupmae --log-level WARNING pretrain``): their values must
    not be taken for the command.
    """
    skip = False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a in GLOBAL_VALUE_OPTIONS:
            skip = True
        elif a == "--":
            return (argv[i + 1], i + 1) if i + 1 < len(argv) else (None, -1)
        elif not a.startswith("-"):
            return a, i
    return None, -1


def _global_options(default: bool) -> argparse.ArgumentParser:
    """``--log-level``, accepted before the command (top level) and after it (every subcommand)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--log-level", type=_log_level, metavar="LEVEL",
                   default="INFO" if default else argparse.SUPPRESS,
                   help=f"logging level: {' | '.join(LOG_LEVELS)} (rank 0; other ranks log warnings; default INFO)")
    return p


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="fastsupmae", description="fastsupmae: fast SupMAE / MAE trainer (DALI + Triton + DeepSpeed)",
        parents=[_global_options(default=True)],
    )
    parser.add_argument("--version", action="version", version=f"fastsupmae {__version__}")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = [_global_options(default=False)]  # after the command too; SUPPRESS keeps the top level's value
    # Only the subcommand actually invoked gets its module imported (and its arguments defined).
    wanted, at = _command_word(argv)
    for name, (module, help_) in TASKS.items():
        sp = sub.add_parser(name, help=help_, parents=common)
        sp.set_defaults(_module=module, _name=name)
        if name == wanted:
            add, _ = _lazy(module, name)
            add(sp)
    bench = sub.add_parser("bench", help="benchmarks that print tables (see docs/benchmarks.md)", parents=common)
    bsub = bench.add_subparsers(dest="bench", metavar="BENCH")
    wanted_b = _command_word(argv[at + 1:])[0] if wanted == "bench" else None
    for name, (module, help_) in BENCHES.items():
        bp = bsub.add_parser(name, help=help_, parents=common)
        bp.set_defaults(_module=module, _name=f"bench {name}")
        if name == wanted_b:
            add, _ = _lazy(module, f"bench {name}")
            add(bp)
    cp = sub.add_parser("config", help="print the resolved config (or --list every key with its help)",
                        parents=common)
    cp.add_argument("--list", action="store_true")
    add_config_args(cp)
    cp.set_defaults(_func=_config_cmd)
    return parser


def _setup_logging(level: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO) if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [r{rank}] %(levelname)s %(name)s: %(message)s" if rank else
        "%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: list[str] | None = None) -> int:
    code = _run(argv)
    if "torch.distributed" in sys.modules:  # a rank of a multi-rank CPU (gloo) run leaves here, not at finalisation
        from .engine.distributed import leave_process

        code = leave_process(code)
    return code


def _run(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        word, at = _command_word(argv)
        if word in CONFIG_FIRST:
            _validate_config_first(argv[at + 1:])
        if word in CHECKPOINT_FIRST:
            _check_checkpoint_first(argv[at + 1:])
        peak_tflops_env()  # a bad value is one line now, not a traceback once training has started
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        _setup_logging(args.log_level)
        if args.local_rank is not None:  # the deepspeed launcher passes --local_rank=N; the env has it too
            os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
        if getattr(args, "_func", None):
            return args._func(args) or 0
        if not getattr(args, "_module", None):
            parser.print_help()
            return 0 if args.command is None else 2
        _, run = _lazy(args._module, args._name)
        result = run(args)
        if isinstance(result, dict) and result.get("stopped") in ("signal", "stop_file"):
            return EXIT_STOPPED_EARLY
        return result if isinstance(result, int) else 0
    except UserError as e:
        print(f"fastsupmae: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastsupmae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
