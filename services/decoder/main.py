"""Decoder process: `python -m services.decoder.main` (settings from FFNSKIP_* variables)."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from functools import partial

if __name__ == "__main__":
    # transformers imports scipy's optimiser (for an object-detection loss) wherever scipy is
    # installed: 35 MB of resident memory that a decoder never uses. Marked absent before anything
    # imports transformers, in the decoder's own process only (importers of this module keep it).
    sys.modules.setdefault("scipy", None)  # type: ignore[arg-type]

import torch

from ffnskip.aio import cancel_and_wait
from ffnskip.config import DENSE
from ffnskip.engine import Engine, int8_kernel, load_model
from ffnskip.engine.precompile import compile_in_child
from ffnskip.logs import get_logger
from ffnskip.rpc.process import run_service
from ffnskip.rpc.server import Server
from ffnskip.store.connection import connect
from ffnskip.store.profiles import ProfileStore
from ffnskip.store.registry import DecoderRegistry
from ffnskip.v1 import decoder_pb2, decoder_pb2_grpc
from services.decoder.engine_loop import EngineLoop
from services.decoder.metrics import DecoderMetrics
from services.decoder.profiles import ProfileWatcher, SubstituteTarget
from services.decoder.registration import Registration
from services.decoder.service import DecoderService
from services.decoder.servicer import DecoderServicer
from services.decoder.settings import DecoderSettings

log = get_logger(__name__)
SERVICE_NAME = decoder_pb2.DESCRIPTOR.services_by_name["Decoder"].full_name


def build_engine(settings: DecoderSettings) -> Engine:
    """Load the model and build the engine (on the engine thread: EngineLoop)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    loaded = load_model(settings.model, device=settings.device, dtype=settings.dtype, cache_dir=settings.cache_dir,
                        weights=settings.weights)
    log.info("model loaded", model=settings.model_name, fingerprint=loaded.fingerprint, device=str(loaded.device),
             dtype=str(loaded.dtype), weights=loaded.weights, seconds=round(loaded.load_seconds, 2))
    return Engine(loaded, max_batch=settings.max_batch, max_seq_len=settings.max_seq_len, compile=settings.compile,
                  eager_until_warm=True, prefill_chunk=settings.prefill_chunk or None, prompt_cache=settings.prompt_cache)


def load_compiled_segments(engine_loop: EngineLoop, max_batch: int) -> None:
    """Load the decode segments of every batch bucket, smallest first; those not in the compile
    cache are compiled by a child process (PyTorch's compiler is not thread-safe, and this process
    serves meanwhile), each bucket loaded as soon as it is complete. Then free the model's own copy
    of the weights: nothing else in a decoder runs the HF modules. The loading and the release run
    on the engine thread, between steps (EngineLoop: one thread for every torch call)."""
    engine = engine_loop.engine
    batch_sizes = range(1, max_batch + 1)
    total = engine.packages_to_compile(batch_sizes)
    log.info("loading compiled decode segments", to_compile=total)
    started = time.perf_counter()
    try:
        if total:
            for event in compile_in_child(engine.loaded, max_batch):
                if "package" in event:
                    log.info("compiled a decode segment", done=event["package"], of=total)
                else:  # a complete bucket: it serves compiled from its next step
                    engine_loop.call(partial(engine.warm_up, [event["bucket"]]))
        engine_loop.call(partial(engine.warm_up, batch_sizes))  # what was on disk already
    except Exception:  # the decoder keeps serving eagerly
        log.exception("compiling decode segments failed; decoding stays eager")
        return
    released = engine_loop.call(engine.release_raw_weights)
    log.info("decode segments ready", seconds=round(time.perf_counter() - started, 1),
             released_mb=round(released / 2**20))


def profile_watcher(settings: DecoderSettings, engine_loop: EngineLoop, store: ProfileStore) -> ProfileWatcher:
    """The watcher of the active profile, building its substitutes for the engine (its device,
    dtype and width) on the engine thread."""
    loaded = engine_loop.engine.loaded
    target = SubstituteTarget(loaded.device, loaded.dtype, int(loaded.model.config.hidden_size), loaded.weights,
                              run=engine_loop.call)
    return ProfileWatcher(store, settings.model_name, loaded.fingerprint, settings.profile_cache_dir, default=DENSE,
                          mode=settings.skip_policy, quorum=settings.aligned_quorum, substitutes=target)


async def serve(settings: DecoderSettings) -> None:
    metrics = DecoderMetrics(settings.model_name, lambda: engine_loop.running, lambda: engine_loop.waiting,
                             lambda: profiles.current.version, lambda: profiles.current.substitute_bytes)
    engine_loop = EngineLoop(partial(build_engine, settings), settings.max_queue, on_result=metrics.finished,
                             on_step=metrics.stepped)
    loaded = engine_loop.start().loaded
    metrics.watch_prompt_cache(engine_loop.engine.scheduler.prompt_cache)
    metrics.watch_ffn_reads(engine_loop.engine)
    if settings.compile:  # the decoder serves eagerly meanwhile; each batch bucket runs compiled once loaded
        threading.Thread(target=load_compiled_segments, args=(engine_loop, settings.max_batch), name="compile",
                         daemon=True).start()
    redis_client = connect(settings.redis)
    profiles = profile_watcher(settings, engine_loop, ProfileStore(redis_client))
    profiles.start()
    facts = {"fingerprint": loaded.fingerprint, "device": str(loaded.device),
             "dtype": str(loaded.dtype).removeprefix("torch."), "weights": loaded.weights, "num_layers": loaded.num_layers}
    metrics.describe_engine(str(loaded.device), str(loaded.dtype).removeprefix("torch."), loaded.weights,
                            int8_kernel.loaded_build() or "none", engine_loop.engine.weight_bytes.total)
    if settings.metrics_port:
        metrics.serve(settings.metrics_host, settings.metrics_port)
    servicer = DecoderServicer(DecoderService(settings, engine_loop, profiles), facts)
    server = Server([SERVICE_NAME])
    decoder_pb2_grpc.add_DecoderServicer_to_server(servicer, server.grpc)
    port = await server.start(f"{settings.host}:{settings.port}")
    address = settings.advertise_address if settings.port else f"{settings.advertise_address.rsplit(':', 1)[0]}:{port}"

    def registry_info() -> dict:
        return {"id": settings.decoder_id, "address": address, "model_id": settings.model_name,
                "capacity": settings.max_batch, "load": engine_loop.running + engine_loop.waiting,
                "profile_version": profiles.current.version, "draining": engine_loop.draining}

    registration = Registration(DecoderRegistry(redis_client), registry_info, settings.registry_ttl_s)
    registration.start()
    watchdog = asyncio.create_task(watch_engine(server, engine_loop, settings.stuck_after_s), name="engine-watchdog")
    await server.set_ready(True)
    log.info("decoder serving", address=address, decoder_id=settings.decoder_id)
    await server.wait_for_signal()
    await cancel_and_wait(watchdog)

    # Drain: stop taking work (readiness off, registry says draining), finish what runs, leave.
    engine_loop.drain()
    registration.beat_once()
    await server.drain(settings.drain_timeout_s, on_drain=lambda: asyncio.to_thread(engine_loop.idle.wait))
    registration.withdraw()
    profiles.stop()
    engine_loop.stop()
    log.info("decoder stopped")


async def watch_engine(server: Server, engine_loop: EngineLoop, stuck_after_s: float) -> None:
    """Liveness follows the engine thread: stuck with work for `stuck_after_s`, the pod says
    NOT_SERVING (and stops registering as healthy load) so Kubernetes restarts it."""
    while True:
        await asyncio.sleep(min(1.0, stuck_after_s / 4))  # the check's period
        stalled = engine_loop.stalled_s()
        if stalled > stuck_after_s:
            log.error("engine loop stuck; liveness NOT_SERVING", stalled_s=round(stalled, 1), limit_s=stuck_after_s)
            await server.set_live(False)
            await server.set_ready(False)
            return


def main() -> int:
    return run_service("decoder", DecoderSettings.from_env, serve)


if __name__ == "__main__":
    sys.exit(main())
