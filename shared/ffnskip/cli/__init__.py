"""The `ffnskip` command line: `app` holds the table of commands and the entry point,
`args` the argument groups the commands share, one module per command family."""

from ffnskip.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
