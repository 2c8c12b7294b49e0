"""`generator list`: the architectures each task supports, native or through Transformers."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table
from tritonforge.generator.architectures import supported_table

EPILOG = """examples:
  generator list           a table of task, architecture, implementation
  generator list --json    the same rows as JSON
"""


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    parser = sub.add_parser(
        name, help="list supported architectures per task",
        description="Supported architectures per task, and whether each runs natively or "
        "through the Transformers implementation.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print JSON rows")


def run(args: argparse.Namespace) -> int:
    rows = supported_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title="supported architectures")
    for column in ("task", "architecture", "implementation"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["task"], row["architecture"], row["implementation"])
    Console().print(table)
    return 0
