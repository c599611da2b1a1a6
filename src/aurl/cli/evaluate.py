"""``aurl evaluate``: placeholder until its issue lands."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="(not built yet)")
    p.set_defaults(func=lambda args: print("aurl evaluate is not built yet") or 1)
