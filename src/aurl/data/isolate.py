"""Untrusted files are read in worker processes: a crash or a hang costs one file, not the run.

The second wall behind :mod:`aurl.data.smf`: whatever still goes wrong inside a native parser
(a segmentation fault, an abort, an endless loop) happens in a worker. :func:`isolated_map`
runs ``fn(item)`` for each item in ``workers`` forked processes, one item at a time per worker,
and yields ``(index, result)`` in completion order. A worker that dies by a signal turns its
item into ``Failed("reader crashed (signal 11)")`` (the signal it died of); one that runs past
its time bound is killed and its item becomes ``Failed("reader timed out after 5.0 s")``. The
worker is replaced and the run goes on. An exception raised by ``fn`` is a bug: it is raised
again in the caller (``fn`` reports bad input in its result, as every caller here does).

The time bound of a file is ``TIME_BOUND_S + TIME_PER_MIB_S`` per MiB of it (5 s for any file
up to a few hundred KiB, 133 s for the 64 MiB maximum): reading and tokenizing a valid file
takes well under a second per MiB, so only a hang reaches it.

A worker may also allocate at most ``MEMORY_BOUND_BYTES`` beyond what it held when it started
(``RLIMIT_DATA``): a reader that runs away with memory (music21 building a time signature of
10**9 beats grew by ~85 MB/s, and a file padded to 16 MiB gets minutes) fails its item,
``Failed("reader ran out of memory (over 4 GiB)")``, instead of taking the machine.
"""

from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

TIME_BOUND_S = 5.0
TIME_PER_MIB_S = 2.0
MEMORY_BOUND_BYTES = 4 * 2**30


@dataclass(frozen=True)
class Failed:
    """An item whose worker died or hung; ``reason`` is one line."""

    reason: str


def time_bound(path: str | os.PathLike) -> float:
    """Seconds one file may take: ``TIME_BOUND_S`` plus ``TIME_PER_MIB_S`` per MiB."""
    try:
        size = os.stat(path).st_size
    except OSError:
        size = 0
    return TIME_BOUND_S + TIME_PER_MIB_S * size / 2**20


def death_reason(exitcode: int | None) -> str:
    """'reader crashed (signal 11)' for a worker killed by a signal, else its exit status."""
    if exitcode is not None and exitcode < 0:
        return f"reader crashed (signal {-exitcode})"
    return f"reader exited with status {exitcode}"


def _bound_memory(extra: int) -> None:
    """Let this process allocate at most ``extra`` bytes beyond its data now (``RLIMIT_DATA``
    counts the heap and private anonymous mappings: every allocation Python and numpy make)."""
    import resource

    try:
        with open("/proc/self/status") as f:
            held = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
    except (OSError, StopIteration, ValueError):  # not Linux: no bound
        return
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = held + extra if hard == resource.RLIM_INFINITY else min(hard, held + extra)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))


def _serve(conn, fn: Callable, initializer: Callable | None, initargs: tuple) -> None:
    """Worker loop: receive (index, item), send back (index, ok, result or exception)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    faulthandler.disable()  # a crash is reported once, by the parent, as one line
    if initializer is not None:
        initializer(*initargs)
    _bound_memory(MEMORY_BOUND_BYTES)
    while True:
        task = conn.recv()
        if task is None:
            return
        i, item = task
        try:
            conn.send((i, True, fn(item)))
        except MemoryError:  # the bound above: this item's, not a bug
            conn.send((i, True, Failed(f"reader ran out of memory (over "
                                       f"{MEMORY_BOUND_BYTES / 2**30:g} GiB)")))  # fmt: skip
        except Exception as e:  # a bug in fn: raised again in the parent
            conn.send((i, False, e))


class _Worker:
    def __init__(self, ctx, fn: Callable, initializer: Callable | None, initargs: tuple):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, fn, initializer, initargs))
        self.proc.daemon = True
        self.proc.start()
        child.close()
        self.task: tuple[int, Any] | None = None
        self.deadline = 0.0

    def stop(self, *, kill: bool = False) -> None:
        if kill and self.proc.is_alive():
            self.proc.kill()
        elif self.proc.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send(None)
        self.proc.join(timeout=None if kill else 5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def isolated_map(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    *,
    workers: int = 1,
    initializer: Callable[..., None] | None = None,
    initargs: tuple = (),
    seconds: Callable[[Any], float] | None = None,
) -> Iterator[tuple[int, Any]]:
    """``(index, fn(item))`` for every item, in completion order, from worker processes.

    Args:
        fn: a module-level function of one item; it should report bad input in its result.
        items: the work (sent to the workers pickled).
        workers: processes (at least 1: the parse never runs in the caller's process).
        initializer: run once in each worker (and again in each replacement).
        initargs: arguments of ``initializer``.
        seconds: the time bound of an item (default: :func:`time_bound` of the item as a path).

    Yields:
        ``(index, result)``; ``result`` is a :class:`Failed` when the worker died or timed out.
    """
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    seconds = seconds or time_bound
    todo = iter(enumerate(items))
    pool = [_Worker(ctx, fn, initializer, initargs) for _ in range(max(1, workers))]
    more = True
    try:
        while True:
            for w in pool:  # hand out work to idle workers
                if w.task is None and more:
                    task = next(todo, None)
                    if task is None:
                        more = False
                        break
                    w.task, w.deadline = task, time.monotonic() + seconds(task[1])
                    with contextlib.suppress(OSError):  # died between two tasks: seen below
                        w.conn.send(task)
            busy = [w for w in pool if w.task is not None]
            if not busy:
                return
            timeout = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready = set(wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout))
            for k, w in enumerate(pool):
                if w.task is None:
                    continue
                result: Any = None
                if w.conn in ready:
                    try:
                        i, ok, result = w.conn.recv()
                    except (EOFError, OSError):
                        pass  # died: the sentinel says how
                    else:
                        w.task = None
                        if not ok:
                            raise result
                        yield i, result
                        continue
                if w.proc.sentinel in ready or not w.proc.is_alive():
                    w.proc.join()
                    result = Failed(death_reason(w.proc.exitcode))
                elif time.monotonic() >= w.deadline:
                    result = Failed(f"reader timed out after {seconds(w.task[1]):.1f} s")
                else:
                    continue
                i = w.task[0]
                w.stop(kill=True)
                pool[k] = _Worker(ctx, fn, initializer, initargs)
                yield i, result
    finally:
        for w in pool:
            w.stop(kill=w.task is not None)


def in_order(done: Iterable[tuple[int, Any]]) -> Iterator[Any]:
    """The results of :func:`isolated_map` in the order of its items (out-of-order ones wait)."""
    waiting: dict[int, Any] = {}
    nxt = 0
    for i, result in done:
        waiting[i] = result
        while nxt in waiting:
            yield waiting.pop(nxt)
            nxt += 1
