"""The CPU fallback keeps its decode processes (and their shard mappings) from one epoch to the next without
changing a batch: the same order, pixels, bad-file verdicts and resume as without workers, new processes after an
epoch left half-way, and none left behind (nor /dev/shm files) after ``close`` or the end of the program."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from fastsupmae.pipelines.cpu_loader import CpuLoader
from fastsupmae.pipelines.imagefolder import ImageFolderSource

from tests.test_pipelines_cpu import _bad_files, make_folder


def _epoch(loader: CpuLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(b["images"].clone(), b["labels"].clone()) for b in loader]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def _alive(pids: list[int]) -> list[int]:
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_workers_are_kept_across_epochs_and_give_the_batches_of_no_workers(tmp_path):
    """Three epochs (with bad files) through the same two workers equal the batches without workers, epoch by
    epoch; a resume into the middle of a later epoch continues exactly; an epoch left half-way stops its workers
    and the next epoch gets new ones that still give the same batches."""
    rng = np.random.default_rng()
    seed = int(rng.integers(1 << 20))
    make_folder(tmp_path / "train", per_class=4, seed=seed)
    _bad_files(tmp_path / "train", rng)  # 4 unreadable, 4 odd but valid: 20 samples
    src = ImageFolderSource(tmp_path / "train")
    ref_loader = CpuLoader(src, 2, (16, 16), True, num_workers=0, seed=seed)
    ref = [_epoch(ref_loader) for _ in range(3)]
    ref_bad = ref_loader.bad_files
    ref.append(_epoch(ref_loader))
    loader = CpuLoader(src, 2, (16, 16), True, num_workers=2, seed=seed)
    pids: list[list[int]] = []
    for e in range(3):
        assert _same(_epoch(loader), ref[e]), e
        pids.append(loader._idle.pids())
    assert len(pids[0]) == 2 and pids[0] == pids[1] == pids[2] and _alive(pids[0]) == pids[0]
    assert loader.bad_files == ref_bad > 0  # the bad-file policy saw the same files

    it = iter(loader)  # epoch 3, left after 3 batches: its workers are stopped, a resume continues it
    head = [(b["images"].clone(), b["labels"].clone()) for b in (next(it) for _ in range(3))]
    state = loader.state_dict()
    del it
    assert loader._idle is None and not _alive(pids[0])
    resumed = CpuLoader(src, 2, (16, 16), True, num_workers=2, seed=seed)
    resumed.load_state_dict(state)
    assert state["epoch"] == 3 and _same(head + _epoch(resumed), ref[3])
    assert _same(_epoch(resumed), _epoch(ref_loader))  # epoch 4 through the resumed loader's kept workers
    loader.load_state_dict(state)
    assert _same(_epoch(loader), ref[3][3:]) and not set(loader._idle.pids()) & set(pids[0])  # new workers
    for x in (loader, resumed):
        kept = x._idle.pids()
        x.close()
        assert x._idle is None and not _alive(kept)


def test_an_unfinished_second_iterator_gets_its_own_workers(tmp_path):
    """A pass started while another is unfinished neither takes the other's workers nor hands its own to it: each
    gives the batches of its own steps; the one that ends first keeps its workers, the other's are stopped."""
    make_folder(tmp_path / "train", per_class=4)
    src = ImageFolderSource(tmp_path / "train")
    ref = _epoch(CpuLoader(src, 2, (16, 16), True, num_workers=0, seed=7))
    loader = CpuLoader(src, 2, (16, 16), True, num_workers=2, seed=7)
    a = iter(loader)
    got_a = [(x["images"].clone(), x["labels"].clone()) for x in [next(a)]]  # steps 0-5 of epoch 0
    b = iter(loader)  # starts where the shared position is: steps 1-5
    got_b = [(x["images"].clone(), x["labels"].clone()) for x in b]
    kept = loader._idle.pids()
    got_a += [(x["images"].clone(), x["labels"].clone()) for x in a]
    assert len(ref) == 6 and _same(got_a, ref) and _same(got_b, ref[1:])
    assert loader._idle.pids() == kept and len(kept) == 2
    loader.close()
    assert not _alive(kept)


_CHILD = """
import os, sys
import torch.multiprocessing
torch.multiprocessing.set_sharing_strategy(sys.argv[2])
from fastsupmae.pipelines.cpu_loader import CpuLoader
from fastsupmae.pipelines.imagefolder import ImageFolderSource
loader = CpuLoader(ImageFolderSource(sys.argv[1]), 2, (16, 16), True, num_workers=2)
for _ in range(2):
    for b in loader:
        pass
print(os.getpid(), *loader._idle.pids(), flush=True)
shm = sorted(f for f in os.listdir("/dev/shm") if str(os.getpid()) in f)
print(len(shm), flush=True)
"""


@pytest.mark.parametrize("strategy", ["file_descriptor", "file_system"])
def test_program_end_leaves_no_workers_and_no_shared_memory(tmp_path, strategy):
    """A program that ends with its loader's workers idle (no ``close``) leaves no process and no /dev/shm file of
    its own or of its workers behind (torch's default sharing unlinks its segments at once; with 'file_system' the
    ring's slots are named files there while the program runs)."""
    make_folder(tmp_path / "train", per_class=4)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(_CHILD), str(tmp_path / "train"), strategy],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert out.returncode == 0, out.stderr[-2000:]
    pids = [int(p) for p in out.stdout.split("\n")[0].split()]
    named = int(out.stdout.split("\n")[1])
    assert len(pids) == 3 and (named >= 2 * 6 if strategy == "file_system" else named == 0), out.stdout
    for _ in range(50):  # the workers see their parent gone and exit; reaped by init
        if not _alive(pids[1:]):
            break
        time.sleep(0.1)
    assert not _alive(pids[1:])
    left = [f for f in os.listdir("/dev/shm") if any(f"_{p}_" in f or f.endswith(f"_{p}") for p in pids)]
    assert not left, left


def test_bench_data_times_a_later_epoch_of_the_same_loader(tmp_path):
    """``bench data``'s ``NAME@K`` rows: the loader comes back with its first K-1 epochs read (so the timed batches
    are of epoch K, through the workers kept from them); a bad epoch number is one clear message."""
    import argparse

    from fastsupmae.bench import data as bench

    make_folder(tmp_path / "train", per_class=4)
    assert bench.parse_name("cpu-raw@2") == ("cpu", "raw", "pretrain") and bench.split_epoch("cpu") == ("cpu", 1)
    for bad in ("cpu-raw@0", "cpu-raw@x", "cpu@"):
        with pytest.raises(SystemExit, match="whole number"):
            bench.split_epoch(bad)
    p = argparse.ArgumentParser()
    bench.add_args(p)
    a = p.parse_args(["--batch", "2", "--workers", "2", "--size", "16"])
    k = int(np.random.default_rng().integers(1, 4))
    loader = bench._make(f"cpu@{k}", str(tmp_path / "train"), a)
    assert loader.order.epoch == k - 1 and loader.order.consumed == 0
    assert (loader._idle is not None) == (k > 1)  # the workers of the epochs read are kept for the timed one
    loader.close()
