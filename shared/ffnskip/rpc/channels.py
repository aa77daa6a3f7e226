"""The gRPC options every ffnskip channel and server shares: message limits and keepalive.

Two message limits: our own services trade large messages (a full prompt set, a profile
with its plot), the gateway's public API takes requests of a person's size.
"""

from __future__ import annotations

import grpc

MAX_MESSAGE_BYTES = 32 * 1024 * 1024  # between ffnskip services: 512 prompts x 8000 chars, a profile + plot
PUBLIC_MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # the gateway's API (its FFNSKIP_MAX_MESSAGE_BYTES default)


def message_limits(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


CHANNEL_OPTIONS = [
    *message_limits(MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),  # spot a dead peer within seconds, inside the server's permit
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def insecure_channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
