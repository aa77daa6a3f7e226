"""`ffnskip` command line: the one table of commands, the entry point, and `prepare`.

Every user error is an FfnSkipError: printed as one line, exit status 2, no traceback.
The command modules import torch and grpc only inside their handlers, so `--help` and the
light commands start fast.
"""

from __future__ import annotations

import argparse
import os
import sys

from ffnskip.cli import bench, calibrate, client, evaluate, generate, ops, up
from ffnskip.cli.args import add_model_args
from ffnskip.errors import FfnSkipError
from ffnskip.settings import cache_root


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ffnskip", description="Adaptive FFN-skip decoding (FFN-SkipLLM)")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="prepare a model once (the embedded default: de-quantise and cache)")
    add_model_args(prepare)
    prepare.set_defaults(handler=run_prepare)
    generate.register(commands)  # generate
    bench.register(commands)  # bench
    calibrate.register(commands)  # calibrate (locally, no services)
    ops.register(commands)  # ops ...: the ops team's calibrator client
    client.register(commands)  # client ..., load: the gateway's clients
    up.register(commands)  # up: the whole stack on loopback
    evaluate.register(commands)  # eval qa | agreement | warmup | report | batching
    return parser


def run_prepare(args: argparse.Namespace) -> int:
    from ffnskip.engine import load_model

    loaded = load_model(args.model, device=args.device, dtype=args.dtype, cache_dir=cache_root(os.environ))
    print(f"{loaded.model_id}: {loaded.num_layers} layers at {loaded.path}, fingerprint {loaded.fingerprint}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except FfnSkipError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
