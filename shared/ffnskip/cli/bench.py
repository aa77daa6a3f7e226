"""`ffnskip bench`: its flags, read into the in-process bench's options (ffnskip.bench.inprocess),
with `--target HOST:PORT` the service bench's (ffnskip.bench.service), or with `--gpu` the GPU
benchmark's (ffnskip.bench.gpu.run: a decode step captured whole on a random-weight Llama)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ffnskip.bench.llama_server import SERVER_PEER
from ffnskip.cli.args import add_model_args
from ffnskip.errors import InvalidArgument

if TYPE_CHECKING:  # the benches import grpc and torch: only a bench run loads them
    from ffnskip.bench.gpu.options import GpuBenchOptions
    from ffnskip.bench.inprocess import BenchOptions
    from ffnskip.bench.service import ServiceBenchOptions

IN_PROCESS_REPS, GPU_REPS = 2, 8


def register(commands) -> None:
    parser = commands.add_parser("bench", help="tokens/s of dense vs skip policies, with the realised fraction of the ideal speedup")
    add_model_args(parser)
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens per sequence (EOS ignored, also through --target)")
    parser.add_argument("--reps", type=int, help=f"interleaved repetitions; rows report the median (default "
                                                 f"{IN_PROCESS_REPS}, {GPU_REPS} with --gpu)")
    parser.add_argument("--policies", help="comma-separated row names or patterns (hf_generate, dense, static_8, 'aligned*', '*@*')")
    parser.add_argument("--profile", action="append", default=[], metavar="PROFILE_JSON",
                        help="add rows for a calibrated profile (`ffnskip calibrate --out`): cal_static, or "
                             "cal_adaptive and cal_aligned_q50/q75; repeatable")
    parser.add_argument("--from-eval", action="append", default=[], metavar="EVAL_JSON",
                        help="add a row METHOD@TARGET for every setting of an `ffnskip eval qa|agreement --json` "
                             "output, with exactly its parameters; repeatable")
    parser.add_argument("--dtypes", help="comma-separated precisions, each a set of rows (e.g. float32,bfloat16,int8; "
                                         "int8: int8 weight matrices, float32 activations; w8a8: int8 activations "
                                         "too); default: --dtype. Rows other than float32 report their dense greedy "
                                         "tokens' agreement with float32")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="run the engine's decode segments as AOTInductor packages (compiled once per model and "
                             "precision into $FFNSKIP_CACHE/compiled, loaded after; the time is reported, not timed)")
    # one flag for both benches' llama.cpp peer: a bare --peer here, --peer llama-server with --target
    parser.add_argument("--peer", nargs="?", const=True, default=None, choices=[SERVER_PEER],
                        help="llama.cpp rows (llamacpp_f32/_bf16, batch 1) on GGUF files written from the same weights; "
                             "default: when llama-cpp-python is installed (pip install '.[peer]'). With --target: "
                             "--peer llama-server runs llama.cpp's server on the same weights after the service rows "
                             "and prints both side by side")
    parser.add_argument("--no-peer", dest="peer", action="store_const", const=False, help="no llama.cpp rows")
    parser.add_argument("--profile-step", action="store_true", help="also profile one dense decode step and print where the time goes")
    parser.add_argument("--json", action="store_true")
    service = parser.add_argument_group("service benchmark (with --target)")
    service.add_argument("--target", help="HOST:PORT of a running gateway or decoder: benchmark it over gRPC instead of in-process")
    service.add_argument("--concurrency", default="1,4,16")
    service.add_argument("--service-policies", default="dense,adaptive", help="'profile' = the decoder's active profile as is")
    service.add_argument("--requests-per-level", type=int, default=8)
    service.add_argument("--prompt-words", type=int, default=0, metavar="N",
                         help="lengthen each question with a note of its own of at least N words ahead of it "
                              "(packaged calibration texts, a different start for every request, so no prompt "
                              "cache holds one; about 1.3 tokens a word); 0: the questions alone")
    service.add_argument("--timeout", type=float, default=600.0)
    service.add_argument("--api-key", help="bearer key, when the target is a gateway")
    service.add_argument("--engine-baseline", action="store_true", help="also run the bare engine in-process on the same prompts")
    service.add_argument("--peer-threads", type=int, metavar="N",
                         help="llama-server's threads (with --peer llama-server); default: torch's thread count in "
                              "this process, which the decoder's own default matches on the same machine")
    service.add_argument("--peer-gguf", choices=("f32", "bf16", "q8_0"),
                         help="the GGUF precision llama-server runs (with --peer llama-server); default: --dtype's. "
                              "q8_0 is llama.cpp's int8 format, the peer of a decoder with int8 weights (w8a8 or int8). Given, "
                              "the greedy check is reported, not enforced: two roundings of the same weights may part "
                              "at the first token")
    service.add_argument("--metrics-url", metavar="URL",
                         help="the decoder's Prometheus endpoint (http://HOST:PORT/metrics): report its resident "
                              "memory after the service rows")
    gpu = parser.add_argument_group("GPU benchmark (with --gpu)")
    gpu.add_argument("--gpu", nargs="?", const="1b", metavar="SHAPE",
                     help="bench the decode step captured whole on a device (CUDA graphs, the skip decision on the "
                          "device) on a random-weight Llama of this shape: 1b (default), 7b or tiny; --model is "
                          "not read, --device auto means cuda when there is one")
    gpu.add_argument("--mechanism", default="auto", help="auto, conditional (IF nodes), segmented or eager")
    gpu.add_argument("--prompt-len", type=int, default=16)
    gpu.add_argument("--target-skip", type=float, default=0.25, help="per-token skip ratio the calibration aims at")
    gpu.add_argument("--calib-steps", type=int, default=8)
    gpu.add_argument("--k", type=int, help="skip run length (default: half the hot layers)")
    gpu.add_argument("--cold-start", type=int)
    gpu.add_argument("--cold-end", type=int)
    gpu.add_argument("--static-layers", help="comma-separated layers for the static pattern")
    gpu.add_argument("--seed", type=int, default=0)
    gpu.add_argument("--no-self-check", dest="self_check", action="store_false",
                     help="skip replaying the captured graphs against the eager step")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.gpu:
        if args.target:
            raise InvalidArgument("gpu", "the GPU benchmark runs in-process: --gpu takes no --target")
        from ffnskip.bench.gpu import run as gpu

        gpu.run(gpu_options(args))
        return 0
    if args.target:
        from ffnskip.bench import service

        return service.run(service_options(args))
    if args.peer == SERVER_PEER:
        raise InvalidArgument("peer", f"{SERVER_PEER} is the peer of the service bench (--target HOST:PORT); "
                                      "the in-process bench takes a bare --peer (llama-cpp-python rows)")
    from ffnskip.bench import inprocess

    return inprocess.run(bench_options(args))


def bench_options(args: argparse.Namespace) -> BenchOptions:
    from ffnskip.bench.inprocess import BenchOptions

    return BenchOptions(model=args.model, device=args.device, dtypes=tuple((args.dtypes or args.dtype).split(",")),
                        batches=_ints(args.batches), new_tokens=args.new_tokens,
                        reps=IN_PROCESS_REPS if args.reps is None else args.reps,
                        policies=tuple(args.policies.split(",")) if args.policies else (),
                        profiles=tuple(args.profile), from_eval=tuple(args.from_eval), compile=args.compile,
                        peer=args.peer, profile_step=args.profile_step, json=args.json)


def service_options(args: argparse.Namespace) -> ServiceBenchOptions:
    from ffnskip.bench.service import ServiceBenchOptions

    concurrency = _ints(args.concurrency)
    if args.peer not in (None, False, SERVER_PEER):
        raise InvalidArgument("peer", f"with --target the peer is llama.cpp's server: --peer {SERVER_PEER}")
    return ServiceBenchOptions(target=args.target, model=args.model, device=args.device, dtype=args.dtype,
                               new_tokens=args.new_tokens, concurrency=concurrency,
                               policies=tuple(args.service_policies.split(",")),
                               requests_per_level=args.requests_per_level, prompt_words=args.prompt_words,
                               timeout_s=args.timeout, api_key=args.api_key,
                               llama_server=args.peer == SERVER_PEER, peer_threads=args.peer_threads,
                               peer_gguf=args.peer_gguf,
                               metrics_url=args.metrics_url, engine_baseline=args.engine_baseline, json=args.json)


def gpu_options(args: argparse.Namespace) -> GpuBenchOptions:
    from ffnskip.bench.gpu.options import GpuBenchOptions

    return GpuBenchOptions(model=args.gpu, batches=_ints(args.batches), new_tokens=args.new_tokens,
                           reps=GPU_REPS if args.reps is None else args.reps, device=args.device, dtype=args.dtype,
                           mechanism=args.mechanism, prompt_len=args.prompt_len, target_skip=args.target_skip,
                           calib_steps=args.calib_steps, k=args.k, cold_start=args.cold_start, cold_end=args.cold_end,
                           static_layers=_ints(args.static_layers) if args.static_layers else None, seed=args.seed,
                           self_check=args.self_check, json=args.json)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))
