"""The CPU fallback's decode processes: forked once, fed keys through pipes, results back in key order.

Why not torch's DataLoader: its hand-over costs ~0.45 ms of CPU per batch while the workers are busy (a
multiprocessing queue each way, each with a feeder thread that pickles and writes, and the processes woken for
each), about 7 us per image at a batch of 64, as much as the per-image work left around the resize. Here each
worker has one pipe to the main process: a key goes one way, a small result (the batch's ring slot, its labels,
its bad files) comes back, pickled in the sending thread; nothing else travels. Batch ``j`` of a pass goes to
worker ``j % W``, so the results come back in order by reading the workers' pipes in turn.

What the pool keeps from DataLoader's behaviour: workers forked once and kept from one pass to the next
(:meth:`DecodePool.run` again), a result that does not come within ``timeout_s`` is an error
(:class:`WorkerTimeout`) rather than a hang, a worker that dies (SIGKILL from the OOM killer, SIGBUS) is one
clear error naming the signal instead of a hang, workers exit when the main process goes (their pipe reads
end of file) and ignore Ctrl-C (the main process handles it and stops them), and, for CUDA, an optional thread
that stages each result (copies it to pinned memory, freeing its slot) while the trainer works.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import queue
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

from fastsupmae.errors import DataError


class WorkerTimeout(DataError):
    """No result from a worker within the pool's ``timeout_s``."""


class _Stopped(Exception):
    """The consumer left the pass: the staging thread stops reading."""


_STOP = b""  # the message that ends a worker (a key is never pickled to zero bytes)


def _worker_main(wid: int, conn: Connection, others: list[Connection], work: Callable[[int, Any], Any],
                 init: Callable[[int], None] | None) -> None:
    """A worker's life: ``init`` once, then ``work(wid, key)`` for each key until the stop message or end of file."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the main one stops us
    for c in others:  # the main process's ends of every pipe made so far: end of file must mean the main is gone
        c.close()
    if init is not None:
        init(wid)
    while True:
        try:
            msg = conn.recv_bytes()
        except (EOFError, OSError):  # the main process is gone
            return
        if msg == _STOP:
            return
        try:
            out = work(wid, pickle.loads(msg))
        except BaseException as e:  # noqa: BLE001 - anything the work did not turn into a result is reported
            out = e
        try:
            conn.send(out)
        except OSError:  # the main process is gone
            return
        except Exception as e:  # noqa: BLE001 - a result that cannot be pickled: say so instead of dying
            conn.send(RuntimeError(f"a data worker's result could not be sent ({type(e).__name__}: {e})"))


def _death(p: mp.process.BaseProcess) -> str:
    """How a worker ended, in words."""
    code = p.exitcode
    if code is None:
        return "closed its pipe"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = {"SIGKILL": " (the kernel's out-of-memory killer?)",
                "SIGBUS": " (a file cut shorter while read, or /dev/shm full?)"}.get(name, "")
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


class DecodePool:
    """``workers`` forked processes that run ``work(worker_id, key)``; started at the first :meth:`run`.

    Args:
        work: runs in a worker for each key; its return value (picklable) is the result. An exception it raises
            is re-raised in the main process by :meth:`run`.
        workers: processes (>= 1).
        prefetch: keys in flight per worker.
        timeout_s: how long :meth:`run` waits for one result before raising :class:`WorkerTimeout`.
        init: runs once in each worker before its first key (``init(worker_id)``).
    """

    def __init__(self, work: Callable[[int, Any], Any], workers: int, prefetch: int, timeout_s: float,
                 init: Callable[[int], None] | None = None) -> None:
        if workers < 1 or prefetch < 1:
            raise ValueError(f"a decode pool needs >= 1 worker and prefetch >= 1 (got {workers}, {prefetch})")
        self.work, self.workers, self.prefetch, self.timeout_s, self.init = work, workers, prefetch, timeout_s, init
        self._procs: list[mp.process.BaseProcess] = []
        self._conns: list[Connection] = []
        self._polls: list[select.poll] = []  # per worker: its pipe and its process sentinel, made once

    def _start(self) -> None:
        ctx = mp.get_context("fork")  # the work (decoder, sources, ring) is inherited, not pickled
        for w in range(self.workers):
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(w, theirs, [*self._conns, mine], self.work, self.init),
                            daemon=True, name=f"fastsupmae-decode-{w}")
            p.start()
            theirs.close()
            poll = select.poll()  # one registered poll per worker: a selector per wait costs ~50 us of Python
            poll.register(mine.fileno(), select.POLLIN)
            poll.register(p.sentinel, select.POLLIN)
            self._procs.append(p)
            self._conns.append(mine)
            self._polls.append(poll)

    def pids(self) -> list[int]:
        """The worker processes' ids (empty before the first :meth:`run` and after :meth:`close`)."""
        return [p.pid for p in self._procs]

    def run(self, keys: list[Any], stage: Callable[[Any], Any] | None = None) -> Iterator[Any]:
        """The results of ``keys``, in order. ``stage``: applied to each result in a thread of its own, which runs
        up to ``workers x prefetch`` results ahead of the consumer (for the copy to pinned memory).

        A pass must be read to its end before the next starts; one left earlier leaves results in flight, so the
        caller closes the pool then (:meth:`close`).
        """
        if not self._procs:
            self._start()
        if stage is None:
            yield from self._in_order(keys, None)
            return
        stop = threading.Event()
        yield from _staged(self._in_order(keys, stop), stage, self.workers * self.prefetch, stop)

    def _in_order(self, keys: list[Any], stop: threading.Event | None) -> Iterator[Any]:
        w, n = self.workers, len(keys)
        sent = min(n, w * self.prefetch)
        for j in range(sent):
            self._send(j % w, keys[j])
        for j in range(n):
            out = self._receive(j % w, stop)
            if sent < n:
                self._send(sent % w, keys[sent])
                sent += 1
            if isinstance(out, BaseException):
                raise out
            yield out

    def _send(self, w: int, key: Any) -> None:
        try:
            self._conns[w].send_bytes(pickle.dumps(key, pickle.HIGHEST_PROTOCOL))
        except OSError:  # its end of the pipe is closed: the worker is gone
            raise self._dead(w) from None

    def _receive(self, w: int, stop: threading.Event | None) -> Any:
        """Worker ``w``'s next result; with ``stop``, waits in short slices and gives up (:class:`_Stopped`) once
        it is set (the staging thread of a pass the consumer left)."""
        conn, proc, poll = self._conns[w], self._procs[w], self._polls[w]
        deadline = time.monotonic() + self.timeout_s
        while True:
            left = max(0.0, deadline - time.monotonic())
            ready = poll.poll(1000 * (left if stop is None else min(left, 0.1)))
            if ready:
                break
            if stop is not None and stop.is_set():
                raise _Stopped
            if time.monotonic() >= deadline:
                raise WorkerTimeout(f"data worker {w} (pid {proc.pid}) produced nothing for {self.timeout_s:.0f} s")
        if any(fd == conn.fileno() for fd, _ in ready):
            try:
                return conn.recv()
            except (EOFError, OSError):
                pass
        raise self._dead(w)

    def _dead(self, w: int) -> DataError:
        """The error for worker ``w`` found gone (reaped first, so its signal or exit code is known)."""
        proc = self._procs[w]
        proc.join(1.0)
        return DataError(f"data worker {w} (pid {proc.pid}) {_death(proc)}")

    def close(self, wait_s: float = 5.0) -> None:
        """Stop the workers: asked to, then killed if they have not stopped within ``wait_s`` in all (0 for
        workers whose results nobody will read: a pass left half-way), and joined."""
        procs, conns = self._procs, self._conns
        self._procs, self._conns, self._polls = [], [], []
        for c in conns:
            try:
                c.send_bytes(_STOP)
            except OSError:
                pass
        deadline = time.monotonic() + wait_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.exitcode is None:
                p.kill()
                p.join()
        for c in conns:
            c.close()


def _staged(results: Iterator[Any], stage: Callable[[Any], Any], ahead: int, stop: threading.Event) -> Iterator[Any]:
    """``stage(r)`` for each of ``results``, computed in a thread up to ``ahead`` results before they are taken;
    ``stop`` is set when the consumer leaves (``results`` must then end soon: :meth:`DecodePool._receive`)."""
    q: queue.Queue = queue.Queue(maxsize=ahead)
    end = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def pump() -> None:
        try:
            for r in results:
                if not put((stage(r), None)):
                    return
        except _Stopped:
            return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put((None, e))
            return
        put((end, None))

    t = threading.Thread(target=pump, name="fastsupmae-stage", daemon=True)
    t.start()
    try:
        while True:
            item, err = q.get()
            if err is not None:
                raise err
            if item is end:
                return
            yield item
    finally:
        stop.set()
        t.join()

