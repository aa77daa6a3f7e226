"""A decode step that runs whole on the device: no host read between its first layer and its logits.

The engine decodes with `ModelRunner.decode`, on a CPU and on CUDA alike: it asks the host
between each layer's attention and its FFN (policies.py runs the skip rule on host vectors, and a
skipped FFN is a call not made). A step captured once per batch bucket as a CUDA graph cannot do
that. `DeviceStep`, what the GPU benchmark (`ffnskip bench --gpu`) measures, is the same forward,
made of the same parts (a runner's fused layers, head, embedding and rotary table, and a
`KVCache`), arranged so that it can be captured:

- the step's inputs live in static device tensors (tokens, positions, write positions, the rows'
  skip plans); the host writes them before a step (one copy for the three integer rows), the step
  reads them, and the attention mask is computed from the positions inside the step;
- the attention always covers the same span of the cache (the mask hides what a row has not
  written yet), so every tensor has the same shape at every step of a bucket;
- the FFN decision comes from `DeviceSkips` (the engine's skip rule run on tensors); rows
  that skip keep h through `torch.where`, and the FFN call itself is gated by one predicate, "some
  row runs it", handed to a `Branch`. Eagerly, `HostBranch` reads that predicate and makes the
  call or not. Under CUDA-graph capture a branch records the call into a conditional (IF) node
  whose predicate the graph's own kernels set at replay, so a step in which no row runs a layer's
  FFN does not read that layer's FFN weights, and no layer waits for the host;
- with `advance`, the step also writes its greedy next tokens and moves the positions on, so
  steps can be replayed back to back with no host work in between.

Every bucket's step reads the runner's weights in place: one copy of the weights serves the
graphs of all buckets. A rope type whose angles depend on the sequence's length (dynamic,
longrope) cannot be tabled once, so it is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import Protocol

import torch

from ffnskip.bench.gpu.device_skips import DeviceSkips, RowTensors
from ffnskip.engine.kv_cache import KVCache
from ffnskip.engine.runner import ModelRunner, causal_mask
from ffnskip.engine.segments import attention_step, residual_similarity


class Branch(Protocol):
    """How a step runs a body that only some steps need: `pred` is a 0-dim bool device tensor."""

    def cond(self, pred: torch.Tensor, body: Callable[[], None]) -> None: ...


class HostBranch:
    """Reads the predicate on the host and runs the body when it is true (eager execution; on a
    GPU each read is a sync). `force`: run every body without reading, as a capture does; the
    results are the same, since the rows that skip are masked inside the body anyway."""

    def __init__(self, force: bool = False) -> None:
        self.force = force

    def cond(self, pred: torch.Tensor, body: Callable[[], None]) -> None:
        if self.force or bool(pred):
            body()


class DeviceStep:
    """One decode step over a batch bucket of `bucket` cache rows, with static inputs and outputs.

    Inputs (written by `set_inputs`, `set_rows`, or by the previous step with `advance`):
    `tokens` [P], `positions` [P], `write_positions` [P] (the scratch position marks a padding
    row: one that is no sequence), `rows` (the rows' skip plans as tensors).
    Outputs: `logits` [P, V]; keys and values written into the cache; the counters `ffn_rows`
    [L, P] (per layer, the steps in which the row ran the FFN) and `ffn_calls` [L] (the steps in
    which the FFN was called, i.e. its weights were read); with `record`, `similarity` [L, P],
    cos(h, out) of the last step. Its tensors are inference tensors: every method that writes
    them runs in inference mode."""

    @torch.inference_mode()
    def __init__(self, runner: ModelRunner, cache: KVCache, bucket: int, span: int | None = None) -> None:
        """`span`: cache positions every step attends over (default: all but the scratch
        position); a row's positions must stay below it."""
        if runner.rotary.per_call:
            raise ValueError("this rope type's angles depend on the sequence's length: a captured step "
                             "cannot table them once")
        if bucket > cache.max_batch:
            raise ValueError(f"bucket {bucket} exceeds the cache's {cache.max_batch} rows")
        span = cache.max_seq_len if span is None else span
        if not 0 < span <= cache.max_seq_len:
            raise ValueError(f"span must be in [1, {cache.max_seq_len}], got {span}")
        self.runner, self.cache, self.bucket, self.span = runner, cache, bucket, span
        device, layers = runner.device, runner.num_layers
        self.device = device
        # tokens, positions and write positions: rows of one tensor, so the host writes them in one copy
        self._inputs = torch.zeros(3, bucket, dtype=torch.long, device=device)
        self.tokens, self.positions, self.write_positions = self._inputs.unbind(0)
        self.write_positions.fill_(cache.scratch_position)
        self.logits = torch.zeros(bucket, runner.head.vocab_size, dtype=runner.dtype, device=device)
        self.ffn_rows = torch.zeros(layers, bucket, dtype=torch.int32, device=device)
        self.ffn_calls = torch.zeros(layers, dtype=torch.int32, device=device)
        self.similarity = torch.zeros(layers, bucket, dtype=torch.float32, device=device)
        self.rows = RowTensors.dense(bucket, layers, device)
        self._span = torch.arange(span, device=device)
        # the runner's own rotary angles for every position of the span, looked up by a gather
        probe = torch.zeros(1, 1, runner.config.hidden_size, dtype=runner.dtype, device=device)
        cos, sin = runner.rotary(probe, self._span[None], end=span)
        self._cos, self._sin = cos[0].clone(), sin[0].clone()

    # ---- host side, between steps

    @torch.inference_mode()
    def set_inputs(self, tokens: Seq[int] | torch.Tensor, positions: Seq[int] | torch.Tensor) -> None:
        """Rows [0, B) decode `tokens` at `positions` (and write their keys there); rows [B, P)
        become padding: token 0 at position 0, writing to the scratch position."""
        tokens = torch.as_tensor(tokens).to("cpu", torch.long)
        positions = torch.as_tensor(positions).to("cpu", torch.long)
        batch = tokens.shape[0]
        if not 0 < batch <= self.bucket or positions.shape != tokens.shape:
            raise ValueError(f"need 1..{self.bucket} tokens with a position each")
        inputs = torch.zeros(3, self.bucket, dtype=torch.long)
        inputs[2] = self.cache.scratch_position
        inputs[0, :batch], inputs[1, :batch], inputs[2, :batch] = tokens, positions, positions
        self._inputs.copy_(inputs)

    @torch.inference_mode()
    def set_rows(self, rows: RowTensors) -> None:
        """Take the rows' plans for the next steps (in place: a captured step reads these tensors)."""
        if rows.adaptive.shape[0] != self.bucket:
            raise ValueError(f"need plans for all {self.bucket} rows of the bucket (padding rows: dense)")
        for name in ("hot", "planned", "adaptive", "aligned", "threshold", "run_length", "quorum"):
            getattr(self.rows, name).copy_(getattr(rows, name))

    @torch.inference_mode()
    def set_threshold(self, value: float | torch.Tensor) -> None:
        """Overwrite the rows' similarity thresholds (one value, or one per row of the bucket)."""
        self.rows.threshold.copy_(torch.as_tensor(value, dtype=self.rows.threshold.dtype).expand(self.bucket))

    @torch.inference_mode()
    def zero_counters(self) -> None:
        self.ffn_rows.zero_()
        self.ffn_calls.zero_()

    # ---- the step (what a graph captures)

    @torch.inference_mode()
    def run(self, branch: Branch, *, skips: bool = True, gated: Seq[bool] | None = None,
            record: bool = False, advance: bool = False) -> None:
        """One decode step of every row of the bucket.

        `skips`: decide per row with `DeviceSkips` over `rows`; False runs every FFN for every row
        with no decision at all (the dense baseline). `gated` [L]: the layers whose FFN call
        `branch` gates on "some row runs it" (default: all); an ungated layer calls its FFN every
        step, still masked per row, so this only trades the predicate's cost against the read it
        can save. `record`: write cos(h, out) per layer into `similarity`. `advance`: write the
        greedy next tokens into `tokens` and move the live rows' positions on by one."""
        runner, cache = self.runner, self.cache
        positions = self.positions
        live = self.write_positions != cache.scratch_position  # [P]: the rows that are sequences
        cos, sin = self._cos[positions][:, None], self._sin[positions][:, None]  # [P, 1, hd]
        mask = causal_mask(self._span, positions, runner.dtype)[:, None, None, :]
        x = runner.embed(self.tokens[:, None])  # [P, 1, D]
        decide = DeviceSkips(self.rows) if skips else None
        for index, layer in enumerate(runner.layers):
            keys, values = cache.layer(index)
            h = attention_step(layer, x, keys, values, self.write_positions, mask, cos, sin)
            if decide is None:
                x = h + layer.mlp(h)
                self.ffn_calls[index] += 1
                self.ffn_rows[index] += live
                if record:
                    self.similarity[index] = residual_similarity(h, x)
                continue
            run = decide.decide(index) & live  # padding rows never ask for an FFN
            # cos(h, out) where no row runs the FFN (out is h); a tensor made before the branch,
            # so that what the body writes outlives a conditional node
            similarity = torch.ones(self.bucket, dtype=torch.float32, device=self.device)

            def body(layer_index: int = index, h: torch.Tensor = h, run: torch.Tensor = run,
                     similarity: torch.Tensor = similarity) -> None:
                out = torch.where(run[:, None, None], h + runner.layers[layer_index].mlp(h), h)
                similarity.copy_(residual_similarity(h, out))
                h.copy_(out)  # h is this step's own tensor: the layer's output takes its place
                self.ffn_calls[layer_index] += 1

            if gated is None or gated[index]:
                branch.cond(run.any(), body)
            else:
                body()
            decide.observe(index, similarity)
            self.ffn_rows[index] += run
            if record:
                self.similarity[index] = similarity
            x = h
        self.logits.copy_(runner.head(x))
        if advance:
            step = live.long()
            self.tokens.copy_(torch.where(live, self.logits.argmax(dim=-1), self.tokens))
            self.positions.add_(step)
            self.write_positions.add_(step)

