"""`ffnskip bench`: dense vs skip policies on one model, interleaved, in one process.

Each repetition runs every configuration once; a row reports the median over
repetitions. The engine's rows of one precision and batch size run side by side,
each on its own engine over one shared model, stepped in turn, so a swing of the
machine's bandwidth hits dense and skip alike; transformers and llama.cpp rows
run alone between them. Exactly `--new-tokens` tokens are generated per sequence
(EOS ignored). Every run is timed twice: the whole request (prefill included;
tokens/s and the comparisons with transformers and llama.cpp use it) and its
decode steps alone.
The realised fraction of the ideal speedup (README, "Numbers") is measured on the
decode steps, whose time the ideal speedup models (every weight read once per
step; the prefill is no step and no policy skips in it), with r = skipped FFN
blocks / (L x decode steps); the same on whole requests, with r over all
generated tokens, is reported next to it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ffnskip.bench.configs import BenchConfig, default_configs, eval_rows, profile_rows, run_groups
from ffnskip.bench.report import print_table, summarise
from ffnskip.config import SamplingParams
from ffnskip.settings import cache_root

if TYPE_CHECKING:
    from ffnskip.bench.inprocess_peer import LlamaCppPeer  # imported when a peer is opened: llama.cpp is an extra


@dataclass(frozen=True)
class BenchOptions:
    """What `ffnskip bench` (in process) runs: its flags, typed (ffnskip.cli.bench reads them)."""

    model: str = "smollm2-135m"
    device: str = "auto"
    # each a set of rows (a dtype, or int8: int8 matrices); rows other than float32 report their agreement with it
    dtypes: tuple[str, ...] = ("auto",)
    batches: tuple[int, ...] = (1, 8)
    new_tokens: int = 128  # tokens per sequence, EOS ignored
    reps: int = 2  # interleaved repetitions; rows report the median
    policies: tuple[str, ...] = ()  # row names or shell patterns to keep (dense always); () = every row
    profiles: tuple[str, ...] = ()  # calibrated profile files: their cal_* rows
    from_eval: tuple[str, ...] = ()  # `ffnskip eval qa|agreement --json` outputs: a METHOD@TARGET row per setting
    compile: bool = True  # the decode segments as AOTInductor packages
    peer: bool | None = None  # llama.cpp rows: True asked for, False none, None when llama-cpp-python is installed
    profile_step: bool = False  # also profile one dense decode step
    json: bool = False  # print the report as JSON instead of the table


@dataclass(frozen=True)
class RunResult:
    """One timed run of a row."""

    seconds: float  # the whole request, prefill included
    decode_seconds: float | None  # from the first generated token to the last (None: not measurable)
    skip_ratio: float = 0.0  # skipped FFN blocks / (L x generated tokens), pooled over the batch
    decode_skip_ratio: float = 0.0  # the same over tokens after warm-up
    avoided: float = 0.0  # share of decode-step FFN weight reads avoided (no row ran the layer)


def run(options: BenchOptions) -> int:
    """Run every row `options.reps` times, then print the table (the JSON report with `json`); -> 0."""
    import torch  # here, not at import: the command line imports this module

    from ffnskip.bench.step_profile import profile_decode_step
    from ffnskip.errors import InvalidArgument

    if options.new_tokens < 2:
        raise InvalidArgument("new_tokens", "must be at least 2: a run is timed over its decode steps")
    batches = list(options.batches)
    runners = {}
    for requested in options.dtypes:
        runner = _runner(options, requested, batches)
        runners[runner.dtype] = runner  # keyed by the resolved precision ("auto" is float32 on a CPU)
    first = next(iter(runners.values()))
    loaded = first.engine.loaded
    extra = [row for path in options.profiles for row in profile_rows(path, loaded)]
    extra += [row for path in options.from_eval for row in eval_rows(path, loaded)]
    extra = list(dict(extra).items())  # a setting named twice (qa and agreement outputs) is one row
    configs = [replace(c, dtype=dtype) for dtype in runners for c in default_configs(loaded.num_layers, batches, extra)]
    if options.policies:  # names or shell patterns: "dense,*@*" = dense and every --from-eval row
        wanted = options.policies
        configs = [c for c in configs if c.name == "dense" or any(fnmatch.fnmatchcase(c.name, w) for w in wanted)]
    if 1 in batches:
        configs += [BenchConfig(peer_row_name(dtype), 1, None, dtype) for dtype, r in runners.items() if r.peer]
    results: dict[tuple[str, int, str], list[RunResult]] = {}
    for rep in range(options.reps):
        for group in run_groups(configs):
            for config, result in zip(group, runners[group[0].dtype].run(group)):
                results.setdefault(config.key, []).append(result)
                print(f"rep {rep + 1}/{options.reps} {config.name} b{config.batch} {config.dtype}: "
                      f"{config.batch * options.new_tokens / result.seconds:.1f} tok/s", file=sys.stderr, flush=True)
    rows = summarise(configs, results, runners, options.new_tokens)
    report = {"model": loaded.model_id, "device": str(loaded.device), "dtype": ",".join(runners),
              "threads": torch.get_num_threads(), "new_tokens": options.new_tokens, "reps": options.reps,
              "compiled": options.compile, "warm_up_seconds": {d: round(r.warm_up_seconds, 1) for d, r in runners.items()},
              "packages_compiled": {d: r.packages_compiled for d, r in runners.items()},
              "ffn_share": first.engine.weight_bytes.ffn_share, "weight_bytes_per_step": first.engine.weight_bytes.total,
              "rows": rows}
    bandwidth = read_bandwidth_gb_s(loaded.device)
    if bandwidth is not None:  # the batch-1 ceiling: every weight byte read once per token
        report["memory_read_gb_per_s"] = round(bandwidth, 1)
        report["bandwidth_limit_tokens_per_s"] = round(bandwidth * 1e9 / first.engine.weight_bytes.total, 1)
    if options.profile_step:
        report["decode_step_profile"] = profile_decode_step(first.engine, first.prompts[0])
    if options.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_table(report)
    return 0


def _warm_up(engine, batches: list[int], dtype: str) -> tuple[float, int]:
    """Load the compiled decode segments, with a progress bar when some must be compiled first;
    -> (seconds, packages compiled)."""
    missing = engine.packages_to_compile(batches)
    if not missing:
        return engine.warm_up(batches), 0
    from tqdm import tqdm

    with tqdm(total=missing, desc=f"compiling {dtype} decode packages (once; --no-compile skips)", unit="package",
              file=sys.stderr, dynamic_ncols=True) as bar:
        return engine.warm_up(batches, on_compiled=bar.update), bar.n


def _runner(options: BenchOptions, dtype: str, batches: list[int]) -> BenchRunner:
    from ffnskip.bench import gguf_export, inprocess_peer
    from ffnskip.engine import Engine, load_model
    from ffnskip.errors import InvalidArgument

    # "int8": float32 activations over int8 matrices (engine.layers.quantise); "w8a8": the
    # activations rounded to int8 at each product too (engine.layers.int8_product)
    weights = dtype if dtype in QUANTISED else "full"
    loaded = load_model(options.model, device=options.device, dtype="float32" if dtype in QUANTISED else dtype,
                        cache_dir=cache_root(os.environ), weights=weights)
    precision = weights if dtype in QUANTISED else str(loaded.dtype).removeprefix("torch.")
    prompts = bench_prompts(loaded.tokenizer, max(batches))
    max_seq_len = max(len(p) for p in prompts) + options.new_tokens + 1
    peer = None
    if options.peer or (options.peer is None and precision in PEER_PRECISIONS and 1 in batches
                        and inprocess_peer.peer_available()):
        if precision not in PEER_PRECISIONS:
            raise InvalidArgument("peer", f"llama.cpp rows exist for {', '.join(PEER_PRECISIONS)}, not {precision}")
        if not inprocess_peer.peer_available():
            raise InvalidArgument("peer", "llama-cpp-python is not installed: pip install '.[peer]'")
        try:  # written before the engine is built: an int8 engine lets the model's own matrices go
            path = gguf_export.ensure_gguf(loaded.model, loaded.tokenizer, loaded.fingerprint, loaded.cache_dir / "gguf",
                                           PEER_PRECISIONS[precision])
            peer = inprocess_peer.LlamaCppPeer(path, n_ctx=max_seq_len)
        except ValueError as err:  # a model llama.cpp cannot load: without rows when they were not asked for
            if options.peer:
                raise InvalidArgument("peer", str(err)) from None
            print(f"no llama.cpp rows: {err}", file=sys.stderr)
    engine = Engine(loaded, max_batch=max(batches), max_seq_len=max_seq_len, compile=options.compile)
    runner = BenchRunner(engine, prompts, options.new_tokens, precision)
    runner.peer = peer
    runner.warm_up_seconds, runner.packages_compiled = _warm_up(engine, batches, precision)
    return runner


QUANTISED = ("int8", "w8a8")  # --dtypes that name a weight format (float32 activations)
# the GGUF of each precision's llama.cpp rows: int8 weights are compared with llama.cpp's Q8_0
PEER_PRECISIONS = {"float32": "f32", "bfloat16": "bf16", "int8": "q8_0", "w8a8": "q8_0"}


def peer_row_name(dtype: str) -> str:
    return f"llamacpp_{PEER_PRECISIONS[dtype]}"


def read_bandwidth_gb_s(device, megabytes: int = 256, reps: int = 7) -> float | None:
    """Sustained read bandwidth: the median time of summing a buffer much larger than the caches
    (CPU only; on a GPU the decode step's own numbers say more)."""
    import torch

    if device.type != "cpu":
        return None
    buffer = torch.ones(megabytes * 2**20 // 4)
    buffer.sum()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        buffer.sum()
        times.append(time.perf_counter() - started)
    return buffer.numel() * 4 / statistics.median(times) / 1e9


def bench_prompts(tokenizer, count: int) -> list[list[int]]:
    from ffnskip.datasets import texts
    from ffnskip.engine.prompts import encode_prompt

    chosen = texts("prompts", "prompt", limit=count)
    return [encode_prompt(tokenizer, None, [{"role": "user", "content": text}]) for text in chosen]


class BenchRunner:
    def __init__(self, engine, prompts: list[list[int]], new_tokens: int, precision: str) -> None:
        self.engine = engine
        self.prompts = prompts
        self.new_tokens = new_tokens
        self.sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        self.dtype = precision  # float32, bfloat16, ... or int8 (its rows' dtype column)
        self.warm_up_seconds = 0.0  # loading (and compiling what is not on disk) the decode segments
        self.packages_compiled = 0
        self.dense_tokens: dict[int, list[list[int]]] = {}  # batch -> each row's greedy dense tokens
        self.peer: LlamaCppPeer | None = None  # on the same weights, when its rows are wanted
        self.peer_tokens: list[int] = []
        self.engines: dict = {}  # row name -> its engine (side_by_side)

    def run(self, group: list[BenchConfig]) -> list[RunResult]:
        """One run of each row of `group`: a llama.cpp or transformers row alone, or engine rows
        of one batch size side by side (`side_by_side`)."""
        prompts = self.prompts[:group[0].batch]
        if group[0].name.startswith("llamacpp"):
            assert self.peer is not None  # llama.cpp rows are made only for runners with a peer
            self.peer_tokens, seconds, decode_seconds = self.peer.greedy(prompts[0], self.new_tokens)
            return [RunResult(seconds, decode_seconds)]
        if group[0].skip is None:
            return [RunResult(self._hf_generate(prompts), None)]
        return self.side_by_side(group, prompts)

    def side_by_side(self, group: list[BenchConfig], prompts: list[list[int]]) -> list[RunResult]:
        """Each row on its own engine (all sharing one model and its compiled segments), stepped
        in turn: every row's decode step is timed next to every other row's, so the machine's
        bandwidth swings of a few seconds (10-30% here) hit dense and skip rows alike. Each
        engine's first step prefills its batch; who steps first rotates."""
        from ffnskip.engine.stats import SkipStats

        engines = [self._engine(config.name) for config in group]
        seqs = [[e.add(prompt_ids=ids, sampling=self.sampling, skip=c.skip) for ids in prompts] for e, c in zip(engines, group)]
        counters = [(e.decode_layer_steps, e.decode_ffn_reads) for e in engines]
        prefill, decode = [0.0] * len(group), [0.0] * len(group)
        for i, engine in enumerate(engines):
            started = time.perf_counter()
            engine.step()
            prefill[i] = time.perf_counter() - started
        order = list(range(len(group)))
        while any(e.has_work for e in engines):
            for i in order:
                if engines[i].has_work:
                    started = time.perf_counter()
                    engines[i].step()
                    decode[i] += time.perf_counter() - started
            order = order[1:] + order[:1]
        results = []
        for config, engine, batch_seqs, (steps_before, reads_before), p, d in zip(group, engines, seqs, counters, prefill, decode):
            if config.name == "dense":
                self.dense_tokens[config.batch] = [list(s.generated) for s in batch_seqs]
            pooled = SkipStats.pooled([engine.result(s).skip_stats for s in batch_seqs])
            layer_steps = engine.decode_layer_steps - steps_before
            avoided = 1.0 - (engine.decode_ffn_reads - reads_before) / layer_steps if layer_steps else 0.0
            results.append(RunResult(p + d, d, pooled.skip_ratio, pooled.decode_skip_ratio, avoided))
        return results

    def _engine(self, row: str):
        """The engine of a row: the first row gets the runner's own, the others share its model."""
        if row not in self.engines:
            from ffnskip.engine import Engine

            first = self.engine
            self.engines[row] = first if not self.engines else Engine(
                first.loaded, max_batch=first.cache.max_batch, max_seq_len=first.max_seq_len, runner=first.runner)
        return self.engines[row]

    def _hf_generate(self, prompts: list[list[int]]) -> float:
        import torch

        model, tokenizer = self.engine.loaded.model, self.engine.loaded.tokenizer
        width = max(len(p) for p in prompts)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens,
                           do_sample=False, pad_token_id=pad)
        return time.perf_counter() - started
