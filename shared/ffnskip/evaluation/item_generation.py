"""Chunked, cached, deterministic generation of items under a Setting.

Items are cut into fixed chunks in data order (chunk i = items[i*B:(i+1)*B]) and each
chunk is generated as one batch, greedy. The batch composition is therefore the same
in every run and a resumed run reproduces a fresh one; a chunk is skipped only when all
its items are cached under a digest that covers the model, the setting, the chunk's
members and their prompts.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ffnskip.config import SamplingParams
from ffnskip.engine import Engine
from ffnskip.engine.prompts import encode_prompt
from ffnskip.evaluation.data import Item
from ffnskip.evaluation.methods import Setting, item_skip
from ffnskip.evaluation.state import StateFile, digest_of


@dataclass(frozen=True)
class Chunk:
    setting: Setting
    items: tuple[Item, ...]
    digest: str


class ItemGenerator:
    """The items of one data kind (`task`) generated under each Setting, chunked and cached."""

    def __init__(self, loaded, state: StateFile, max_new_tokens: int, seed: int, task: str) -> None:
        self.loaded = loaded
        self.state = state
        self.task = task  # the data kind ("qa", "prompts"): commands share results of the same kind
        self.seed = seed
        self.sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        self.num_layers = loaded.num_layers
        self._engines: dict[tuple, Engine] = {}
        self._encoded: dict[str, list[int]] = {}

    def key(self, setting: Setting, item: Item) -> str:
        return f"{self.task}|{setting.key}|{item.id}"

    def chunks(self, setting: Setting, items: Sequence[Item]) -> list[Chunk]:
        base = setting.digest(self.loaded.fingerprint, self.sampling.max_new_tokens, self.seed)
        size = setting.batch_size
        out = []
        for start in range(0, len(items), size):
            members = tuple(items[start:start + size])
            out.append(Chunk(setting, members, digest_of(base, [[i.id, i.prompt] for i in members])))
        return out

    def pending(self, setting: Setting, items: Sequence[Item]) -> list[Chunk]:
        return [c for c in self.chunks(setting, items)
                if any(self.state.get(self.key(setting, i), c.digest) is None for i in c.items)]

    def results(self, setting: Setting, items: Sequence[Item], on_chunk: Callable[[Chunk], None] | None = None) -> list[dict]:
        """Per item (in order): tokens, text, finish and skip counts; generates what is missing."""
        for chunk in self.pending(setting, items):
            self._generate(chunk)
            if on_chunk:
                on_chunk(chunk)
        out = []
        for chunk in self.chunks(setting, items):
            for i in chunk.items:
                value = self.state.get(self.key(setting, i), chunk.digest)
                assert value is not None  # every pending chunk was generated above
                out.append(value)
        return out

    def _generate(self, chunk: Chunk) -> None:
        setting = chunk.setting
        ids = [self.encode(item) for item in chunk.items]
        engine = self.engine(setting, max(len(p) for p in ids))
        seqs = [engine.add(prompt_ids=p, sampling=self.sampling, skip=item_skip(setting, item.id, self.seed))
                for p, item in zip(ids, chunk.items)]
        while engine.has_work:
            engine.step()
        records = []
        dropped = len(setting.drop_layers)
        for item, seq in zip(chunk.items, seqs):
            result = engine.result(seq)
            stats = result.skip_stats
            n = len(result.token_ids)
            if setting.method == "layer_drop":  # every token (prefill included) misses the dropped layers' FFNs
                skipped, decode_tokens, decode_skipped = dropped * n, n, dropped * n
            else:
                skipped, decode_tokens, decode_skipped = stats.ffn_blocks_skipped, stats.decode_tokens, stats.decode_ffn_blocks_skipped
            records.append((self.key(setting, item), chunk.digest, {
                "tokens": result.token_ids, "text": result.text, "finish": result.finish_reason,
                "generated": n, "skipped": skipped, "decode_tokens": decode_tokens, "decode_skipped": decode_skipped,
            }))
        self.state.put_many(records)  # a chunk is stored whole or not at all

    def encode(self, item: Item) -> list[int]:
        if item.prompt not in self._encoded:
            tokenizer = self.loaded.tokenizer
            if tokenizer.chat_template:
                ids = encode_prompt(tokenizer, None, [{"role": "user", "content": item.prompt}])
            else:  # a base model without a template: a plain question/answer frame
                ids = encode_prompt(tokenizer, f"Question: {item.prompt}\nAnswer:", None)
            self._encoded[item.prompt] = ids
        return self._encoded[item.prompt]

    def engine(self, setting: Setting, prompt_tokens: int) -> Engine:
        need = prompt_tokens + self.sampling.max_new_tokens + 1
        key = (setting.batch_size, setting.drop_layers)
        engine = self._engines.get(key)
        if engine is None or engine.max_seq_len < need:
            if setting.drop_layers and engine is None:
                self._release_dropped()  # one pruned copy at a time: each holds its own fused weights
            loaded = self.loaded
            if setting.drop_layers:
                from ffnskip.evaluation.layerdrop import pruned_model

                loaded = pruned_model(self.loaded, setting.drop_layers)
            engine = Engine(loaded, max_batch=setting.batch_size, max_seq_len=max(need, 128))
            self._engines[key] = engine
        return engine

    def _release_dropped(self) -> None:
        for key in [k for k in self._engines if k[1]]:
            del self._engines[key]
        gc.collect()

    def probe(self, batch_size: int, items: Sequence[Item]) -> tuple[float, float]:
        """(seconds per prefill, seconds per decode step) at this batch size, from 4 dense tokens."""
        from ffnskip.config import DENSE

        setting = Setting("dense", 0.0, DENSE, batch_size=batch_size)
        members = list(items[:batch_size]) or []
        members = (members * (batch_size // max(1, len(members)) + 1))[:batch_size]
        ids = [self.encode(i) for i in members]
        engine = self.engine(setting, max(len(p) for p in ids))
        sampling = SamplingParams(max_new_tokens=4, ignore_eos=True)
        for p in ids:
            engine.add(prompt_ids=p, sampling=sampling)
        started = time.perf_counter()
        engine.step()  # the prefills
        prefill = (time.perf_counter() - started) / len(ids)
        started = time.perf_counter()
        steps = 0
        while engine.has_work:
            engine.step()
            steps += 1
        return prefill, (time.perf_counter() - started) / max(1, steps)


def estimate_seconds(jobs: Sequence[tuple[int, int, int]], timing: dict[int, tuple[float, float]]) -> float:
    """Upper bound for chunks (batch size, items, max_new_tokens): each runs to max_new_tokens
    (EOS ends most chunks earlier)."""
    total = 0.0
    for batch, count, max_new_tokens in jobs:
        prefill, step = timing[batch]
        total += count * prefill + (max_new_tokens - 1) * step
    return total


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
