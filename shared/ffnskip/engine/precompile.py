"""Compile a model's decode segments in a child process, for a process that serves meanwhile.

PyTorch's compile stack (export, fake tensors, Inductor) is not thread-safe: a package traced in
a background thread of a serving process corrupted the eager requests served meanwhile (their
sampled tokens came back as symbolic integers). So a server compiles in a child process that
writes the packages into the shared compile cache (each written atomically, compiled.py), and
loads each batch bucket once the child reports it complete; its own torch never traces.

    python -m ffnskip.engine.precompile --model PATH --dtype float32 --weights int8 --device cpu \
        --max-batch 16 --cache-dir DIR

prints one JSON line per compiled package ({"package": done}) and per complete bucket
({"bucket": size}), smallest bucket first.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from ffnskip.engine.compiled import CompiledSegments, batch_buckets
from ffnskip.engine.engine import Engine
from ffnskip.engine.loading import LoadedModel, load_model
from ffnskip.logs import configure_logging


def compile_in_child(loaded: LoadedModel, max_batch: int) -> Iterator[dict]:
    """Run the child for `loaded`'s model and yield its events; raises RuntimeError if it fails."""
    command = [sys.executable, "-m", "ffnskip.engine.precompile", "--model", loaded.path,
               "--dtype", str(loaded.dtype).removeprefix("torch."), "--weights", loaded.weights, "--device", str(loaded.device),
               "--max-batch", str(max_batch), "--cache-dir", str(loaded.cache_dir)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as child:
        assert child.stdout is not None
        for line in child.stdout:
            yield json.loads(line)
    if child.returncode:
        raise RuntimeError(f"compiling decode segments in a child process failed (exit status {child.returncode})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="compile a model's decode segments into the compile cache")
    parser.add_argument("--model", required=True, help="a model spec or directory (load_model)")
    parser.add_argument("--dtype", required=True)
    parser.add_argument("--weights", default="full")
    parser.add_argument("--device", required=True)
    parser.add_argument("--max-batch", type=int, required=True)
    parser.add_argument("--cache-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    configure_logging()  # on stderr: stdout carries the events the parent reads, one JSON object a line
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir, weights=args.weights)
    # a KV cache of a few positions: the packages' cache dimensions are dynamic
    engine = Engine(loaded, max_batch=args.max_batch, max_seq_len=16, compile=True)
    segments = engine.runner.segments
    assert isinstance(segments, CompiledSegments)
    done = 0

    def compiled() -> None:
        nonlocal done
        done += 1
        print(json.dumps({"package": done}), flush=True)

    for bucket in batch_buckets(args.max_batch):
        segments.warm_up([bucket], on_compiled=compiled)
        print(json.dumps({"bucket": bucket}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
