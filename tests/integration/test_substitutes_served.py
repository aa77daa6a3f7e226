"""A decoder serves the active profile's substitutes: its parts as services.decoder.main wires
them (engine thread, profile watcher, service, servicer, metrics) in this process, a tiny random
Llama, a real redis-server and real gRPC on loopback. Requests under the profile's parameters
get its substitutes (resumed ones too), requests with parameters of their own skip plainly, a
profile whose substitutes are missing or wrong is not adopted, and the disk copy carries them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path

import grpc
import pytest
import torch
from structlog.testing import capture_logs

from ffnskip.config import DENSE, SamplingParams, SkipParams
from ffnskip.engine import Engine
from ffnskip.engine.substitutes import Int8LowRank, Substitute, SubstituteSet
from ffnskip.profile import Profile
from ffnskip.rpc.server import Server
from ffnskip.store import ProfileStore, RedisSettings, connect
from ffnskip.v1 import decoder_pb2, decoder_pb2_grpc
from ffnskip.v1 import generation_pb2 as pb
from services.decoder.engine_loop import EngineLoop
from services.decoder.main import SERVICE_NAME, build_engine, profile_watcher
from services.decoder.metrics import DecoderMetrics
from services.decoder.profiles import ActiveProfile, ProfileWatcher, SubstituteTarget
from services.decoder.service import DecoderService
from services.decoder.servicer import DecoderServicer
from services.decoder.settings import DecoderSettings
from tests.helpers.polling import wait_for
from tests.helpers.profiles import build_profile, substitutes_record
from tests.helpers.tiny import save_tiny_model
from tests.redis_server import RedisServer, running_redis

pytestmark = pytest.mark.timeout(120)
MODEL = "tiny"
PROMPT = "The tide comes in"
TOKENS = 16
SAMPLING = SamplingParams(max_new_tokens=TOKENS, ignore_eos=True)  # greedy


class InProcessDecoder:
    """The decoder's parts as main.serve wires them, on an event loop of their own (a thread)."""

    def __init__(self, settings: DecoderSettings) -> None:
        self.settings = settings
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="in-process-decoder", daemon=True)

    def start(self) -> InProcessDecoder:
        self._thread.start()
        assert self._ready.wait(60) and self.port, "the in-process decoder did not start"
        return self

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        engine_loop = EngineLoop(partial(build_engine, self.settings), self.settings.max_queue)
        loaded = engine_loop.start().loaded
        self.profiles = profile_watcher(self.settings, engine_loop, ProfileStore(connect(self.settings.redis)))
        self.metrics = DecoderMetrics(MODEL, lambda: engine_loop.running, lambda: engine_loop.waiting,
                                      lambda: self.profiles.current.version, lambda: self.profiles.current.substitute_bytes)
        self.profiles.start()
        facts = {"fingerprint": loaded.fingerprint, "device": "cpu", "dtype": "float32", "num_layers": loaded.num_layers}
        server = Server([SERVICE_NAME])
        decoder_pb2_grpc.add_DecoderServicer_to_server(
            DecoderServicer(DecoderService(self.settings, engine_loop, self.profiles), facts), server.grpc)
        self.port = await server.start("127.0.0.1:0")
        await server.set_ready(True)
        self._ready.set()
        await self._stop.wait()
        await server.grpc.stop(grace=None)
        self.profiles.stop()
        engine_loop.stop()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=30)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("substitutes")
    model_dir = save_tiny_model(tmp / "tiny")
    with running_redis() as redis_server:
        settings = DecoderSettings.from_env({
            "FFNSKIP_MODEL": str(model_dir), "FFNSKIP_MODEL_NAME": MODEL, "FFNSKIP_DEVICE": "cpu",
            "FFNSKIP_DTYPE": "float32", "FFNSKIP_COMPILE": "0", "FFNSKIP_CACHE": str(tmp / "cache"),
            "FFNSKIP_PROFILE_CACHE_DIR": str(tmp / "profiles"), "FFNSKIP_REDIS_URL": redis_server.url,
            "FFNSKIP_MAX_BATCH": "2", "FFNSKIP_MAX_SEQ_LEN": "256"})
        decoder = InProcessDecoder(settings).start()
        reference = build_engine(settings)  # built as the decoder's: the same greedy answers
        channel = grpc.insecure_channel(f"127.0.0.1:{decoder.port}")
        client = connect(RedisSettings(url=redis_server.url))
        try:
            yield {"decoder": decoder, "stub": decoder_pb2_grpc.DecoderStub(channel), "store": ProfileStore(client),
                   "client": client, "reference": reference, "fingerprint": reference.loaded.fingerprint}
        finally:
            channel.close()
            decoder.stop()
            client.close()


def substitute_set(seed: int, width: int = 64, layers: tuple[int, ...] = (2, 3), scale: float = 4.0) -> SubstituteSet:
    """Bias substitutes large enough to change a greedy answer."""
    generator = torch.Generator().manual_seed(seed)
    return SubstituteSet({layer: Substitute(torch.randn(width, generator=generator) * scale) for layer in layers})


def static_profile(fingerprint: str, blob: bytes | None = None, layers: list[int] | None = None) -> Profile:
    record = substitutes_record(blob, layers or [2, 3]) if blob is not None else {}
    return build_profile(model_id=MODEL, fingerprint=fingerprint, policy="static", static_layers=[2, 3], cold_start=1,
                         cold_end=5, warm_up=2, substitutes=record)


def activate(served: dict, profile: Profile, blob: bytes | None = None) -> int:
    """Publish and activate `profile`; return its version once the decoder serves it."""
    version = served["store"].publish(profile, activate=True, substitutes=blob)
    wait_for(lambda: info(served).profile_version == version, what=f"the decoder to serve v{version}")
    return version


def info(served: dict) -> decoder_pb2.InfoResponse:
    return served["stub"].Info(decoder_pb2.InfoRequest(), timeout=10)


def generate(served: dict, **fields) -> pb.GenerateResponse:  # type: ignore[no-untyped-def]
    request = pb.GenerateRequest(model=MODEL, prompt=PROMPT, sampling=pb.SamplingOptions(max_new_tokens=TOKENS, ignore_eos=True),
                                 **fields)
    return served["stub"].Generate(request, timeout=60)


def expected(served: dict, skip: SkipParams, substitutes: SubstituteSet | None = None) -> list[int]:
    engine: Engine = served["reference"]
    return list(engine.generate([PROMPT], SAMPLING, skip, substitutes=substitutes)[0].token_ids)


def test_requests_under_the_profile_get_its_substitutes(served: dict) -> None:
    fingerprint, subs = served["fingerprint"], substitute_set(seed=1)
    blob = subs.to_bytes()
    plain_profile = static_profile(fingerprint)
    plain_version = activate(served, plain_profile)
    plain = generate(served)
    assert plain.profile_version == plain_version and list(plain.token_ids) == expected(served, plain_profile.skip_params())

    version = activate(served, static_profile(fingerprint, blob), blob)
    compensated = generate(served)
    params = plain_profile.skip_params()
    assert compensated.profile_version == version
    assert list(compensated.token_ids) != list(plain.token_ids)  # the substitutes changed the answer...
    assert list(compensated.token_ids) == expected(served, params, subs)  # ...as the engine applies them
    gauge = served["decoder"].metrics.registry.get_sample_value("ffnskip:profile_substitute_bytes", {"model_name": MODEL})
    assert gauge == subs.nbytes == 2 * 64 * 4

    # naming the profile's own policy is running its parameters; another warm-up is not
    assert generate(served, skip=pb.SkipOverrides(policy="static")).token_ids == compensated.token_ids
    own = generate(served, skip=pb.SkipOverrides(warm_up=3))
    assert list(own.token_ids) == expected(served, replace(params, warm_up=3))

    # a stream resumed here after 8 tokens (another pod failed) continues with the same substitutes
    chunks = [m.token for m in served["stub"].GenerateStream(pb.GenerateRequest(
        model=MODEL, prompt=PROMPT, sampling=pb.SamplingOptions(max_new_tokens=TOKENS, ignore_eos=True)), timeout=60)
        if m.HasField("token")]
    resume = pb.Resume(token_ids=[c.token_id for c in chunks[:8]], profile_version=version,
                       skipped_layers=[pb.SkippedLayers(layers=c.skipped_layers) for c in chunks[:8]])
    resumed = generate(served, resume=resume)
    assert list(resumed.token_ids) == list(compensated.token_ids) and resumed.profile_version == version


def test_a_w8a8_decoder_builds_a_low_rank_set_with_int8_factors(served: dict) -> None:
    """A decoder whose matrices are w8a8 holds a profile's low-rank maps as its engine applies
    them (Int8LowRank), and reports those bytes, not the stored float32 ones."""
    generator = torch.Generator().manual_seed(5)
    subs = SubstituteSet({layer: Substitute(*(torch.randn(*shape, generator=generator) for shape in ((64,), (64, 8), (8, 64))))
                          for layer in (2, 3)})
    blob = subs.to_bytes()
    profile = build_profile(model_id=MODEL, fingerprint=served["fingerprint"], policy="static", static_layers=[2, 3],
                            cold_start=1, cold_end=5, warm_up=2, substitutes=substitutes_record(blob, [2, 3], "lowrank"))
    built = {weights: SubstituteTarget(width=64, weights=weights).build(profile, blob) for weights in ("full", "w8a8")}
    assert all(isinstance(built["w8a8"][layer], Int8LowRank) for layer in (2, 3))
    assert all(isinstance(built["full"][layer], Substitute) for layer in (2, 3))
    assert ActiveProfile(1, profile.skip_params(), built["w8a8"]).substitute_bytes < subs.nbytes / 2


def corrupt(served: dict, version: int, how: str) -> None:
    key = f"ffnskip:profile:{MODEL}:substitutes:v{version}"
    if how == "missing":
        served["client"].delete(key)
    else:  # the same size, one byte flipped
        blob = bytearray(served["client"].get(key))
        blob[len(blob) // 2] ^= 0xFF
        served["client"].set(key, bytes(blob))


@pytest.mark.parametrize("case", ["flipped", "missing", "not a set", "wrong width", "other layers"])
def test_a_profile_with_bad_substitutes_is_not_adopted(served: dict, case: str) -> None:
    fingerprint, subs = served["fingerprint"], substitute_set(seed=2)
    good = activate(served, static_profile(fingerprint, subs.to_bytes()), subs.to_bytes())
    answer = generate(served).token_ids

    bad_blob = {"not a set": b"not a substitute set", "wrong width": substitute_set(seed=3, width=8).to_bytes(),
                "other layers": substitute_set(seed=3, layers=(2,)).to_bytes()}.get(case, substitute_set(seed=3).to_bytes())
    bad = served["store"].publish(static_profile(fingerprint, bad_blob, layers=[2, 3]), substitutes=bad_blob)
    if case in ("flipped", "missing"):
        corrupt(served, bad, case)
    with capture_logs() as logs:
        served["store"].activate(MODEL, bad)
        served["decoder"].profiles.refresh()  # what the activation event does, here and now
    refused = [e for e in logs if e["event"] == "profile substitutes refused; keeping previous" and e["version"] == bad]
    assert refused and refused[0]["log_level"] == "error" and refused[0]["kept_version"] == good
    assert info(served).profile_version == good
    kept = generate(served)
    assert kept.profile_version == good and kept.token_ids == answer


def test_a_resync_keeps_the_built_substitutes_without_reading_them_again(served: dict) -> None:
    subs = substitute_set(seed=6)
    version = activate(served, static_profile(served["fingerprint"], subs.to_bytes()), subs.to_bytes())
    active = served["decoder"].profiles.current.substitutes
    served["client"].delete(f"ffnskip:profile:{MODEL}:substitutes:v{version}")  # a re-read would now find none
    with capture_logs() as logs:
        assert served["decoder"].profiles.refresh()  # what the slow timer and every resubscription do
    assert not [e for e in logs if e["log_level"] == "error"]
    assert served["decoder"].profiles.current.version == version and served["decoder"].profiles.current.substitutes is active


def test_the_disk_copy_carries_the_substitutes(redis_server: RedisServer, tmp_path: Path) -> None:
    store = ProfileStore(connect(RedisSettings(url=redis_server.url, retries=1, socket_timeout_s=1.0)))
    subs = substitute_set(seed=4)
    blob = subs.to_bytes()
    watch = partial(ProfileWatcher, store, MODEL, "ab12cd34", tmp_path, DENSE)
    stale = store.publish(static_profile("ab12cd34", substitute_set(seed=5).to_bytes()),
                          substitutes=substitute_set(seed=5).to_bytes(), activate=True)
    first = watch()
    assert first.refresh() and first.current.version == stale
    version = store.publish(static_profile("ab12cd34", blob), substitutes=blob, activate=True)
    assert first.refresh() and first.current.version == version
    copies = sorted(p.name for p in tmp_path.iterdir())
    assert copies == [f"{MODEL}.profile.json", f"{MODEL}.substitutes.{substitutes_record(blob, [2, 3])['digest']}.bin"]

    redis_server.stop()  # a restart without Redis serves the disk copy, substitutes included
    restarted = watch()
    restarted.start()
    restarted.stop()
    served = restarted.current.substitutes
    assert restarted.current.version == version and served is not None
    assert all(torch.equal(served[layer].bias, subs[layer].bias) for layer in (2, 3))

    blob_file = tmp_path / copies[1]
    blob_file.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))  # a damaged copy is refused, not served
    with capture_logs() as logs:
        damaged = watch()
        damaged.start()
        damaged.stop()
    assert damaged.current.version == 0 and damaged.current.substitutes is None
    assert any(e["event"] == "profile substitutes refused; keeping previous" and e["version"] == version for e in logs)
