"""`ffnskip ops show` prints what replaces a profile's skipped FFNs (from the profile's JSON)."""

from __future__ import annotations

import argparse

import pytest

from ffnskip.cli.ops import _show
from ffnskip.profile import Profile
from ffnskip.v1 import calibrator_pb2 as pb
from services.calibrator.convert import summary_to_proto
from tests.helpers.profiles import build_profile, substitutes_record

BLOB = b"a substitute set"


class ProfileStub:
    """The calibrator's GetProfile answer for one stored profile."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile

    def GetProfile(self, request: pb.GetProfileRequest, timeout: float) -> pb.GetProfileResponse:
        return pb.GetProfileResponse(summary=summary_to_proto(self.profile, active=True), profile_json=self.profile.to_json())


def show(profile: Profile, capsys: pytest.CaptureFixture[str]) -> list[str]:
    args = argparse.Namespace(model=profile.model_id, version=None, timeout=5.0, plot_out=None, json=False)
    assert _show(args, ProfileStub(profile)) == 0
    return capsys.readouterr().out.splitlines()


def test_show_prints_the_substitutes_kind_layers_and_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    record = substitutes_record(BLOB, [2, 3], kind="lowrank")
    lines = show(build_profile(policy="static", static_layers=[2, 3], substitutes=record, version=4), capsys)
    assert f"substitutes: lowrank on layers 2,3  {len(BLOB)} bytes  sha256 {record['digest'][:12]}" in lines


def test_show_says_plain_skips_without_substitutes(capsys: pytest.CaptureFixture[str]) -> None:
    assert "substitutes: none (plain skips)" in show(build_profile(version=1), capsys)
