"""`wgpunch lab`: build, inspect and remove NAT labs."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("lab", help="build and drive the network-namespace NAT lab")
    parser.set_defaults(func=lambda args: parser.print_help())
