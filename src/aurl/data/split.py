"""Deterministic train/valid/test split from a hash of each file's key.

The key is the file's tune group where its corpus manifest records one (:mod:`aurl.data.tunes`:
settings of one hymn tune share a group, so they share a split), else its relative path. A
file's split depends on its key and the two fractions only, so it never changes when unrelated
files are added or removed, on any machine or Python version (SHA-1, not ``hash()``).
The hash maps each path to a point ``u`` in [0, 1): ``u < test`` is test, ``u < test + valid``
is valid, the rest train. Growing a fraction therefore only moves files out of train, never
between valid and test the other way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import PurePath

from aurl.errors import ConfigError

SPLITS = ("train", "valid", "test")


def normalize_relpath(relpath: str | PurePath) -> str:
    """The key a split is computed from: forward slashes, no leading ``./``.

    ``a\\b.mid``, ``./a/b.mid`` and ``a/b.mid`` are the same file on every platform.
    """
    key = str(relpath).replace("\\", "/")
    while key.startswith("./"):
        key = key[2:]
    return key.lstrip("/")


def hash_unit(relpath: str | PurePath) -> float:
    """The path's fixed point in [0, 1): the first 8 bytes of SHA-1 of its UTF-8 key / 2**64
    (a name that is not UTF-8 hashes by its bytes on disk, as :func:`os.fsencode` gives them)."""
    digest = hashlib.sha1(normalize_relpath(relpath).encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def check_fractions(valid_fraction: float, test_fraction: float) -> None:
    """Raise ConfigError unless both fractions lie in [0, 1) and leave some training data."""
    for key, value in (
        ("data.valid_fraction", valid_fraction),
        ("data.test_fraction", test_fraction),
    ):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{key} is {value}: use a fraction in [0, 1), e.g. 0.1")
    if valid_fraction + test_fraction >= 1.0:
        raise ConfigError(
            f"data.valid_fraction + data.test_fraction is {valid_fraction + test_fraction}: "
            "their sum must stay below 1 so that some files are left for training"
        )


def split_of(
    relpath: str | PurePath, valid_fraction: float = 0.1, test_fraction: float = 0.1
) -> str:
    """The split (``"train"``, ``"valid"`` or ``"test"``) of one file.

    Args:
        relpath: The file's path relative to its corpus root (``"bach_bwv66.6.mid"``).
        valid_fraction: Expected share of files in ``valid`` (``data.valid_fraction``).
        test_fraction: Expected share of files in ``test`` (``data.test_fraction``).

    Returns:
        The split name; the same for the same path and fractions, whatever else exists.
    """
    check_fractions(valid_fraction, test_fraction)
    u = hash_unit(relpath)
    if u < test_fraction:
        return "test"
    if u < test_fraction + valid_fraction:
        return "valid"
    return "train"


def split_counts(
    relpaths: Iterable[str | PurePath], valid_fraction: float = 0.1, test_fraction: float = 0.1
) -> dict[str, int]:
    """How many of ``relpaths`` fall in each split (all three keys present)."""
    counts = dict.fromkeys(SPLITS, 0)
    for relpath in relpaths:
        counts[split_of(relpath, valid_fraction, test_fraction)] += 1
    return counts
