"""``aurl generate``: placeholder until its issue lands."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="(not built yet)")
    p.set_defaults(func=lambda args: print("aurl generate is not built yet") or 1)
