"""Which rows `ffnskip bench` runs: the default policies per batch size, a calibrated
profile's rows, an `ffnskip eval` output's rows, and how rows group to run side by side."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from ffnskip.config import DENSE, Policy, SkipParams

STATIC_8_OF_30 = (4, 7, 10, 13, 16, 19, 22, 25)


@dataclass(frozen=True)
class BenchConfig:
    name: str
    batch: int
    skip: SkipParams | None  # None = plain transformers generate
    dtype: str = "float32"

    @property
    def key(self) -> tuple[str, int, str]:
        return self.name, self.batch, self.dtype


ALIGNED_QUORUMS = (0.5, 0.75)


def profile_rows(path: str, loaded) -> list[tuple[str, SkipParams]]:
    """Rows for a calibrated profile file: `cal_static`, or `cal_adaptive` plus the same rule
    decided per batch (`cal_aligned_qNN`), so per-row and batch-level skipping compare at
    the calibrated threshold and k."""
    from pathlib import Path

    from ffnskip.errors import InvalidArgument
    from ffnskip.profile import Profile

    try:
        profile = Profile.from_json(Path(path).read_text())
    except OSError as err:
        raise InvalidArgument("profile", f"cannot read {path}: {err.strerror}") from None
    if profile.fingerprint != loaded.fingerprint:  # the same check the decoder makes
        raise InvalidArgument("profile", f"{path} was calibrated for other weights (fingerprint {profile.fingerprint[:12]}...)")
    params = profile.skip_params()
    if params.policy != "adaptive":
        return [(f"cal_{params.policy}", params)]
    return [("cal_adaptive", params)] + [
        (f"cal_aligned_q{round(100 * q)}", replace(params, policy=Policy.ALIGNED, quorum=q)) for q in ALIGNED_QUORUMS]


def eval_rows(path: str, loaded) -> list[tuple[str, SkipParams]]:
    """Rows with exactly the parameters an `ffnskip eval qa|agreement --json` output measured
    quality for, named `method@target` (e.g. aligned_q75@0.25), so speed and quality pair up."""
    from dataclasses import fields
    from pathlib import Path

    from ffnskip.errors import InvalidArgument
    from ffnskip.evaluation.methods import setting_name
    from ffnskip.evaluation.report import load_output

    report = load_output(Path(path), "from_eval")
    if report.get("fingerprint") != loaded.fingerprint:
        raise InvalidArgument("from_eval", f"{path} was measured on other weights")
    known = {f.name for f in fields(SkipParams)}
    rows = []
    for row in report["rows"]:
        params = row.get("params") or {}
        if row.get("label") or row["method"] in ("dense", "layer_drop") or not known.issuperset(params):
            continue  # dense is always a row; layer_drop changes the model, not the skip policy
        params = {**params, "static_layers": tuple(params.get("static_layers", ()))}
        rows.append((setting_name(row), SkipParams(**params)))
    return rows


def default_configs(num_layers: int, batches: list[int], extra: Sequence[tuple[str, SkipParams]] = ()) -> list[BenchConfig]:
    static = tuple(layer for layer in STATIC_8_OF_30 if layer < num_layers)
    adaptive: dict[str, Any] = dict(policy=Policy.ADAPTIVE, cold_start=1, cold_end=num_layers - 1, threshold=0.97,
                                    warm_up=16)
    per_batch = [
        ("dense", DENSE),
        ("static_8", SkipParams(policy=Policy.STATIC, static_layers=static, warm_up=16)),
        ("adaptive_k2", SkipParams(max_skip=2, **adaptive)),
        ("adaptive_k4", SkipParams(max_skip=4, **adaptive)),
        ("adaptive_k8", SkipParams(max_skip=8, **adaptive)),
        ("random_p25", SkipParams(policy=Policy.RANDOM, probability=0.25, warm_up=16)),
        ("non_adaptive_p25", SkipParams(policy=Policy.NON_ADAPTIVE, probability=0.25, cold_start=1, cold_end=num_layers - 1, warm_up=16)),
        ("aligned_k8_q50", SkipParams(**{**adaptive, "policy": Policy.ALIGNED}, max_skip=8, quorum=0.5)),
        ("aligned_k8_q75", SkipParams(**{**adaptive, "policy": Policy.ALIGNED}, max_skip=8, quorum=0.75)),
        *extra,
    ]
    configs = []
    for batch in batches:
        configs.append(BenchConfig("hf_generate", batch, None))
        # at batch 1 aligned is per-row adaptive by definition: no row to align with
        configs += [BenchConfig(name, batch, skip) for name, skip in per_batch if batch > 1 or skip.policy != "aligned"]
    return configs


def run_groups(configs: list[BenchConfig]) -> list[list[BenchConfig]]:
    """Engine rows of one precision and batch size run side by side; other rows alone. In order
    of each group's first row."""
    groups: dict[tuple, list[BenchConfig]] = {}
    for config in configs:
        key = (config.dtype, config.batch) if config.skip is not None else config.key
        groups.setdefault(key, []).append(config)
    return list(groups.values())
