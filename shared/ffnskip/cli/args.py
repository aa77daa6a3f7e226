"""Argument groups shared by the commands (model, skip policy, sampling) and their
conversion to engine parameters. Command modules import this, never the entry point."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from ffnskip.config import POLICIES, SamplingParams, SkipParams
from ffnskip.errors import InvalidArgument


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m (embedded), a HF directory, a .gguf file or a cached HF id")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])


def add_skip_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("skip policy")
    group.add_argument("--profile", type=Path, help="a profile.json from the calibrator; flags below override it")
    group.add_argument("--policy", choices=POLICIES)
    group.add_argument("--cold-start", type=int)
    group.add_argument("--cold-end", type=int)
    group.add_argument("--threshold", type=float)
    group.add_argument("--max-skip", type=_int_or_none, default=argparse.SUPPRESS,
                       help="k, the skip run length; 'none' = up to cold_end")
    group.add_argument("--warm-up", type=int)
    group.add_argument("--probability", type=float, help="skip probability for random / non_adaptive")
    group.add_argument("--static-layers", type=_int_list, help="comma-separated layers for static")
    group.add_argument("--skip-seed", type=int)


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-new-tokens", type=int, default=128)
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--seed", type=int, help="sampling seed (default: a fresh one per request)")
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def skip_params_from_args(args: argparse.Namespace) -> SkipParams:
    base = load_skip_file(args.profile) if args.profile else SkipParams()
    overrides = {
        "policy": args.policy, "cold_start": args.cold_start, "cold_end": args.cold_end,
        "threshold": args.threshold, "warm_up": args.warm_up, "probability": args.probability,
        "static_layers": tuple(args.static_layers) if args.static_layers is not None else None,
        "seed": args.skip_seed,
    }
    params = base.with_overrides(**overrides)
    if hasattr(args, "max_skip"):  # given on the command line; None ("none") is a real value here
        params = replace(params, max_skip=args.max_skip)
    return params


def substitutes_from_args(args: argparse.Namespace, skip: SkipParams):
    """The substitutes of a `--profile` that records them (substitutes.bin beside it, as `ffnskip
    calibrate` writes it; its digest checked), when the run uses the profile's own FFN set; else
    None (plain skips)."""
    from ffnskip.engine.substitutes import SubstituteSet
    from ffnskip.profile import Profile

    if not args.profile:
        return None
    data = json.loads(args.profile.read_text())
    if not (isinstance(data, dict) and data.get("substitutes")):
        return None
    profile = Profile.from_dict(data)
    if skip.static_layers != profile.static_layers or skip.policy is not profile.policy:
        return None  # substitutes were fitted for the profile's own set
    path = args.profile.with_name("substitutes.bin")
    blob = path.read_bytes() if path.exists() else None
    profile.check_substitutes(blob)
    assert blob is not None
    return SubstituteSet.from_bytes(blob)


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))


def load_skip_file(path: Path) -> SkipParams:
    """A calibrator profile, or a plain JSON object of SkipParams fields."""
    from ffnskip.profile import Profile

    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise InvalidArgument("profile", f"cannot read {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise InvalidArgument("profile", f"{path} is not JSON: {exc}") from exc
    if isinstance(data, dict) and "schema_version" in data:
        return Profile.from_dict(data).skip_params()
    if not isinstance(data, dict):
        raise InvalidArgument("profile", f"{path} must hold a JSON object")
    known = set(SkipParams.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidArgument(f"profile.{unknown[0]}", f"unknown field (expected some of {', '.join(sorted(known))})")
    if "static_layers" in data:
        data["static_layers"] = tuple(data["static_layers"])
    return SkipParams(**data)


def _int_or_none(text: str) -> int | None:
    return None if text.lower() in ("none", "null") else int(text)


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]
