"""``python -m aurl ...`` (also what ``torchrun -m aurl train ...`` runs): the console script's
entry, :func:`aurl.cli.console`."""

from aurl.cli import console

console()
