"""`ffnskip ops ...` against a running calibrator process, and `ffnskip calibrate --out`
locally; both on a tiny random Llama model, both as real command-line processes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ffnskip.profile import Profile
from ffnskip.store import ProfileStore, RedisSettings, connect
from tests.helpers.calibrator import PNG_MAGIC, start_calibrator
from tests.helpers.profiles import build_profile
from tests.helpers.services import REPO, free_port
from tests.helpers.tiny import save_tiny_model
from tests.redis_server import running_redis

pytestmark = pytest.mark.timeout(600)
PROMPTS = ["The sea is", "Once upon a time", "Mountains are tall because", "My favourite food"]


def ffnskip(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ffnskip.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny-ops") / "tiny"))


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": p}) + "\n" for i, p in enumerate(PROMPTS)))
    return path


@pytest.fixture(scope="module")
def calibrator(tmp_path_factory, model_dir: str) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("ops")
    with running_redis() as redis_server:
        process = start_calibrator(tmp, redis_server.url, model_dir, "calibrator")
        client = connect(RedisSettings(url=redis_server.url, retries=1))
        try:
            yield {"address": process.address, "store": ProfileStore(client)}
        finally:
            process.stop()
            client.close()


def test_ops_calibrate_wait_then_profiles_show_activate_rollback(calibrator: dict, model_dir: str, prompts_file: Path,
                                                                 tmp_path: Path) -> None:
    address, store = ["--address", calibrator["address"]], calibrator["store"]
    run = ffnskip("ops", "calibrate", *address, "--model", model_dir, "--prompts-file", str(prompts_file),
                  "--tokens-per-prompt", "8", "--target-skip", "0.25", "--activate", "--wait")
    assert run.returncode == 0, run.stderr
    job_id = run.stdout.splitlines()[0]
    assert f"job {job_id} succeeded" in run.stdout
    first = store.active_version(model_dir)
    assert first is not None and store.get(model_dir, first).job_id == job_id

    jobs = json.loads(ffnskip("ops", "jobs", *address, "--json").stdout)
    assert [(j["job_id"], j["state"]) for j in jobs] == [(job_id, "JOB_STATE_SUCCEEDED")]

    plot = tmp_path / "plot.png"
    shown = ffnskip("ops", "show", *address, "--model", model_dir, "--plot-out", str(plot), "--json")
    assert shown.returncode == 0, shown.stderr
    assert Profile.from_json(shown.stdout) == store.get(model_dir, first)
    assert plot.read_bytes().startswith(PNG_MAGIC)

    second = store.publish(build_profile(model_id=model_dir))  # a second version to switch to
    profiles = json.loads(ffnskip("ops", "profiles", *address, "--model", model_dir, "--json").stdout)
    assert [(int(p["version"]), p.get("active", False)) for p in profiles] == [(first, True), (second, False)]

    activated = ffnskip("ops", "activate", *address, "--model", model_dir, "--version", str(second))
    assert activated.returncode == 0 and f"active profile v{second} (was v{first})" in activated.stdout
    assert store.active_version(model_dir) == second
    rolled = ffnskip("ops", "rollback", *address, "--model", model_dir)
    assert rolled.returncode == 0 and f"active profile v{first}" in rolled.stdout
    assert store.active_version(model_dir) == first

    again = ffnskip("ops", "rollback", *address, "--model", model_dir)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [again.stderr.strip()]  # one line
    assert again.stderr.startswith("error: FAILED_PRECONDITION: ")


def test_ops_errors_are_one_line_with_status_2(calibrator: dict, model_dir: str) -> None:
    address = ["--address", calibrator["address"]]
    unknown = ffnskip("ops", "calibrate", *address, "--model", "no-such-model")
    assert (unknown.returncode, unknown.stderr.strip()) == (
        2, f"error: NOT_FOUND: model: 'no-such-model' is not served by this calibrator (models: {model_dir})")
    bad = ffnskip("ops", "calibrate", *address, "--model", model_dir, "--target-skip", "0.95")
    assert bad.returncode == 2 and bad.stderr.startswith("error: INVALID_ARGUMENT: target_skip_ratio: ")
    nowhere = ffnskip("ops", "jobs", "--address", f"127.0.0.1:{free_port()}", "--timeout", "3", timeout=60)
    assert nowhere.returncode == 2 and nowhere.stderr.startswith(("error: UNAVAILABLE: ", "error: DEADLINE_EXCEEDED: "))


def test_watch_of_a_cancelled_job_exits_1(calibrator: dict, model_dir: str, prompts_file: Path) -> None:
    address = ["--address", calibrator["address"]]
    submitted = ffnskip("ops", "calibrate", *address, "--model", model_dir, "--prompts-file", str(prompts_file))
    job_id = submitted.stdout.strip()
    cancelled = ffnskip("ops", "cancel", *address, job_id)
    assert cancelled.returncode == 0, cancelled.stderr
    watched = ffnskip("ops", "watch", *address, job_id)
    assert watched.returncode == 1 and f"job {job_id} cancelled: cancelled on request" in watched.stderr


def test_local_calibrate_writes_profile_and_plot(model_dir: str, prompts_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = ffnskip("calibrate", "--model", model_dir, "--device", "cpu", "--target-skip", "0.25", "--out", str(out),
                  "--tokens-per-prompt", "8", "--prompts-file", str(prompts_file))
    assert run.returncode == 0, run.stderr
    profile = Profile.from_json((out / "profile.json").read_text())
    assert profile.model_id == model_dir and profile.version == 0 and profile.calibration["size"] == len(PROMPTS)
    assert profile.target_skip_ratio == 0.25 and profile.num_layers == 6
    assert (out / "similarity.png").read_bytes().startswith(PNG_MAGIC)
    assert sorted(p.name for p in out.iterdir()) == ["profile.json", "similarity.png"]  # no temporary files left


def test_local_calibrate_to_a_budget_writes_substitutes_that_generate_reads(model_dir: str, prompts_file: Path,
                                                                            tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = ffnskip("calibrate", "--model", model_dir, "--device", "cpu", "--out", str(out), "--tokens-per-prompt", "24",
                  "--prompts-file", str(prompts_file), "--max-kl", "5", "--max-relative-nll", "10")
    assert run.returncode == 0, run.stderr
    profile = Profile.from_json((out / "profile.json").read_text())
    assert profile.quality["max_kl"] == 5 and profile.static_layers  # the generous budget let it skip
    assert profile.substitutes["layers"] == list(profile.static_layers)
    profile.check_substitutes((out / "substitutes.bin").read_bytes())
    generate = ("generate", "--model", model_dir, "--device", "cpu", "--prompt", "hello", "--max-new-tokens", "4",
                "--profile", str(out / "profile.json"))
    assert ffnskip(*generate).returncode == 0
    blob = bytearray((out / "substitutes.bin").read_bytes())
    blob[-1] ^= 0xFF
    (out / "substitutes.bin").write_bytes(bytes(blob))
    tampered = ffnskip(*generate)
    assert tampered.returncode == 2 and tampered.stderr.startswith("error: substitutes:")


def test_local_calibrate_bad_input_is_one_line(tmp_path: Path, model_dir: str) -> None:
    run = ffnskip("calibrate", "--model", model_dir, "--device", "cpu", "--target-skip", "1.5", "--out", str(tmp_path / "o"))
    assert run.returncode == 2 and run.stderr.strip() == "error: target_skip_ratio: must be in (0, 0.9], got 1.5"
    assert not (tmp_path / "o").exists()
