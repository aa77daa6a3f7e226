"""`ffnskip client generate|stream|models|telemetry`, `ffnskip load` and `ffnskip up`:
the gateway's command line.

    ffnskip client generate --model smollm2-135m "Why is the sky blue?"
    ffnskip client stream --model smollm2-135m --policy dense "Tell me a joke"
    ffnskip client models
    ffnskip client telemetry --api-key $OPS_KEY
    ffnskip load --model smollm2-135m --count 200 --concurrency 16
    ffnskip up --decoders 2 --gateway-port 50051

Address and key default to $FFNSKIP_GATEWAY_ADDRESS and $FFNSKIP_API_KEY. A gRPC error
prints as one line `error: <STATUS>: <message>` with exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import sys
from collections.abc import Callable

from ffnskip.client import DEFAULT_ADDRESS, describe


def register(commands) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", default=os.environ.get("FFNSKIP_GATEWAY_ADDRESS") or DEFAULT_ADDRESS,
                        help="gateway HOST:PORT (default $FFNSKIP_GATEWAY_ADDRESS or %(default)s)")
    common.add_argument("--api-key", default=os.environ.get("FFNSKIP_API_KEY"),
                        help="API key (ops key for telemetry); default $FFNSKIP_API_KEY")
    client = commands.add_parser("client", help="call the gateway's public API")
    sub = client.add_subparsers(dest="client_command", required=True)
    add = functools.partial(sub.add_parser, parents=[common])
    for name, help_text, handler in (("generate", "one whole response", _generate),
                                     ("stream", "print tokens as they arrive", _stream)):
        parser = add(name, help=help_text)
        _request_args(parser)
        parser.set_defaults(handler=_rpc(handler))
    models = add("models", help="the models served and their decoder pods")
    models.add_argument("--json", action="store_true")
    models.set_defaults(handler=_rpc(_models))
    telemetry = add("telemetry", help="fleet-wide skip and latency statistics (needs an ops key)")
    telemetry.add_argument("--model", default="", help="only this model")
    telemetry.add_argument("--json", action="store_true")
    telemetry.set_defaults(handler=_rpc(_telemetry))

    load = commands.add_parser("load", parents=[common], help="a bounded load through a gateway on loopback")
    load.add_argument("--model", default="smollm2-135m")
    load.add_argument("--count", type=int, default=100, help="requests at most (<= 100000)")
    load.add_argument("--duration", type=float, default=60.0, help="seconds at most to send new requests (<= 3600)")
    load.add_argument("--concurrency", type=int, default=4, help="requests in flight (<= 256)")
    load.add_argument("--max-new-tokens", type=int, default=32)
    load.add_argument("--http", action="store_true",
                      help="drive the OpenAI-compatible HTTP API instead (--address: its host:port)")
    load.add_argument("--json", action="store_true")
    load.set_defaults(handler=_rpc(_load))


def _request_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", help="the user message (or the plain prompt with --raw)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--raw", action="store_true", help="send TEXT as a plain prompt, not a chat message")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="0 = the server default")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, help="sampling seed (default: a fresh one per request)")
    parser.add_argument("--stop", action="append", default=[])
    parser.add_argument("--policy", default="", help="adaptive, aligned, dense, random, non_adaptive, static")
    parser.add_argument("--threshold", type=float)
    parser.add_argument("--max-skip", type=int, help="-1 = up to the end of the hot region")
    parser.add_argument("--warm-up", type=int)
    parser.add_argument("--quorum", type=float, help="aligned: share of a batch's rows that must vote to skip")
    parser.add_argument("--timeout", type=float, default=300.0, help="the call's deadline in seconds")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def _rpc(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        import grpc

        try:
            return fn(args)
        except grpc.RpcError as err:
            print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
            return 2

    return run


def _client(args: argparse.Namespace):
    from ffnskip.client import GatewayClient

    return GatewayClient(args.address, api_key=args.api_key, timeout_s=getattr(args, "timeout", 60.0))


def _request(args: argparse.Namespace):
    from ffnskip.client import build_request

    return build_request(
        args.model, prompt=args.text if args.raw else None, chat=None if args.raw else args.text,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, stop=args.stop, policy=args.policy, threshold=args.threshold, max_skip=args.max_skip,
        warm_up=args.warm_up, quorum=args.quorum)


def _print_summary(summary, as_json: bool) -> None:
    from google.protobuf.json_format import MessageToDict

    if as_json:
        print(json.dumps(MessageToDict(summary, preserving_proto_field_name=True), indent=2))
    else:
        print(describe(summary, summary.latency.total_ms / 1e3))


def _generate(args: argparse.Namespace) -> int:
    with _client(args) as client:
        summary = client.generate(_request(args))
    if not args.json:
        print(summary.text, end="\n\n")
    _print_summary(summary, args.json)
    return 0


def _stream(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for message in client.stream(_request(args)):
            if message.HasField("token"):
                if not args.json:
                    print(message.token.text, end="", flush=True)
            else:
                if not args.json:
                    print("\n")
                _print_summary(message.summary, args.json)
    return 0


def _models(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    with _client(args) as client:
        reply = client.list_models()
    if args.json:
        print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2))
        return 0
    for model in reply.models:
        print(f"{model.model}  ({model.ready_decoders} ready)")
        for d in model.decoders:
            state = " draining" if d.draining else ""
            print(f"  {d.decoder_id}  profile v{d.profile_version}  load {d.load:g}/{d.capacity}  in flight {d.in_flight}{state}")
    return 0


def _telemetry(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    from ffnskip.client import telemetry_table

    with _client(args) as client:
        reply = client.telemetry(args.model)
    print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2) if args.json
          else telemetry_table(reply))
    return 0


def _load(args: argparse.Namespace) -> int:
    from ffnskip.bench.load import run_load

    report = asyncio.run(run_load(args.address, args.model, api_key=args.api_key, count=args.count,
                                  concurrency=args.concurrency, duration_s=args.duration,
                                  max_new_tokens=args.max_new_tokens, http=args.http))
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.text())
    return 0 if not report.errors else 1
