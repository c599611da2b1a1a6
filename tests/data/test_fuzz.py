"""Seeded mutation fuzzing of the MIDI reader: no input may crash, hang or raise anything but
MidiReadError, and every input that crashes symusic on its own must be repaired or refused by
the pre-pass (aurl.data.smf) before symusic sees it.

Mutants are made from the fixture files (tests/fixtures/midi) by a seeded generator, ``mutant(k)``
for k = 0..MUTANTS-1 (the kinds cycle: truncation at a chunk boundary and inside an event, bit
flips, chunk-length lies up and down, junk tails, running-status abuse, huge delta times, SMPTE
divisions, zero length), plus two 64 MiB inputs (one at data.max_file_bytes, one past it). They
run through :func:`aurl.data.isolate.isolated_map`: forked workers, replaced when one dies, each
mutant under a watchdog of ``WATCHDOG_S``. ``AURL_FUZZ_SEED`` / ``AURL_FUZZ_MUTANTS`` explore
further (e.g. 100000 mutants overnight).
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

import numpy as np
import pytest

from aurl.data.isolate import Failed, isolated_map
from aurl.data.smf import PADDING, check_smf
from aurl.errors import MidiReadError

FIXTURES = sorted((Path(__file__).parents[1] / "fixtures" / "midi").glob("*.mid"))
SOURCES = [p.read_bytes() for p in FIXTURES]
SEED = int(os.environ.get("AURL_FUZZ_SEED", "20261130"))
MUTANTS = int(os.environ.get("AURL_FUZZ_MUTANTS", "2000"))
WATCHDOG_S = 20.0  # per mutant; a clean read of a fixture takes ~10 ms
BIG = 64 * 1024 * 1024  # data.max_file_bytes
KINDS = (
    "chunk_boundary", "inside_event", "bit_flips", "length_up", "length_down", "junk_tail",
    "running_status", "huge_delta", "smpte", "zero_length",
)  # fmt: skip


def chunk_bounds(data: bytes) -> list[int]:
    """Offsets of every chunk start and of the end of the file (the fixtures are clean)."""
    out, pos = [], 14
    while pos + 8 <= len(data):
        out.append(pos)
        pos += 8 + int.from_bytes(data[pos + 4 : pos + 8], "big")
    return [*out, len(data)]


def track_starts(data: bytes) -> list[int]:
    """Offsets of the first event of every track chunk."""
    return [p + 8 for p in chunk_bounds(data)[:-1] if data[p : p + 4] == b"MTrk"]


def mutant(k: int) -> tuple[str, bytes]:
    """The k-th mutant: ``(description, bytes)``; the same k gives the same bytes in any run."""
    if k == -1:  # exactly data.max_file_bytes: a fixture and a junk tail
        rng = random.Random(SEED)
        return "64 MiB junk tail", SOURCES[0] + rng.randbytes(BIG - len(SOURCES[0]))
    if k == -2:  # one byte over the limit: refused by size, never read
        return "64 MiB + 1 byte", SOURCES[1] + bytes(BIG + 1 - len(SOURCES[1]))
    rng = random.Random(SEED * 1_000_003 + k)
    src = k % len(SOURCES)
    data = bytearray(SOURCES[src])
    kind = KINDS[(k // len(SOURCES)) % len(KINDS)]
    bounds = chunk_bounds(bytes(data))
    starts = track_starts(bytes(data))
    if kind == "chunk_boundary":  # at a chunk start or end, or within its 8-byte header
        cut = rng.choice([0, 4, 8, 13, 14, *bounds, *(b + rng.randrange(1, 8) for b in bounds)])
        data = data[:cut]
    elif kind == "inside_event":
        data = data[: rng.randrange(14, len(data))]
    elif kind == "bit_flips":
        for _ in range(rng.randint(1, 16)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif kind in ("length_up", "length_down"):  # a chunk (header or track) lies about its size
        at = rng.choice([0, *bounds[:-1]])
        length = int.from_bytes(data[at + 4 : at + 8], "big")
        if kind == "length_up":
            length += rng.choice([1, 2, 3, rng.randrange(1, 4096), rng.randrange(1, 2**31)])
        else:
            length = rng.randrange(0, max(1, length))
        data[at + 4 : at + 8] = min(length, 2**32 - 1).to_bytes(4, "big")
    elif kind == "junk_tail":  # the reported case: cut inside a track, 1-4096 random bytes
        data = data[: rng.randrange(starts[0], len(data))] + rng.randbytes(rng.randint(1, 4096))
    elif kind == "running_status":
        s = rng.choice(starts)
        if rng.random() < 0.5:  # the first event of a track has no status byte
            data[s + 1] = rng.randrange(0x80)
        else:  # data bytes where a status byte should follow a meta event
            metas = [i for i in range(s, len(data) - 1) if data[i] == 0xFF and data[i - 1] < 0x80]
            i = rng.choice(metas or [s + 1])
            data[i] = rng.randrange(0x80)
    elif kind == "huge_delta":  # a 4-byte maximum delta, or an over-long 5-byte one
        s = rng.choice(starts)
        delta = b"\xff\xff\xff\x7f" if rng.random() < 0.5 else b"\xff\xff\xff\xff\x7f"
        data = data[:s] + delta + data[s + 1 :]
        if rng.random() < 0.5:  # and the chunk length kept consistent
            at = s - 8
            length = int.from_bytes(data[at + 4 : at + 8], "big") + len(delta) - 1
            data[at + 4 : at + 8] = length.to_bytes(4, "big")
    elif kind == "smpte":
        data[12] = rng.choice([256 - 24, 256 - 25, 256 - 29, 256 - 30, rng.randrange(0x80, 0x100)])
        data[13] = rng.randrange(256)
    else:  # zero_length
        data = bytearray()
    return f"mutant {k} ({kind} of {FIXTURES[src].name}, seed {SEED})", bytes(data)


# -- the workers -------------------------------------------------------------------------------

_STATE: dict = {}


def _init(folder: str) -> None:
    from aurl.data.tokenizer import Tokenizer

    _STATE["tokenizer"] = Tokenizer()
    _STATE["path"] = Path(folder) / f"mutant-{os.getpid()}.mid"  # one per worker


def _read(k: int) -> tuple[str, str, str]:
    """Read + repair + tokenize mutant k: (description, "ok" / "refused" / "error", detail)."""
    name, data = mutant(k)
    path = _STATE["path"]
    path.write_bytes(data)
    try:
        ids = _STATE["tokenizer"].encode_file(path)
        return name, "ok", f"{len(ids)} ids"
    except MidiReadError as e:
        return name, "refused", str(e)
    except Exception as e:  # anything else is a bug the test reports
        return name, "error", f"{type(e).__name__}: {e}"
    finally:
        path.unlink(missing_ok=True)


def _raw_parse(k: int) -> str:
    """symusic on the mutant's raw bytes, both sanitize modes, no pre-pass (finds crashers)."""
    import symusic

    _, data = mutant(k)
    for sanitize in (False, True):  # a clean rejection is fine: only a dead process counts
        with contextlib.suppress(Exception):
            symusic.Score.from_midi(data, sanitize_data=sanitize)
    return "survived"


def _watchdog(_k: int) -> float:
    return WATCHDOG_S


def _big_watchdog(_k: int) -> float:
    return 5 * WATCHDOG_S


# -- the tests ---------------------------------------------------------------------------------


def test_mutants_cover_every_kind():
    kinds = {mutant(k)[0].split("(")[1].split(" of")[0] for k in range(len(KINDS) * 6)}
    assert kinds == set(KINDS)
    assert mutant(123) == mutant(123) and mutant(123) != mutant(124)


def test_every_mutant_reads_or_is_refused(tmp_path):
    """>= 2000 mutants: each gives ids or MidiReadError; no crash, hang or other exception."""
    outcomes, bad = {"ok": 0, "refused": 0}, []
    for k, res in isolated_map(
        _read,
        range(MUTANTS),
        workers=2,
        initializer=_init,
        initargs=(str(tmp_path),),
        seconds=_watchdog,
    ):
        if isinstance(res, Failed):
            bad.append(f"{mutant(k)[0]}: {res.reason}")
        elif res[1] == "error":
            bad.append(f"{res[0]}: {res[2]}")
        else:
            outcomes[res[1]] += 1
    assert not bad, f"{len(bad)} mutants crashed, hung or raised: {bad[:5]}"
    assert sum(outcomes.values()) == MUTANTS
    # the pre-pass repairs most damage rather than refusing it
    assert outcomes["ok"] > outcomes["refused"] > 0, outcomes


def test_64mib_inputs_are_bounded(tmp_path):
    """At the size limit: read (the junk tail dropped); past it: refused by size."""
    res = dict(
        isolated_map(
            _read,
            [-1, -2],
            workers=2,
            initializer=_init,
            initargs=(str(tmp_path),),
            seconds=_big_watchdog,
        )
    )
    assert not isinstance(res[0], Failed) and not isinstance(res[1], Failed), res
    assert res[0][1] == "ok", res[0]
    assert res[1][1] == "refused" and "max_file_bytes" in res[1][2], res[1]


def test_crashers_never_reach_symusic_as_they_were():
    """Mutants on which symusic alone kills its process (an out-of-bounds access: it crashes
    only some runs) must be repaired or refused by the pre-pass, never passed through."""
    crashers = [
        k
        for k, res in isolated_map(_raw_parse, range(MUTANTS), workers=2, seconds=_watchdog)
        if isinstance(res, Failed)
    ]
    for k in crashers:
        name, data = mutant(k)
        try:
            checked, repairs = check_smf(data, name)
        except MidiReadError:
            continue  # refused
        assert checked != data + PADDING and repairs.items(), f"{name} passed unchanged"


# -- decoding random ids -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_decoding_random_ids_never_raises(seed):
    """Random id sequences (in and out of the vocabulary, any length) decode to a Score and a
    note array, or raise a clean error; nothing else."""
    from aurl.data.tokenizer import Tokenizer

    tok = Tokenizer()
    rng = np.random.default_rng(seed)
    for n in [0, 1, 2, 7, 100, 5000]:
        for ids in (
            rng.integers(0, tok.vocab.size, n),
            rng.integers(-5, tok.vocab.size + 5, n),
            np.concatenate([[1], rng.integers(0, tok.vocab.size, n)]),  # START first
        ):
            score = tok.decode_to_score(ids)
            notes = tok.decode_to_notes(ids)
            assert score.note_num() == len(notes)
