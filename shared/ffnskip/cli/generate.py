"""`ffnskip generate`: one prompt or chat through the skip engine, from the command line."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ffnskip.cli.args import (
    add_model_args,
    add_sampling_args,
    add_skip_args,
    sampling_from_args,
    skip_params_from_args,
    substitutes_from_args,
)
from ffnskip.errors import InvalidArgument
from ffnskip.settings import cache_root


def register(commands) -> None:
    parser = commands.add_parser("generate", help="generate text with adaptive FFN skipping")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="a plain prompt (no chat template)")
    source.add_argument("--chat", help="a user message, sent through the model's chat template")
    source.add_argument("--messages", help='chat messages as JSON: [{"role": "user", "content": "..."}]')
    add_model_args(parser)
    add_skip_args(parser)
    add_sampling_args(parser)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--json", action="store_true", help="print text, tokens, skip_stats and timings as JSON")
    parser.add_argument("--stream", action="store_true", help="print text as it is generated")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ffnskip.engine import Engine, load_model

    prompt = _prompt(args)
    skip = skip_params_from_args(args)
    substitutes = substitutes_from_args(args, skip)
    sampling = sampling_from_args(args)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, cache_dir=cache_root(os.environ))
    engine = Engine(loaded, max_batch=1, max_seq_len=args.max_seq_len)
    if args.stream and not args.json:
        for event in engine.stream(prompt, sampling, skip, substitutes):
            print(event.text, end="", flush=True)
        print()
        return 0
    result = engine.generate([prompt], sampling, skip, substitutes)[0]
    if args.json:
        data = result.to_dict()
        data.update(model=loaded.model_id, fingerprint=loaded.fingerprint, device=str(loaded.device),
                    dtype=str(loaded.dtype).removeprefix("torch."), skip_params=_params_dict(engine, skip))
        json.dump(data, sys.stdout, indent=2)
        print()
    else:
        print(result.text)
        stats = result.skip_stats
        print(f"\n[{skip.policy}] {len(result.token_ids)} tokens, {result.tokens_per_s:.1f} tok/s, "
              f"skip_ratio {stats.skip_ratio:.3f}, decode_skip_ratio {stats.decode_skip_ratio:.3f} "
              f"({stats.ffn_blocks_skipped}/{stats.ffn_blocks_total} FFN blocks), finish: {result.finish_reason}",
              file=sys.stderr)
    return 0


def _prompt(args: argparse.Namespace):
    if args.prompt is not None:
        return args.prompt
    if args.chat is not None:
        return [{"role": "user", "content": args.chat}]
    try:
        messages = json.loads(args.messages)
    except ValueError as exc:
        raise InvalidArgument("messages", f"not valid JSON: {exc}") from exc
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise InvalidArgument("messages", "must be a JSON list of {role, content} objects")
    return messages


def _params_dict(engine, skip) -> dict:
    from dataclasses import asdict
    data = asdict(skip.resolved(engine.num_layers))
    data["static_layers"] = list(data["static_layers"])
    return data
