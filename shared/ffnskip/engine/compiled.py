"""Decode segments compiled ahead of time by AOTInductor: one package per segment kind
("attention", "ffn", "substitute", "head") and batch bucket, serving every layer.

Why this shape (measured on SmolLM2-135M, 2 CPU threads, docs/performance.md):
- The weights are inputs, not constants: a layer's segment is the package of its kind called
  with that layer's weights, so a bucket is four packages (seconds to compile, not one
  per layer in minutes) and no package holds a weight. The weights it is called with are one
  copy made at start-up in the blocked layout of layers.blocked (BLOCK output rows side by side,
  what a prepacking GEMM makes), shared by every bucket; layers.project multiplies in it. Over
  weights read from memory this ran as fast as a package per layer with its weights frozen
  and prepacked by Inductor (the earlier design), and the raw [N, K] weights as inputs ran
  at half that speed (a library GEMV).
- `max_autotune` (float32 only, see __init__): Inductor benchmarks its C++ GEMM templates
  against the library call for the batched block matmul of buckets > 1 and keeps the faster.
- AOTInductor, not `torch.compile`: a package is called through its C++ runner with a
  plain list of tensors (about 5 us), where a Dynamo-compiled segment went through
  frame evaluation and AOTAutograd's wrappers (50-100 us per call); and a
  package is a file, so a process loads in seconds what took minutes to compile.
- Separate "attention" and "ffn" packages, so that a skipped FFN is a call not made; a
  "substitute" package applies a low-rank substitute where one replaces it (its rank dynamic).
  Eagerly, the substitute's half-dozen small operations cost more than the skipped FFN saved:
  right after the packages each runs several times slower than in a loop, 248 us in a decode
  step against 39 for the package (one row, SmolLM2-135M, w8a8; the FFN it replaces takes
  130-230).
- Static shapes except the attention span and the cache's size: each batch bucket
  (1, 2, 4, ... up to the cache's rows) is its own set of packages; a batch runs padded
  to the next bucket. (One package with a dynamic batch was tried once, on a busy
  machine: its batch-1 call took 3.8 ms against 0.2 ms at batch 2.)

Packages live under $FFNSKIP_CACHE/compiled/<key>/, the key hashing everything a
package depends on: the model's fingerprint, dtype, torch version, the CPU's capability
(or the GPU's name), autotuning, the package format, and the source of the code traced into it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from ffnskip.engine import int8_kernel
from ffnskip.engine import layers as layers_module
from ffnskip.engine import segments as segments_module
from ffnskip.engine import substitutes as substitutes_module
from ffnskip.engine.cpu_target import cpu_target
from ffnskip.engine.layers import FusedLayer, Head, blocked, scale_of
from ffnskip.engine.segments import EagerSegments, StepInputs, attention_step, ffn_step, substitute_step
from ffnskip.engine.substitutes import AnySubstitute, Substitute, int8_factors

# Bump when a change here alters what a package computes or expects (the traced wrappers, the
# example shapes, the options); the source of segments.py and layers.py is hashed as it is.
PACKAGE_FORMAT = 5
KINDS = ("attention", "ffn", "substitute", "head")
# The parameters each kind of segment reads, in the order they follow its other inputs
# (those a model lacks, like Llama's biases, are left out; the scales only int8 matrices have, the
# smoothing only w8a8 ones).
WEIGHTS = {
    "attention": ("input_norm.weight", "qkv_weight", "qkv_scale", "qkv_smoothing", "qkv_bias", "o_proj.weight",
                  "o_proj.weight_scale", "o_proj.weight_smoothing", "o_proj.bias"),
    "ffn": ("post_norm.weight", "gate_up_weight", "gate_up_scale", "gate_up_smoothing", "down_proj.weight",
            "down_proj.weight_scale", "down_proj.weight_smoothing", "down_proj.bias"),
    "substitute": ("post_norm.weight",),
    "head": ("final_norm.weight", "lm_head.weight", "lm_head.weight_scale", "lm_head.weight_smoothing", "lm_head.bias"),
}
COMPILE_OPTIONS = {"freezing": True, "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}


@dataclass(frozen=True)
class CompileTarget:
    """What compiled segments are built for: batch buckets up to `max_batch`, packages under
    `directory` (a compile cache, shared by processes and pods), for the model `fingerprint`."""

    max_batch: int
    directory: Path
    fingerprint: str
    # True: a bucket runs eagerly until warm_up has loaded it (a server serves while it compiles);
    # False: a bucket is loaded, or compiled, on its first use
    eager_until_warm: bool = False


# A loaded package's runner: a list of input tensors in, a list of output tensors out.
PackageRun = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two below max_batch, and max_batch itself."""
    buckets, size = [], 1
    while size < max_batch:
        buckets.append(size)
        size *= 2
    return tuple(buckets) + (max_batch,)


def calls_int8_kernel(weights: str, device: torch.device) -> bool:
    """Whether packages of this format on this device call the int8 kernel (where it loads):
    w8a8 products on a CPU (layers.int8_product)."""
    return weights == "w8a8" and device.type == "cpu"


def compiled_substitute(substitute: AnySubstitute) -> bool:
    """Whether the "substitute" package applies it: a low-rank map of rank 2 or more (its rank is
    the package's one dynamic size). A bias or a full map runs eagerly."""
    return substitute.kind == "lowrank" and substitute.rank >= 2


def package_key(fingerprint: str, dtype: torch.dtype, weights: str, device: torch.device, autotune: bool) -> str:
    """Everything a compiled package depends on besides its segment and bucket."""
    digest = hashlib.sha256()
    target = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_target()
    # a package built calling the int8 kernel needs it loaded
    kernel = int8_kernel.digest() if calls_int8_kernel(weights, device) else "none"
    for part in (fingerprint, str(dtype), weights, torch.__version__, target, str(autotune), str(PACKAGE_FORMAT), kernel):
        digest.update(part.encode() + b"\0")
    for module in (segments_module, layers_module, substitutes_module):  # the code traced into a package
        digest.update(Path(str(module.__file__)).read_bytes())
    return digest.hexdigest()[:20]


def weight_names(module: nn.Module, kind: str) -> list[str]:
    """The parameters of `module` (a layer or the head) a segment of `kind` reads, in input order."""
    params = dict(module.named_parameters())
    return [name for name in WEIGHTS[kind] if name in params]


def decode_weights(module: nn.Module, names: list[str]) -> list[torch.Tensor]:
    """Those parameters as the packages read them: matrices in the blocked layout (an int8
    [N, K] one as it is: the library's integer GEMM packs it), the rest copied too (the model's
    own may lie in the weight file's memory map, which a decoder lets go of once it runs on
    these copies alone)."""
    params = {name: param.detach() for name, param in module.named_parameters()}
    return [blocked(param) if param.dim() == 2 and param.is_floating_point() else param.clone()
            for param in (params[name] for name in names)]


def weights_format(layer: FusedLayer) -> str:
    """The layer's matrices' format (config.WEIGHT_FORMATS; layers.quantise_matrices)."""
    if scale_of(layer, "gate_up_weight") is None:
        return "full"
    return "w8a8" if layer.gate_up_weight.dim() == 2 else "int8"


def load_package(path: Path) -> PackageRun:
    """The C++ runner of an AOTInductor package, called with a plain list (consumed: a new one per
    call). The loader unpacks a package into a new directory under TMPDIR and deletes it only when
    the loader is destroyed, which never happens in a process that is killed: a machine that ran the
    tests and restarted stacks for a day held 256 of them, 7 GB. Its library is mapped once loaded,
    so the package is unpacked into a directory of ours, removed as soon as it is loaded."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir  # local: Inductor costs every importer

    cache_dir()  # Inductor fixes its cache directory from TMPDIR on first use: not from ours
    previous = os.environ.get("TMPDIR")
    with tempfile.TemporaryDirectory(prefix="ffnskip-package-") as scratch:
        os.environ["TMPDIR"] = scratch
        try:
            return torch._inductor.aoti_load_package(str(path)).loader.boxed_run
        finally:
            if previous is None:
                del os.environ["TMPDIR"]
            else:
                os.environ["TMPDIR"] = previous


class _Shared(nn.Module):
    """A segment over any layer's weights: forward(*inputs, *weights) runs `example` (a segment
    module of one layer) with the weights swapped in for its own, which therefore stay out of
    the package."""

    def __init__(self, example: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.names = names
        self._example = [example]  # a list: not a submodule, so its parameters are not lifted

    def forward(self, *args: torch.Tensor) -> object:
        count = len(self.names)
        inputs, weights = args[:-count], args[-count:]
        return torch.func.functional_call(self._example[0], dict(zip(self.names, weights)), inputs)


class _LayerSegment(nn.Module):
    """One kind of segment of `layer` (its forward: the segment's function)."""

    def __init__(self, layer: FusedLayer) -> None:
        super().__init__()
        self.layer = layer


class _Attention(_LayerSegment):
    def forward(self, x, keys, values, write_positions, mask, cos, sin):
        return attention_step(self.layer, x, keys, values, write_positions, mask, cos, sin)


class _Ffn(_LayerSegment):
    def forward(self, h, row_mask):
        return ffn_step(self.layer, True, h, row_mask)


class _Substitute(_LayerSegment):
    def forward(self, h, x, row_mask, bias, *factors):
        return substitute_step(self.layer, h, x, row_mask, bias, *factors)


class CompiledSegments:
    """The EagerSegments interface over AOTInductor packages; the cosine is computed in the graph."""

    def __init__(self, layers: Seq[FusedLayer], head: Head, target: CompileTarget) -> None:
        self.layers, self._head = layers, head
        self.buckets = batch_buckets(target.max_batch)
        weight = head.final_norm.weight  # in the activations' precision, whatever the matrices' format
        self.device, self.dtype = weight.device, weight.dtype
        # Autotuning (the micro-GEMM) in float32 only: its bfloat16 kernels produced wrong tokens
        # on an AVX2 CPU without native bf16 (greedy text diverged at token 2); freezing alone is
        # exact there.
        self.autotune = self.dtype == torch.float32
        self.weights = weights_format(layers[0])
        if calls_int8_kernel(self.weights, self.device):
            int8_kernel.load(Path(target.directory))  # before any package is traced or loaded
        self.directory = Path(target.directory) / package_key(target.fingerprint, self.dtype, self.weights, self.device,
                                                              self.autotune)
        with torch.inference_mode():  # like every decode input
            self._all_rows = {b: torch.ones(b, 1, 1, dtype=torch.bool, device=self.device) for b in self.buckets}
        self._runners: dict[tuple[int, str], PackageRun] = {}
        self._row_masks: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
        # the one copy of the weights every bucket's packages read, per layer, in package order
        with torch.inference_mode():
            self._names = {kind: weight_names(layers[0], kind) for kind in ("attention", "ffn")}
            self._names["head"] = weight_names(head, "head")
            self._attention_weights = [decode_weights(layer, self._names["attention"]) for layer in layers]
            self._ffn_weights = [decode_weights(layer, self._names["ffn"]) for layer in layers]
            self._names["substitute"] = weight_names(layers[0], "substitute")
            # the FFN's own copies of them (the post-norm's weight): nothing is copied twice
            self._substitute_weights = [[dict(zip(self._names["ffn"], weights))[name] for name in self._names["substitute"]]
                                        for weights in self._ffn_weights]
            self._head_weights = decode_weights(head, self._names["head"])
        self.warm_buckets: set[int] = set()  # every segment loaded for these batch buckets
        self._plain = EagerSegments(layers, head)  # what no package runs: bias and full-map substitutes
        self._eager = self._plain if target.eager_until_warm else None
        self.compiled = 0  # packages compiled by this process (the others were loaded)

    def bucket(self, batch: int) -> int:
        for size in self.buckets:
            if size >= batch:
                return size
        raise ValueError(f"batch of {batch} rows exceeds the largest bucket {self.buckets[-1]}")

    def row_mask(self, padded: int, rows: Seq[int] | None) -> torch.Tensor:
        if rows is None:
            return self._all_rows[padded]
        key = (padded, tuple(rows))
        mask = self._row_masks.get(key)
        if mask is None:  # a step's masks repeat while its rows' plans do (kept for the last few)
            mask = torch.zeros(padded, 1, 1, dtype=torch.bool)
            mask[list(rows)] = True
            if len(self._row_masks) >= 64:
                self._row_masks.clear()
            mask = self._row_masks[key] = mask.to(self.device)
        return mask

    # The bucket of a call is its batch's first dimension, padded by the runner.

    def _cold(self, padded: int) -> EagerSegments | None:
        """The eager segments, while bucket `padded` waits for warm_up (eager_until_warm)."""
        return self._eager if self._eager is not None and padded not in self.warm_buckets else None

    def attention(self, index: int, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  step: StepInputs) -> torch.Tensor:
        if (eager := self._cold(x.shape[0])) is not None:
            return eager.attention(index, x, keys, values, step)
        run = self._runner(x.shape[0], "attention")
        return run([x, keys, values, step.write_positions, step.mask, step.cos, step.sin,
                    *self._attention_weights[index]])[0]

    def ffn(self, index: int, h: torch.Tensor,
            row_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if (eager := self._cold(h.shape[0])) is not None:
            return eager.ffn(index, h, row_mask)
        mask = self._all_rows[h.shape[0]] if row_mask is None else row_mask
        out, similarity = self._runner(h.shape[0], "ffn")([h, mask, *self._ffn_weights[index]])
        return out, similarity

    def substitute(self, index: int, h: torch.Tensor, x: torch.Tensor, row_mask: torch.Tensor | None,
                   substitute: AnySubstitute) -> torch.Tensor:
        if self._cold(h.shape[0]) is not None or not compiled_substitute(substitute):
            return self._plain.substitute(index, h, x, row_mask, substitute)
        mask = self._all_rows[h.shape[0]] if row_mask is None else row_mask
        return self._runner(h.shape[0], "substitute")([h, x, mask, substitute.bias, *substitute.factors,
                                                      *self._substitute_weights[index]])[0]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        if (eager := self._cold(x.shape[0])) is not None:
            return eager.head(x)
        return self._runner(x.shape[0], "head")([x, *self._head_weights])[0]

    def layer_weights(self, index: int) -> dict[str, torch.Tensor]:
        """Layer `index`'s weights as the packages read them, by parameter name."""
        return {**dict(zip(self._names["attention"], self._attention_weights[index])),
                **dict(zip(self._names["ffn"], self._ffn_weights[index]))}

    def head_weights(self) -> dict[str, torch.Tensor]:
        return dict(zip(self._names["head"], self._head_weights))

    def package_names(self) -> list[str]:
        return list(KINDS)

    def missing(self, buckets: Seq[int]) -> int:
        """How many packages of these buckets are not on disk yet (each takes seconds to compile)."""
        return sum(not self._path(size, name).exists() for size in buckets for name in self.package_names())

    def warm_up(self, buckets: Seq[int], on_compiled: Callable[[], None] | None = None) -> float:
        """Load (compiling where missing, calling `on_compiled` after each) every segment of these
        buckets; returns seconds."""
        started = time.perf_counter()
        for size in buckets:
            for name in self.package_names():
                compiled = self.compiled
                self._runner(size, name)
                if on_compiled is not None and self.compiled > compiled:
                    on_compiled()
            self.warm_buckets.add(size)
        return time.perf_counter() - started

    def _runner(self, padded: int, name: str) -> PackageRun:
        key = (padded, name)
        if key not in self._runners:
            self._runners[key] = self._load(padded, name)
        return self._runners[key]

    def _path(self, padded: int, name: str) -> Path:
        return self.directory / f"b{padded}" / f"{name}.pt2"

    def _load(self, padded: int, name: str) -> PackageRun:
        path = self._path(padded, name)
        if not path.exists():
            self._compile(padded, name, path)
            self.compiled += 1
        return load_package(path)

    def _compile(self, padded: int, name: str, path: Path) -> None:
        module, args, dynamic = self._traceable(padded, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        # unique per writer: decoders on other nodes may compile the same package into a shared volume
        partial = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.pt2")
        try:
            with torch.no_grad():
                program = torch.export.export(module.eval(), args, dynamic_shapes=dynamic)
                torch._inductor.aoti_compile_and_package(
                    program, package_path=str(partial),
                    inductor_configs={**COMPILE_OPTIONS, "max_autotune": self.autotune})
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)  # only left when the compile failed

    def _traceable(self, padded: int, name: str) -> tuple[nn.Module, tuple, tuple | None]:
        """The module of a segment kind, example inputs of bucket `padded` (the first layer's
        weights), and their dynamic dims."""
        first = self.layers[0]
        like: dict[str, Any] = dict(dtype=self.dtype, device=self.device)
        x = torch.zeros(padded, 1, first.hidden_size, **like)
        names = self._names[name]  # the example inputs: the weights the first layer is called with
        if name == "head":
            return _Shared(self._head, names), (x, *self._head_weights), None
        if name == "ffn":
            return (_Shared(_Ffn(first), [f"layer.{n}" for n in names]),
                    (x, self._all_rows[padded].clone(), *self._ffn_weights[0]), None)
        if name == "substitute":
            factors, factor_dims = self._example_factors(8)  # the rank is dynamic
            args = (x, torch.zeros_like(x), self._all_rows[padded].clone(), torch.zeros(first.hidden_size, **like),
                    *factors, *self._substitute_weights[0])
            dynamic = ((None, None, None, None, *factor_dims, *([None] * len(names))),)
            return _Shared(_Substitute(first), [f"layer.{n}" for n in names]), args, dynamic
        weights = self._attention_weights[0]
        cos = torch.ones(padded, 1, first.head_dim, **like)
        cache_rows, positions, span = padded + 1, 8, 4  # example sizes only: these three are dynamic
        keys = torch.zeros(cache_rows, first.num_kv_heads, positions, first.head_dim, **like)
        write_positions = torch.zeros(padded, dtype=torch.long, device=self.device)
        mask = torch.zeros(padded, 1, 1, span, **like)
        args = (x, keys, torch.zeros_like(keys), write_positions, mask, cos, torch.zeros_like(cos), *weights)
        cache = {0: Dim(f"cache_rows_{padded}", min=padded), 2: Dim("cache_positions", min=3)}
        # one entry: forward takes its inputs as *args
        dynamic = ((None, cache, cache, None, {3: Dim("span", min=2)}, None, None, *([None] * len(weights))),)
        return _Shared(_Attention(first), [f"layer.{n}" for n in names]), args, dynamic

    def _example_factors(self, rank: int) -> tuple[tuple[torch.Tensor, ...], tuple[dict[int, Dim] | None, ...]]:
        """Example factors of a low-rank substitute as this format's engine applies them (Substitute
        or, where the matrices are w8a8, Int8LowRank .factors), and their dynamic rank dims."""
        width, dim = self.layers[0].hidden_size, Dim("rank", min=2)
        example = Substitute(*(torch.zeros(shape, dtype=self.dtype) for shape in ((width,), (width, rank), (rank, width))))
        if int8_factors(self.weights):
            return tuple(t.to(self.device) for t in example.int8().factors), ({0: dim}, {0: dim}, {1: dim}, None)
        return tuple(t.to(self.device) for t in example.factors), ({0: dim}, {0: dim})
