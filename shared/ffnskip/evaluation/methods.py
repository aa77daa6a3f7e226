"""Methods under evaluation: a name and a target decode skip ratio -> one Setting.

| method | what runs |
|---|---|
| dense | nothing skipped |
| random | every FFN with probability p = target |
| non_adaptive | hot-region FFNs with probability p = target * L / hot layers |
| adaptive | the paper's rule, (threshold, k) tuned to the target with real runs |
| aligned[_qNN] | adaptive with batch-level votes, quorum NN%, run in batches of 8 |
| adaptive_window | candidate better rule: adaptive inside the calibrated most-redundant window |
| static | a fixed FFN set chosen by the calibrator's rule (tuning.static_candidates), checked by real runs |
| layer_drop | ShortGPT: whole layers (attention too) of lowest Block Influence removed |

Every FFN-skip method shares one warm-up so methods differ only in what they skip.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from ffnskip.config import DENSE, Policy, SkipParams
from ffnskip.errors import InvalidArgument
from ffnskip.evaluation.state import digest_of

METHODS: tuple[str, ...] = ("dense", "random", "non_adaptive", "adaptive", "aligned", "adaptive_window",
                            "static", "layer_drop")
TUNED = ("adaptive", "aligned", "adaptive_window", "static")  # parameters chosen by real runs
SEEDED = ("random", "non_adaptive")  # draws seeded per item from --seed
_ALIGNED = re.compile(r"^aligned_q(\d{1,3})$")


@dataclass(frozen=True)
class Setting:
    """One evaluated configuration: a method at a target ratio (optionally a variant label)."""

    method: str
    target: float  # 0 for dense
    skip: SkipParams
    drop_layers: tuple[int, ...] = ()  # layer_drop only
    batch_size: int = 16
    label: str = ""  # e.g. "warm_up=8" in the warm-up ablation
    calibration: dict = field(default_factory=dict, compare=False)  # held-out numbers, for the report

    @property
    def key(self) -> str:
        """Unique per result set: commands run at other warm-ups never overwrite each other's records."""
        return f"{self.method}@{self.target:.3f}" + (f"/w{self.warm_up}" if self.warm_up_applies else "")

    @property
    def warm_up_applies(self) -> bool:
        return self.method not in ("dense", "layer_drop")  # dense never skips; layer_drop has no warm-up

    @property
    def warm_up(self) -> int:
        return self.skip.warm_up if self.warm_up_applies else 0

    def digest(self, fingerprint: str, max_new_tokens: int, seed: int) -> str:
        return digest_of(fingerprint, max_new_tokens, self.params(), self.batch_size,
                         seed if self.method in SEEDED else None)

    def params(self) -> dict:
        data = asdict(self.skip)
        data["static_layers"] = list(data["static_layers"])
        if self.method == "layer_drop":
            return {"drop_layers": list(self.drop_layers)}
        return data


def parse_methods(text: str) -> list[str]:
    """Comma-separated method specs; `name@t1/t2` runs that method at its own targets only."""
    specs = [n.strip() for n in text.split(",") if n.strip()]
    for spec in specs:
        name, own = split_spec(spec)
        if name not in METHODS and not _ALIGNED.match(name):
            raise InvalidArgument("methods", f"unknown method {name!r}; expected some of {', '.join(METHODS)} (or aligned_qNN)")
        match = _ALIGNED.match(name)
        if match and not 0 < int(match.group(1)) <= 100:
            raise InvalidArgument("methods", f"{name}: the quorum must be in (0, 100] percent")
        if own is not None and name == "dense":
            raise InvalidArgument("methods", "dense takes no targets")
    if not specs:
        raise InvalidArgument("methods", "name at least one method")
    names = [split_spec(s)[0] for s in specs]
    if len(set(names)) != len(names):
        raise InvalidArgument("methods", f"a method is named twice in {text!r}")
    return ["dense"] + [s for s in specs if s != "dense"]  # dense is every comparison's reference


def split_spec(spec: str) -> tuple[str, list[float] | None]:
    if "@" not in spec:
        return spec, None
    name, targets = spec.split("@", 1)
    return name, parse_targets(targets.replace("/", ","))


def targets_of(spec: str, targets: Sequence[float]) -> list[float]:
    name, own = split_spec(spec)
    return [0.0] if name == "dense" else list(own if own is not None else targets)


def parse_targets(text: str) -> list[float]:
    try:
        targets = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InvalidArgument("targets", f"expected comma-separated ratios like 0.05,0.15, got {text!r}") from None
    if not targets or any(not 0.0 < t <= 0.9 for t in targets):
        raise InvalidArgument("targets", f"every target skip ratio must be in (0, 0.9], got {text!r}")
    return sorted(set(targets))


def quorum_of(method: str, default: float) -> float:
    match = _ALIGNED.match(method)
    return int(match.group(1)) / 100 if match else default


def base_method(method: str) -> str:
    return "aligned" if _ALIGNED.match(method) else method


def build_setting(method: str, target: float, calibrator, warm_up: int, batch_size: int,
                  aligned_batch: int, quorum: float) -> Setting:
    """`calibrator` (evaluation.calibrated_settings.Calibrator) supplies the measured model facts."""
    kind = base_method(method)
    if kind == "dense":
        return Setting("dense", 0.0, DENSE, batch_size=batch_size)  # one dense run for every warm-up
    num_layers = calibrator.num_layers
    if kind == "layer_drop":  # needs the layers' Block Influence only, no observe run
        from ffnskip.evaluation.layerdrop import layers_to_drop

        drop = layers_to_drop(calibrator.importance(), round_half_up(target * num_layers))
        return Setting("layer_drop", target, SkipParams(policy=Policy.DENSE, warm_up=0), drop_layers=drop, batch_size=batch_size)
    obs = calibrator.observation()
    cold_start, cold_end = obs["cold_start"], obs["cold_end"]
    common = dict(cold_start=cold_start, cold_end=cold_end, warm_up=warm_up)
    if kind == "random":
        skip = SkipParams(policy=Policy.RANDOM, probability=target, **common)
    elif kind == "non_adaptive":
        skip = SkipParams(policy=Policy.NON_ADAPTIVE, probability=min(1.0, target * num_layers / (cold_end - cold_start)), **common)
    else:
        q = quorum_of(method, quorum)
        tuned = calibrator.tuned(kind, target, warm_up, q)
        skip = SkipParams(**{**tuned["params"], "static_layers": tuple(tuned["params"]["static_layers"])})
        return Setting(method, target, skip, batch_size=aligned_batch if kind == "aligned" else batch_size,
                       calibration=tuned["held_out"])
    return Setting(method, target, skip, batch_size=batch_size)


def window_candidates(means: Sequence[float], target: float, num_layers: int, cold_start: int,
                      cold_end: int, fire_rates: Sequence[float] = (1.0, 0.8)) -> list[tuple[int, int]]:
    """Hot windows [a, b) for adaptive_window: b - a - 1 layers are skipped when the token fires at
    a, enough for the target at the given fire rates; a is placed where the layers a run would
    skip have the highest mean similarity (the most redundant stretch, not "the next k")."""
    import math

    windows = []
    for rate in fire_rates:
        width = min(cold_end - cold_start, math.ceil(target * num_layers / rate) + 1)
        starts = range(cold_start, cold_end - width + 1)
        start = max(starts, key=lambda a: (sum(means[a + 1:a + width]) / max(1, width - 1), -a))
        if (start, start + width) not in windows:
            windows.append((start, start + width))
    return windows


def setting_name(row: dict) -> str:
    """`method@target` of an eval --json row ("dense" alone): how bench rows and quality rows pair up."""
    return "dense" if row["method"] == "dense" else f"{row['method']}@{row['target_skip']:.2f}"


def round_half_up(value: float) -> int:
    return int(value + 0.5)


def with_warm_up(setting: Setting, warm_up: int) -> Setting:
    return replace(setting, skip=replace(setting.skip, warm_up=warm_up), label=f"warm_up={warm_up}")


def item_skip(setting: Setting, item_id: str, seed: int) -> SkipParams:
    """Random baselines draw per item from (seed, item id): independent across items, repeatable."""
    if setting.method not in SEEDED:
        return setting.skip
    return replace(setting.skip, seed=int(digest_of(seed, item_id)[:8], 16))


def settings_for(methods: Sequence[str], targets: Sequence[float], calibrator, **kwargs) -> list[Setting]:
    return [build_setting(split_spec(spec)[0], target, calibrator, **kwargs)
            for spec in methods for target in targets_of(spec, targets)]


def describe(setting: Setting) -> str:
    s = setting.skip
    if setting.method == "dense":
        return "nothing skipped"
    if setting.method == "layer_drop":
        return f"layers {list(setting.drop_layers)} removed"
    if s.policy in ("random", "non_adaptive"):
        return f"p={s.probability:.3f}, hot [{s.cold_start}, {s.cold_end}), warm-up {s.warm_up}"
    if s.policy == "static":
        return f"FFNs {list(s.static_layers)}, warm-up {s.warm_up}"
    k = "to cold_end" if s.max_skip is None else s.max_skip
    quorum = f", quorum {s.quorum:g}" if s.policy == "aligned" else ""
    return f"threshold {s.threshold:.4f}, k {k}, hot [{s.cold_start}, {s.cold_end}){quorum}, warm-up {s.warm_up}"
