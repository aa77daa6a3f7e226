"""`ffnskip calibrate`: calibrate a model locally, without Redis or any service, and write
DIR/profile.json and DIR/similarity.png (the same calibration the calibrator service runs)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ffnskip.cli.args import add_model_args
from ffnskip.config import DEFAULT_MAX_KL, DEFAULT_MAX_RELATIVE_NLL, Policy
from ffnskip.settings import cache_root


def register(commands) -> None:
    local = commands.add_parser("calibrate", help="calibrate a model locally and write DIR/profile.json + DIR/similarity.png")
    add_model_args(local)
    local.add_argument("--target-skip", type=float, help="calibrate to a target decode skip ratio in (0, 0.9] instead "
                       "of the quality budget (the default objective)")
    local.add_argument("--tokens-per-prompt", type=int, default=128)
    local.add_argument("--policy", default=None, help="tune for adaptive (default) or static (a fixed FFN set; "
                       "the default with a quality budget)")
    local.add_argument("--max-kl", type=float, help="calibrate to a quality budget instead of --target-skip: mean "
                       f"teacher-forced KL from dense per token after the warm-up (default {DEFAULT_MAX_KL} with a budget)")
    local.add_argument("--max-relative-nll", type=float, help="the budget's limit on dense's NLL of the answers "
                       f"relative to its own (default {DEFAULT_MAX_RELATIVE_NLL} with a budget)")
    local.add_argument("--prompts-file", type=Path, help="default: the shipped calibration set")
    local.add_argument("--batch-size", type=int, help="prompts decoded together (default: the calibration's)")
    local.add_argument("--out", type=Path, required=True, help="output directory")
    local.set_defaults(handler=_local_calibrate)


def read_prompts_file(path: Path) -> list[str]:
    """JSONL rows with a text / prompt / question field, or plain text with one prompt per line."""
    from ffnskip import datasets
    from ffnskip.errors import InvalidArgument

    try:
        text = path.read_text()
    except OSError as err:
        raise InvalidArgument("prompts_file", f"cannot read {path}: {err.strerror}") from None
    if path.suffix != ".jsonl":
        return [line for line in text.splitlines() if line.strip()]
    prompts = []
    for number, row in enumerate(datasets.read_jsonl(str(path)), start=1):
        value = next((row[k] for k in ("text", "prompt", "question") if isinstance(row.get(k), str)), None)
        if value is None:
            raise InvalidArgument("prompts_file", f"{path} row {number} has no text, prompt or question string")
        prompts.append(value)
    return prompts


def _local_calibrate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ffnskip import datasets
    from ffnskip.calibration.calibrate import CalibrationRequest, calibrate
    from ffnskip.config import QualityBudget
    from ffnskip.engine import load_model

    prompts = read_prompts_file(args.prompts_file) if args.prompts_file else datasets.texts("calibration", "text")
    batching = {} if args.batch_size is None else {"batch_size": args.batch_size}
    limits = {name: getattr(args, name) for name in ("max_kl", "max_relative_nll") if getattr(args, name) is not None}
    # no objective asked for: the default budget (the paper's rule has none: it takes the default target)
    budgeted = bool(limits) or (args.target_skip is None and args.policy != "adaptive")
    target = {} if args.target_skip is None else {"target_skip_ratio": args.target_skip}
    request = CalibrationRequest(prompts=tuple(prompts), tokens_per_prompt=args.tokens_per_prompt, policy=args.policy,
                                 **batching, **target, quality_budget=QualityBudget(**limits) if budgeted else None)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, cache_dir=cache_root(os.environ))
    with tqdm(total=0, unit="step", file=sys.stderr, dynamic_ncols=True) as bar:
        def progress(phase: str, done: int, total: int) -> None:
            if bar.total != total:
                bar.reset(total=total)
            bar.set_description(phase)
            bar.n = done
            bar.refresh()

        outcome = calibrate(loaded, request, progress=progress)
    profile = outcome.profile
    args.out.mkdir(parents=True, exist_ok=True)
    _write_atomic(args.out / "profile.json", (json.dumps(profile.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n").encode())
    _write_atomic(args.out / "similarity.png", outcome.plot_png)
    if outcome.substitutes is not None:  # `ffnskip generate --profile DIR/profile.json` reads it beside the profile
        _write_atomic(args.out / "substitutes.bin", outcome.substitutes)
    rule = (f"static FFNs {list(profile.static_layers)}" if profile.policy is Policy.STATIC
            else f"threshold {profile.threshold:.4f}, max_skip {profile.max_skip}")
    print(f"{profile.model_id}: cold [0, {profile.cold_start}) and [{profile.cold_end}, {profile.num_layers}), "
          f"{rule}, warm_up {profile.warm_up}; "
          f"decode_skip_ratio {profile.measured_decode_skip_ratio:.3f} "
          f"({'to a quality budget' if request.quality_budget else f'target {profile.target_skip_ratio:.2f}'}), "
          f"agreement {profile.measured_agreement:.3f}")
    q = profile.quality
    print(f"quality after the warm-up: kl {q['kl']:.4f} nats/token, top-1 {q['top_match']:.3f}, relative NLL "
          f"{q['relative_nll']:.3f} ({profile.budget_verdict()}{'' if profile.within_budget else ': MISSED'})")
    written = ["profile.json", "similarity.png"] + (["substitutes.bin"] if outcome.substitutes is not None else [])
    print(f"wrote {', '.join(str(args.out / name) for name in written)}")
    return 0


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)  # a reader never sees a half-written profile
