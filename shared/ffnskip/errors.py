"""One error taxonomy for the engine, the stores and the services.

Every layer raises these; the gRPC edge maps them to status codes in one table
(ffnskip.rpc.status) and the CLI prints them without a traceback.
"""

from __future__ import annotations


class FfnSkipError(Exception):
    """Base class: a failure a user can act on, with a message that says what."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(FfnSkipError):
    """A request or configuration field is out of range or malformed."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class NotFound(FfnSkipError):
    """An unknown model, profile, job or decoder."""


class AlreadyExists(FfnSkipError):
    """A resource with this key exists and may not be overwritten."""


class FailedPrecondition(FfnSkipError):
    """The request is well-formed but the system is not in a state to serve it
    (for example a profile whose fingerprint does not match the loaded model)."""


class ResourceExhausted(FfnSkipError):
    """A queue or a capacity limit is full; retry later."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(FfnSkipError):
    """A dependency (Redis, a decoder) is unreachable or the server is draining."""


class DeadlineExceeded(FfnSkipError):
    """The request's deadline passed before it finished."""


class Cancelled(FfnSkipError):
    """The client cancelled the request."""


class Unauthenticated(FfnSkipError):
    """No or an unknown API key."""


class PermissionDenied(FfnSkipError):
    """A valid key without the right for this call."""
