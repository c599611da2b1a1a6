"""Aurl: learn from MIDI collections and compose new music."""

__version__ = "0.1.0"
