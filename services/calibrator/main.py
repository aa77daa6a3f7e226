"""`python -m services.calibrator.main`: the calibrator service process.

Reads CalibratorSettings from the environment (here and nowhere else), connects Redis,
serves the Calibrator API and runs FFNSKIP_CALIBRATOR_WORKERS worker threads. On
SIGTERM/SIGINT: readiness NOT_SERVING, workers stop claiming, in-flight RPCs and the
running jobs get FFNSKIP_DRAIN_TIMEOUT_S to finish; a job still running after that is
abandoned un-acked and another calibrator reclaims it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import threading
import uuid
from collections.abc import Mapping

from ffnskip.logs import get_logger
from ffnskip.rpc.process import run_service
from ffnskip.rpc.server import Server
from ffnskip.store import JobQueue, ProfileStore, connect
from ffnskip.v1 import calibrator_pb2, calibrator_pb2_grpc
from services.calibrator.servicer import CalibratorServicer
from services.calibrator.settings import CalibratorSettings
from services.calibrator.worker import ModelCache, Worker

log = get_logger(__name__)
SERVICE_NAME = calibrator_pb2.DESCRIPTOR.services_by_name["Calibrator"].full_name


class WorkerPool:
    def __init__(self, settings: CalibratorSettings, jobs: JobQueue, profiles: ProfileStore) -> None:
        self.stop = threading.Event()
        self.abandon = threading.Event()
        models = ModelCache(settings.device, settings.dtype, settings.cache_dir)
        # Consumer names must be unique across pods and restarts: a restarted pod must not
        # inherit (and silently resume) the pending entries of its previous incarnation.
        base = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.workers = [Worker(f"{base}-{i}", settings, jobs, profiles, models, self.stop, self.abandon)
                        for i in range(settings.workers)]
        self.threads = [threading.Thread(target=w.run, name=f"worker-{i}", daemon=True) for i, w in enumerate(self.workers)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    async def drain(self) -> None:
        """Stop claiming and wait for the running jobs (cancelled by the caller's timeout)."""
        self.stop.set()
        try:
            await asyncio.to_thread(self._join)
        except asyncio.CancelledError:
            self.abandon.set()  # past the grace period: leave the jobs to be reclaimed
            raise

    def _join(self) -> None:
        for thread in self.threads:
            while thread.is_alive() and not self.abandon.is_set():
                thread.join(timeout=0.5)


async def serve(settings: CalibratorSettings) -> None:
    """Serve until a signal and drain."""
    client = connect(settings.redis)
    jobs, profiles = JobQueue(client), ProfileStore(client)
    server = Server([SERVICE_NAME])
    calibrator_pb2_grpc.add_CalibratorServicer_to_server(CalibratorServicer(settings, jobs, profiles), server.grpc)
    await server.start(settings.address)
    pool = WorkerPool(settings, jobs, profiles)
    pool.start()
    await server.set_ready(True)
    log.info("calibrator ready", address=settings.address, port=server.port, models=list(settings.models),
             workers=settings.workers, redis=settings.redis.address)
    await server.wait_for_signal()
    await server.drain(settings.drain_timeout_s, on_drain=pool.drain)
    pool.abandon.set()
    client.close()
    if any(thread.is_alive() for thread in pool.threads):
        # A worker is still inside torch: normal interpreter teardown would abort the process
        # under it. The job stays unacknowledged and another calibrator reclaims it.
        log.warning("exiting with a calibration still running; it will be reclaimed by another worker")
        logging.shutdown()
        os._exit(0)


def main(environ: Mapping[str, str] | None = None) -> int:
    return run_service("calibrator", CalibratorSettings.from_env, serve, environ)


if __name__ == "__main__":
    sys.exit(main())
