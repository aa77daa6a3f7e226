"""API-key authentication: `authorization: Bearer <key>` metadata, keys held as sha256
digests only, two roles (api, ops), applied by one server interceptor.

Keys are never logged: they exist in plain text only in the environment and in the
request metadata, and only their digests are compared.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from ffnskip.errors import InvalidArgument, PermissionDenied, Unauthenticated

API = "api"
OPS = "ops"
DIGEST_PREFIX = "sha256:"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _digests(text: str, name: str) -> frozenset[str]:
    """Comma-separated keys; an entry `sha256:<hex>` is already a digest (so a Secret
    need not hold plain keys)."""
    out = set()
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        if entry.startswith(DIGEST_PREFIX):
            digest = entry[len(DIGEST_PREFIX):].lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise InvalidArgument(name, "a sha256: entry must be 64 hex digits")
            out.add(digest)
        else:
            out.add(hash_key(entry))
    return frozenset(out)


@dataclass(frozen=True)
class KeyRing:
    """Digests of the API keys and the ops keys (an ops key is also an API key)."""

    api: frozenset[str] = frozenset()
    ops: frozenset[str] = frozenset()

    @classmethod
    def from_strings(cls, api_keys: str, ops_keys: str) -> KeyRing:
        return cls(_digests(api_keys, "FFNSKIP_API_KEYS"), _digests(ops_keys, "FFNSKIP_OPS_KEYS"))

    @property
    def empty(self) -> bool:
        return not (self.api or self.ops)

    def __repr__(self) -> str:  # digests are not secrets, but there is no reason to print them
        return f"KeyRing(api={len(self.api)} keys, ops={len(self.ops)} keys)"

    def role_of(self, key: str) -> str | None:
        digest = hash_key(key)
        # compare_digest over every entry: no early exit that times which key matched
        is_ops = any([hmac.compare_digest(digest, d) for d in self.ops])
        is_api = any([hmac.compare_digest(digest, d) for d in self.api])
        return OPS if is_ops else API if is_api else None


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def authorize(keys: KeyRing, metadata: Iterable[tuple[str, Any]] | None, needed: str) -> str:
    """The caller's role, or Unauthenticated / PermissionDenied."""
    token = bearer_token(metadata)
    if token is None:
        raise Unauthenticated("missing API key: send metadata 'authorization: Bearer <key>'")
    role = keys.role_of(token)
    if role is None:
        raise Unauthenticated("unknown API key")
    if needed == OPS and role != OPS:
        raise PermissionDenied("this call needs an ops key")
    return role


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks the key of every call to a method in `roles` (method path -> needed role);
    other methods (health, reflection) pass untouched. A refusal is raised inside the
    handler as a taxonomy error, so the status interceptor maps and logs it like any other.
    """

    def __init__(self, keys: KeyRing, roles: Mapping[str, str],
                 on_refused: Callable[[str, BaseException], None] | None = None) -> None:
        self._keys = keys
        self._roles = dict(roles)
        self._on_refused = on_refused

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        needed = self._roles.get(details.method)
        if handler is None or needed is None:
            return handler
        try:
            authorize(self._keys, details.invocation_metadata, needed)
            return handler
        except (Unauthenticated, PermissionDenied) as exc:
            if self._on_refused is not None:
                self._on_refused(details.method, exc)
            return _refusing(handler, exc)


def _refusing(handler: grpc.RpcMethodHandler, exc: BaseException) -> grpc.RpcMethodHandler:
    """A handler of the same kind that raises `exc` when called."""
    kwargs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_stream is not None or handler.stream_stream is not None:
        async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            raise exc
            yield  # pragma: no cover  (makes this an async generator)

        assert inspect.isasyncgenfunction(refuse_stream)
        factory = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
        return factory(refuse_stream, **kwargs)

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise exc

    factory = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
    return factory(refuse, **kwargs)
