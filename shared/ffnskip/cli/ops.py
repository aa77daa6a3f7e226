"""`ffnskip ops ...`: the ops team's client for the calibrator service (the same
calibration run locally, without any service, is `ffnskip calibrate`: ffnskip.cli.calibrate).

    ffnskip ops calibrate --model smollm2-135m --target-skip 0.25 --activate --wait
    ffnskip ops jobs | watch JOB | cancel JOB
    ffnskip ops profiles [--model M] | show --model M [--version N] [--plot-out p.png]
    ffnskip ops activate --model M --version N | rollback --model M

A gRPC error prints as one line `error: <STATUS>: <message>` with exit status 2; a job
that ends failed or cancelled under --wait / watch exits with status 1.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ffnskip.cli.calibrate import read_prompts_file
from ffnskip.config import DEFAULT_MAX_KL, DEFAULT_MAX_RELATIVE_NLL

DEFAULT_ADDRESS = "127.0.0.1:50053"


def register(commands) -> None:
    ops = commands.add_parser("ops", help="operate the calibrator service (jobs and profiles)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", default=os.environ.get("FFNSKIP_CALIBRATOR_ADDRESS") or DEFAULT_ADDRESS,
                        help="calibrator HOST:PORT (default $FFNSKIP_CALIBRATOR_ADDRESS or %(default)s)")
    common.add_argument("--timeout", type=float, default=30.0, help="seconds per call (watching has no limit)")
    sub = ops.add_subparsers(dest="ops_command", required=True)
    add = functools.partial(sub.add_parser, parents=[common])

    calibrate = add("calibrate", help="queue a calibration job")
    calibrate.add_argument("--model", required=True)
    calibrate.add_argument("--target-skip", type=float, help="calibrate to a target decode skip ratio in (0, 0.9] "
                           "instead of the quality budget (measured against the default budget all the same)")
    calibrate.add_argument("--tokens-per-prompt", type=int, help="tokens generated per prompt (default 128)")
    calibrate.add_argument("--policy", default="", help="static (default: a fixed FFN set, compensated) or adaptive "
                           "(the paper's rule; needs --target-skip)")
    calibrate.add_argument("--max-kl", type=float, help="the quality budget (the default objective): mean "
                           f"teacher-forced KL from dense per token (default {DEFAULT_MAX_KL})")
    calibrate.add_argument("--max-relative-nll", type=float, help="the budget's limit on dense's NLL of the answers "
                           f"relative to its own (default {DEFAULT_MAX_RELATIVE_NLL})")
    source = calibrate.add_mutually_exclusive_group()
    source.add_argument("--prompts-file", type=Path, help="prompts: JSONL (text/prompt/question field) or one per line")
    source.add_argument("--dataset", help="a data set the calibrator ships: calibration (default), prompts, factoid_qa")
    calibrate.add_argument("--activate", action="store_true", help="activate the profile when the job succeeds")
    calibrate.add_argument("--idempotency-key", help="resubmitting with the same key returns the first job")
    calibrate.add_argument("--wait", action="store_true", help="watch the job to the end with a progress bar")
    _command(add, "jobs", "list the newest jobs", _jobs, ("--limit", dict(type=int, default=20)), json_flag=True)
    _command(add, "watch", "follow a job to the end", _watch, ("job_id", {}))
    _command(add, "cancel", "cancel a job", _cancel, ("job_id", {}))
    _command(add, "profiles", "list stored profile versions", _profiles, ("--model", dict(default="")), json_flag=True)
    show = _command(add, "show", "show one profile", _show, ("--model", dict(required=True)),
                    ("--version", dict(type=int, help="default: the active version")), json_flag=True)
    show.add_argument("--plot-out", type=Path, help="write the similarity plot (PNG) here")
    _command(add, "activate", "activate a stored profile version", _activate,
             ("--model", dict(required=True)), ("--version", dict(type=int, required=True)),
             ("--force", dict(action="store_true", help="activate even a profile that misses its quality budget")))
    _command(add, "rollback", "re-activate the previously active version", _rollback, ("--model", dict(required=True)))
    calibrate.set_defaults(handler=_rpc(_submit))


def _command(add: Callable, name: str, help_text: str, fn: Callable, *arguments: tuple, json_flag: bool = False):
    parser = add(name, help=help_text)
    for flag, options in arguments:
        parser.add_argument(flag, **options)
    if json_flag:
        parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(handler=_rpc(fn))
    return parser


def _rpc(fn: Callable[[argparse.Namespace, object], int]) -> Callable[[argparse.Namespace], int]:
    """Open a channel to the calibrator, run `fn(args, stub)`, and print gRPC errors as one line."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        import grpc

        from ffnskip.rpc.channels import insecure_channel
        from ffnskip.v1 import calibrator_pb2_grpc

        with insecure_channel(args.address) as channel:
            try:
                return fn(args, calibrator_pb2_grpc.CalibratorStub(channel))
            except grpc.RpcError as err:
                print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
                return 2

    return run


def _submit(args: argparse.Namespace, stub) -> int:
    from ffnskip.rpc.convert import policy_fields  # local, as the generated modules it imports are here
    from ffnskip.v1 import calibrator_pb2 as pb

    request = pb.SubmitCalibrationRequest(model=args.model, activate_on_success=args.activate,
                                          idempotency_key=args.idempotency_key or "", **policy_fields(args.policy))
    if args.target_skip is not None:
        request.target_skip_ratio = args.target_skip
    if args.tokens_per_prompt is not None:
        request.tokens_per_prompt = args.tokens_per_prompt
    if args.max_kl is not None:
        request.max_kl = args.max_kl
    if args.max_relative_nll is not None:
        request.max_relative_nll = args.max_relative_nll
    if args.prompts_file is not None:
        request.prompts.prompts.extend(read_prompts_file(args.prompts_file))
    elif args.dataset is not None:
        request.dataset = args.dataset
    job_id = stub.SubmitCalibration(request, timeout=args.timeout).job_id
    print(job_id)
    return follow_job(stub, job_id) if args.wait else 0


def _watch(args: argparse.Namespace, stub) -> int:
    return follow_job(stub, args.job_id)


def follow_job(stub, job_id: str) -> int:
    """A progress bar until the job is over; 0 when it succeeded, 1 otherwise."""
    from tqdm import tqdm

    from ffnskip.v1 import calibrator_pb2 as pb

    last = None
    with tqdm(total=0, desc="queued", unit="step", file=sys.stderr, dynamic_ncols=True) as bar:
        for job in stub.WatchJob(pb.WatchJobRequest(job_id=job_id)):
            last = job
            bar.set_description(job.phase or pb.JobState.Name(job.state).removeprefix("JOB_STATE_").lower())
            if job.total and bar.total != job.total:
                bar.reset(total=job.total)
            bar.n = job.done
            bar.set_postfix_str(f"eta {job.eta_s:.0f}s" if job.HasField("eta_s") else "", refresh=False)
            if job.state == pb.JOB_STATE_SUCCEEDED and job.total:
                bar.n = job.total  # tuning may stop before the planned total
            bar.refresh()
    if last is None:
        print(f"error: job {job_id}: the watch ended without a state", file=sys.stderr)
        return 1
    if last.state == pb.JOB_STATE_SUCCEEDED:
        print(f"job {job_id} succeeded: {last.model} profile v{last.profile_version}")
        return 0
    state = pb.JobState.Name(last.state).removeprefix("JOB_STATE_").lower()
    print(f"job {job_id} {state}: {last.error}", file=sys.stderr)
    return 1


def _jobs(args: argparse.Namespace, stub) -> int:
    from ffnskip.v1 import calibrator_pb2 as pb

    jobs = stub.ListJobs(pb.ListJobsRequest(limit=args.limit), timeout=args.timeout).jobs
    if args.json:
        return _print_json([_dict(job) for job in jobs])
    for job in jobs:
        state = pb.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
        version = f" -> v{job.profile_version}" if job.HasField("profile_version") else ""
        progress = f" {job.phase} {job.done}/{job.total}" if job.total else ""
        print(f"{job.job_id}  {job.created_at}  {job.model}  {state}{progress}{version}  {job.error}".rstrip())
    return 0


def _cancel(args: argparse.Namespace, stub) -> int:
    from ffnskip.v1 import calibrator_pb2 as pb

    job = stub.CancelJob(pb.CancelJobRequest(job_id=args.job_id), timeout=args.timeout)
    print(f"job {job.job_id}: {pb.JobState.Name(job.state).removeprefix('JOB_STATE_').lower()}")
    return 0


def _profiles(args: argparse.Namespace, stub) -> int:
    from ffnskip.v1 import calibrator_pb2 as pb

    profiles = stub.ListProfiles(pb.ListProfilesRequest(model=args.model), timeout=args.timeout).profiles
    if args.json:
        return _print_json([_dict(p) for p in profiles])
    for p in profiles:
        mark = "*" if p.active else " "
        if p.error:
            print(f"{mark} {p.model} v{p.version}  MALFORMED: {p.error}")
            continue
        print(f"{mark} {p.model} v{p.version}  {p.created_at}  cold [{p.skip_params.cold_start}, {p.skip_params.cold_end})"
              f"  decode_skip {p.measured_decode_skip_ratio:.3f} (target {p.target_skip_ratio:.2f})"
              f"  agreement {p.measured_agreement:.3f}  {_quality(p)}")
    return 0


def _quality(summary) -> str:
    """A profile summary's measured quality and budget, in one phrase."""
    if not summary.measured_top_match:
        return "quality not measured"
    text = (f"kl {summary.measured_kl:.4f}  top-1 {summary.measured_top_match:.3f}"
            f"  relative NLL {summary.measured_relative_nll:.3f}")
    if summary.max_kl:
        text += (f"  budget kl {summary.max_kl:g} / NLL {summary.max_relative_nll:g}: "
                 + ("kept" if summary.within_budget else "MISSED (activate needs --force)"))
    return text


def _show(args: argparse.Namespace, stub) -> int:
    from ffnskip.v1 import calibrator_pb2 as pb

    request = pb.GetProfileRequest(model=args.model)
    if args.version is not None:
        request.version = args.version
    reply = stub.GetProfile(request, timeout=args.timeout)
    if args.plot_out is not None:
        if not reply.plot_png:
            print(f"error: NOT_FOUND: profile v{reply.summary.version} has no stored plot", file=sys.stderr)
            return 2
        args.plot_out.write_bytes(reply.plot_png)
    if args.json:
        print(reply.profile_json)
        return 0
    s = reply.summary
    print(f"{s.model} v{s.version}{' (active)' if s.active else ''}  created {s.created_at}  job {s.job_id or '-'}")
    print(f"fingerprint {s.fingerprint}  layers {s.num_layers}  calibration prompts {s.calibration_size}")
    print(f"skip params: {json.dumps(_dict(s.skip_params), sort_keys=True)}")
    print(f"skip_ratio {s.measured_skip_ratio:.3f}  decode_skip_ratio {s.measured_decode_skip_ratio:.3f}"
          f" (target {s.target_skip_ratio:.2f})  agreement {s.measured_agreement:.3f}")
    print(f"quality after the warm-up: {_quality(s)}")
    print(f"substitutes: {_substitutes(json.loads(reply.profile_json).get('substitutes') or {})}")
    for layer in reply.layers:
        print(f"  layer {layer.layer:3d}  mean {layer.mean:.4f}  p05 {layer.p05:.4f}  p95 {layer.p95:.4f}")
    return 0


def _substitutes(recorded: dict) -> str:
    """What replaces a profile's skipped FFNs, in one phrase (its `substitutes` field)."""
    if not recorded:
        return "none (plain skips)"
    layers = ",".join(str(layer) for layer in recorded["layers"])
    return f"{recorded['kind']} on layers {layers}  {recorded['bytes']} bytes  sha256 {recorded['digest'][:12]}"


def _activate(args: argparse.Namespace, stub) -> int:
    from ffnskip.v1 import calibrator_pb2 as pb

    change = stub.ActivateProfile(pb.ActivateProfileRequest(model=args.model, version=args.version, force=args.force), timeout=args.timeout)
    return _print_change(change)


def _rollback(args: argparse.Namespace, stub) -> int:
    from ffnskip.v1 import calibrator_pb2 as pb

    return _print_change(stub.RollbackProfile(pb.RollbackProfileRequest(model=args.model), timeout=args.timeout))


def _print_change(change) -> int:
    previous = f" (was v{change.previous_version})" if change.HasField("previous_version") else ""
    print(f"{change.model}: active profile v{change.active_version}{previous}")
    return 0


def _dict(message) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, preserving_proto_field_name=True)


def _print_json(data: object) -> int:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    print()
    return 0
