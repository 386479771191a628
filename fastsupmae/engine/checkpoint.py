"""Crash-safe DeepSpeed checkpoints with the client state an exact resume needs.

Layout (``<output_dir>/checkpoints``)::

    latest                      text file: the tag of the newest complete checkpoint (DeepSpeed's format)
    step_00000500/              one complete checkpoint (DeepSpeed tag)
        mp_rank_00_model_states.pt          module weights + client state (written by DeepSpeed, rank 0)
        zero_pp_rank_<r>_mp_rank_00_optim_states.pt   fp32 master / optimizer shard of rank r (ZeRO >= 1)
        rank<r>_state.pt                    this rank's RNG states and loader position (fastsupmae)
        meta.json                           step, epoch, world size, config hash (human-readable)
    zero_to_fp32.py             DeepSpeed's consolidation script

Commit protocol: every rank writes into ``.tmp-step_XXXXXXXX``; after DeepSpeed's closing barrier rank 0 fsyncs,
renames the directory to its final name and replaces ``latest`` with an atomic ``os.replace``. A process killed
at any point leaves either the old or the new checkpoint complete, never a half one under a final name;
leftover ``.tmp-*`` directories are removed at the next start. A failed write (disk full, unwritable path)
removes the temporary directory and raises :class:`CheckpointWriteError`; the previous checkpoint is untouched.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastsupmae import safe_unpickle
from fastsupmae.engine import dep_logs, reshard
from fastsupmae.engine import distributed as dist_utils
from fastsupmae.errors import UserError

log = logging.getLogger(__name__)

TAG_RE = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp-"

# Test hook: called on every rank after all shards are written and before rank 0 commits (fault-injection
# tests kill the process here to prove a write interrupted at the worst moment leaves the old checkpoint).
before_commit_hook: Callable[[Path], None] | None = None


class CheckpointWriteError(UserError, RuntimeError):
    """A checkpoint could not be written; the previous one is intact."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """The checkpoint to resume from does not exist or is incomplete."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; rename is still atomic there
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new content, never a mix."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_meta(path: Path) -> dict[str, Any]:
    """meta.json of checkpoint ``path`` (step, epoch, world size, ZeRO stage, precision, config, ...)."""
    f = Path(path) / "meta.json"
    if not f.exists():
        raise CheckpointNotFoundError(f"{path} is not a complete checkpoint (no meta.json)")
    return json.loads(f.read_text())


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``ckpt_dir`` as (step, path), oldest first."""
    out = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            m = TAG_RE.match(p.name)
            if m and p.is_dir() and (p / "meta.json").exists():
                out.append((int(m.group(1)), p))
    return sorted(out)


def find_latest(ckpt_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names, or the newest complete one if the pointer is missing or stale."""
    ptr = ckpt_dir / "latest"
    if ptr.exists():
        cand = ckpt_dir / ptr.read_text().strip()
        if (cand / "meta.json").exists():
            return cand
        log.warning("checkpoint pointer %s names %s, which is missing or incomplete; using the newest complete one",
                    ptr, cand.name)
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def verify(path: Path) -> str | None:
    """What is wrong with checkpoint ``path`` on disk, or None: its meta.json must parse and every file it lists
    must be there with the size it was written with (a truncated copy or an interrupted transfer shows here,
    before DeepSpeed reads gigabytes of it)."""
    try:
        meta = json.loads((Path(path) / "meta.json").read_text())
    except (OSError, ValueError) as e:
        return f"meta.json unreadable ({type(e).__name__}: {e})"
    for name, size in (meta.get("files") or {}).items():
        f = Path(path) / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    return None


def _file_sizes(d: Path) -> dict[str, int]:
    return {str(f.relative_to(d)): f.stat().st_size for f in sorted(d.rglob("*"))
            if f.is_file() and f.name != "meta.json" and not f.name.startswith(".probe")}


def resume_candidates(resume: str, output_dir: Path) -> list[Path]:
    """Checkpoints to try for ``train.resume``, best first: with 'auto' the latest, then the older complete
    ones newest first (a damaged newest checkpoint falls back to the one before); a named path alone."""
    first = resolve_resume(resume, output_dir)
    if first is None or resume != "auto":
        return [first] if first is not None else []
    older = [p for _, p in reversed(list_checkpoints(output_dir / "checkpoints")) if p != first]
    return [first, *older]


def shape_mismatch(path: Path, own: dict[str, tuple[int, ...]]) -> str | None:
    """Compare the tensor shapes checkpoint ``path`` holds with ``own`` (name -> shape of this model); a message
    naming the first difference, or None. Reads rank 0's model-states file memory-mapped (no copy) through the
    restricted unpickler (a file naming other objects raises UnsafeCheckpointError); a file that cannot be read
    raises what torch.load raises (the caller treats it as damage)."""
    f = Path(path) / "mp_rank_00_model_states.pt"
    if not f.exists():
        return None
    states = safe_unpickle.load(f, mmap=True)
    theirs = {k: tuple(v.shape) for k, v in (states.get("module") or {}).items()
              if isinstance(v, torch.Tensor) and v.numel() > 0}
    for group in states.get("param_shapes") or []:  # ZeRO keeps partitioned parameters' true shapes here
        theirs.update({k: tuple(v) for k, v in group.items()})
    diff = [(k, theirs[k], s) for k, s in own.items() if k in theirs and theirs[k] != s]
    extra = sorted(set(theirs) - set(own))
    missing = sorted(k for k in own if k not in theirs and not k.endswith("num_batches_tracked"))
    if not (diff or extra or missing):
        return None
    if diff:
        k, a, b = diff[0]
        what = f"'{k}' is {list(a)} in the checkpoint but {list(b)} in this model ({len(diff)} tensor(s) differ)"
    elif extra:
        what = f"the checkpoint has {len(extra)} tensor(s) this model lacks, e.g. {extra[:3]}"
    else:
        what = f"the checkpoint lacks {len(missing)} tensor(s) of this model, e.g. {missing[:3]}"
    return (f"checkpoint {path} was trained with another architecture: {what}. Resume with the run's own config "
            f"(--config {Path(path).parent.parent / 'config.yaml'} train.resume=auto), or start a new run in "
            f"another train.output_dir")


def resolve_resume(resume: str, output_dir: Path) -> Path | None:
    """Map ``train.resume`` to a checkpoint directory (None: start fresh).

    'auto' picks the latest checkpoint of ``output_dir`` (none yet: fresh start). A path may name a checkpoint
    directory, a ``checkpoints`` directory, or a run directory.
    """
    if not resume:
        return None
    if resume == "auto":
        return find_latest(output_dir / "checkpoints")
    p = Path(resume)
    if (p / "meta.json").exists():
        return p
    for d in (p, p / "checkpoints"):
        if d.is_dir():
            latest = find_latest(d)
            if latest is not None:
                return latest
    raise CheckpointNotFoundError(
        f"train.resume={resume!r}: no complete checkpoint there (expected a step_XXXXXXXX directory with meta.json, "
        f"or a run directory holding checkpoints/); use train.resume=auto to continue the run in train.output_dir")


class CheckpointManager:
    """Saves, finds, loads and prunes the checkpoints of one run directory."""

    def __init__(self, output_dir: str | Path, keep_last: int, keep_every: int, rank: int, world_size: int) -> None:
        self.dir = Path(output_dir) / "checkpoints"
        self.keep_last = max(1, int(keep_last))
        self.keep_every = max(0, int(keep_every))
        self.rank = rank
        self.world_size = world_size
        self.damaged: set[str] = set()  # checkpoints a resume found damaged (any load error): never "kept"
        self.known_good: Path | None = None  # the one resumed from or last committed: never pruned

    # ------------------------------------------------------------------------------------------- housekeeping
    def cleanup_stale(self) -> None:
        """Remove temporary directories of writes that never committed (rank 0; call before a barrier)."""
        if self.rank != 0 or not self.dir.is_dir():
            return
        for p in self.dir.iterdir():
            if p.name.startswith(TMP_PREFIX):
                log.warning("removing incomplete checkpoint write %s (interrupted earlier)", p)
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def prune(self) -> list[Path]:
        """Delete checkpoints outside the keep policy (the last ``keep_last`` intact ones + every
        ``keep_every``-th step), and damaged ones.

        Only intact checkpoints count towards ``keep_last`` (:func:`verify` passes and no resume found them
        damaged), and :attr:`known_good` is always kept: a damaged newest checkpoint never pushes the last good
        one out.
        """
        found = list_checkpoints(self.dir)
        intact = [(s, p) for s, p in found if p.name not in self.damaged and verify(p) is None]
        keep = {s for s, _ in intact[-self.keep_last:]}
        if self.keep_every:
            keep |= {s for s, _ in intact if s % self.keep_every == 0}
        if self.known_good is not None:
            keep |= {s for s, p in found if p.name == self.known_good.name and (s, p) in intact}
        removed = []
        for s, p in found:
            if s not in keep:
                if (s, p) not in intact:
                    log.warning("removing damaged checkpoint %s", p)
                # Rename first so a crash mid-delete never leaves a half checkpoint under a valid name.
                doomed = p.with_name(f"{TMP_PREFIX}del-{p.name}")
                os.rename(p, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
                removed.append(p)
        return removed

    # ------------------------------------------------------------------------------------------------- saving
    def _preflight(self, tmp: Path, estimate_bytes: int) -> str | None:
        """Check the checkpoint directory is writable and has room. Returns an error message or None."""
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            probe = tmp / f".probe-rank{self.rank}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            return f"cannot write to {tmp.parent}: {e.strerror or e}"
        if self.rank == 0:
            free = shutil.disk_usage(tmp).free
            if free < estimate_bytes:
                return (f"not enough free space in {tmp.parent}: {free / 2**20:.1f} MiB free, the checkpoint needs "
                        f"about {estimate_bytes / 2**20:.1f} MiB")
        return None

    def _fail(self, tmp: Path, msg: str) -> CheckpointWriteError:
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        prev = find_latest(self.dir)
        keep = f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists"
        return CheckpointWriteError(f"could not write checkpoint: {msg}; {keep}. Free space or fix the path "
                                    f"(train.output_dir), then resume with train.resume=auto")

    def _agree_or_fail(self, tmp: Path, err: str | None) -> None:
        """Raise CheckpointWriteError on every rank when ``err`` is set on any rank, naming the first failing rank."""
        if dist_utils.all_agree(err is None):
            return
        msgs = [err]
        if self.world_size > 1:
            msgs = [None] * self.world_size
            torch.distributed.all_gather_object(msgs, err)
        first = next((f"rank {r}: {m}" for r, m in enumerate(msgs) if m), "another rank failed")
        raise self._fail(tmp, first if self.world_size > 1 else str(err))

    def _commit(self, tmp: Path, final: Path, tag: str, common: dict[str, Any]) -> str | None:
        """Rank 0: write meta.json, move ``tmp`` to its final name, point ``latest`` at it, prune. Returns an error
        message or None."""
        try:
            meta = {**common, "files": _file_sizes(tmp)}  # sizes: a resume can tell a damaged copy
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
            _fsync_tree(tmp)
            if final.exists():  # the same step saved again (e.g. a final save after a time limit): replace it
                old = final.with_name(f"{TMP_PREFIX}old-{tag}")
                os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
            _fsync_dir(self.dir)
            atomic_write_text(self.dir / "latest", tag)
            self.damaged.discard(tag)  # a damaged checkpoint of this step was just replaced
            self.known_good = final
        except OSError as e:
            return f"{type(e).__name__}: {e.strerror or e}"
        try:
            removed = self.prune()
        except OSError as e:  # the new checkpoint is committed; an old one left behind is only disk space
            log.warning("could not prune old checkpoints in %s: %s", self.dir, e)
        else:
            if removed:
                log.debug("pruned %s", ", ".join(p.name for p in removed))
        return None

    def save(self, engine: Any, step: int, common: dict[str, Any], rank_state: dict[str, Any],
             estimate_bytes: int = 0) -> Path:
        """Write a checkpoint for optimizer step ``step`` on every rank and commit it atomically.

        Args:
            engine: the DeepSpeed engine.
            step: number of optimizer steps done.
            common: client state shared by all ranks (step, epoch, config, ...), stored by DeepSpeed and in
                meta.json.
            rank_state: this rank's RNG states and loader position.
            estimate_bytes: expected total size, for the free-space check.
        Returns:
            The committed checkpoint directory.
        Raises:
            CheckpointWriteError: on every rank when any rank could not write; the previous checkpoint is intact.
        """
        tag = tag_for(step)
        tmp_tag = TMP_PREFIX + tag
        tmp = self.dir / tmp_tag
        final = self.dir / tag
        t0 = time.perf_counter()
        self._agree_or_fail(tmp, self._preflight(tmp, int(estimate_bytes * 1.05)))
        err = None
        try:
            torch.save(rank_state, tmp / f"rank{self.rank}_state.pt")
            # DeepSpeed writes its files under the temporary tag; no rank writes anything under the final name.
            engine.save_checkpoint(str(self.dir), tag=tmp_tag, client_state={"fastsupmae": common},
                                   save_latest=False)
        except Exception as e:  # noqa: BLE001 - any failure of the write must leave the old checkpoint alone
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            err = f"{type(e).__name__}: {reason}"
        # Rank 0 commits only once every rank's files are written (and all ranks raise together when one could
        # not write, rather than one dying while the others wait in a collective).
        self._agree_or_fail(tmp, err)
        if before_commit_hook is not None:
            before_commit_hook(tmp)
        err = self._commit(tmp, final, tag, common) if self.rank == 0 else None
        self._agree_or_fail(tmp, err)  # also the barrier: no rank returns before the commit
        log.debug("checkpoint %s written in %.2f s", final, time.perf_counter() - t0)
        return final

    # ------------------------------------------------------------------------------------------------ loading
    def load(self, engine: Any, path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Load checkpoint ``path`` into ``engine``. Returns (common client state, this rank's state or None).

        This rank's state is None when the checkpoint was written by fewer ranks (world size changed).

        A checkpoint of another world size under ZeRO >= 1 (its fp32 masters and optimizer state sharded by the
        old ranks) loads the weights from its consolidated fp32 masters, then re-shards the fp32 masters, Adam
        moments and step counts into this run's partitioning (:mod:`fastsupmae.engine.reshard`): they carry
        over exactly.
        """
        meta_path = path / "meta.json"
        if not meta_path.exists():
            raise CheckpointNotFoundError(f"{path} is not a complete checkpoint (no meta.json)")
        meta = json.loads(meta_path.read_text())
        old_world = int(meta.get("world_size", self.world_size))
        load_opt = True
        stage = engine.zero_optimization_stage()
        if stage > 0 and (old_world != self.world_size or int(meta.get("zero_stage", stage)) != stage):
            # ZeRO shards the fp32 masters and optimizer state by rank: DeepSpeed cannot load them into another
            # partitioning, nor a stage-1 bf16-optimizer checkpoint into ZeRO 2; the module alone is loaded here
            # and the optimizer state is re-sharded below.
            load_opt = False
        # DeepSpeed unpickles its files with no restriction: each pickle of the folder passes the allow-list first
        safe_unpickle.check_checkpoint_dir(path)
        client: dict[str, Any] | None = None
        if load_opt or engine.zero_optimization_stage() < 3:
            load_path, client = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True,
                                                       load_optimizer_states=load_opt,
                                                       load_lr_scheduler_states=False, load_module_only=not load_opt)
            if load_path is None:
                raise CheckpointNotFoundError(f"DeepSpeed could not load the checkpoint {path}")
        # else ZeRO 3 on another world size: DeepSpeed would read this rank's own model-states file, which a run
        # of fewer ranks did not write; the weights and buffers all come from the consolidated state below and
        # the client state from meta.json.
        if not load_opt:
            _load_consolidated_into(engine, path)
            reshard.apply_full_optimizer_state(engine, reshard.read_full_optimizer_state(path))
        common = (client or {}).get("fastsupmae", meta)
        rank_file = path / f"rank{self.rank}_state.pt"
        rank_state = safe_unpickle.load(rank_file) if rank_file.exists() else None
        if rank_state is not None and not (isinstance(rank_state, dict) and {"rng", "loader"} <= set(rank_state)):
            # damage the size check cannot see (a file of another run, or rewritten): the caller falls back
            raise ValueError(f"{rank_file.name} holds no RNG state and loader position (not a rank-state file)")
        return common, rank_state


def consolidated_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a checkpoint (a tag folder) as a plain ``state_dict``, buffers included.

    Works for every ZeRO stage and precision; the result loads into the single-device model:

    - ZeRO 1-3 shards (``*zero_pp_rank_*optim_states.pt`` with a ``zero_stage``): DeepSpeed's zero_to_fp32;
    - DeepSpeed's bf16 optimizer (what bf16 training uses at ZeRO 0 and 1: ``bf16_zero_pp_rank_*`` files, which
      zero_to_fp32 refuses): the fp32 master partitions of every rank, reassembled by the parameter map the
      files carry (:func:`_bf16_optimizer_fp32_params`);
    - otherwise (no optimizer shards) the weights of the model-states file.

    Buffers (BatchNorm statistics) and any parameter the optimizer does not hold come from rank 0's
    model-states file, converted to fp32.

    Every file is read through the restricted unpickler (:mod:`fastsupmae.safe_unpickle`), the ones zero_to_fp32
    reads too, before it does: a file naming other Python objects raises UnsafeCheckpointError, nothing of it run.
    """
    path = Path(path)
    dep_logs.import_deepspeed()  # its files name DeepSpeed classes: imported here, what it prints held for the log
    model_file = path / "mp_rank_00_model_states.pt"
    module = safe_unpickle.load(model_file)["module"] if model_file.exists() else {}
    bf16_files = sorted(path.glob("bf16_zero_pp_rank_*optim_states.pt"))
    masters = _bf16_optimizer_fp32_params(bf16_files, module) if bf16_files else None
    if masters is None and (any(path.glob("zero_pp_rank_*optim_states.pt")) or bf16_files):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        safe_unpickle.check_checkpoint_dir(path)
        # zero_to_fp32 prints its progress and a progress bar (stderr): the run's DeepSpeed log, not the terminal
        with dep_logs.captured(), contextlib.redirect_stderr(io.StringIO()):
            masters = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    sd = {**module, **(masters or {})}
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _rank_of(f: Path) -> int:
    m = re.search(r"zero_pp_rank_(\d+)_", f.name)
    return int(m.group(1)) if m else 0


def _bf16_optimizer_fp32_params(files: list[Path], module: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """fp32 masters from DeepSpeed's bf16-optimizer files (one per data-parallel rank), or None if they are
    regular ZeRO files (zero_to_fp32 reads those).

    Each rank holds an equal slice of every parameter group's flat fp32 buffer and maps each parameter it holds
    to (start, numel) within its slice; the buffer is the ranks' slices in rank order, and a parameter is
    contiguous in it, so its elements are the union of its fragments.
    """
    files = sorted(files, key=_rank_of)
    first = safe_unpickle.load(files[0])["optimizer_state_dict"]
    if "single_partition_of_fp32_groups" not in first or "param_slice_mappings" not in first:
        return None  # checked on rank 0's file alone: zero_to_fp32 will read them all
    states = [first] + [safe_unpickle.load(f)["optimizer_state_dict"] for f in files[1:]]
    out: dict[str, torch.Tensor] = {}
    for g in range(len(states[0]["single_partition_of_fp32_groups"])):
        parts = [st["single_partition_of_fp32_groups"][g] for st in states]
        size = parts[0].numel()
        flat = torch.cat([t.reshape(-1) for t in parts])
        spans: dict[str, tuple[int, int]] = {}
        for r, st in enumerate(states):
            for name, frag in st["param_slice_mappings"][g].items():
                begin = r * size + frag.start
                lo, n = spans.get(name, (begin, 0))
                spans[name] = (min(lo, begin), n + frag.numel)
        for name, (begin, n) in spans.items():
            ref = module.get(name)
            if ref is None or ref.numel() != n:
                raise ValueError(f"bf16 optimizer state of '{name}' has {n} elements, the model's weight "
                                 f"{None if ref is None else tuple(ref.shape)}")
            out[name] = flat[begin:begin + n].detach().view(ref.shape).clone()
    return out


def _load_consolidated_into(engine: Any, path: Path) -> None:
    """Overwrite the engine's weights (and fp32 masters) with the consolidated fp32 weights of ``path``."""
    sd = consolidated_state_dict(path)
    module = engine.module
    stage = engine.zero_optimization_stage()
    if stage == 3:
        import deepspeed

        params = [p for _, p in module.named_parameters()]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if torch.distributed.get_rank() == 0:
                module.load_state_dict({k: v for k, v in sd.items()}, strict=False)
        # buffers (BatchNorm statistics) are not partitioned: every rank loads its own copy
        buffers = {n: sd[n] for n, _ in module.named_buffers() if n in sd}
        if buffers:
            module.load_state_dict(buffers, strict=False)
    else:
        with torch.no_grad():
            for n, p in module.named_parameters():
                if n in sd:
                    p.copy_(sd[n].to(p.dtype))
    # Rebuild the fp32 masters from the (now loaded) module weights.
    opt = engine.optimizer
    if hasattr(opt, "refresh_fp32_params"):
        opt.refresh_fp32_params()
    elif hasattr(opt, "_restore_from_bit16_weights"):
        opt._restore_from_bit16_weights()
