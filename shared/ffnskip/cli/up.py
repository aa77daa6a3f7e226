"""`ffnskip up`: its flags, read into the stack's options (ffnskip.stack.local, which starts,
serves and stops the stack); a calibration it starts is followed with `ffnskip ops`' progress bar."""

from __future__ import annotations

import argparse
from pathlib import Path

from ffnskip.cli.ops import follow_job
from ffnskip.stack.local import DEFAULT_PROMPT, StackOptions, run_stack


def register(commands) -> None:
    up = commands.add_parser("up", help="start redis, the calibrator, decoders and the gateway on loopback; "
                                        "serve a request; keep serving (restarting children that exit) "
                                        "until Ctrl-C")
    up.add_argument("--model", default="smollm2-135m", help="model spec (default: the embedded SmolLM2-135M)")
    up.add_argument("--decoders", type=int, default=1, help="decoder processes (default 1)")
    up.add_argument("--gateway-port", type=int, default=50051, help="gateway gRPC port on 127.0.0.1 (0 = any free)")
    up.add_argument("--http-port", type=int, default=8080,
                    help="gateway OpenAI-compatible HTTP API port on 127.0.0.1 (0 = any free)")
    up.add_argument("--metrics-port", type=int, default=0, help="gateway /metrics port (default: any free)")
    up.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    up.add_argument("--prompt", default=DEFAULT_PROMPT, help="the first request's chat message")
    up.add_argument("--max-new-tokens", type=int, default=64)
    up.add_argument("--target-skip", type=float, help="target decode skip ratio of a needed calibration")
    up.add_argument("--calibration-tokens", type=int, default=StackOptions.calibration_tokens,
                    help="tokens per prompt of a needed calibration (default %(default)s: the budget's free-running "
                         "check reads the answers after the warm-up, and 32-token answers passed a set whose "
                         "96-token answers missed it)")
    up.add_argument("--data-dir", type=Path, help="redis data and logs (default $FFNSKIP_CACHE/stack)")
    up.add_argument("--once", action="store_true", help="exit after the first request (tests, scripts)")
    up.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    return run_stack(StackOptions(
        model=args.model, decoders=args.decoders, gateway_port=args.gateway_port, http_port=args.http_port,
        metrics_port=args.metrics_port, device=args.device, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
        target_skip=args.target_skip, calibration_tokens=args.calibration_tokens, data_dir=args.data_dir,
        once=args.once), follow_job)
