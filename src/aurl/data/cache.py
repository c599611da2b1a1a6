"""The token cache: a folder of uint16 token shards plus one index, built incrementally.

Layout of a cache folder::

    index.npz        the commit point: per-file columns + meta (JSON). Replaced atomically, last.
    meta.json        a readable copy of the meta (vocab config, totals); never read back
    shards/*.u16     raw little-endian uint16 token streams, appended to and then never changed
    parts/i-of-n/    part caches written by ``prepare(..., shard=(i, n))``; merged by ``prepare``
    .lock            held (flock) while a process writes the cache

Per file the index keeps: relative path, shard, offset and length (in tokens), split, notes,
time signature (the file's first: numerator and denominator, 4/4 where it has none), style
(an index into ``meta["styles"]``, the style labels of the corpus manifests; -1 for none),
content hash (BLAKE2b-128), size and mtime (a quick "unchanged" test before hashing). Format 2
added the time signature; a cache of format 1 is refused with "run aurl data prepare again",
and ``prepare`` rebuilds it. The style column needs no new format: like the split it is
recomputed from the manifests on every ``prepare``, and an index written before it reads as
"no styles" (training a style model on it asks for ``aurl data prepare`` again).

Crash safety: shards are only ever appended to and fsynced before the index that points into
them is written (temp file + fsync + rename, then fsync of the folder). Whatever the moment of a
crash, ``index.npz`` is either the old or the new one and every byte it points to is on disk.
Shards no committed index refers to (left by a crash) are deleted by the next writer. During a
long run the index is committed every ``commit_every`` files, so an interrupted run keeps its work.

Scale: tokens stream from the worker processes straight to the shard file; the index is columnar
numpy (about 60 bytes per file plus its path); readers ``np.memmap`` the shards, lazily and once
per process (so DataLoader workers each open their own maps).
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import secrets
import stat
import time
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aurl.config import DataConfig, VocabConfig, build
from aurl.data.corpora import manifest_labels
from aurl.data.meter import read_meter
from aurl.data.vocab import Kind, Vocab
from aurl.errors import AurlError, ConfigError, DataError
from aurl.fileio import atomic_write, atomic_write_text, fsync_path, temp_path
from aurl.progress import Progress, silent

FORMAT = 2  # 2: time signatures in the index
SPLITS = ("train", "valid", "test")
MIDI_SUFFIXES = (".mid", ".midi", ".kar")
TOKEN_DTYPE = np.dtype("<u2")
HASH_BYTES = 16
DEFAULT_SHARD_TOKENS = 1 << 28  # 512 MB per shard file
# The DataConfig fields that change what the tokenizer writes; a change invalidates every entry.
# the shard files _ShardWriter names: <run time>-<8 hex>-<k>.u16
_SHARD_NAME = re.compile(r"\d{14}-[0-9a-f]{8}-\d{5,}\.u16")
# the files a cache folder holds besides its shards (their temporary names are removed)
_OWN_FILES = ("index.npz", "meta.json", "config.yaml")
TOKENIZER_FIELDS = ("out_of_range", "drums", "max_events_per_file", "max_file_bytes")


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def file_hash(path: str | Path) -> bytes:
    """BLAKE2b-128 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.blake2b(digest_size=HASH_BYTES)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.digest()


def shard_of(relpath: str, n: int) -> int:
    """The part (0..n-1) a file belongs to under ``--shard i/n``: a hash of its relative path, so
    it never depends on the other files."""
    key = relpath.encode(errors="surrogateescape")  # a name that is not UTF-8: its bytes
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % n


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/8"`` -> ``(2, 8)``; parts are numbered 0..n-1."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise DataError(f"--shard {text!r}: expected i/n with integers, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise DataError(f"--shard {text!r}: need n >= 1 and 0 <= i < n (parts are 0..n-1)")
    return i, n


def _split_id(relpath: str, data_config: DataConfig, groups: dict[str, str]) -> int:
    """The split of ``relpath``: a hash of its tune group (``groups``, from the corpus
    manifest) or, for a file no manifest lists, of its path."""
    from aurl.data.split import split_of

    key = groups.get(relpath, relpath)
    split = split_of(key, data_config.valid_fraction, data_config.test_fraction)
    return SPLITS.index(split) if isinstance(split, str) else int(split)


def fingerprint(vocab_config: VocabConfig, data_config: DataConfig) -> dict[str, Any]:
    """What a cache's tokens depend on: the vocab and the tokenizer's data options."""
    return {
        "format": FORMAT,
        "vocab": dataclasses.asdict(vocab_config),
        "tokenizer": {k: getattr(data_config, k) for k in TOKENIZER_FIELDS},
    }


def scan_midi_files(
    root: str | Path, *, skip: Iterable[str | Path] = ()
) -> Iterator[tuple[str, os.stat_result | OSError]]:
    """``(relative POSIX path, stat or the OSError of stat)`` of every MIDI file under ``root``.

    Hidden names are skipped, and so are the folders in ``skip``; symlinked folders are not
    followed (no loops). Strings and ``os.scandir`` rather than pathlib: a million files.
    """
    skip_set = {os.path.realpath(p) for p in skip}
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(os.path.join(root, rel_dir)) as it:
            entries = sorted(it, key=lambda e: e.name)
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
            if e.is_dir(follow_symlinks=False):
                if os.path.realpath(e.path) not in skip_set:
                    subdirs.append(rel)
            elif e.name.lower().endswith(MIDI_SUFFIXES):
                try:
                    yield rel, e.stat()
                except OSError as err:  # e.g. a dangling symlink: reported, not fatal
                    yield rel, err
        stack.extend(reversed(subdirs))  # depth first, in name order


def find_midi_files(root: str | Path, *, skip: Iterable[str | Path] = ()) -> Iterator[str]:
    """Relative POSIX paths of the MIDI files under ``root`` (see :func:`scan_midi_files`)."""
    return (rel for rel, _ in scan_midi_files(root, skip=skip))


# --------------------------------------------------------------------------------------------
# The index: columnar arrays, one row per file
# --------------------------------------------------------------------------------------------

_COLUMNS = {
    "shard": np.int32,
    "offset": np.int64,
    "length": np.int64,
    "split": np.uint8,
    "notes": np.int64,
    "meter_num": np.int16,
    "meter_den": np.int16,
    "style": np.int16,
    "size": np.int64,
    "mtime_ns": np.int64,
}


@dataclass
class _Index:
    """Rows of a cache index. ``paths`` is a list of str; the rest are numpy columns."""

    paths: list[str]
    cols: dict[str, np.ndarray]
    hashes: np.ndarray  # (N, 16) uint8
    shards: list[str]
    failed: list[dict[str, Any]] = field(default_factory=list)  # {path, size, mtime_ns, error}
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> _Index:
        cols = {k: np.zeros(0, dtype=t) for k, t in _COLUMNS.items()}
        return cls([], cols, np.zeros((0, HASH_BYTES), np.uint8), [])

    def __len__(self) -> int:
        return len(self.paths)

    @classmethod
    def load(cls, path: Path, *, stale: bool = False) -> _Index:
        """The index at ``path``; with ``stale``, an index of another format reads as empty
        (``prepare`` redoes it) instead of raising."""
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                blob, offs = z["path_blob"].tobytes(), z["path_offsets"]
                paths = [
                    blob[a:b].decode(errors="surrogateescape") for a, b in zip(offs[:-1], offs[1:])
                ]
                cols = {
                    k: z[k].astype(t, copy=False) if k in z.files else np.full(len(paths), -1, t)
                    for k, t in _COLUMNS.items()
                }  # style: optional, -1 (no style) in an index written before it
                hashes = z["hash"]
        except KeyError as e:  # a column this format has and an older one lacks
            found = _format_of(path)
            if found == FORMAT:
                raise DataError(
                    f"cache index {path} is unreadable ({e}); delete the cache folder and "
                    "prepare again"
                ) from None
            if stale:
                return cls.empty()
            raise _stale_error(path, found) from None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # truncated or not a zip
            raise DataError(
                f"cache index {path} is unreadable ({e}); delete the cache folder and prepare again"
            ) from None
        if not isinstance(meta, dict):
            raise _damaged(path, "its meta is not a mapping")
        if meta.get("format") != FORMAT:
            if stale:
                return cls.empty()
            raise _stale_error(path, meta.get("format"))
        if not isinstance(meta.get("shards"), list) or not isinstance(meta.get("failed", []), list):
            raise _damaged(path, "its meta lists no shards")
        index = cls(paths, cols, hashes, list(meta.pop("shards")), meta.pop("failed", []), meta)
        if why := index.damage():
            raise _damaged(path, why)
        return index

    def damage(self) -> str | None:
        """What does not hang together in these rows, or None: a damaged or hand-edited index
        once raised IndexError, KeyError or AttributeError deep in training or prepare."""
        n, cols = len(self.paths), self.cols
        if any(len(v) != n for v in cols.values()) or self.hashes.shape != (n, HASH_BYTES):
            return "its columns have different lengths"
        if any(not isinstance(s, str) or not _SHARD_NAME.fullmatch(s) for s in self.shards):
            return "a shard name that is not one this cache writes"
        if n and not 0 <= cols["shard"].min() <= cols["shard"].max() < len(self.shards):
            return "a file in a shard it does not list"
        if n and (cols["offset"].min() < 0 or cols["length"].min() < 0):
            return "a negative offset or length"
        if n and cols["split"].max() >= len(SPLITS):
            return "a split past test"
        return None

    def intact(self, folder: Path) -> np.ndarray:
        """(N,) bool: each file's tokens lie inside its shard file (False for every file of a
        shard that is missing, cut short or not a file)."""
        tokens = []
        for name in self.shards:
            try:
                st = os.stat(folder / "shards" / name)
            except OSError:
                tokens.append(-1)
                continue
            tokens.append(st.st_size // TOKEN_DTYPE.itemsize if stat.S_ISREG(st.st_mode) else -1)
        if not len(self):
            return np.ones(0, dtype=bool)
        end = self.cols["offset"].astype(np.int64) + self.cols["length"]
        return end <= np.array(tokens, np.int64)[self.cols["shard"]]

    def save(self, path: Path) -> None:
        encoded = [p.encode(errors="surrogateescape") for p in self.paths]
        offs = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offs[1:])
        meta = {**self.meta, "shards": self.shards, "failed": self.failed}
        arrays = {
            "meta": np.array(json.dumps(meta)),
            "path_blob": np.frombuffer(b"".join(encoded), dtype=np.uint8),
            "path_offsets": offs,
            "hash": self.hashes,
            **self.cols,
        }

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        atomic_write(path, write)

    def select(self, rows: np.ndarray) -> _Index:
        """The rows ``rows`` (indices or bool mask), same shard list."""
        rows = np.flatnonzero(rows) if rows.dtype == bool else rows
        cols = {k: v[rows] for k, v in self.cols.items()}
        paths = [self.paths[i] for i in rows]
        return _Index(paths, cols, self.hashes[rows], list(self.shards), [], dict(self.meta))

    def concat(self, other: _Index) -> _Index:
        """Rows of ``self`` then ``other``; shard ids of ``other`` remapped into one list."""
        names = list(self.shards)
        pos = {s: i for i, s in enumerate(names)}
        for s in other.shards:
            if s not in pos:
                pos[s] = len(names)
                names.append(s)
        remap = np.array([pos[s] for s in other.shards] or [0], dtype=np.int32)
        cols = {k: np.concatenate([self.cols[k], other.cols[k]]) for k in _COLUMNS}
        cols["shard"] = np.concatenate([self.cols["shard"], remap[other.cols["shard"]]])
        hashes = np.concatenate([self.hashes, other.hashes])
        return _Index(self.paths + other.paths, cols, hashes, names, [], dict(self.meta))

    def drop_unused_shards(self) -> None:
        used = np.unique(self.cols["shard"])
        self.shards = [self.shards[i] for i in used]
        remap = np.zeros(max(len(used), int(used.max(initial=0)) + 1), dtype=np.int32)
        remap[used] = np.arange(len(used), dtype=np.int32)
        self.cols["shard"] = remap[self.cols["shard"]]


def _format_of(path: Path) -> Any:
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(str(z["meta"])).get("format")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def _damaged(path: Path, why: str) -> DataError:
    return DataError(f"cache index {path} is damaged ({why}); delete the cache folder and "
                     "prepare again")  # fmt: skip


def _stale_error(path: Path, found: Any) -> DataError:
    return DataError(
        f"cache {path.parent} has format {found}, this Aurl reads format {FORMAT} (it adds time "
        f"signatures): run 'aurl data prepare MIDI_DIR --out {path.parent}' again"
    )


class _Rows:
    """New rows accumulated during a run, turned into an :class:`_Index` at each commit."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        # packed 8-byte columns, not lists of int objects: a million rows stay ~60 MB
        self.cols = {k: array.array("q") for k in _COLUMNS}
        self.hashes = bytearray()

    def add(self, path: str, hash_: bytes, **values: int) -> None:
        self.paths.append(path)
        self.hashes += hash_
        for k in _COLUMNS:
            self.cols[k].append(values[k])

    def to_index(self, shards: list[str]) -> _Index:
        cols = {k: np.frombuffer(v, np.int64).astype(_COLUMNS[k]) for k, v in self.cols.items()}
        hashes = np.frombuffer(bytes(self.hashes), dtype=np.uint8).reshape(-1, HASH_BYTES)
        return _Index(list(self.paths), cols, hashes, list(shards))


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class _ShardWriter:
    """Appends token arrays to ``shards/<run>-<k>.u16``, starting a new file past ``max_tokens``."""

    def __init__(self, folder: Path, max_tokens: int) -> None:
        self.folder = folder
        self.run = f"{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(4)}"
        self.max_tokens = max_tokens
        self.names: list[str] = []
        self.file: Any = None
        self.used = 0

    def append(self, tokens: np.ndarray) -> tuple[str, int]:
        """Write ``tokens``; return (shard name, offset in tokens)."""
        if self.file is None or (self.used and self.used + len(tokens) > self.max_tokens):
            self.close()
            name = f"{self.run}-{len(self.names):05d}.u16"
            self.folder.mkdir(parents=True, exist_ok=True)
            self.file = open(self.folder / name, "ab")  # noqa: SIM115 - closed in close()
            self.names.append(name)
            self.used = 0
        offset = self.used
        self.file.write(np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE).tobytes())
        self.used += len(tokens)
        return self.names[-1], offset

    def sync(self) -> None:
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            fsync_path(self.folder)

    def close(self) -> None:
        if self.file is not None:
            self.sync()
            self.file.close()
            self.file = None


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, kind in ((".lock", "a file"), ("index.npz", "a file"), ("shards", "a folder")):
        with contextlib.suppress(OSError):  # absent: made below
            mode = os.stat(folder / name).st_mode
            if stat.S_ISDIR(mode) != (kind == "a folder"):
                raise DataError(f"cache {folder} is damaged ({name} is not {kind}); delete the "
                                "cache folder and prepare again")  # fmt: skip
    with open(folder / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(
                f"cache {folder} is being written by another process; wait for it to finish"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _clean_unreferenced(folder: Path, keep: Iterable[str]) -> None:
    """Delete shard and temp files no committed index refers to (a crash's leftovers): only
    names this module writes, since ``--out`` may be a folder of the user's own files (their
    ``*.tmp`` files and ``shards/*`` were deleted)."""
    keep = set(keep)
    shard_dir = folder / "shards"
    if shard_dir.is_dir():
        for p in shard_dir.iterdir():
            if p.name not in keep and _SHARD_NAME.fullmatch(p.name):
                p.unlink()
    for name in _OWN_FILES:  # current and older temp names
        for tmp in (temp_path(folder / name), folder / f"{name}.tmp"):
            tmp.unlink(missing_ok=True)


def _commit(folder: Path, index: _Index, writer: _ShardWriter | None) -> _Index:
    """Make ``index`` the cache's state: shards on disk first, then the index, then meta.json.

    Returns the index as committed (rows sorted by path, unused shards dropped)."""
    if writer is not None:
        writer.sync()
    meta, failed = index.meta, sorted(index.failed, key=lambda f: f["path"])
    # rows sorted by path: the same folder gives the same row numbers whatever the worker timing
    index = index.select(np.array(sorted(range(len(index)), key=index.paths.__getitem__), int))
    index.meta, index.failed = meta, failed
    index.drop_unused_shards()
    index.meta["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    index.meta["totals"] = _totals(index)
    index.save(folder / "index.npz")
    readable = {**index.meta, "files": len(index), "shards": len(index.shards)}
    atomic_write_text(folder / "meta.json", json.dumps(readable, indent=2))
    return index


def _totals(index: _Index) -> dict[str, dict[str, int]]:
    out = {}
    for i, name in enumerate(SPLITS):
        rows = index.cols["split"] == i
        out[name] = {
            "files": int(rows.sum()),
            "tokens": int(index.cols["length"][rows].sum()),
            "notes": int(index.cols["notes"][rows].sum()),
        }
    return out


# Worker side: one Tokenizer per process, built once by the pool initializer.
_WORKER: dict[str, Any] = {}


def _init_worker(root: Path, vocab_config: VocabConfig, data_config: DataConfig) -> None:
    from aurl.data.tokenizer import Tokenizer

    vocab = Vocab(vocab_config)
    _WORKER["root"] = root
    _WORKER["tokenizer"] = Tokenizer(vocab_config, data_config)
    _WORKER["is_note_on"] = vocab.kind == Kind.NOTE_ON


def _work(task: tuple[str, bytes | None]) -> tuple:
    """Hash and (if changed) tokenize one file. Never raises: errors come back as a reason."""
    relpath, old_hash = task
    path = _WORKER["root"] / relpath
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):  # a FIFO blocks the hash's open, /dev/zero never ends
            return ("failed", relpath, None, 0, 0,
                    "not a regular file (a device, pipe or socket): give a MIDI file")  # fmt: skip
        digest = file_hash(path)
        if digest == old_hash:
            return ("same", relpath, digest, st.st_size, st.st_mtime_ns)
        ids = _WORKER["tokenizer"].encode_file(path)
        notes = int(_WORKER["is_note_on"][ids].sum())
        tokens = np.asarray(ids).astype(TOKEN_DTYPE)
        meter = read_meter(path)
        return ("ok", relpath, digest, st.st_size, st.st_mtime_ns, tokens, notes, meter)
    except (AurlError, OSError) as e:
        return ("failed", relpath, None, 0, 0, f"{type(e).__name__}: {e}")
    except Exception as e:  # a tokenizer bug on one file must not stop a 1M-file run
        return ("failed", relpath, None, 0, 0, f"unexpected {type(e).__name__}: {e}")


def _crashed(task: tuple[str, bytes | None], reason: str) -> tuple:
    return ("failed", task[0], None, 0, 0, reason)


def _results(
    root: Path,
    tasks: list[tuple[str, bytes | None]],
    workers: int,
    vocab_config: VocabConfig,
    data_config: DataConfig,
) -> Iterator[tuple]:
    """Results of :func:`_work` in completion order, from ``workers`` processes.

    The files are read in workers (:func:`aurl.data.isolate.isolated_map`, even with one): a
    worker that dies on a file (a crash inside a MIDI parser) or runs past its time bound is
    replaced, and that file alone is reported as failed ("reader crashed (signal 11)").
    """
    from aurl.data.isolate import Failed, isolated_map, time_bound

    init_args = (root, vocab_config, data_config)
    _init_worker(*init_args)  # fail fast here, not in every worker
    done = isolated_map(
        _work, tasks, workers=workers, initializer=_init_worker, initargs=init_args,
        seconds=lambda task: time_bound(root / task[0]),
    )  # fmt: skip
    for i, res in done:
        yield _crashed(tasks[i], res.reason) if isinstance(res, Failed) else res


def _compact(
    folder: Path, base: _Index, redone: np.ndarray, rows: _Rows, writer: _ShardWriter
) -> int:
    """Copy the live pieces of shards that are mostly dead (replaced or removed files) into the
    writer's shards, so that dead tokens never pile up; the old files go after the commit.

    Returns the number of pieces copied (streamed one at a time through the mmap).
    """
    live_rows = np.flatnonzero(~redone)
    shard_ids = base.cols["shard"][live_rows]
    live = np.bincount(
        shard_ids, weights=base.cols["length"][live_rows], minlength=len(base.shards)
    )
    size = np.array([(folder / "shards" / s).stat().st_size // 2 for s in base.shards], np.int64)
    sparse = np.flatnonzero(live < size // 2)
    moved = 0
    for s in sparse:
        mm = np.memmap(folder / "shards" / base.shards[s], dtype=TOKEN_DTYPE, mode="r")
        for i in live_rows[shard_ids == s]:
            off, length = int(base.cols["offset"][i]), int(base.cols["length"][i])
            name, offset = writer.append(mm[off : off + length])
            keys = ("split", "notes", "meter_num", "meter_den", "style", "size", "mtime_ns")
            values = {k: int(base.cols[k][i]) for k in keys}
            rows.add(
                base.paths[i], base.hashes[i].tobytes(), shard=len(writer.names) - 1,
                offset=offset, length=length, **values,
            )  # fmt: skip
            redone[i] = True
            moved += 1
        del mm
    return moved


@dataclass
class PrepareReport:
    """What one ``prepare`` run did."""

    cache: Path
    files: int = 0  # MIDI files found (in this part, with --shard)
    tokenized: int = 0  # new or changed files tokenized in this run
    unchanged: int = 0
    removed: int = 0
    merged: int = 0  # entries imported from part caches
    compacted: int = 0  # entries copied out of mostly-dead shards
    failed: list[tuple[str, str]] = field(default_factory=list)  # (relpath, reason)
    totals: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        """Plain, greppable lines: counts, then per-split totals."""
        lines = [
            f"cache {self.cache}: {self.files} files, {self.tokenized} tokenized, "
            f"{self.unchanged} unchanged, {self.removed} removed, {self.merged} merged, "
            f"{self.compacted} compacted, {len(self.failed)} failed, {self.seconds:.1f} s"
        ]
        for name, t in self.totals.items():
            lines.append(f"  {name:5s} {t['files']} files {t['tokens']} tokens {t['notes']} notes")
        return "\n".join(lines)


def _plan(
    source: Path, out: Path, shard: tuple[int, int] | None, old: _Index, report: PrepareReport
) -> tuple[np.ndarray, list[tuple[str, bytes | None]], list[dict[str, Any]]]:
    """Sort the files under ``source`` against the committed index ``old``.

    Unchanged files (same size and mtime) are kept without reading them; files that failed
    before and did not change are failed again without a retry. Counts ``report.files`` and
    ``report.unchanged``.

    Returns:
        ``(keep, tasks, failed)``: a bool mask over ``old``'s rows still present, the
        ``(relpath, old hash or None)`` files to hash and maybe tokenize, and the failures.
    """
    old_row = {p: i for i, p in enumerate(old.paths)}
    old_failed = {f["path"]: f for f in old.failed}
    keep = np.zeros(len(old), dtype=bool)
    tasks: list[tuple[str, bytes | None]] = []
    failed: list[dict[str, Any]] = []
    for rel, st in scan_midi_files(source, skip=[out]):
        if shard and shard_of(rel, shard[1]) != shard[0]:
            continue
        report.files += 1
        if isinstance(st, OSError):
            failed.append({"path": rel, "error": f"OSError: {st}", "size": -1, "mtime_ns": -1})
            continue
        i = old_row.get(rel)
        if i is not None:
            keep[i] = True  # kept until redone: an interrupted run still has the old tokens
            if old.cols["size"][i] == st.st_size and old.cols["mtime_ns"][i] == st.st_mtime_ns:
                report.unchanged += 1
                continue
            tasks.append((rel, old.hashes[i].tobytes()))
            continue
        f = old_failed.get(rel)
        if f and f["size"] == st.st_size and f["mtime_ns"] == st.st_mtime_ns:
            failed.append(f)
            continue
        tasks.append((rel, None))
    return keep, tasks, failed


def prepare(
    source: str | Path,
    out: str | Path,
    *,
    vocab_config: VocabConfig | None = None,
    data_config: DataConfig | None = None,
    workers: int = 0,
    shard: tuple[int, int] | None = None,
    commit_every: int = 10_000,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: Progress = silent,
) -> PrepareReport:
    """Tokenize every MIDI file under ``source`` into the cache ``out``, incrementally.

    Only new or changed files (by content hash) are tokenized; files gone from ``source`` are
    dropped; unchanged files that failed before are reported again without a retry. A change of
    vocabulary or tokenizer options redoes everything. Part caches found in ``out/parts/`` (from
    runs with ``shard``) are merged in first, so that a run without ``shard`` joins them.

    Args:
        source: Folder of MIDI files (searched recursively; ``.mid``, ``.midi``, ``.kar``).
        out: Cache folder (created). With ``shard=(i, n)`` the part goes to
            ``out/parts/<i>-of-<n>``.
        vocab_config: The vocabulary (stored in the cache).
        data_config: Tokenizer options and the valid/test fractions of the split.
        workers: Tokenizer processes; 0 means all cores.
        shard: ``(i, n)``: prepare only the files with :func:`shard_of` ``== i``.
        commit_every: Commit the index after this many processed files (crash checkpoints).
        shard_tokens: Tokens per shard file before a new one is started.
        progress: Progress wrapper (``aurl.progress.bar`` in the CLI).

    Returns:
        A :class:`PrepareReport` with counts, per-file failures and per-split totals.

    Raises:
        DataError: ``source`` is not a folder, or the cache is locked or unreadable.
    """
    t0 = time.perf_counter()
    vocab_config = vocab_config or VocabConfig()
    data_config = data_config or DataConfig()
    if Vocab(vocab_config).size > np.iinfo(TOKEN_DTYPE).max:
        raise DataError(f"vocabulary of {Vocab(vocab_config).size} ids does not fit in uint16")
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise DataError(f"{source} is not a folder of MIDI files: check the path")
    folder = out / "parts" / f"{shard[0]}-of-{shard[1]}" if shard else out
    workers = workers or os.cpu_count() or 1
    fp = fingerprint(vocab_config, data_config)
    report = PrepareReport(cache=folder)

    if shard is None and (out / "parts").is_dir():
        parts = sorted(p for p in (out / "parts").iterdir() if (p / "index.npz").is_file())
        if parts:
            report.merged = merge_caches(parts, out, remove_parts=True)

    with _locked(folder):
        index_file = folder / "index.npz"
        old = _Index.load(index_file, stale=True) if index_file.is_file() else _Index.empty()
        if not (intact := old.intact(folder)).all():  # a shard cut short or gone: redo its files
            kept = old.select(intact)
            kept.failed = old.failed
            kept.drop_unused_shards()
            old = kept
        # leftovers of a crash go now; the committed index's shards stay until the next commit
        _clean_unreferenced(folder, old.shards)
        if {k: old.meta.get(k) for k in fp} != fp:
            old = _Index.empty()  # another vocabulary or tokenizer: every entry is stale
        keep, tasks, failed = _plan(source, out, shard, old, report)
        if report.files == 0 and shard is None:
            raise DataError(
                f"no MIDI files ({', '.join(MIDI_SUFFIXES)}) under {source}: check the path"
            )
        report.removed = int(len(old) - keep.sum())
        base = old.select(keep)
        fractions = [data_config.valid_fraction, data_config.test_fraction]
        # the split and the style are recomputed for every file each run (a hash per file): the
        # fractions or the manifests' tune groups and styles may have changed, the tokens not
        labels = manifest_labels(source)
        groups = {f: lab["group"] for f, lab in labels.items() if "group" in lab}
        styles = sorted({lab["style"] for lab in labels.values() if lab.get("style")})
        style_of = {f: styles.index(lab["style"]) for f, lab in labels.items() if lab.get("style")}
        base.cols["split"] = np.array(
            [_split_id(p, data_config, groups) for p in base.paths], np.uint8
        )
        base.cols["style"] = np.array([style_of.get(p, -1) for p in base.paths], np.int16)
        base.meta = {
            **fp, "split_fractions": fractions, "source": str(source.resolve()),
            "shard": list(shard) if shard else None, "styles": styles,
        }  # fmt: skip
        base_row = {p: i for i, p in enumerate(base.paths)}

        writer = _ShardWriter(folder / "shards", shard_tokens)
        rows = _Rows()
        redone = np.zeros(len(base), dtype=bool)  # base rows replaced by a new row or a failure

        def state() -> _Index:
            index = base.select(~redone).concat(rows.to_index(writer.names))
            index.meta, index.failed = base.meta, failed
            return index

        try:
            results = _results(source, tasks, workers, vocab_config, data_config)
            for n, res in enumerate(progress(results, total=len(tasks), desc="tokenize"), 1):
                kind, rel, digest, size, mtime = res[:5]
                i = base_row.get(rel)
                if kind == "same":  # touched, not changed: keep the tokens, note the new stat
                    base.cols["size"][i], base.cols["mtime_ns"][i] = size, mtime
                    report.unchanged += 1
                    continue
                if i is not None:
                    redone[i] = True
                if kind == "failed":
                    st = os.stat(source / rel) if (source / rel).exists() else None
                    failed.append({
                        "path": rel, "error": res[5],
                        "size": st.st_size if st else -1, "mtime_ns": st.st_mtime_ns if st else -1,
                    })  # fmt: skip
                    continue
                tokens, notes, (num, den) = res[5], res[6], res[7]
                name, offset = writer.append(tokens)
                rows.add(
                    rel, digest, shard=len(writer.names) - 1, offset=offset, length=len(tokens),
                    split=_split_id(rel, data_config, groups), notes=notes,
                    meter_num=num, meter_den=den, style=style_of.get(rel, -1), size=size,
                    mtime_ns=mtime,
                )  # fmt: skip
                report.tokenized += 1
                if n % commit_every == 0:
                    _commit(folder, state(), writer)
            report.compacted = _compact(folder, base, redone, rows, writer)
        except KeyboardInterrupt:  # keep what is done; the next run goes on from there
            writer.close()
            _commit(folder, state(), None)
            raise
        finally:
            writer.close()
        final = _commit(folder, state(), None)
        _clean_unreferenced(folder, final.shards)

    report.failed = [(f["path"], f["error"]) for f in failed]
    report.totals = final.meta["totals"]
    report.seconds = time.perf_counter() - t0
    return report


def _restyle(index: _Index, styles: list[str]) -> None:
    """Renumber ``index``'s style column into ``styles`` (extended with its new names)."""
    own = index.meta.get("styles", [])
    for name in own:
        if name not in styles:
            styles.append(name)
    lookup = np.array([styles.index(n) for n in own] + [-1], np.int16)  # -1 stays -1
    col = index.cols["style"]
    index.cols["style"] = lookup[np.where(col < 0, len(own), col)]
    index.meta["styles"] = list(styles)


def merge_caches(
    parts: Iterable[str | Path], out: str | Path, *, remove_parts: bool = False
) -> int:
    """Join part caches (same vocabulary) into ``out``; return the number of entries imported.

    Shard files are hard-linked (copied across file systems), never rewritten; a file present in
    several caches keeps the entry of the last part. ``out`` keeps its own entries for files no
    part has, unless it was built with another vocabulary (then the parts replace it). With
    ``remove_parts`` the parts are deleted once the merged index is committed.

    Raises:
        DataError: A part was built with another vocabulary or tokenizer options than the others.
    """
    import shutil

    out = Path(out)
    parts = [Path(p) for p in parts]
    keys = ("format", "vocab", "tokenizer")
    with _locked(out):
        merged = (
            _Index.load(out / "index.npz", stale=True) if (out / "index.npz").is_file() else None
        )
        first: dict[str, Any] | None = None
        imported = 0
        for part in parts:
            with _locked(part):
                idx = _Index.load(part / "index.npz")
                fp = {k: idx.meta.get(k) for k in keys}
                if first is None:
                    first = fp
                    if merged is None or {k: merged.meta.get(k) for k in keys} != fp:
                        merged = _Index.empty()  # tokens of another vocabulary: replaced
                        merged.meta = {
                            **fp, "source": idx.meta.get("source"), "shard": None,
                            "split_fractions": idx.meta.get("split_fractions"),
                        }  # fmt: skip
                elif fp != first:
                    raise DataError(
                        f"cache part {part} was built with another vocabulary or tokenizer "
                        f"options than {parts[0]}: prepare it again with the same config"
                    )
                if idx.meta.get("split_fractions") != merged.meta.get("split_fractions"):
                    merged.meta["split_fractions"] = None  # mixed: prepare recomputes splits
                (out / "shards").mkdir(parents=True, exist_ok=True)
                for name in idx.shards:
                    target = out / "shards" / name
                    if not target.exists():
                        try:
                            os.link(part / "shards" / name, target)
                        except OSError:
                            shutil.copyfile(part / "shards" / name, target)
                _restyle(idx, merged.meta.setdefault("styles", []))
                in_part = set(idx.paths)
                stay = np.array([p not in in_part for p in merged.paths], dtype=bool)
                failed = [f for f in merged.failed if f["path"] not in in_part] + idx.failed
                meta = merged.meta
                merged = merged.select(stay).concat(idx)
                merged.meta, merged.failed = meta, failed
                imported += len(idx)
        if merged is None:
            return 0
        fsync_path(out / "shards")
        merged = _commit(out, merged, None)
        _clean_unreferenced(out, merged.shards)
    if remove_parts:
        for part in parts:
            shutil.rmtree(part)
        with contextlib.suppress(OSError):  # the parts/ folder itself, once empty
            (out / "parts").rmdir()
    return imported


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class TokenCache:
    """Read access to a prepared cache: per-file token arrays as memory-mapped uint16 views.

    Shards are mapped lazily on first access in each process (and again after a fork), so the
    object can be handed to DataLoader workers. Only the index lives in memory.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index_path = self.path / "index.npz"
        if not index_path.is_file():
            raise DataError(
                f"{self.path} is not a token cache (no index.npz): run "
                f"'aurl data prepare MIDI_DIR --out {self.path}' first"
            )
        self._index = _Index.load(index_path)
        self.meta = self._index.meta
        try:
            self.vocab_config: VocabConfig = build(VocabConfig, self.meta["vocab"])
        except (KeyError, TypeError, ConfigError) as e:
            raise DataError(
                f"cache index {index_path} holds no valid vocabulary ({e}); delete the cache "
                "folder and prepare again"
            ) from None
        self.lengths: np.ndarray = self._index.cols["length"]  # (N,) tokens per file
        self.splits: np.ndarray = self._index.cols["split"]  # (N,) 0 train, 1 valid, 2 test
        self.notes: np.ndarray = self._index.cols["notes"]  # (N,) NOTE_ONs per file
        # (N, 2) int64 time signature (numerator, denominator) of each file
        self.meters: np.ndarray = np.stack(
            [self._index.cols["meter_num"], self._index.cols["meter_den"]], axis=1
        ).astype(np.int64)
        # (N,) int64 index of each file's style into ``style_names``; -1: no style
        self.styles: np.ndarray = self._index.cols["style"].astype(np.int64)
        self.style_names: list[str] = list(self.meta.get("styles", []))
        self.failed: list[dict[str, Any]] = self._index.failed
        if not (intact := self._index.intact(self.path)).all():
            i = int(np.flatnonzero(~intact)[0])
            shard = self.path / "shards" / self._index.shards[int(self._index.cols["shard"][i])]
            raise DataError(
                f"cache {self.path}: {int((~intact).sum())} files' tokens lie past the end of "
                f"their shard ({shard} is missing or cut short): run 'aurl data prepare "
                f"MIDI_DIR --out {self.path}' again"
            )
        self._vocab_size = Vocab(self.vocab_config).size
        self._maps: dict[int, np.ndarray] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._index)

    def __repr__(self) -> str:
        return f"TokenCache({str(self.path)!r}, files={len(self)}, tokens={self.total_tokens()})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = {}  # maps are per process; reopened lazily after unpickling
        return state

    def relpath(self, i: int) -> str:
        """Relative path (inside the prepared folder) of file ``i``."""
        return self._index.paths[i]

    def content_hash(self, i: int) -> str:
        return self._index.hashes[i].tobytes().hex()

    def split_indices(self, split: str) -> np.ndarray:
        """(n,) int64 indices of the files of ``split`` ("train", "valid" or "test")."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
        return np.flatnonzero(self.splits == SPLITS.index(split))

    def tokens(self, i: int) -> np.ndarray:
        """(length,) uint16 token ids of file ``i``: a read-only view into the shard's mmap."""
        if os.getpid() != self._pid:  # forked: do not share the parent's maps
            self._maps, self._pid = {}, os.getpid()
        cols = self._index.cols
        s = int(cols["shard"][i])
        mm = self._maps.get(s)
        if mm is None:
            path = self.path / "shards" / self._index.shards[s]
            try:
                mm = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
            except (OSError, ValueError) as e:
                raise DataError(f"cache shard {path} cannot be read ({e}): prepare again") from None
            if len(mm) and int(mm.max()) >= self._vocab_size:  # once per shard and process
                raise DataError(
                    f"cache shard {path} holds token id {int(mm.max())}, past the "
                    f"{self._vocab_size} of this cache's vocabulary: delete the cache folder "
                    "and prepare again"
                )
            self._maps[s] = mm
        off = int(cols["offset"][i])
        return mm[off : off + int(cols["length"][i])]

    def total_tokens(self, split: str | None = None) -> int:
        """Tokens in ``split`` (all splits when None)."""
        rows = slice(None) if split is None else self.split_indices(split)
        return int(self.lengths[rows].sum())

    def total_notes(self, split: str | None = None) -> int:
        rows = slice(None) if split is None else self.split_indices(split)
        return int(self.notes[rows].sum())

    def model_styles(self, styles: Sequence[str]) -> np.ndarray:
        """(N,) int64 each file's style as an id of a model's ``styles`` (-1: no style).

        Raises:
            DataError: the cache has no style labels, or one a model without it cannot take.
        """
        if not self.style_names or not (self.styles >= 0).any():
            raise DataError(
                f"cache {self.path} has no style labels (the model has model.styles "
                f"{list(styles)}): style labels come from the corpus manifests "
                "('aurl data corpus'); run 'aurl data prepare MIDI_DIR --out "
                f"{self.path}' again on the folder with the manifests"
            )
        missing = [n for n in self.style_names if n not in styles]
        if missing:
            raise DataError(
                f"cache {self.path} has style {missing[0]!r}, which model.styles "
                f"{list(styles)} lacks: add it to model.styles"
            )
        lookup = np.array([list(styles).index(n) for n in self.style_names] + [-1], np.int64)
        return lookup[np.where(self.styles < 0, len(self.style_names), self.styles)]

    def check_vocab(self, vocab_config: VocabConfig) -> None:
        """Raise DataError unless this cache was built with ``vocab_config``."""
        if vocab_config != self.vocab_config:
            diff = [
                f"{k}={getattr(self.vocab_config, k)!r} (wanted {getattr(vocab_config, k)!r})"
                for k in dataclasses.asdict(vocab_config)
                if getattr(vocab_config, k) != getattr(self.vocab_config, k)
            ]
            raise DataError(
                f"cache {self.path} was built with another vocabulary: {', '.join(diff)}; "
                "prepare it again with this config or use the matching model"
            )
