"""A profile's `substitutes` field: what replaces its skipped FFNs (kind, layers, size, sha256 of
the set's bytes). Optional (older profiles load), validated field by field, exact through JSON."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest

from ffnskip.engine.substitutes import KINDS, blob_digest
from ffnskip.errors import InvalidArgument
from ffnskip.profile import MAX_SUBSTITUTE_BYTES, SUBSTITUTE_KINDS, Profile
from tests.helpers.profiles import build_profile, substitutes_record

BLOB = b"substitute set bytes"
RECORD = substitutes_record(BLOB, [2, 3])


def compensated(**overrides: Any) -> Profile:
    fields: dict[str, Any] = {"policy": "static", "static_layers": [2, 3, 4], "substitutes": RECORD, **overrides}
    return build_profile(**fields)


def test_the_kinds_are_the_engines() -> None:
    assert SUBSTITUTE_KINDS == KINDS
    assert RECORD["digest"] == blob_digest(BLOB)  # the digest the engine's sets are recorded with


def test_a_profile_with_substitutes_round_trips_through_json() -> None:
    profile = compensated(version=3)
    text = profile.to_json()
    assert json.loads(text)["substitutes"] == RECORD
    again = Profile.from_json(text)
    assert again == profile and again.to_json() == text
    assert compensated(substitutes={**RECORD, "layers": (2, 3)}) == profile.with_version(0)  # a tuple is kept as JSON's list


def test_a_profile_without_the_field_loads_as_plain_skips() -> None:
    data = json.loads(build_profile().to_json())
    del data["substitutes"]  # as every profile published before substitutes existed
    profile = Profile.from_dict(data)
    assert profile.substitutes == {}
    assert json.loads(profile.to_json())["substitutes"] == {}


def _with(**changes: Any) -> Callable[[dict], None]:
    def mutate(data: dict) -> None:
        data["substitutes"] = {**data["substitutes"], **changes}

    return mutate


def _without(key: str) -> Callable[[dict], None]:
    def mutate(data: dict) -> None:
        del data["substitutes"][key]

    return mutate


def _replace(value: Any) -> Callable[[dict], None]:
    def mutate(data: dict) -> None:
        data["substitutes"] = value

    return mutate


BAD = [
    (_replace([]), "profile.substitutes"),
    (_replace(None), "profile.substitutes"),
    (_without("kind"), "profile.substitutes.kind"),
    (_without("digest"), "profile.substitutes.digest"),
    (_with(rank=4), "profile.substitutes.rank"),
    (_with(kind="quadratic"), "profile.substitutes.kind"),
    (_with(kind=1), "profile.substitutes.kind"),
    (_with(layers=[]), "profile.substitutes.layers"),
    (_with(layers="2,3"), "profile.substitutes.layers"),
    (_with(layers=[5]), "profile.substitutes.layers[0]"),  # not a skipped layer: static_layers are 2, 3, 4
    (_with(layers=[2, 1]), "profile.substitutes.layers[1]"),
    (_with(layers=[3, 2]), "profile.substitutes.layers[1]"),
    (_with(layers=[2, 2]), "profile.substitutes.layers[1]"),
    (_with(layers=[2.0]), "profile.substitutes.layers[0]"),
    (_with(layers=[True]), "profile.substitutes.layers[0]"),
    (_with(bytes=0), "profile.substitutes.bytes"),
    (_with(bytes="20"), "profile.substitutes.bytes"),
    (_with(bytes=MAX_SUBSTITUTE_BYTES + 1), "profile.substitutes.bytes"),
    (_with(digest="abc"), "profile.substitutes.digest"),
    (_with(digest=RECORD["digest"].upper()), "profile.substitutes.digest"),
    (_with(digest="g" * 64), "profile.substitutes.digest"),
    (_with(digest=None), "profile.substitutes.digest"),
]


@pytest.mark.parametrize("mutate,field", BAD, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD)])
def test_each_bad_substitutes_record_names_its_field(mutate: Callable[[dict], None], field: str) -> None:
    data = json.loads(compensated().to_json())
    mutate(data)
    with pytest.raises(InvalidArgument) as err:
        Profile.from_json(json.dumps(data))
    assert err.value.field == field, err.value.message


def test_an_adaptive_profile_cannot_record_substitutes() -> None:
    with pytest.raises(InvalidArgument) as err:  # it has no static layers for them to replace
        build_profile(substitutes=RECORD)
    assert err.value.field == "profile.substitutes.layers[0]"


def test_the_largest_allowed_size_is_accepted() -> None:
    assert compensated(substitutes={**RECORD, "bytes": MAX_SUBSTITUTE_BYTES}).substitutes["bytes"] == MAX_SUBSTITUTE_BYTES


@pytest.mark.parametrize("profile, blob, problem", [
    (compensated(), None, "missing"),
    (compensated(), BLOB + b"!", "bytes"),
    (compensated(), BLOB.upper(), "sha256"),  # the same size, other bytes
    (build_profile(), BLOB, "records none"),
])
def test_check_substitutes_refuses_bytes_that_are_not_the_recorded_ones(profile: Profile, blob: bytes | None,
                                                                         problem: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        profile.check_substitutes(blob)
    assert err.value.field == "substitutes" and problem in err.value.problem


def test_check_substitutes_accepts_the_recorded_bytes() -> None:
    compensated().check_substitutes(BLOB)
    build_profile().check_substitutes(None)
    assert hashlib.sha256(BLOB).hexdigest() == compensated().substitutes["digest"]
