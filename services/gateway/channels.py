"""The gateway's channels to decoder pods: one long-lived channel per address."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc

from ffnskip.rpc.channels import message_limits
from ffnskip.v1 import decoder_pb2_grpc


class ChannelPool:
    """One long-lived channel per decoder address, with keepalive (a silently dead pod
    is detected mid-stream) and explicit message-size limits."""

    def __init__(self, max_message_bytes: int, keepalive_s: float) -> None:
        self._options = [
            ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 0),  # ping only while calls run: idle pods are not pestered
            ("grpc.http2.max_pings_without_data", 0),
            *message_limits(max_message_bytes),
            ("grpc.enable_retries", 0),  # retries are ours, with the first-token rule
            ("grpc.initial_reconnect_backoff_ms", 200),  # a restarted pod is found again quickly
            ("grpc.max_reconnect_backoff_ms", 5_000),
        ]
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._busy: dict[str, int] = {}  # calls running per address

    @contextlib.contextmanager
    def stub(self, address: str) -> Iterator[decoder_pb2_grpc.DecoderStub]:
        """A stub on the address's channel, marked busy while the block runs."""
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address, options=self._options)
        self._busy[address] = self._busy.get(address, 0) + 1
        try:
            yield decoder_pb2_grpc.DecoderStub(channel)
        finally:
            self._busy[address] -= 1
            if not self._busy[address]:
                del self._busy[address]

    async def retain(self, addresses: set[str]) -> None:
        """Close the channels of pods that left the registry (not while calls run on them:
        a registry hiccup must not cut streams that are fine)."""
        for address in [a for a in self._channels if a not in addresses and a not in self._busy]:
            await self._channels.pop(address).close(grace=None)

    async def close(self) -> None:
        await self.retain(set())
