"""``python -m aurl ...`` (also what ``torchrun -m aurl train ...`` runs)."""

from aurl.cli import main

raise SystemExit(main())
