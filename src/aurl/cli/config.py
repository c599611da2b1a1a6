"""``aurl config show``: print the resolved configuration."""

from __future__ import annotations

import argparse


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The config options every command that builds a Config shares."""
    parser.add_argument(
        "--config", metavar="FILE", help="YAML file (may name a 'base:' to inherit)"
    )
    parser.add_argument("--preset", metavar="NAME", help="preset: tiny, small or full")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="override any field, e.g. training.lr=3e-4 model.attention=local",
    )  # fmt: skip


def config_from_args(args: argparse.Namespace):
    from aurl.config import load_config

    return load_config(args.config, preset=args.preset, overrides=args.overrides)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show the resolved configuration")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION")
    show = csub.add_parser(
        "show",
        help="print the resolved config as YAML",
        description="Print the config that results from the defaults, a preset, a YAML file and "
        "key=value overrides, in that order. Unknown keys and bad values are errors.",
    )
    add_config_arguments(show)
    show.set_defaults(func=run_show)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def run_show(args: argparse.Namespace) -> int:
    print(config_from_args(args).to_yaml(), end="")
    return 0
