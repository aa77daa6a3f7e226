"""A valid test profile factory, and the `substitutes` record of a substitute set's bytes."""

from __future__ import annotations

import hashlib


def _layer_stats(layer: int, mean: float):  # type: ignore[no-untyped-def]
    from ffnskip.profile import LayerStats

    return LayerStats(layer=layer, mean=mean, std=0.02, min=mean - 0.1, p05=mean - 0.05, p25=mean - 0.02,
                      p50=mean, p75=mean + 0.005, p95=mean + 0.01, max=min(1.0, mean + 0.02), count=512)


def build_profile(**overrides):  # type: ignore[no-untyped-def]
    """A valid 6-layer profile; keyword arguments replace fields."""
    from ffnskip.profile import Profile

    num_layers = overrides.pop("num_layers", 6)
    means = [0.5] + [0.96] * (num_layers - 2) + [0.6]
    fields = dict(
        model_id="tiny-llama",
        fingerprint="ab12cd34",
        created_at="2025-01-02T03:04:05.000006Z",
        calibration={"digest": "0" * 64, "size": 8, "tokens_per_prompt": 64},
        num_layers=num_layers,
        layers=[_layer_stats(i, m) for i, m in enumerate(means)],
        cold_start=1,
        cold_end=num_layers - 1,
        threshold=0.95,
        max_skip=2,
        warm_up=16,
        target_skip_ratio=0.25,
        measured_skip_ratio=0.2,
        measured_decode_skip_ratio=0.22,
        measured_agreement=0.9,
    )
    fields.update(overrides)
    return Profile(**fields)


def substitutes_record(blob: bytes, layers: list[int], kind: str = "bias") -> dict:
    """A profile's `substitutes` field for `blob` (SubstituteSet.to_bytes) on `layers`."""
    return {"kind": kind, "layers": sorted(layers), "bytes": len(blob), "digest": hashlib.sha256(blob).hexdigest()}
