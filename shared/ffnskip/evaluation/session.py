"""What every `ffnskip eval` command shares: the model, the state file, the calibration,
the settings, the time estimate and the progress bars."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ffnskip.evaluation.calibrated_settings import Calibrator
from ffnskip.evaluation.data import Item, load_prompt_items
from ffnskip.evaluation.item_generation import ItemGenerator, estimate_seconds, log
from ffnskip.evaluation.methods import TUNED, Setting, base_method, quorum_of, settings_for, split_spec, targets_of
from ffnskip.evaluation.state import StateFile
from ffnskip.settings import cache_root


@dataclass(frozen=True)
class Options:
    model: str = "smollm2-135m"
    device: str = "auto"
    dtype: str = "auto"
    out: Path | None = None  # the state file; None = nothing is kept
    seed: int = 0
    batch_size: int = 16
    aligned_batch: int = 8
    quorum: float = 0.5
    warm_up: int = 16
    calibration_data: str = "calibration"
    calibration_prompts: int = 24
    calibration_tokens: int = 64
    plan_only: bool = False
    progress: bool = True


class Session:
    def __init__(self, options: Options) -> None:
        from ffnskip.engine import load_model

        self.options = options
        prompts = [i.prompt for i in load_prompt_items(options.calibration_data, limit=options.calibration_prompts)]
        self.loaded = load_model(options.model, device=options.device, dtype=options.dtype, cache_dir=cache_root(os.environ))
        self.state = StateFile(options.out)
        self._bar: Any | None = None  # the calibration's tqdm bar while it runs
        self.calibrator = Calibrator(self.loaded, prompts, options.calibration_tokens, options.aligned_batch,
                                     self.state, advance=self._calibration_step)
        self.timing: dict[int, tuple[float, float]] = {}

    # -- settings ---------------------------------------------------------------------------

    def settings(self, methods: Sequence[str], targets: Sequence[float], warm_up: int | None = None) -> list[Setting]:
        o = self.options
        return settings_for(methods, targets, self.calibrator, warm_up=o.warm_up if warm_up is None else warm_up,
                            batch_size=o.batch_size, aligned_batch=o.aligned_batch, quorum=o.quorum)

    def calibration_todo(self, methods: Sequence[str], targets: Sequence[float], warm_up: int | None = None) -> int:
        """Chunks the calibration still has to generate for these methods (an estimate)."""
        warm = self.options.warm_up if warm_up is None else warm_up
        if all(m == "dense" for m in methods):
            return 0
        names = [split_spec(m)[0] for m in methods]
        tunings = [(base_method(n), t, warm, quorum_of(n, self.options.quorum))
                   for n, m in zip(names, methods) if base_method(n) in TUNED for t in targets_of(m, targets)]
        observe = any(base_method(n) not in ("dense", "layer_drop") for n in names)  # cold regions, similarity
        return self.calibrator.chunks_to_generate(tunings, observe=observe, importance="layer_drop" in names)

    # -- time estimate and progress -----------------------------------------------------------

    def prepare(self, what: str, runs: Sequence[tuple[ItemGenerator, Sequence[Item]]], expected_batches: Sequence[int],
                calibration_chunks: int, build: Callable[[], list[Setting]]) -> list[Setting] | None:
        """Estimate, calibrate (through `build`), estimate what remains; None with --plan."""
        o = self.options
        if calibration_chunks:  # settings need the calibration first: estimate as a fresh run
            self._measure(runs, set(expected_batches) | {o.aligned_batch})
            jobs = [(b, len(chunk), r.sampling.max_new_tokens) for r, items in runs for b in expected_batches
                    for chunk in _chunk_sizes(len(items), b)]
            self._announce(what, calibration_chunks, jobs)
            if o.plan_only:
                return None
        settings = build()
        self.close_calibration_bar()
        jobs = [(c.setting.batch_size, len(c.items), r.sampling.max_new_tokens)
                for r, items in runs for s in settings for c in r.pending(s, items)]
        if not jobs:
            log(f"{what}: every result is in the state file; nothing to generate")
        elif not calibration_chunks or o.plan_only:
            self._measure(runs, {b for b, _, _ in jobs})
            self._announce(what, 0, jobs)
        return None if o.plan_only else settings

    def _measure(self, runs: Sequence[tuple[ItemGenerator, Sequence[Item]]], batch_sizes) -> None:
        generator, items = runs[0]
        for size in sorted(batch_sizes):
            if size not in self.timing:
                self.timing[size] = generator.probe(size, items)

    def _announce(self, what: str, calibration_chunks: int, jobs: Sequence[tuple[int, int, int]]) -> None:
        batch = self.options.aligned_batch
        prefill, step = self.timing.get(batch) or next(iter(self.timing.values()))
        calibration_s = calibration_chunks * (batch * prefill + self.options.calibration_tokens * step)
        generation_s = estimate_seconds(jobs, self.timing)
        speeds = ", ".join(f"batch {b}: {p * 1000:.0f} ms per prefill, {s * 1000:.0f} ms per step"
                           for b, (p, s) in sorted(self.timing.items()))
        calibration = f" and about {calibration_chunks} calibration chunks" if calibration_chunks else ""
        log(f"{what}: {len(jobs)} chunks to generate{calibration}; measured {speeds}")
        log(f"estimate: at most {(calibration_s + generation_s) / 60:.1f} min (calibration {calibration_s / 60:.1f}, "
            f"generation {generation_s / 60:.1f}; it assumes every chunk runs to max_new_tokens, EOS ends most earlier)")

    def _calibration_step(self, phase: str) -> None:
        if self._bar is None:
            self._bar = self._new_bar(total=None, unit="chunk", desc=phase)
        self._bar.set_description(phase)
        self._bar.update(1)

    def close_calibration_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def run(self, generator: ItemGenerator, settings: Sequence[Setting],
            items: Sequence[Item]) -> dict[str, list[dict]]:
        """Generate what is missing for every setting (one progress bar) and return records per setting key."""
        pending = {s.key: generator.pending(s, items) for s in settings}
        total = sum(len(c.items) for chunks in pending.values() for c in chunks)
        bar = self._new_bar(total=total, unit="item", desc=f"{generator.task}")
        out = {}
        try:
            for setting in settings:
                bar.set_description(f"{generator.task} {setting.key}")
                out[setting.key] = generator.results(setting, items, on_chunk=lambda c: bar.update(len(c.items)))
        finally:
            bar.close()
        return out

    def _new_bar(self, total: int | None, unit: str, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=True,
                    disable=not self.options.progress, leave=False)

    # -- what the JSON outputs carry ------------------------------------------------------------

    def header(self, command: str, argv: Sequence[str], data: str, items: Sequence[Item], max_new_tokens: int) -> dict:
        from ffnskip.evaluation.data import items_digest

        return {"command": command, "argv": list(argv), "model": self.loaded.model_id,
                "fingerprint": self.loaded.fingerprint, "num_layers": self.loaded.num_layers,
                "data": data, "data_digest": items_digest(list(items)), "n_items": len(items),
                "max_new_tokens": max_new_tokens, "seed": self.options.seed, "warm_up": self.options.warm_up,
                "batch_size": self.options.batch_size, "aligned_batch": self.options.aligned_batch,
                "machine": machine_info(self.loaded)}


def _chunk_sizes(count: int, batch: int) -> list[range]:
    return [range(start, min(count, start + batch)) for start in range(0, count, batch)]


def machine_info(loaded) -> dict:
    """Stable facts about where it ran (no timestamps: a rerun must give the same JSON)."""
    import os

    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"platform": platform.platform(terse=True), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "device": str(loaded.device), "dtype": str(loaded.dtype).removeprefix("torch.")}
    if loaded.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(loaded.device)
    return info
