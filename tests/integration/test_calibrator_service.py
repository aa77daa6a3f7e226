"""The calibrator service for real: a redis-server, calibrator processes on loopback
serving a tiny random Llama model, gRPC over sockets; readiness via grpc.health.v1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from ffnskip.profile import Profile
from ffnskip.store import JobQueue, ProfileStore, RedisSettings, connect
from ffnskip.v1 import calibrator_pb2 as pb
from ffnskip.v1 import calibrator_pb2_grpc, common_pb2
from tests.helpers.calibrator import PNG_MAGIC, start_calibrator
from tests.helpers.profiles import build_profile
from tests.helpers.tiny import save_tiny_model
from tests.redis_server import running_redis

pytestmark = pytest.mark.timeout(600)
PROMPTS = ["The sea is", "Once upon a time", "Mountains are tall because", "My favourite food"]


def submit(stub, model: str, prompts=PROMPTS, tokens: int = 8, **fields) -> str:
    request = pb.SubmitCalibrationRequest(model=model, prompts=pb.PromptList(prompts=prompts), tokens_per_prompt=tokens, **fields)
    return stub.SubmitCalibration(request, timeout=30).job_id


def watch(stub, job_id: str) -> list[pb.Job]:
    return list(stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=400))


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, timeout=30, **kwargs)
    return caught.value


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny-cal") / "tiny"))


@pytest.fixture(scope="module")
def service(tmp_path_factory, model_dir: str) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("calibrator")
    with running_redis() as redis_server:
        calibrator = start_calibrator(tmp, redis_server.url, model_dir, "calibrator")
        client = connect(RedisSettings(url=redis_server.url, retries=1))
        channel = grpc.insecure_channel(calibrator.address)
        try:
            yield {"stub": calibrator_pb2_grpc.CalibratorStub(channel), "redis": client, "process": calibrator,
                   "store": ProfileStore(client), "jobs": JobQueue(client), "model": model_dir}
        finally:
            channel.close()
            calibrator.stop()


def test_submit_watch_to_completion_then_profile_is_active(service: dict) -> None:
    stub, store, model = service["stub"], service["store"], service["model"]
    job_id = submit(stub, model, activate_on_success=True)
    updates = watch(stub, job_id)
    final = updates[-1]
    assert final.state == pb.JOB_STATE_SUCCEEDED, final
    assert any(u.state == pb.JOB_STATE_RUNNING and u.done > 0 for u in updates)  # progress was reported
    done = [u.done for u in updates if u.state == pb.JOB_STATE_RUNNING]
    assert done == sorted(done)
    assert final.HasField("profile_version") and final.attempts == 1 and final.prompt_source == "4 prompts"

    active = store.get_active(model)  # straight from Redis
    assert active is not None and active.version == final.profile_version and active.job_id == job_id
    assert active.calibration["size"] == len(PROMPTS) and active.calibration["tokens_per_prompt"] == 8

    reply = stub.GetProfile(pb.GetProfileRequest(model=model), timeout=30)  # unset version = active
    assert Profile.from_json(reply.profile_json) == active
    assert reply.plot_png.startswith(PNG_MAGIC) and reply.plot_png == store.get_plot(model, active.version)
    assert reply.summary.active and reply.summary.version == active.version
    assert reply.summary.fingerprint == active.fingerprint
    assert [layer.layer for layer in reply.layers] == list(range(active.num_layers))
    assert stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=30) == final


def test_static_job_publishes_a_fixed_ffn_set(service: dict) -> None:
    stub, store, model = service["stub"], service["store"], service["model"]
    job_id = submit(stub, model, policy="static", target_skip_ratio=0.3)
    final = watch(stub, job_id)[-1]
    assert final.state == pb.JOB_STATE_SUCCEEDED and final.policy == "static", final
    assert final.policy_value == common_pb2.SKIP_POLICY_STATIC  # the encoding, beside the deprecated name
    profile = store.get(model, final.profile_version)
    assert profile.policy == "static" and profile.job_id == job_id
    assert len(profile.static_layers) == 2  # round(0.3 x 6 layers)
    assert all(profile.cold_start <= layer < profile.cold_end for layer in profile.static_layers)
    summary = stub.GetProfile(pb.GetProfileRequest(model=model, version=final.profile_version), timeout=30).summary
    assert summary.skip_params.policy == common_pb2.SKIP_POLICY_STATIC
    assert list(summary.skip_params.static_layers) == list(profile.static_layers)


def test_list_activate_and_rollback(service: dict) -> None:
    stub, store = service["stub"], service["store"]
    model = "ops-model"
    first = store.publish(build_profile(model_id=model), b"png-1", activate=True)
    second = store.publish(build_profile(model_id=model, threshold=0.9))  # stored, not active
    listed = stub.ListProfiles(pb.ListProfilesRequest(model=model), timeout=30).profiles
    assert [(p.version, p.active) for p in listed] == [(first, True), (second, False)]
    assert listed[1].skip_params.threshold == pytest.approx(0.9) and not listed[1].error
    assert model in {p.model for p in stub.ListProfiles(pb.ListProfilesRequest(), timeout=30).profiles}

    change = stub.ActivateProfile(pb.ActivateProfileRequest(model=model, version=second), timeout=30)
    assert (change.active_version, change.previous_version) == (second, first)
    assert store.active_version(model) == second
    change = stub.RollbackProfile(pb.RollbackProfileRequest(model=model), timeout=30)
    assert (change.active_version, change.previous_version) == (first, second)
    assert store.active_version(model) == first

    err = rpc_error(stub.RollbackProfile, pb.RollbackProfileRequest(model=model))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "roll back" in err.details()
    err = rpc_error(stub.ActivateProfile, pb.ActivateProfileRequest(model=model, version=99))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "v99" in err.details()
    err = rpc_error(stub.GetProfile, pb.GetProfileRequest(model="no-such-model"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert store.active_version(model) == first


def test_malformed_profile_in_redis_is_refused_and_logged(service: dict) -> None:
    stub, store, client = service["stub"], service["store"], service["redis"]
    model = "broken-model"
    good = store.publish(build_profile(model_id=model), activate=True)
    bad = good + 1
    client.set(f"ffnskip:profile:{model}:v{bad}", b'{"schema_version": 1, "model_id": ')  # truncated JSON
    client.zadd(f"ffnskip:profile:{model}:versions", {str(bad): bad})

    err = rpc_error(stub.GetProfile, pb.GetProfileRequest(model=model, version=bad))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"ffnskip:profile:{model}:v{bad}" in err.details() and "malformed" in err.details()
    err = rpc_error(stub.ActivateProfile, pb.ActivateProfileRequest(model=model, version=bad))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert store.active_version(model) == good  # the previous active profile is kept

    listed = stub.ListProfiles(pb.ListProfilesRequest(model=model), timeout=30).profiles
    assert [(p.version, bool(p.error)) for p in listed] == [(good, False), (bad, True)]
    assert "malformed profile in redis" in service["process"].log()


def test_idempotency_key_returns_the_same_job_and_cancel(service: dict) -> None:
    stub, jobs, model = service["stub"], service["jobs"], service["model"]
    first = submit(stub, model, idempotency_key="nightly-1")
    assert submit(stub, model, idempotency_key="nightly-1", tokens=16) == first
    other = submit(stub, model, idempotency_key="nightly-2")
    assert other != first
    for job_id in (first, other):
        job = stub.CancelJob(pb.CancelJobRequest(job_id=job_id), timeout=30)
        assert job.cancel_requested
    for job_id in (first, other):  # queued: cancelled at once; running: at the next checkpoint
        final = watch(stub, job_id)[-1]
        assert final.state == pb.JOB_STATE_CANCELLED and not final.HasField("profile_version")
    assert {j.job_id for j in stub.ListJobs(pb.ListJobsRequest(limit=100), timeout=30).jobs} >= {first, other}
    assert jobs.get(first)["request"]["tokens_per_prompt"] == 8  # the resubmission changed nothing


BAD_SUBMISSIONS = [
    ("unknown model", dict(model="no-such-model"), grpc.StatusCode.NOT_FOUND, "model"),
    ("empty model", dict(model=""), grpc.StatusCode.INVALID_ARGUMENT, "model"),
    ("empty prompts", dict(prompts=pb.PromptList(prompts=[])), grpc.StatusCode.INVALID_ARGUMENT, "prompts"),
    ("too many prompts", dict(prompts=pb.PromptList(prompts=["p"] * 513)), grpc.StatusCode.INVALID_ARGUMENT, "prompts"),
    ("long prompt", dict(prompts=pb.PromptList(prompts=["ok", "x" * 8001, "ok"])), grpc.StatusCode.INVALID_ARGUMENT, "prompts[1]"),
    ("blank prompt", dict(prompts=pb.PromptList(prompts=["ok", " ", "ok"])), grpc.StatusCode.INVALID_ARGUMENT, "prompts"),
    ("zero target", dict(target_skip_ratio=0.0), grpc.StatusCode.INVALID_ARGUMENT, "target_skip_ratio"),
    ("target too high", dict(target_skip_ratio=0.95), grpc.StatusCode.INVALID_ARGUMENT, "target_skip_ratio"),
    ("negative target", dict(target_skip_ratio=-0.1), grpc.StatusCode.INVALID_ARGUMENT, "target_skip_ratio"),
    ("too few tokens", dict(tokens_per_prompt=2), grpc.StatusCode.INVALID_ARGUMENT, "tokens_per_prompt"),
    ("unknown policy", dict(policy="random"), grpc.StatusCode.INVALID_ARGUMENT, "policy"),
    ("uncalibrated policy value", dict(policy_value=common_pb2.SKIP_POLICY_RANDOM), grpc.StatusCode.INVALID_ARGUMENT,
     "policy"),
    ("unknown policy value", dict(policy_value=99), grpc.StatusCode.INVALID_ARGUMENT, "policy_value"),
    ("unknown dataset", dict(dataset="/etc/passwd"), grpc.StatusCode.NOT_FOUND, "dataset"),
    ("bad idempotency key", dict(idempotency_key="has space"), grpc.StatusCode.INVALID_ARGUMENT, "idempotency_key"),
]


@pytest.mark.parametrize("case", BAD_SUBMISSIONS, ids=[c[0] for c in BAD_SUBMISSIONS])
def test_bad_submission_gets_its_status_and_queues_nothing(service: dict, case) -> None:
    _, fields, code, field = case
    stub, client = service["stub"], service["redis"]
    before = client.xlen("ffnskip:jobs")
    request = pb.SubmitCalibrationRequest(model=service["model"], prompts=pb.PromptList(prompts=PROMPTS))
    for name, value in fields.items():
        if name == "prompts":
            request.prompts.CopyFrom(value)
        else:
            setattr(request, name, value)
    err = rpc_error(stub.SubmitCalibration, request)
    assert err.code() == code
    assert err.details().startswith(f"{field}:"), err.details()
    assert client.xlen("ffnskip:jobs") == before


@pytest.mark.parametrize("job_id, code", [("0" * 32, grpc.StatusCode.NOT_FOUND), ("a:b", grpc.StatusCode.INVALID_ARGUMENT),
                                          ("", grpc.StatusCode.INVALID_ARGUMENT)])
def test_bad_job_ids(service: dict, job_id: str, code: grpc.StatusCode) -> None:
    stub = service["stub"]
    assert rpc_error(stub.GetJob, pb.GetJobRequest(job_id=job_id)).code() == code
    assert rpc_error(stub.CancelJob, pb.CancelJobRequest(job_id=job_id)).code() == code
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=30))
    assert caught.value.code() == code


def test_redis_down_at_submit_is_unavailable_and_queues_nothing(tmp_path: Path, model_dir: str) -> None:
    # Persistence on, so "nothing queued" is checked on the data Redis comes back with.
    with running_redis(appendonly="yes", appendfsync="always") as redis_server:
        calibrator = start_calibrator(tmp_path, redis_server.url, model_dir, "api-only", FFNSKIP_CALIBRATOR_WORKERS="0")
        try:
            with grpc.insecure_channel(calibrator.address) as channel:
                stub = calibrator_pb2_grpc.CalibratorStub(channel)
                kept = submit(stub, model_dir)
                redis_server.stop()
                err = rpc_error(stub.SubmitCalibration, pb.SubmitCalibrationRequest(model=model_dir))
                assert err.code() == grpc.StatusCode.UNAVAILABLE and "redis" in err.details()
                redis_server.start()
                client = redis.Redis.from_url(redis_server.url)
                assert client.xlen("ffnskip:jobs") == 1
                assert [j.job_id for j in stub.ListJobs(pb.ListJobsRequest(), timeout=30).jobs] == [kept]
                assert submit(stub, model_dir)  # and the service works again
                assert client.xlen("ffnskip:jobs") == 2
                client.close()
        finally:
            calibrator.stop()


def test_killed_worker_job_is_reclaimed_and_completed_once(tmp_path: Path, model_dir: str) -> None:
    fast_reclaim = {"FFNSKIP_CALIBRATOR_RECLAIM_IDLE_MS": "1500", "FFNSKIP_CALIBRATOR_BATCH_SIZE": "1"}
    with running_redis() as redis_server:
        client = connect(RedisSettings(url=redis_server.url, retries=1))
        store, jobs = ProfileStore(client), JobQueue(client)
        first = start_calibrator(tmp_path, redis_server.url, model_dir, "calibrator-a", **fast_reclaim)
        second = None
        try:
            with grpc.insecure_channel(first.address) as channel:
                stub = calibrator_pb2_grpc.CalibratorStub(channel)
                # batch size 1: progress after every prompt, and the job still runs for many seconds
                prompts = [f"Prompt {i}: tell me about the weather in spring" for i in range(6)]
                job_id = submit(stub, model_dir, prompts=prompts, tokens=12, activate_on_success=True)
                for update in stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=300):
                    assert update.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING), update
                    if update.done > 0:
                        break
            first.kill()  # SIGKILL mid-job: no chance to record anything
            assert jobs.get(job_id)["state"] == "running"

            second = start_calibrator(tmp_path, redis_server.url, model_dir, "calibrator-b", **fast_reclaim)
            with grpc.insecure_channel(second.address) as channel:
                final = watch(calibrator_pb2_grpc.CalibratorStub(channel), job_id)[-1]
            assert final.state == pb.JOB_STATE_SUCCEEDED, final
            assert final.attempts == 2
            assert store.list_versions(model_dir) == [final.profile_version]  # exactly one profile
            assert store.get_active(model_dir).job_id == job_id
            assert client.xpending("ffnskip:jobs", "calibrators")["pending"] == 0
            assert jobs.dead_letters() == []
            assert second.terminate(timeout_s=60) == 0  # SIGTERM drains and exits cleanly
        finally:
            first.stop()
            if second is not None:
                second.stop()
            client.close()


def test_a_profile_that_misses_its_budget_is_activated_only_with_force(service: dict) -> None:
    stub, store = service["stub"], service["store"]
    model = "budget-model"
    kept = store.publish(build_profile(model_id=model), activate=True)
    missed = store.publish(build_profile(model_id=model, quality={
        "kl": 0.2, "top_match": 0.8, "relative_nll": 1.4, "max_kl": 0.06, "max_relative_nll": 1.1, "within_budget": False}))

    err = rpc_error(stub.ActivateProfile, pb.ActivateProfileRequest(model=model, version=missed))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details().startswith("force:") and "kl 0.2000 > 0.06" in err.details()
    assert store.active_version(model) == kept
    listed = {p.version: p for p in stub.ListProfiles(pb.ListProfilesRequest(model=model), timeout=30).profiles}
    assert not listed[missed].within_budget and listed[missed].measured_kl == pytest.approx(0.2)
    assert listed[kept].within_budget  # no budget: nothing to miss

    change = stub.ActivateProfile(pb.ActivateProfileRequest(model=model, version=missed, force=True), timeout=30)
    assert (change.active_version, change.previous_version) == (missed, kept)
    assert store.active_version(model) == missed
