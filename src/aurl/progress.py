"""The one progress helper. Library functions take ``progress=`` (default: silent); the CLI
passes :func:`bar`, so nothing below the CLI draws bars on its own."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Progress(Protocol):
    def __call__(
        self, items: Iterable[T], *, total: int | None = None, desc: str = ""
    ) -> Iterator[T]: ...


def silent(items: Iterable[T], *, total: int | None = None, desc: str = "") -> Iterator[T]:
    """No output: the default for library calls and tests."""
    yield from items


def bar(items: Iterable[T], *, total: int | None = None, desc: str = "", **kw: Any) -> Iterator[T]:
    """A tqdm bar on stderr (rate and ETA); the items alone when stderr is not a terminal
    (tqdm, ~0.1 s to import, is then never loaded: a start-up cost of every command)."""
    if not sys.stderr.isatty():
        return iter(items)
    from tqdm import tqdm

    return tqdm(
        items, total=total, desc=desc, file=sys.stderr, disable=not sys.stderr.isatty(),
        dynamic_ncols=True, **kw,
    )  # fmt: skip


def set_status(it: Iterator[Any], text: str) -> None:
    """Show ``text`` (e.g. ``loss 1.83 tok/s 41k lr 3.0e-04``) beside a bar; no-op when silent."""
    setter = getattr(it, "set_postfix_str", None)
    if setter is not None:
        setter(text, refresh=False)
