"""One decode thread per model: requests share it through a continuous batcher.

The FastAPI handlers run on the event loop; the model runs on a plain thread that owns a
:class:`~aurl.generation.batching.ContinuousBatcher` and advances every live row by one token
per step. Handlers :meth:`ModelServer.submit` a :class:`Job` and read its tokens from an asyncio
queue that the thread fills (at most one ``call_soon_threadsafe`` per step for all rows, none
while the loop has not yet taken the previous steps' tokens: they go in the same wake-up). A job is
cancelled when its client goes away, and fails with a :class:`LimitError` when it outlives the
per-request time limit; either way its row leaves the batch at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from aurl.errors import AurlError

log = logging.getLogger("aurl.serve")


@dataclass(frozen=True)
class Limits:
    """What one server accepts. Over a limit, a request gets a 4xx naming the limit."""

    max_upload_bytes: int = 1_000_000  # an uploaded or base64 MIDI file
    max_tokens: int = 4096  # tokens generated per request
    max_seconds: float = 600.0  # length of a requested piece, in seconds of music
    slots: int = 16  # requests decoding together per model
    max_queue: int = 64  # requests waiting for a slot, per model
    request_seconds: float = 120.0  # wall-clock time per request
    parse_seconds: float = 20.0  # parsing one upload (inside request_seconds)
    parse_memory_mb: int = 2048  # address space of the parsing process


class LimitError(AurlError):
    """A request went over one of the server's :class:`Limits`."""

    def __init__(self, message: str, *, limit: str, status: int, field: str | None = None):
        super().__init__(message)
        self.limit, self.status, self.field = limit, status, field


_DONE = object()


class Job:
    """One request: its tokens arrive on :attr:`tokens` (lists of ints, in order, then the end
    marker): as many as the decode thread produced since the loop last ran, so a loop that
    falls behind catches up in one wake-up per job instead of one per token."""

    def __init__(self, config: Any, primer: np.ndarray | None, masker: Any, deadline: float):
        self.config, self.primer, self.masker, self.deadline = config, primer, masker, deadline
        self.loop = asyncio.get_running_loop()
        self.tokens: asyncio.Queue = asyncio.Queue()
        self.error: Exception | None = None
        self.cancelled = False
        self.row: Any = None  # the batcher's Row, once admitted
        self.submitted = time.monotonic()

    def cancel(self) -> None:
        """The client went away: stop decoding (the thread drops the row at its next step)."""
        self.cancelled = True

    async def chunks(self):
        """Yield the tokens decoded so far and not yet yielded (a non-empty list, in order)
        whenever there are some; raise the job's error if it failed."""
        while True:
            chunk = await self.tokens.get()
            if chunk is _DONE:
                if self.error is not None:
                    raise self.error
                return
            yield chunk

    async def stream(self):
        """Yield each token as it is decoded; raise the job's error if it failed."""
        async for chunk in self.chunks():
            for token in chunk:
                yield token

    async def ids(self) -> list[int]:
        """All ids (primer included) once the job is done."""
        async for _ in self.stream():
            pass
        return list(self.row.ids)


class ModelServer:
    """A model, its tokenizer and the thread that decodes its requests."""

    def __init__(self, name: str, model: Any, limits: Limits, composer: Any = None) -> None:
        from aurl.config import DataConfig
        from aurl.data.tokenizer import Tokenizer
        from aurl.generation.batching import ContinuousBatcher

        self.name, self.model, self.limits = name, model, limits
        # what harmonize / infill decode with: an engine of the same weights (the native one,
        # as the composing commands' default), or None: the torch model itself
        self.composer = composer
        self.vocab = model.vocab
        self.tokenizer = Tokenizer(model.vocab_config, DataConfig())
        self.device = model.embed.weight.device
        self._new_batcher = lambda: ContinuousBatcher(model, slots=limits.slots, fold_starts=True)
        self.batcher = self._new_batcher()
        self.inbox: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._outbox: dict[Any, list] = {}  # per event loop: events not yet delivered
        self._outbox_lock = threading.Lock()
        self.jobs: set[Job] = set()  # submitted and not finished (touched on the loop only)
        self.steps = 0
        self.tokens_out = 0
        self.composing = 0  # harmonize / infill requests running (touched on the loop only)
        self._stop = threading.Event()
        self.ready = threading.Event()  # set once the warm-up decode is done
        self.thread = threading.Thread(target=self._run, name=f"decode-{name}", daemon=True)
        self.thread.start()
        self.ready.wait(timeout=120)

    def _warm_up(self) -> None:
        """Decode a few tokens before the first request: torch's first calls at each batch
        shape are slower (allocations, kernel selection), and the first listener should not
        wait for them. The server reports its address only after this."""
        from aurl.config import GenerationConfig

        b = self._new_batcher()
        for seed in range(2):  # one row, then two: the shapes of a lone and a shared step
            b.add(GenerationConfig(max_tokens=24, min_tokens=16, seed=seed))
            for _ in range(12):
                b.step()
        while b.busy:
            b.step()

    # -- the loop side ---------------------------------------------------------------------------

    def submit(
        self, config: Any, primer: np.ndarray | None = None, *, deadline: float | None = None
    ) -> Job:
        """Queue a request (options already checked); raises LimitError when the queue is full.
        ``deadline`` (``time.monotonic()``): when it fails with a 408 (default:
        ``request_seconds`` from now; the handler's own, so parsing a primer counts).

        Raises:
            ConstraintError: the constraints cannot be met (from the masker).
            LimitError: ``slots + max_queue`` requests are already running or waiting.
        """
        from aurl.generation.generate import make_masker

        lim = self.limits
        if len(self.jobs) >= lim.slots + lim.max_queue:
            raise LimitError(
                f"model {self.name!r} is busy: {len(self.jobs)} requests running or queued "
                f"(limit max_queue={lim.max_queue} waiting + slots={lim.slots}); retry later",
                limit="max_queue", status=429,
            )  # fmt: skip
        masker = make_masker(self.vocab, config, self.batcher.masker_device)
        deadline = time.monotonic() + lim.request_seconds if deadline is None else deadline
        job = Job(config, primer, masker, deadline)
        self.jobs.add(job)
        self.inbox.put(job)
        return job

    def _finish(self, job: Job, error: Exception | None = None) -> None:
        if job not in self.jobs:
            return
        self.jobs.discard(job)
        job.error = job.error or error
        job.tokens.put_nowait(_DONE)

    def _deliver(self, events: list[tuple[Job, int | None, bool, Exception | None]]) -> None:
        """On the loop: hand each job its tokens, all of this delivery's in one list; ``last``
        (or no token) ends the job. The flag travels with the token because the thread may be
        steps ahead of the loop."""
        chunks: dict[Job, list[int]] = {}
        ends: list[tuple[Job, Exception | None]] = []
        for job, token, last, error in events:
            if token is not None:
                chunks.setdefault(job, []).append(token)
            if token is None or last:
                ends.append((job, error))
        for job, chunk in chunks.items():
            if job in self.jobs:
                job.tokens.put_nowait(chunk)
        for job, error in ends:
            self._finish(job, error)

    def _post(self, events: dict[Any, list]) -> None:
        """From the decode thread: queue ``events`` (per event loop) for delivery. A loop is
        woken only when it has nothing waiting already: one that is behind (the GIL is shared)
        gets several steps' tokens in one wake-up, and the thread skips the wake-up write."""
        wake = []
        with self._outbox_lock:
            for loop, items in events.items():
                box = self._outbox.get(loop)
                if box is None:
                    self._outbox[loop] = list(items)
                    wake.append(loop)
                else:
                    box.extend(items)
        for loop in wake:
            loop.call_soon_threadsafe(self._flush, loop)

    def _flush(self, loop: Any) -> None:
        """On ``loop``: deliver everything posted for it so far."""
        with self._outbox_lock:
            items = self._outbox.pop(loop, [])
        self._deliver(items)

    def piece_score(self, ids: Any, voices: int = 0, meter: str = "") -> Any:
        """The piece of ``ids`` as a symusic score, as ``aurl generate`` writes it: one track, or
        ``voices`` tracks (Soprano, Alto, Tenor, Bass for 4;
        :func:`aurl.generation.export.voice_data`), with the ``meter`` asked and the key found
        (:func:`aurl.generation.export.signed`)."""
        from aurl.generation.export import signed, voice_data

        data = self.tokenizer.decode_to_data(np.asarray(ids))
        signed(data, meter)
        return (voice_data(data, voices) if voices else data).to_score()

    def piece_midi(self, ids: Any, voices: int = 0, meter: str = "") -> bytes:
        """:meth:`piece_score` as the bytes of a MIDI file."""
        return self.piece_score(ids, voices, meter).dumps_midi()

    def stats(self) -> dict[str, Any]:
        return {
            "active": len(self.batcher.rows),
            "waiting": max(0, len(self.jobs) - len(self.batcher.rows)),
            "slots": self.limits.slots,
            "composing": self.composing,
            "steps": self.steps,
            "tokens": self.tokens_out,
        }

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)

    # -- the decode thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._warm_up()
        except Exception:  # noqa: BLE001 - a failed warm-up only costs the first request time
            log.exception("warm-up of %s failed", self.name)
        self.ready.set()
        while not self._stop.is_set():
            try:
                self._cycle()
            except Exception as e:  # a bug, not bad input: fail the batch, keep serving
                log.exception("decode thread of %s failed; its requests get an error", self.name)
                rows = self.batcher.rows + self.batcher.pending
                self.batcher = self._new_batcher()
                for row in rows:
                    job = row.tag
                    job.loop.call_soon_threadsafe(self._deliver, [(job, None, True, e)])

    def _cycle(self) -> None:
        b = self.batcher
        try:
            job = self.inbox.get(timeout=0.2) if not b.busy else self.inbox.get_nowait()
        except queue.Empty:
            job = None
        while job is not None:
            self._add(job)
            try:
                job = self.inbox.get_nowait()
            except queue.Empty:
                job = None
        now = time.monotonic()
        events: dict[Any, list] = {}
        for row in b.rows + b.pending:
            job = row.tag
            if job.cancelled:
                b.cancel(row)
            elif now > job.deadline:
                b.cancel(row)
                err = LimitError(
                    f"the request took over request_seconds={self.limits.request_seconds:g} s "
                    f"(at {row.generated} tokens): ask for fewer tokens or retry when the "
                    "server is less busy",
                    limit="request_seconds", status=408,
                )  # fmt: skip
                events.setdefault(job.loop, []).append((job, None, True, err))
            if row.cancelled and job.cancelled:
                events.setdefault(job.loop, []).append((job, None, True, None))
        stepped = b.step()
        if stepped:
            self.steps += 1
            self.tokens_out += len(stepped)
        for row in stepped:
            events.setdefault(row.tag.loop, []).append((row.tag, row.ids[-1], row.finished, None))
        if events:
            self._post(events)

    def _add(self, job: Job) -> None:
        try:
            job.row = self.batcher.add(job.config, primer=job.primer, masker=job.masker, tag=job)
        except AurlError as e:
            job.loop.call_soon_threadsafe(self._deliver, [(job, None, True, e)])
