"""The CPU fallback's decode processes (pipelines/decode_pool.py): results in key order whatever the workers'
timing, kept across passes, and every way a worker can fail is one clear error instead of a hang."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest
from fastsupmae.pipelines.decode_pool import DecodePool, WorkerTimeout

from fastsupmae.errors import DataError


def _alive(pids: list[int]) -> list[int]:
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def _square_slowly(wid: int, key: tuple[int, float]) -> tuple[int, int, int]:
    k, delay = key
    time.sleep(delay)
    return k, k * k, os.getpid()


@pytest.mark.parametrize("staged", [False, True])
def test_results_come_in_key_order_from_kept_workers(staged):
    """Random per-key delays (so workers finish out of order): the results are the keys' in order, pass after pass,
    from the same processes; with a staging function it is applied to each, in order."""
    rng = np.random.default_rng()
    workers = int(rng.integers(1, 4))
    pool = DecodePool(_square_slowly, workers, prefetch=int(rng.integers(1, 4)), timeout_s=300)
    stage = (lambda r: (*r, threading.current_thread().name)) if staged else None
    try:
        seen: set[int] = set()
        for _ in range(2):
            n = int(rng.integers(1, 25))
            keys = [(k, float(rng.uniform(0, 0.01))) for k in range(n)]
            out = list(pool.run(keys, stage=stage))
            assert [r[:2] for r in out] == [(k, k * k) for k in range(n)]
            assert all(r[3] == "fastsupmae-stage" for r in out) if staged else all(len(r) == 3 for r in out)
            seen |= {r[2] for r in out}
            assert len(pool.pids()) == workers and seen <= set(pool.pids())
    finally:
        pids = pool.pids()
        pool.close()
    assert not _alive(pids) and pool.pids() == []


def _fail_on_three(wid: int, key: int) -> int:
    if key == 3:
        raise ValueError("key three is bad")
    return key


def test_an_exception_in_the_work_reaches_the_caller():
    pool = DecodePool(_fail_on_three, 2, prefetch=2, timeout_s=300)
    try:
        got = []
        with pytest.raises(ValueError, match="key three is bad"):
            for r in pool.run(list(range(6))):
                got.append(r)
        assert got == [0, 1, 2]
    finally:
        pool.close()


def _die_on_two(wid: int, key: int) -> int:
    if key == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return key


@pytest.mark.parametrize("staged", [False, True])
def test_a_killed_worker_is_one_clear_error(staged):
    """A worker killed by a signal (here SIGKILL, as the OOM killer sends) stops the pass with an error naming the
    signal, not a hang until the timeout."""
    pool = DecodePool(_die_on_two, 2, prefetch=2, timeout_s=120)
    t0 = time.monotonic()
    try:
        msg = r"data worker 0 \(pid \d+\) was killed by SIGKILL \(the kernel's out-of-memory killer\?\)"
        with pytest.raises(DataError, match=msg):
            list(pool.run(list(range(6)), stage=(lambda r: r) if staged else None))
    finally:
        pool.close()
    assert time.monotonic() - t0 < 120  # the death was seen, not waited out (that would be a WorkerTimeout)


def _hang(wid: int, key: int) -> int:
    time.sleep(3600)
    return key


def test_a_stuck_worker_becomes_a_timeout_error_and_close_stops_it():
    pool = DecodePool(_hang, 1, prefetch=1, timeout_s=1)
    with pytest.raises(WorkerTimeout, match="produced nothing for 1 s"):
        list(pool.run([0]))
    pids = pool.pids()
    t0 = time.monotonic()
    pool.close(wait_s=0.5)  # the worker is in its sleep: killed after half a second
    assert not _alive(pids) and time.monotonic() - t0 < 60


def test_a_consumer_that_leaves_a_staged_pass_early_is_not_kept_waiting():
    """Leaving a staged pass stops its thread within a short slice even while the workers are busy (so the caller
    can close the pool), instead of waiting for their results or the timeout."""
    pool = DecodePool(_square_slowly, 2, prefetch=2, timeout_s=3600)
    try:
        it = pool.run([(0, 0.0)] + [(k, 3600.0) for k in range(1, 6)], stage=lambda r: r)
        assert next(it)[:2] == (0, 0)
        t0 = time.monotonic()
        it.close()
        assert time.monotonic() - t0 < 60
        assert not [t for t in threading.enumerate() if t.name == "fastsupmae-stage"]
    finally:
        pool.close(wait_s=0)


def test_workers_ignore_ctrl_c_and_exit_when_their_pipe_closes():
    """SIGINT (Ctrl-C reaches every process of the group) does not kill a worker; closing the pool does."""
    pool = DecodePool(_square_slowly, 2, prefetch=1, timeout_s=300)
    try:
        assert [r[:2] for r in pool.run([(1, 0.0), (2, 0.0)])] == [(1, 1), (2, 4)]
        pids = pool.pids()
        for p in pids:
            os.kill(p, signal.SIGINT)
        time.sleep(0.5)
        assert _alive(pids) == pids
        assert [r[:2] for r in pool.run([(3, 0.0)])] == [(3, 9)]
    finally:
        pool.close()
    assert not _alive(pids)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="needs >= 1 worker"):
        DecodePool(_square_slowly, 0, prefetch=1, timeout_s=1)


def test_a_worker_that_died_between_passes_is_named_when_the_next_pass_starts():
    """A kept worker killed while idle (the OOM killer picks any process): the next pass fails at once with its
    signal named, whether the death shows at the key's send or at the wait for its result."""
    pool = DecodePool(_square_slowly, 2, prefetch=1, timeout_s=120)
    try:
        assert [r[:2] for r in pool.run([(1, 0.0), (2, 0.0)])] == [(1, 1), (2, 4)]
        victim = pool.pids()[1]
        os.kill(victim, signal.SIGKILL)
        for _ in range(600):  # dead (a zombie until the pool reaps it): not reaped here, so its signal stays known
            if not _alive([victim]):
                break
            time.sleep(0.1)
        with pytest.raises(DataError, match=rf"data worker 1 \(pid {victim}\) was killed by SIGKILL"):
            list(pool.run([(3, 0.0), (4, 0.0), (5, 0.0)]))
    finally:
        pool.close()
