"""The calibration profile: what the calibrator measured and the skip parameters it chose.

A Profile is immutable and valid by construction (__post_init__ checks every field);
`from_dict`/`from_json` additionally reject missing, extra and wrong-typed fields, so
a profile read back from Redis is either exactly right or an InvalidArgument that
names the field ("profile.<field>") - never a KeyError or TypeError.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from typing import Any

from ffnskip.config import Policy, SkipParams
from ffnskip.errors import InvalidArgument

SCHEMA_VERSION = 1
CALIBRATION_KEYS = ("digest", "size", "tokens_per_prompt")
QUALITY_KEYS = ("kl", "top_match", "relative_nll", "max_kl", "max_relative_nll", "within_budget")
_STAT_ORDER = ("min", "p05", "p25", "p50", "p75", "p95", "max")
# the engine's substitute kinds (ffnskip.engine.substitutes.KINDS, spelled out: reading a profile
# needs no torch; a unit test keeps the two equal)
SUBSTITUTE_KINDS = ("bias", "lowrank", "linear")
SUBSTITUTE_KEYS = ("kind", "layers", "bytes", "digest")
# a bound on the blob a profile may carry (a 30-layer model's full maps in float32 are ~ 300 MiB:
# well past what a cheap substitute is for, and what one Redis value should hold)
MAX_SUBSTITUTE_BYTES = 64 * 2**20
_HEX = frozenset("0123456789abcdef")


def utc_now_iso() -> str:
    """Now as ISO-8601 UTC with a 'Z' suffix, the form created_at uses."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # bool is an int subclass


def _is_real(value: object) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _require_int(name: str, value: object, minimum: int = 0) -> None:
    if not _is_int(value):
        raise InvalidArgument(name, f"must be an integer, got {type(value).__name__}")
    if value < minimum:  # type: ignore[operator]
        raise InvalidArgument(name, f"must be >= {minimum}, got {value}")


def _require_real(name: str, value: object, low: float, high: float, low_open: bool = False) -> None:
    if not _is_real(value):
        raise InvalidArgument(name, f"must be a finite number, got {value!r}")
    too_low = value <= low if low_open else value < low  # type: ignore[operator]
    if too_low or value > high:  # type: ignore[operator]
        bracket = "(" if low_open else "["
        raise InvalidArgument(name, f"must be in {bracket}{low}, {high}], got {value}")


def _require_str(name: str, value: object, allow_empty: bool = False) -> None:
    if not isinstance(value, str):
        raise InvalidArgument(name, f"must be a string, got {type(value).__name__}")
    if not allow_empty and not value:
        raise InvalidArgument(name, "must not be empty")


def _require_hex(name: str, value: object) -> None:
    _require_str(name, value)
    try:
        int(str(value), 16)  # a str: checked above
    except ValueError:
        raise InvalidArgument(name, f"must be a hex string, got {value!r}") from None


def _require_utc_timestamp(name: str, value: object) -> None:
    _require_str(name, value)
    try:
        parsed = datetime.fromisoformat(value)  # type: ignore[arg-type]
    except ValueError:
        raise InvalidArgument(name, f"must be an ISO-8601 timestamp, got {value!r}") from None
    if parsed.utcoffset() is None or parsed.utcoffset().total_seconds() != 0:  # type: ignore[union-attr]
        raise InvalidArgument(name, f"must be in UTC (Z or +00:00), got {value!r}")


def _check_keys(where: str, data: object, expected: Sequence[str], optional: Sequence[str] = ()) -> Mapping[str, Any]:
    """Exactly the expected keys (`optional` ones may be absent): a missing or unknown key is a
    schema error, named."""
    if not isinstance(data, Mapping):
        raise InvalidArgument(where, f"must be an object, got {type(data).__name__}")
    missing = [k for k in expected if k not in data and k not in optional]
    if missing:
        raise InvalidArgument(f"{where}.{missing[0]}", "missing")
    extra = sorted(str(k) for k in data if k not in expected)
    if extra:
        raise InvalidArgument(f"{where}.{extra[0]}", "unknown field")
    return data


@dataclass(frozen=True)
class LayerStats:
    """Cosine similarity cos(h, h + ffn(h)) of one layer over the calibration tokens."""

    layer: int
    mean: float
    std: float
    min: float
    p05: float
    p25: float
    p50: float
    p75: float
    p95: float
    max: float
    count: int

    def __post_init__(self) -> None:
        _require_int("layer", self.layer)
        _require_int("count", self.count, minimum=1)
        for name in ("mean", *_STAT_ORDER):
            _require_real(name, getattr(self, name), -1.0, 1.0)
        _require_real("std", self.std, 0.0, 2.0)
        # Quantiles must be ordered; a shuffled row means a bug in whoever wrote it.
        for lower, upper in zip(_STAT_ORDER, _STAT_ORDER[1:]):
            if getattr(self, lower) > getattr(self, upper):
                raise InvalidArgument(upper, f"must be >= {lower} ({getattr(self, lower)}), got {getattr(self, upper)}")
        if not (self.min <= self.mean <= self.max):
            raise InvalidArgument("mean", f"must lie in [min, max] = [{self.min}, {self.max}], got {self.mean}")

    @classmethod
    def from_dict(cls, data: object, where: str = "layer_stats") -> LayerStats:
        names = [f.name for f in fields(cls)]
        checked = _check_keys(where, data, names)
        try:
            return cls(**{name: checked[name] for name in names})
        except InvalidArgument as err:
            raise InvalidArgument(f"{where}.{err.field}", err.problem) from None


@dataclass(frozen=True)
class Profile:
    """One calibrated, versioned profile of one model (README: "Profile schema")."""

    model_id: str
    fingerprint: str
    created_at: str
    calibration: dict
    num_layers: int
    layers: tuple[LayerStats, ...]
    cold_start: int
    cold_end: int
    threshold: float
    max_skip: int | None
    warm_up: int
    target_skip_ratio: float
    measured_skip_ratio: float
    measured_decode_skip_ratio: float
    measured_agreement: float
    policy: Policy = Policy.ADAPTIVE  # a policy's name is accepted and made a Policy
    static_layers: tuple[int, ...] = ()
    # QUALITY_KEYS: what skipping kept of dense after the warm-up, and the budget (if any)
    # it was calibrated to; absent from profiles calibrated before it was measured
    quality: dict = field(default_factory=dict)
    # SUBSTITUTE_KEYS: what replaces its skipped FFNs (a SubstituteSet stored beside it, this
    # records its kind, layers, size and sha256); empty = plain skips, as every older profile
    substitutes: dict = field(default_factory=dict)
    version: int = 0  # 0 = not yet published; the store allocates the real number
    job_id: str = ""
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        # Copies in canonical, immutable-ish form so a caller's list cannot change us later.
        object.__setattr__(self, "layers", tuple(self.layers) if isinstance(self.layers, (list, tuple)) else self.layers)
        if isinstance(self.static_layers, (list, tuple)):
            object.__setattr__(self, "static_layers", tuple(self.static_layers))
        if isinstance(self.calibration, Mapping):
            object.__setattr__(self, "calibration", dict(self.calibration))
        if isinstance(self.quality, Mapping):
            object.__setattr__(self, "quality", dict(self.quality))
        if isinstance(self.substitutes, Mapping):  # layers as JSON gives them back, so round trips compare equal
            layers = self.substitutes.get("layers")
            substitutes = {**self.substitutes, **({"layers": list(layers)} if isinstance(layers, tuple) else {})}
            object.__setattr__(self, "substitutes", substitutes)
        self._validate_identity()
        self._validate_layers()
        self._validate_params()
        self._validate_measurements()
        self._validate_substitutes()

    def _validate_identity(self) -> None:
        if not _is_int(self.schema_version) or self.schema_version != SCHEMA_VERSION:
            raise InvalidArgument("profile.schema_version", f"must be {SCHEMA_VERSION}, got {self.schema_version!r}")
        _require_str("profile.model_id", self.model_id)
        _require_hex("profile.fingerprint", self.fingerprint)
        _require_int("profile.version", self.version)
        _require_utc_timestamp("profile.created_at", self.created_at)
        _require_str("profile.job_id", self.job_id, allow_empty=True)
        calibration = _check_keys("profile.calibration", self.calibration, CALIBRATION_KEYS)
        _require_hex("profile.calibration.digest", calibration["digest"])
        if len(calibration["digest"]) != 64:
            raise InvalidArgument("profile.calibration.digest", "must be a sha256 hex digest (64 characters)")
        _require_int("profile.calibration.size", calibration["size"], minimum=1)
        _require_int("profile.calibration.tokens_per_prompt", calibration["tokens_per_prompt"], minimum=1)

    def _validate_layers(self) -> None:
        _require_int("profile.num_layers", self.num_layers, minimum=1)
        if not isinstance(self.layers, tuple):
            raise InvalidArgument("profile.layers", f"must be a list, got {type(self.layers).__name__}")
        if len(self.layers) != self.num_layers:
            raise InvalidArgument("profile.layers", f"must have num_layers ({self.num_layers}) entries, got {len(self.layers)}")
        for index, stats in enumerate(self.layers):
            if not isinstance(stats, LayerStats):
                raise InvalidArgument(f"profile.layers[{index}]", f"must be LayerStats, got {type(stats).__name__}")
            if stats.layer != index:
                raise InvalidArgument(f"profile.layers[{index}].layer", f"must be {index}, got {stats.layer}")

    def _validate_params(self) -> None:
        _require_int("profile.cold_start", self.cold_start)
        _require_int("profile.cold_end", self.cold_end)
        if not (self.cold_start < self.cold_end <= self.num_layers):
            raise InvalidArgument(
                "profile.cold_end",
                f"must satisfy cold_start ({self.cold_start}) < cold_end <= num_layers ({self.num_layers}), got {self.cold_end}",
            )
        object.__setattr__(self, "policy", Policy.parse(self.policy, "profile.policy"))
        _require_real("profile.threshold", self.threshold, 0.0, 1.0, low_open=True)
        if self.max_skip is not None:
            _require_int("profile.max_skip", self.max_skip)
        _require_int("profile.warm_up", self.warm_up)
        if not isinstance(self.static_layers, tuple):
            raise InvalidArgument("profile.static_layers", f"must be a list, got {type(self.static_layers).__name__}")
        for index, layer in enumerate(self.static_layers):
            _require_int(f"profile.static_layers[{index}]", layer)
            if layer >= self.num_layers:
                raise InvalidArgument(f"profile.static_layers[{index}]", f"must be < num_layers ({self.num_layers}), got {layer}")

    def _validate_measurements(self) -> None:
        _require_real("profile.target_skip_ratio", self.target_skip_ratio, 0.0, 0.9, low_open=True)
        for name in ("measured_skip_ratio", "measured_decode_skip_ratio", "measured_agreement"):
            _require_real(f"profile.{name}", getattr(self, name), 0.0, 1.0)
        if not isinstance(self.quality, dict):
            raise InvalidArgument("profile.quality", f"must be an object, got {type(self.quality).__name__}")
        if self.quality:
            quality = _check_keys("profile.quality", self.quality, QUALITY_KEYS, optional=("max_kl", "max_relative_nll"))
            for name in ("kl", "relative_nll", "max_kl", "max_relative_nll"):
                if name in quality:
                    _require_real(f"profile.quality.{name}", quality[name], 0.0, 1e6)
            _require_real("profile.quality.top_match", quality["top_match"], 0.0, 1.0)
            if not isinstance(quality["within_budget"], bool):
                raise InvalidArgument("profile.quality.within_budget", "must be true or false")

    def _validate_substitutes(self) -> None:
        if not isinstance(self.substitutes, dict):
            raise InvalidArgument("profile.substitutes", f"must be an object, got {type(self.substitutes).__name__}")
        if not self.substitutes:
            return
        substitutes = _check_keys("profile.substitutes", self.substitutes, SUBSTITUTE_KEYS)
        if substitutes["kind"] not in SUBSTITUTE_KINDS:
            raise InvalidArgument("profile.substitutes.kind", f"must be one of {', '.join(SUBSTITUTE_KINDS)}, "
                                  f"got {substitutes['kind']!r}")
        layers = substitutes["layers"]
        if not isinstance(layers, list) or not layers:
            raise InvalidArgument("profile.substitutes.layers", "must be a non-empty list of skipped layers")
        for index, layer in enumerate(layers):
            where = f"profile.substitutes.layers[{index}]"
            _require_int(where, layer)
            if layer not in self.static_layers:  # a substitute replaces a skipped FFN, never a running one
                raise InvalidArgument(where, f"must be one of static_layers {list(self.static_layers)}, got {layer}")
            if index and layer <= layers[index - 1]:
                raise InvalidArgument(where, f"must be sorted without repeats, got {layer} after {layers[index - 1]}")
        _require_int("profile.substitutes.bytes", substitutes["bytes"], minimum=1)
        if substitutes["bytes"] > MAX_SUBSTITUTE_BYTES:
            raise InvalidArgument("profile.substitutes.bytes", f"must be <= {MAX_SUBSTITUTE_BYTES}, got {substitutes['bytes']}")
        digest = substitutes["digest"]
        if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX:
            raise InvalidArgument("profile.substitutes.digest", "must be a sha256 hex digest (64 lowercase characters)")

    def check_substitutes(self, blob: bytes | None) -> None:
        """That `blob` is the substitute set this profile records (none for plain skips): its size
        and sha256. InvalidArgument naming `substitutes` otherwise (the store refuses to publish
        such a pair; a decoder refuses to serve it)."""
        if not self.substitutes:
            if blob is not None:
                raise InvalidArgument("substitutes", "given, but the profile records none")
            return
        if blob is None:
            raise InvalidArgument("substitutes", f"missing: the profile records {self.substitutes['bytes']} bytes")
        if len(blob) != self.substitutes["bytes"]:
            raise InvalidArgument("substitutes", f"{len(blob)} bytes, the profile records {self.substitutes['bytes']}")
        if hashlib.sha256(blob).hexdigest() != self.substitutes["digest"]:
            raise InvalidArgument("substitutes", "sha256 differs from the digest the profile records")

    @property
    def within_budget(self) -> bool:
        """Whether its measured quality keeps the budget it was calibrated to (a profile with no
        budget keeps it by definition)."""
        return bool(self.quality.get("within_budget", True))

    def budget_verdict(self) -> str:
        """Its measured quality against its budget, in words (for errors and logs)."""
        q = self.quality
        if "max_kl" not in q:
            return "calibrated to a target ratio, no budget"
        return (f"kl {q['kl']:.4f} {'<=' if q['kl'] <= q['max_kl'] else '>'} {q['max_kl']:g}, relative NLL "
                f"{q['relative_nll']:.3f} {'<=' if q['relative_nll'] <= q['max_relative_nll'] else '>'} {q['max_relative_nll']:g}")

    # --- serialisation -------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["layers"] = [asdict(stats) for stats in self.layers]
        data["static_layers"] = list(self.static_layers)
        return data

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace, so equal profiles give equal bytes."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_dict(cls, data: object) -> Profile:
        names = [f.name for f in fields(cls)]
        checked = dict(_check_keys("profile", data, names, optional=("quality", "substitutes")))
        raw_layers = checked["layers"]
        if not isinstance(raw_layers, list):
            raise InvalidArgument("profile.layers", f"must be a list, got {type(raw_layers).__name__}")
        checked["layers"] = tuple(LayerStats.from_dict(item, f"profile.layers[{i}]") for i, item in enumerate(raw_layers))
        if not isinstance(checked["static_layers"], list):
            raise InvalidArgument("profile.static_layers", f"must be a list, got {type(checked['static_layers']).__name__}")
        if not isinstance(checked["calibration"], dict):
            raise InvalidArgument("profile.calibration", f"must be an object, got {type(checked['calibration']).__name__}")
        return cls(**checked)

    @classmethod
    def from_json(cls, text: str | bytes) -> Profile:
        try:
            data = json.loads(text, parse_constant=_reject_constant)
        except (ValueError, TypeError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise InvalidArgument("profile", f"malformed JSON: {err}") from None
        return cls.from_dict(data)

    # --- use -----------------------------------------------------------------------

    def skip_params(self) -> SkipParams:
        """The decode loop's parameters; validated again by SkipParams."""
        return SkipParams(
            policy=self.policy,
            cold_start=self.cold_start,
            cold_end=self.cold_end,
            threshold=float(self.threshold),
            max_skip=self.max_skip,
            warm_up=self.warm_up,
            static_layers=self.static_layers,
        ).resolved(self.num_layers)

    def with_version(self, version: int) -> Profile:
        return replace(self, version=version)


def _reject_constant(name: str) -> float:
    # json accepts NaN/Infinity by default; a profile never legitimately holds them.
    raise ValueError(f"non-finite number {name} is not allowed")


__all__ = ["MAX_SUBSTITUTE_BYTES", "SUBSTITUTE_KINDS", "LayerStats", "Profile", "SCHEMA_VERSION", "utc_now_iso"]
