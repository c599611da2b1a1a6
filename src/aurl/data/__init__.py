"""The data layer: MIDI reading and repair, the vocabulary, the tokenizer and the grammar.

Usable alone as a tokenizer library::

    from aurl.data import Tokenizer
    ids = Tokenizer().encode_file("piece.mid")      # (n,) int64, START ... END
    Tokenizer().decode_to_midi(ids, "again.mid")

The grammar needs torch and is imported lazily (``from aurl.data import Grammar`` still works).
"""

from __future__ import annotations

from typing import Any

from aurl.data.midi_io import MidiData, RepairReport, read_midi
from aurl.data.tokenizer import Tokenizer
from aurl.data.vocab import Kind, Vocab

__all__ = ["Grammar", "Kind", "MidiData", "RepairReport", "Tokenizer", "Vocab", "read_midi"]


def __getattr__(name: str) -> Any:
    if name in ("Grammar", "GrammarState"):
        from aurl.data import grammar

        return getattr(grammar, name)
    raise AttributeError(f"module 'aurl.data' has no attribute {name!r}")
