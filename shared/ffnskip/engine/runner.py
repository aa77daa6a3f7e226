"""A Llama-family forward over the loaded HF weights, with the skip hook.

ModelRunner prefills prompt chunks together, each into its cache row (a long prompt in
several chunks, a resumed answer with the FFNs its tokens skipped), running the fused layers
of layers.py directly, and decodes a batch of rows. A decode step runs as segments cut at
the skip point (segments.py): per layer "q/k/v + cache write + attention + o_proj", then
the decision, then "FFN" unless no row runs it (rows that skip it while others run it keep
h), then the substitutes of the rows that skip it; the LM head after the last layer. An FFN
no row runs is a call not made, so none of its weights is read. Segments run eagerly or
compiled (compiled.py) with the same code; this module's own code (the loop, the step's
inputs) is never traced, so changing it recompiles nothing.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

import torch
from torch import nn

from ffnskip.config import WEIGHT_FORMATS
from ffnskip.engine.compiled import WEIGHTS, CompiledSegments, CompileTarget
from ffnskip.engine.embedding import TiedInt8Embedding
from ffnskip.engine.heap import return_freed_memory
from ffnskip.engine.kv_cache import KVCache
from ffnskip.engine.layers import FusedLayer, Head, adopt, quantise_matrices
from ffnskip.engine.loading import LoadedModel
from ffnskip.engine.policies import FfnRows, StepSkips
from ffnskip.engine.segments import EagerSegments, Segments, StepInputs
from ffnskip.engine.smoothing import HEAD_INPUTS, LAYER_INPUTS, calibration_tokens, input_maxima
from ffnskip.engine.stats import WeightBytes
from ffnskip.engine.substitutes import SubstituteSet, substitute_groups


class ModelRunner:
    """Prefill prompt chunks into their cache rows; decode a batch of rows under their skip policies.

    `compiled`: run the decode segments as AOTInductor packages built (or loaded) for that
    target; None runs them eagerly. `weights`: "full" keeps the matrices in the model's precision;
    "int8" holds them as int8 with a scale per output (layers.quantise) for every forward, prefill
    and decode, and lets the model's own go (its HF modules cannot run afterwards); "w8a8" holds
    them as int8 too, and rounds the activations to int8 at each product (layers.int8_product),
    each input smoothed by its maxima over `smoothing_tokens` (smoothing.py; none: unsmoothed)."""

    def __init__(self, hf_model: Any, compiled: CompileTarget | None = None, weights: str = "full",
                 smoothing_tokens: Seq[Seq[int]] = ()) -> None:
        if weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
        config = hf_model.config
        inner = hf_model.model
        self.config = config
        self.embed: nn.Module = inner.embed_tokens
        self.rotary = RotaryTable(inner.rotary_emb)
        self.head = Head(inner.norm, hf_model.lm_head)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.layers = [FusedLayer(layer, self.num_heads, self.num_kv_heads, self.head_dim) for layer in inner.layers]
        self.num_layers = len(self.layers)
        weight = hf_model.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.weights = weights
        tied = hf_model.lm_head.weight.data_ptr() == inner.embed_tokens.weight.data_ptr()
        if weights != "full":
            maxima = input_maxima(hf_model, smoothing_tokens) if weights == "w8a8" and smoothing_tokens else None
            with torch.inference_mode():
                for index, layer in enumerate(self.layers):
                    quantise_matrices(layer, weights == "w8a8", maxima and {
                        name: maxima[f"model.layers.{index}.{module}"] for name, module in LAYER_INPUTS.items()})
                quantise_matrices(self.head, weights == "w8a8",
                                  maxima and {name: maxima[module] for name, module in HEAD_INPUTS.items()})
                if weights == "w8a8" and tied:  # the head's int8 copy serves the lookups; the float table goes
                    self.embed = TiedInt8Embedding(self.head, self.dtype)
                    inner.embed_tokens.weight = nn.Parameter(inner.embed_tokens.weight.new_empty(0), requires_grad=False)
            return_freed_memory()
        self.segments: Segments = (EagerSegments(self.layers, self.head) if compiled is None
                                   else CompiledSegments(self.layers, self.head, compiled))
        self._positions = torch.arange(256, device=self.device)

    @classmethod
    def of(cls, loaded: LoadedModel, compiled: CompileTarget | None = None) -> ModelRunner:
        """The runner of a loaded model in its weight format (w8a8 smoothed over the packaged
        calibration texts)."""
        smoothing = calibration_tokens(loaded.tokenizer) if loaded.weights == "w8a8" else ()
        return cls(loaded.model, compiled, loaded.weights, smoothing)

    def release_raw_weights(self) -> int:
        """Run the prefill and any eager segment on the compiled segments' copy of the weights
        (the blocked layout `project` reads) and free the model's own matrices: one copy of the
        weights in the process, not two. Returns the bytes released. For a model that nothing
        else runs (a serving decoder): the HF modules cannot run afterwards. The embedding
        table is copied off the weight file's memory map (where the loader may have left it),
        so nothing holds that map afterwards."""
        segments = self.segments
        if not isinstance(segments, CompiledSegments):
            raise ValueError("release_raw_weights: the decode segments are not compiled")
        modules = (*self.layers, self.head, self.embed)
        before = _storages(modules)
        with torch.inference_mode():  # the segments' copies are inference tensors
            for index, layer in enumerate(self.layers):
                layer.adopt(segments.layer_weights(index))
            adopt(self.head, segments.head_weights())  # a tied LM head no longer shares the embedding's
            # a float embedding table, off the weight file's map (nothing else holds the map after this)
            table = self.embed.weight if isinstance(self.embed, nn.Embedding) else None
            if table is not None:
                adopt(self.embed, {"weight": table.detach().clone()})
        after = _storages(modules)
        # (`before` holds the old storages until here, so no new tensor can take one's address)
        released = sum(storage.nbytes() for pointer, storage in before.items() if pointer not in after)
        if table is not None:
            released -= table.untyped_storage().nbytes()  # the copy made above
        del before
        return_freed_memory()
        return released

    def weight_bytes(self) -> WeightBytes:
        """FFN and total bytes of weights a dense decode step reads, as this runner holds them."""
        ffn = sum(_nbytes(p) for layer in self.layers for name, p in layer.named_parameters() if name in WEIGHTS["ffn"])
        total = sum(_nbytes(p) for module in (*self.layers, self.head) for p in module.parameters())
        return WeightBytes(ffn=ffn, total=total)

    def new_cache(self, max_batch: int, max_seq_len: int) -> KVCache:
        return KVCache(self.num_layers, max_batch, self.num_kv_heads, max_seq_len, self.head_dim, self.device, self.dtype)

    @torch.inference_mode()
    def prefill(self, cache: KVCache, rows: Seq[int], chunks: Seq[Seq[int]], starts: Seq[int] | None = None,
                logits_of: Seq[int] | None = None) -> torch.Tensor:
        """Run the full model over prompt chunks together (prefill_states); the logits
        [len(logits_of), V] of the last token of the chunks `logits_of` (indices into `chunks`;
        all of them by default)."""
        states = self.prefill_states(cache, rows, chunks, starts)
        return self.last_logits(states, [len(chunk) for chunk in chunks],
                                range(len(chunks)) if logits_of is None else logits_of)

    @torch.inference_mode()
    def last_logits(self, states: torch.Tensor, lengths: Seq[int], wanted: Seq[int]) -> torch.Tensor:
        """The logits [len(wanted), V] of the last real position of the chunks `wanted` of
        prefill_states' output."""
        wanted = list(wanted)
        if not wanted:
            return states.new_empty(0, self.head.vocab_size)
        index = torch.tensor(wanted, device=self.device)
        return self.head(states[index, torch.tensor([lengths[i] - 1 for i in wanted], device=self.device)][:, None])

    @torch.inference_mode()
    def position_logits(self, states: torch.Tensor, slice_tokens: int = 256) -> torch.Tensor:
        """The logits [L, V] of every position of one chunk's states [L, H] (prompt
        log-probabilities), the head run on slices so a long prompt's transient stays bounded."""
        return torch.cat([self.head(states[i:i + slice_tokens, None]) for i in range(0, states.shape[0], slice_tokens)])

    @torch.inference_mode()
    def prefill_states(self, cache: KVCache, rows: Seq[int], chunks: Seq[Seq[int]],
                       starts: Seq[int] | None = None,
                       skipped: Seq[Seq[Seq[int]] | None] | None = None,
                       substitutes: Seq[SubstituteSet | None] | None = None) -> torch.Tensor:
        """Run the full model over prompt chunks together, each into its cache row at positions
        [start, start + len) after the `start` positions it holds already (a prompt prefilled in
        chunks); the last layer's hidden states [len(chunks), longest, H] (padding rows beyond
        each chunk's length).

        The chunks are right-padded to the longest: under the causal mask a real token sees only
        the positions before it, all real, and only each chunk's own positions reach the cache.
        Chunks that all start at 0 attend among themselves; otherwise each attends to its row's
        cached keys up to its own position.

        `skipped[i][t]`, when given, lists the layers whose FFN position t of chunk i skips (a
        resumed answer's tokens, prefilled as the decode steps that generated them ran them,
        so the cache holds what it held on the decoder that failed); `substitutes[i]`, chunk i's
        substitutes for the FFNs it skips (substitutes.py), as its decode steps applied them."""
        starts = [0] * len(chunks) if starts is None else list(starts)
        lengths = [len(chunk) for chunk in chunks]
        longest = max(lengths)
        keep = self._ffn_keep(skipped, longest) if skipped is not None and any(skipped) else None
        ids = torch.tensor([list(chunk) + [0] * (longest - len(chunk)) for chunk in chunks], device=self.device)
        positions = torch.tensor(starts, device=self.device)[:, None] + self._arange(longest)[None]
        x = self.embed(ids)
        cos, sin = self.rotary(x, positions, end=max(starts) + longest)
        mask, row_index = None, None
        if any(starts):  # the chunk's queries read the row's earlier positions from the cache
            span = max(start + length for start, length in zip(starts, lengths))  # no padding: the cache may end there
            mask = causal_mask(self._arange(span), positions, x.dtype)[:, None]
            row_index = torch.tensor(list(rows), device=self.device)
        for index, layer in enumerate(self.layers):
            q, k, v = layer.qkv(x, cos, sin)
            for i, (row, start, length) in enumerate(zip(rows, starts, lengths)):
                cache.write_prefill(index, row, k[i, :, :length], v[i, :, :length], start)
            if row_index is not None:
                keys, values = cache.layer(index)
                k, v = keys[row_index, :, :span], values[row_index, :, :span]
            h = x + layer.output(layer.attention(q, k, v, mask, causal=mask is None))
            if keep is not None and not bool(keep[index].all()):
                x = h + layer.mlp(h) * keep[index][..., None]
                if substitutes is not None:
                    x = _compensate_positions(index, layer, h, x, keep[index], substitutes)
            else:
                x = h + layer.mlp(h)
        for row, start, length in zip(rows, starts, lengths):
            cache.lengths[row] = start + length
        return x

    def _ffn_keep(self, skipped: Seq[Seq[Seq[int]] | None], longest: int) -> torch.Tensor:
        """[layers, chunks, longest]: 1 where a position runs the layer's FFN, 0 where it skips it."""
        keep = torch.ones(self.num_layers, len(skipped), longest, dtype=self.dtype)
        for i, positions in enumerate(skipped):
            for t, layers in enumerate(positions or ()):
                for layer in layers:
                    keep[layer, i, t] = 0.0
        return keep.to(self.device)

    @torch.inference_mode()
    def decode(self, cache: KVCache, tokens: list[int], positions: list[int], skips: StepSkips,
               substitutes: Seq[SubstituteSet | None] | None = None) -> torch.Tensor:
        """One decode step for rows [0, B): each row's last token at its position; logits [B, V].
        `substitutes[b]`: what row b's skipped FFNs are replaced with (None: nothing).

        Compiled segments run on a fixed batch bucket P >= B: the padding rows attend to
        position 0 of cache rows [B, P) and write their keys to the scratch position."""
        batch = len(tokens)
        padded = self.segments.bucket(batch)
        if padded > cache.max_batch:
            raise ValueError(f"batch bucket {padded} exceeds the cache's {cache.max_batch} rows")
        pad = padded - batch
        span = max(positions) + 1
        # one host-to-device copy for the step's integer inputs
        inputs = torch.tensor([tokens + [0] * pad, positions + [0] * pad,
                               positions + [cache.scratch_position] * pad], device=self.device)
        x = self.embed(inputs[0, :, None])
        row_positions = inputs[1]
        cos, sin = self.rotary(x, row_positions[:, None], end=span)
        # made once per step, not per layer
        mask = causal_mask(self._arange(span), row_positions, x.dtype)
        step = StepInputs(batch=batch, padded=padded, cos=cos, sin=sin, mask=mask[:, None, None, :],
                          write_positions=inputs[2])
        sets = substitutes if substitutes is not None and any(s is not None for s in substitutes) else None
        logits = self._layers(cache, skips, x, step, sets)
        cache.lengths[:batch] = [p + 1 for p in positions]
        return logits[:batch]

    def _arange(self, size: int) -> torch.Tensor:
        """0..size-1, from a tensor kept between steps."""
        if self._positions.shape[0] < size:
            self._positions = torch.arange(max(size, 2 * self._positions.shape[0]), device=self.device)
        return self._positions[:size]

    def _layers(self, cache: KVCache, skips: StepSkips, x: torch.Tensor, step: StepInputs,
                sets: Seq[SubstituteSet | None] | None) -> torch.Tensor:
        """Every layer: attention, the skip decision, the FFN unless no row runs it, the substitutes
        of the rows that skip it; then the head."""
        segments, real = self.segments, step.real
        for index in range(self.num_layers):
            keys, values = cache.layer(index)
            h = segments.attention(index, x, keys, values, step)
            decision = skips.decide(index)
            x, similarity = h, None
            if decision.kind is not FfnRows.NONE:
                x, similarity = segments.ffn(index, h, segments.row_mask(step.padded, decision.rows))
            if sets is not None and decision.kind is not FfnRows.ALL:
                running = set(decision.rows or ())
                for substitute, rows in substitute_groups(index, [b not in running for b in range(step.batch)], sets):
                    mask = None if len(rows) == step.padded else segments.row_mask(step.padded, rows)
                    x = segments.substitute(index, h, x, mask, substitute)
            skips.observe(index, real(h), real(x), None if similarity is None else real(similarity))
        return segments.head(x)


def _compensate_positions(index: int, layer: FusedLayer, h: torch.Tensor, x: torch.Tensor, keep: torch.Tensor,
                          substitutes: Seq[SubstituteSet | None]) -> torch.Tensor:
    """x plus each chunk's substitute for layer `index` at the positions that skipped it
    (keep [chunks, T]: 0 there)."""
    for i, chosen in enumerate(substitutes):
        if chosen is not None and index in chosen and not bool(keep[i].all()):
            x[i] = x[i] + chosen[index](layer.post_norm(h[i])) * (1 - keep[i])[:, None]
    return x


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def causal_mask(keys: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask [*positions.shape, S]: 0 where the key position (`keys` [S]) is at
    most the query's position, -inf after it (SDPA would convert a boolean mask in every layer)."""
    return torch.where(keys <= positions[..., None], 0.0, float("-inf")).to(dtype)


def _storages(modules: Seq[nn.Module]) -> dict[int, torch.UntypedStorage]:
    """The memory the modules' parameters lie in, by address."""
    return {param.untyped_storage().data_ptr(): param.untyped_storage() for module in modules for param in module.parameters()}


class RotaryTable:
    """The rotary module's cos and sin for every position, computed once and looked up per step
    (the module costs about 0.15 ms a call on a CPU, and a position's angles do not depend on
    the others, so the values are the module's own). Rope types whose frequencies depend on
    the sequence's length (dynamic, longrope) call the module every time instead."""

    def __init__(self, rotary: nn.Module) -> None:
        self.rotary = rotary
        rope_type = getattr(rotary, "rope_type", "default")
        self.per_call = "dynamic" in rope_type or "longrope" in rope_type
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, positions: torch.Tensor,
                 end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, T, head_dim] in x's dtype. `end`: one past the largest
        position, when the caller knows it (saves a reduction and a read-back per step)."""
        if self.per_call:
            return self.rotary(x, positions)
        needed = end if end is not None else int(positions.max()) + 1
        if self.cos is None or needed > self.cos.shape[0] or self.cos.dtype != x.dtype:
            size = max(needed, 256 if self.cos is None else 2 * self.cos.shape[0])
            cos, sin = self.rotary(x, torch.arange(size, device=x.device)[None])
            self.cos, self.sin = cos[0], sin[0]
        assert self.sin is not None
        return self.cos[positions], self.sin[positions]
