"""`ffnskip eval qa|agreement|warmup|report`: the evaluation (ffnskip.evaluation).

Data problems are found before the model loads and reported as one line (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ffnskip.cli.args import add_model_args
from ffnskip.errors import InvalidArgument

DEFAULT_METHODS = "dense,random,non_adaptive,adaptive,aligned,layer_drop"
DEFAULT_TARGETS = "0.05,0.15,0.25,0.35"


def register(commands) -> None:
    parser = commands.add_parser("eval", help="evaluate skip methods: factoid QA, agreement with dense, warm-up ablation, report")
    sub = parser.add_subparsers(dest="eval_command", required=True)

    qa = sub.add_parser("qa", help="factoid QA accuracy per method and target skip ratio")
    _common(qa, data="factoid_qa", max_new_tokens=48)
    _methods(qa)
    qa.set_defaults(handler=_run_qa)

    agreement = sub.add_parser("agreement", help="agreement with dense and token collapse on open prompts")
    _common(agreement, data="prompts", max_new_tokens=64)
    _methods(agreement)
    agreement.set_defaults(handler=_run_agreement)

    warmup = sub.add_parser("warmup", help="quality against the number of warm-up tokens at one skip ratio")
    _common(warmup, data="prompts", max_new_tokens=64)
    warmup.add_argument("--method", default="adaptive", help="the rule to ablate (adaptive, aligned, adaptive_window)")
    warmup.add_argument("--target", type=float, default=0.25, help="target decode skip ratio")
    warmup.add_argument("--warm-ups", default="0,4,8,16,32", help="comma-separated warm-up token counts")
    warmup.add_argument("--qa-data", default="factoid_qa", help="QA set for accuracy ('none' to skip)")
    warmup.add_argument("--qa-limit", type=int, help="only the first N questions")
    warmup.add_argument("--qa-max-new-tokens", type=int, default=48)
    warmup.set_defaults(handler=_run_warmup)

    report = sub.add_parser("report", help="write docs/RESULTS.md and its plots from the commands' --json outputs")
    report.add_argument("--qa", type=Path, required=True, help="output of `ffnskip eval qa --json`")
    report.add_argument("--agreement", type=Path, help="output of `ffnskip eval agreement --json`")
    report.add_argument("--warmup", type=Path, help="output of `ffnskip eval warmup --json`")
    report.add_argument("--bench", type=Path, help="output of `ffnskip bench --json`")
    report.add_argument("--commands", type=Path, help="a text file with the exact commands that produced the inputs")
    report.add_argument("--out", type=Path, default=Path("docs/RESULTS.md"))
    report.add_argument("--plots", type=Path, default=Path("docs/plots"))
    report.set_defaults(handler=_run_report)

    batching = sub.add_parser("batching", help="skipping inside a batch: speed per batch size against quality (docs/batching.md)")
    batching.add_argument("--bench", type=Path, required=True, help="`ffnskip bench --json --from-eval QA_JSON` output")
    batching.add_argument("--qa", type=Path, required=True, help="`ffnskip eval qa --json` output with the same settings")
    batching.add_argument("--agreement", type=Path, help="`ffnskip eval agreement --json` output with the same settings")
    batching.add_argument("--plots", type=Path, default=Path("docs/plots"))
    batching.set_defaults(handler=_run_batching)


def _common(parser: argparse.ArgumentParser, data: str, max_new_tokens: int) -> None:
    add_model_args(parser)
    parser.add_argument("--data", default=data, help=f"a named data set or a JSONL file of the same format (default {data})")
    parser.add_argument("--limit", type=int, help="only the first N items")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--batch-size", type=int, default=16, help="items decoded together (fixed chunks in data order)")
    parser.add_argument("--aligned-batch", type=int, default=8, help="batch of the aligned policy (and of calibration runs)")
    parser.add_argument("--quorum", type=float, default=0.5, help="aligned: share of rows that must vote skip")
    parser.add_argument("--warm-up", type=int, default=16, help="warm-up tokens of every FFN-skip method")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random baselines' draws (per item)")
    parser.add_argument("--out", type=Path, help="state file (JSONL): results are cached per item, a rerun resumes")
    parser.add_argument("--calibration-data", default="calibration", help="prompts for calibration (named set or JSONL)")
    parser.add_argument("--calibration-prompts", type=int, default=24, help="two thirds measured, one third held out")
    parser.add_argument("--calibration-tokens", type=int, default=64)
    parser.add_argument("--plan", action="store_true",
                        help="print the work and the time estimate (from a 4-token speed probe); evaluate nothing")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def _methods(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help="comma-separated: dense, random, non_adaptive, adaptive, aligned (or aligned_qNN), "
                             "adaptive_window, static, layer_drop; NAME@T1/T2 runs NAME at its own targets only")
    parser.add_argument("--targets", default=DEFAULT_TARGETS, help="target decode skip ratios")


def _options(args: argparse.Namespace):
    from ffnskip.evaluation.session import Options

    for name in ("batch_size", "aligned_batch", "max_new_tokens", "calibration_tokens"):
        if getattr(args, name) < 1:
            raise InvalidArgument(name, f"must be >= 1, got {getattr(args, name)}")
    if args.warm_up < 0:
        raise InvalidArgument("warm_up", f"must be >= 0, got {args.warm_up}")
    if not 0.0 < args.quorum <= 1.0:
        raise InvalidArgument("quorum", f"must be in (0, 1], got {args.quorum}")
    return Options(model=args.model, device=args.device, dtype=args.dtype, out=args.out, seed=args.seed,
                   batch_size=args.batch_size, aligned_batch=args.aligned_batch, quorum=args.quorum,
                   warm_up=args.warm_up, calibration_data=args.calibration_data,
                   calibration_prompts=args.calibration_prompts, calibration_tokens=args.calibration_tokens,
                   plan_only=args.plan, progress=not args.no_progress)


def _emit(report, args: argparse.Namespace, table) -> int:
    if report is None:  # --plan
        return 0
    if args.json:
        json.dump(report, sys.stdout, indent=2, allow_nan=False)
        print()
    else:
        table(report)
    return 0


def _run_qa(args: argparse.Namespace) -> int:
    from ffnskip.evaluation import qa
    from ffnskip.evaluation.data import load_qa_items

    return _run_comparison(args, load_qa_items, qa.run_qa, qa.print_table)


def _run_agreement(args: argparse.Namespace) -> int:
    from ffnskip.evaluation import agreement
    from ffnskip.evaluation.data import load_prompt_items

    return _run_comparison(args, load_prompt_items, agreement.run_agreement, agreement.print_table)


def _run_comparison(args: argparse.Namespace, load_items, run, table) -> int:
    """Methods x targets on a data set: items (checked before the model loads), then the run."""
    from ffnskip.evaluation.methods import parse_methods, parse_targets
    from ffnskip.evaluation.session import Session

    items = load_items(args.data, args.limit)
    methods, targets = parse_methods(args.methods), parse_targets(args.targets)
    session = Session(_options(args))
    return _emit(run(session, items, methods, targets, args.max_new_tokens, args.data, _argv(args)), args, table)


def _run_warmup(args: argparse.Namespace) -> int:
    from ffnskip.evaluation import warmup
    from ffnskip.evaluation.data import load_prompt_items, load_qa_items
    from ffnskip.evaluation.methods import TUNED, base_method, parse_targets
    from ffnskip.evaluation.session import Session

    if base_method(args.method) not in TUNED:
        raise InvalidArgument("method", f"the warm-up ablation needs a calibrated rule ({', '.join(TUNED)}), got {args.method!r}")
    try:
        warm_ups = sorted({int(w) for w in args.warm_ups.split(",") if w.strip()})
    except ValueError:
        raise InvalidArgument("warm_ups", f"expected comma-separated integers, got {args.warm_ups!r}") from None
    if not warm_ups or warm_ups[0] < 0:
        raise InvalidArgument("warm_ups", f"expected warm-up counts >= 0, got {args.warm_ups!r}")
    target = parse_targets(str(args.target))[0]
    prompts = load_prompt_items(args.data, args.limit)
    qa_items = [] if args.qa_data == "none" else load_qa_items(args.qa_data, args.qa_limit)
    session = Session(_options(args))
    report = warmup.run_warmup(session, args.method, target, warm_ups, prompts, qa_items, args.max_new_tokens,
                               args.qa_max_new_tokens, args.data, args.qa_data, _argv(args))
    return _emit(report, args, warmup.print_table)


def _run_report(args: argparse.Namespace) -> int:
    from ffnskip.evaluation import report

    command = " ".join(["ffnskip", "eval", "report"] + [f"--{name} {value}" for name, value in vars(args).items()
                                                       if name not in _NOT_ECHOED and value is not None])
    written = report.write_report(qa=args.qa, agreement=args.agreement, warmup=args.warmup, bench=args.bench,
                                  commands=args.commands, out=args.out, plots_dir=args.plots, report_command=command)
    for path in written:
        print(f"wrote {path}")
    return 0


def _run_batching(args: argparse.Namespace) -> int:
    from ffnskip.evaluation import batching

    print(batching.write(args.bench, args.qa, args.agreement, args.plots), end="")
    return 0


_NOT_ECHOED = {"handler", "command", "eval_command", "json", "no_progress", "plan"}


def _argv(args: argparse.Namespace) -> list[str]:
    """The command that reproduces this run, every option spelled out (recorded in the JSON)."""
    argv = ["ffnskip", "eval", args.eval_command]
    for name, value in vars(args).items():
        if name not in _NOT_ECHOED and value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv
