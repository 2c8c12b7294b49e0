"""One module per CLI command: `add_parser(subparsers, name)` and `run(args) -> int`."""
