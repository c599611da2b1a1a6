"""A reader in a worker process that runs away with memory fails its item, not the machine
(:data:`aurl.data.isolate.MEMORY_BOUND_BYTES`; docs/design.md, "Hostile inputs, session 19
(commands)")."""

from __future__ import annotations

import sys

import pytest

from aurl.data import isolate
from aurl.data.isolate import Failed, isolated_map


def _allocate(mib: int) -> int:
    return len(bytearray(mib * 2**20))


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_DATA is bounded on Linux")
def test_a_reader_past_the_memory_bound_fails_its_item_and_the_rest_go_on(monkeypatch):
    """Before the bound, a reader could grow until the machine ran out (music21 reading a
    MusicXML time signature of 10**9 beats: 3.4 GB after 40 s, within the time bound of a
    padded file). Now an allocation past the bound is the item's failure, one line."""
    monkeypatch.setattr(isolate, "MEMORY_BOUND_BYTES", 256 * 2**20, raising=False)
    res = dict(isolated_map(_allocate, [1, 1024, 2], workers=1, seconds=lambda _: 60.0))
    assert res == {0: 2**20, 1: Failed("reader ran out of memory (over 0.25 GiB)"), 2: 2 * 2**20}
