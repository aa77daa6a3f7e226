"""A Python client for the gateway's public API (protos/ffnskip/v1/gateway.proto).

    from ffnskip.client import GatewayClient, build_request

    with GatewayClient("127.0.0.1:50051", api_key="...") as client:
        reply = client.generate(build_request("smollm2-135m", chat="Why is the sky blue?"))
        print(reply.text, reply.skip_stats.decode_skip_ratio, reply.served_by)
        for message in client.stream(build_request("smollm2-135m", prompt="Once upon a time")):
            if message.HasField("token"):
                print(message.token.text, end="", flush=True)

Errors arrive as grpc.RpcError with the standard codes (see gateway.proto).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import grpc

from ffnskip.rpc.channels import PUBLIC_MAX_MESSAGE_BYTES, message_limits
from ffnskip.rpc.convert import policy_fields, policy_of
from ffnskip.v1 import gateway_pb2, gateway_pb2_grpc, generation_pb2

DEFAULT_ADDRESS = "127.0.0.1:50051"


def build_request(
    model: str, prompt: str | None = None, chat: str | None = None,
    messages: Sequence[tuple[str, str]] = (), max_new_tokens: int = 0, temperature: float = 0.0,
    top_p: float | None = None, top_k: int = 0, seed: int | None = None, stop: Sequence[str] = (),
    policy: str = "", threshold: float | None = None, max_skip: int | None = None,
    warm_up: int | None = None, quorum: float | None = None, request_id: str = "",
) -> generation_pb2.GenerateRequest:
    """A GenerateRequest: `prompt` (plain text), or `chat` (one user turn), or `messages`
    ((role, content) pairs). Unset optional fields keep the server's defaults (no seed: a
    fresh one per request, reported in the response)."""
    turns = [generation_pb2.ChatMessage(role=role, content=content) for role, content in messages]
    if chat is not None:
        turns.append(generation_pb2.ChatMessage(role="user", content=chat))
    sampling = generation_pb2.SamplingOptions(max_new_tokens=max_new_tokens, temperature=temperature,
                                              top_k=top_k, seed=seed, stop=list(stop))  # None: unset
    if top_p is not None:
        sampling.top_p = top_p
    skip = generation_pb2.SkipOverrides(**policy_fields(policy))
    for name, value in (("threshold", threshold), ("max_skip", max_skip), ("warm_up", warm_up), ("quorum", quorum)):
        if value is not None:
            setattr(skip, name, value)
    return generation_pb2.GenerateRequest(model=model, prompt=prompt or "", messages=turns, sampling=sampling,
                                          skip=skip, request_id=request_id)


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def channel_options(max_message_bytes: int = PUBLIC_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return message_limits(max_message_bytes)


class GatewayClient:
    """A synchronous client (thread-safe: one channel, many calls)."""

    def __init__(self, address: str = DEFAULT_ADDRESS, api_key: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None, timeout_s: float | None = 300.0) -> None:
        if tls or root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self.channel = grpc.secure_channel(address, credentials, options=channel_options())
        else:
            self.channel = grpc.insecure_channel(address, options=channel_options())
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)
        self.metadata = auth_metadata(api_key)
        self.timeout_s = timeout_s

    def generate(self, request: generation_pb2.GenerateRequest,
                 timeout_s: float | None = None) -> generation_pb2.GenerateResponse:
        return self.stub.Generate(request, timeout=timeout_s or self.timeout_s, metadata=self.metadata)

    def stream(self, request: generation_pb2.GenerateRequest,
               timeout_s: float | None = None) -> Iterator[generation_pb2.GenerateStreamResponse]:
        """Token messages, then the summary. The returned iterator is also the call:
        `.initial_metadata()` holds x-served-by, `.cancel()` stops the generation."""
        return self.stub.GenerateStream(request, timeout=timeout_s or self.timeout_s, metadata=self.metadata)

    def list_models(self, timeout_s: float = 10.0) -> gateway_pb2.ListModelsResponse:
        return self.stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=timeout_s, metadata=self.metadata)

    def telemetry(self, model: str = "", timeout_s: float = 10.0) -> gateway_pb2.GetTelemetryResponse:
        return self.stub.GetTelemetry(gateway_pb2.GetTelemetryRequest(model=model), timeout=timeout_s,
                                      metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def served_by(call: object) -> str:
    """The decoder pod named in a stream's initial metadata ("" when not yet known)."""
    for key, value in call.initial_metadata() or ():  # type: ignore[attr-defined]
        if key == "x-served-by":
            return str(value)
    return ""


def telemetry_table(response: gateway_pb2.GetTelemetryResponse) -> str:
    """GetTelemetry as a text table: one row per model total ("*") and per pod."""
    header = ("model", "decoder", "reqs", "errors", "failover", "tokens", "skip", "dec.skip",
              "ttft p50/p95 ms", "itl p50/p95 ms", "e2e p50/p95 s")
    rows = [header]
    for g in response.groups:
        errors = ",".join(f"{code}={n}" for code, n in sorted(g.errors_by_code.items())) or "0"
        rows.append((
            g.model, g.decoder or "*", str(g.requests), errors, str(g.failovers), str(g.generated_tokens),
            f"{g.skip_ratio:.3f}", f"{g.request_decode_skip_ratio.mean:.3f}",
            f"{g.time_to_first_token_seconds.p50 * 1e3:.0f}/{g.time_to_first_token_seconds.p95 * 1e3:.0f}",
            f"{g.inter_token_latency_seconds.p50 * 1e3:.1f}/{g.inter_token_latency_seconds.p95 * 1e3:.1f}",
            f"{g.e2e_request_latency_seconds.p50:.2f}/{g.e2e_request_latency_seconds.p95:.2f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([f"gateway replicas reporting: {response.gateways}", *lines])


def describe(summary: generation_pb2.GenerateResponse, client_s: float) -> str:
    """A response summary for people: pod, policy and profile, skip stats, latency."""
    stats, latency = summary.skip_stats, summary.latency
    profile = f"profile v{summary.profile_version}" if summary.profile_version else "no profile"
    return "\n".join([
        f"served by {summary.served_by} ({policy_of(summary)}, {profile}), finish reason {summary.finish_reason}",
        f"skip: {stats.skip_ratio:.1%} of FFN blocks ({stats.ffn_blocks_skipped}/{stats.ffn_blocks_total}), "
        f"{stats.decode_skip_ratio:.1%} after warm-up; per layer {list(stats.per_layer_skips)}",
        f"latency: first token {latency.ttft_ms:.0f} ms, total {latency.total_ms:.0f} ms, "
        f"{latency.tokens_per_s:.1f} tokens/s ({stats.generated_tokens} tokens; {client_s:.2f} s at the client)",
    ])
