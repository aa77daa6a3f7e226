"""Profile schema: round trip, strict validation that names the field, malformed JSON."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from ffnskip.calibration.plots import plot_layer_similarity
from ffnskip.config import SkipParams
from ffnskip.errors import InvalidArgument
from ffnskip.profile import LayerStats, Profile
from tests.helpers.profiles import build_profile


def test_round_trip_is_exact_and_stable() -> None:
    profile = build_profile(static_layers=[3, 2], max_skip=None, job_id="job-1", version=4)
    text = profile.to_json()
    again = Profile.from_json(text)
    assert again == profile
    assert again.to_json() == text
    assert list(json.loads(text)) == sorted(json.loads(text))  # keys sorted
    assert isinstance(again.layers[0], LayerStats)
    assert again.static_layers == (3, 2)


def test_round_trip_accepts_bytes() -> None:
    profile = build_profile()
    assert Profile.from_json(profile.to_json().encode()) == profile


def test_skip_params_and_with_version() -> None:
    profile = build_profile(threshold=0.97, max_skip=3, warm_up=8)
    assert profile.skip_params() == SkipParams(
        policy="adaptive", cold_start=1, cold_end=5, threshold=0.97, max_skip=3, warm_up=8
    )
    published = profile.with_version(7)
    assert published.version == 7 and profile.version == 0
    assert published.to_json() != profile.to_json()


def test_construction_validates() -> None:
    with pytest.raises(InvalidArgument) as err:
        build_profile(threshold=1.5)
    assert err.value.field == "profile.threshold"


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def mutate(data: dict) -> None:
        target, *rest = path.split(".")
        if rest:
            node = data[target]
            for part in rest[:-1]:
                node = node[int(part)] if isinstance(node, list) else node[part]
            key = rest[-1]
            node[int(key) if isinstance(node, list) else key] = value
        else:
            data[target] = value

    return mutate


def _delete(path: str) -> Callable[[dict], None]:
    def mutate(data: dict) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        del node[last]

    return mutate


BAD_FIELDS = [
    (_delete("threshold"), "profile.threshold"),
    (_set("bogus", 1), "profile.bogus"),
    (_set("threshold", "0.9"), "profile.threshold"),
    (_set("threshold", 0.0), "profile.threshold"),
    (_set("threshold", 1.01), "profile.threshold"),
    (_set("threshold", True), "profile.threshold"),
    (_set("cold_end", 7), "profile.cold_end"),
    (_set("cold_start", 5), "profile.cold_end"),
    (_set("cold_start", -1), "profile.cold_start"),
    (_set("cold_start", 1.0), "profile.cold_start"),
    (_set("num_layers", 5), "profile.layers"),
    (_set("num_layers", "6"), "profile.num_layers"),
    (_set("layers", {}), "profile.layers"),
    (_set("layers.2.layer", 3), "profile.layers[2].layer"),
    (_delete("layers.1.mean"), "profile.layers[1].mean"),
    (_set("layers.1.extra", 0), "profile.layers[1].extra"),
    (_set("layers.1.p05", 0.99), "profile.layers[1].p25"),
    (_set("layers.1.count", 0), "profile.layers[1].count"),
    (_set("layers.1.std", -0.1), "profile.layers[1].std"),
    (_set("layers.3", "x"), "profile.layers[3]"),
    (_set("policy", "greedy"), "profile.policy"),
    (_set("max_skip", -1), "profile.max_skip"),
    (_set("max_skip", 1.5), "profile.max_skip"),
    (_set("warm_up", "16"), "profile.warm_up"),
    (_set("static_layers", [99]), "profile.static_layers[0]"),
    (_set("static_layers", "1,2"), "profile.static_layers"),
    (_set("target_skip_ratio", 0.0), "profile.target_skip_ratio"),
    (_set("target_skip_ratio", 0.95), "profile.target_skip_ratio"),
    (_set("measured_agreement", 1.2), "profile.measured_agreement"),
    (_set("measured_skip_ratio", None), "profile.measured_skip_ratio"),
    (_set("measured_decode_skip_ratio", -0.1), "profile.measured_decode_skip_ratio"),
    (_set("schema_version", 2), "profile.schema_version"),
    (_set("model_id", ""), "profile.model_id"),
    (_set("model_id", 5), "profile.model_id"),
    (_set("fingerprint", "xyz"), "profile.fingerprint"),
    (_set("version", -1), "profile.version"),
    (_set("created_at", "yesterday"), "profile.created_at"),
    (_set("created_at", "2025-01-01T00:00:00+02:00"), "profile.created_at"),
    (_set("created_at", "2025-01-01T00:00:00"), "profile.created_at"),
    (_set("job_id", None), "profile.job_id"),
    (_delete("calibration.size"), "profile.calibration.size"),
    (_set("calibration.digest", "abc"), "profile.calibration.digest"),
    (_set("calibration.seed", 1), "profile.calibration.seed"),
    (_set("calibration", [1]), "profile.calibration"),
]


@pytest.mark.parametrize("mutate,field", BAD_FIELDS, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD_FIELDS)])
def test_every_schema_error_names_its_field(mutate: Callable[[dict], None], field: str) -> None:
    data = json.loads(build_profile().to_json())
    mutate(data)
    with pytest.raises(InvalidArgument) as err:
        Profile.from_json(json.dumps(data))
    assert err.value.field == field, err.value.message


def test_optional_fields_accept_their_empty_forms() -> None:
    data = json.loads(build_profile().to_json())
    data.update(max_skip=None, static_layers=[], job_id="", created_at="2025-01-01T00:00:00+00:00")
    assert Profile.from_dict(data).max_skip is None


@pytest.mark.parametrize(
    "text", ["{", "", "[]", "null", "42", '"profile"', b"\xff\xfe", '{"threshold": NaN}', "{} trailing"]
)
def test_malformed_json_is_invalid_argument(text: Any) -> None:
    with pytest.raises(InvalidArgument) as err:
        Profile.from_json(text)
    assert err.value.field == "profile"


def test_plot_is_a_png() -> None:
    profile = build_profile()
    png = plot_layer_similarity(list(profile.layers), 1, 5, "tiny-llama", threshold=0.95)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


def test_plot_rejects_bad_cold_region() -> None:
    with pytest.raises(InvalidArgument):
        plot_layer_similarity(list(build_profile().layers), 3, 2, "bad")
