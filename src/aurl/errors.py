"""One exception type per failure family. Messages name the file or key and say what to do.

The CLI prints ``error: <message>`` on one line for any of these and exits non-zero; nothing
below the CLI catches them silently.
"""


class AurlError(Exception):
    """Base of every error Aurl raises on purpose (bad input, not a bug)."""


class ConfigError(AurlError, ValueError):
    """A configuration key, value or file is wrong."""


class MidiReadError(AurlError):
    """A MIDI file cannot be read (missing, damaged, not MIDI, or too large)."""


class DataError(AurlError):
    """A corpus, cache or split is missing, empty or inconsistent."""


class CheckpointError(AurlError):
    """A checkpoint or weights file is missing, corrupt, unsafe or incompatible."""


class ConstraintError(AurlError):
    """Generation constraints are unknown or cannot be met together."""
