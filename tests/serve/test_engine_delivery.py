"""The decode thread hands tokens to the event loop in as few wake-ups as it can: tokens of
several steps posted while the loop is busy reach the job as one chunk, in order, and the job
then ends."""

from __future__ import annotations

import asyncio
import threading
import time

from aurl.config import GenerationConfig
from aurl.serve.engine import Job, Limits, ModelServer


def test_tokens_posted_while_the_loop_is_busy_arrive_in_one_chunk(tiny) -> None:
    srv = ModelServer("tiny", tiny, Limits(slots=2))
    try:

        async def main() -> list:
            loop = asyncio.get_running_loop()
            job = Job(GenerationConfig(), None, None, deadline=time.monotonic() + 60)
            srv.jobs.add(job)

            def decode_steps() -> None:  # as the decode thread posts, step by step
                srv._post({loop: [(job, 7, False, None)]})
                srv._post({loop: [(job, 8, False, None)]})
                srv._post({loop: [(job, 9, True, None)]})

            thread = threading.Thread(target=decode_steps)
            thread.start()
            thread.join()  # the loop is busy (blocked here) while the thread posts
            return [chunk async for chunk in job.chunks()]

        assert asyncio.run(main()) == [[7, 8, 9]]
        assert not srv.jobs  # the last token ended the job
    finally:
        srv.close()
