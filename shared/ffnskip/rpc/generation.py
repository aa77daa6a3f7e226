"""GenerateRequest <-> engine parameters, shared by the decoder and the gateway.

Validation errors name the request field as a client sees it (`sampling.top_p`,
`skip.threshold`, `messages[1].content`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ffnskip.config import CHAT_ROLES, DENSE, Policy, SamplingParams, SkipParams
from ffnskip.errors import InvalidArgument
from ffnskip.rpc.convert import policy_of
from ffnskip.v1 import generation_pb2 as pb

OVERRIDABLE_POLICIES = tuple(policy for policy in Policy if policy is not Policy.OBSERVE)  # observe is the calibrator's
# Bounds on client input: what a request may hold, and what an error may echo of it.
MAX_PROMPT_CHARS = 200_000  # the prompt, or all chat messages' contents together
MAX_MESSAGES = 256
MAX_PROMPT_TOKENS = 65_536  # a prompt given as token ids
MAX_MODEL_CHARS = 256
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
ECHO_CHARS = 64  # of a client's value quoted back in an error message


def shown(value: str) -> str:
    """A client's value as an error message may quote it: repr'd and cut to ECHO_CHARS."""
    return repr(value) if len(value) <= ECHO_CHARS else f"{value[:ECHO_CHARS]!r}... ({len(value)} characters)"


@dataclass(frozen=True)
class OverrideLimits:
    """What a request may change in the active profile's skip parameters."""

    policies: tuple[Policy, ...] = OVERRIDABLE_POLICIES
    min_threshold: float = 0.5
    max_skip: int = 64  # the largest k a request may ask for
    min_warm_up: int = 0
    min_quorum: float = 0.25  # a lower quorum skips for rows that did not ask to


def prompt_of(request: pb.GenerateRequest) -> tuple[str | None, list[dict] | None, list[int] | None]:
    """(prompt, messages, prompt token ids): exactly one is set."""
    given = [name for name, present in (("prompt", bool(request.prompt)), ("messages", bool(request.messages)),
                                        ("prompt_token_ids", bool(request.prompt_token_ids))) if present]
    if len(given) > 1:
        raise InvalidArgument(given[0], f"give one of prompt, messages and prompt_token_ids, not {' and '.join(given)}")
    if request.prompt_token_ids:
        if len(request.prompt_token_ids) > MAX_PROMPT_TOKENS:
            raise InvalidArgument("prompt_token_ids", f"at most {MAX_PROMPT_TOKENS} tokens, got {len(request.prompt_token_ids)}")
        if any(token < 0 for token in request.prompt_token_ids):
            raise InvalidArgument("prompt_token_ids", "token ids must be >= 0")
        return None, None, list(request.prompt_token_ids)
    if request.messages:
        if len(request.messages) > MAX_MESSAGES:
            raise InvalidArgument("messages", f"at most {MAX_MESSAGES} messages, got {len(request.messages)}")
        messages, chars = [], 0
        for i, m in enumerate(request.messages):
            if m.role not in CHAT_ROLES:
                raise InvalidArgument(f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}, got {shown(m.role)}")
            if not m.content.strip():
                raise InvalidArgument(f"messages[{i}].content", "must not be empty")
            chars += len(m.content)
            if chars > MAX_PROMPT_CHARS:
                raise InvalidArgument(f"messages[{i}].content", f"the messages together exceed {MAX_PROMPT_CHARS} characters")
            messages.append({"role": m.role, "content": m.content})
        return None, messages, None
    if not request.prompt.strip():
        raise InvalidArgument("prompt", "must not be empty (or give messages or prompt_token_ids)")
    if len(request.prompt) > MAX_PROMPT_CHARS:
        raise InvalidArgument("prompt", f"longer than {MAX_PROMPT_CHARS} characters")
    return request.prompt, None, None


def sampling_of(options: pb.SamplingOptions, default_max_new_tokens: int, max_new_tokens_cap: int) -> SamplingParams:
    max_new = options.max_new_tokens or default_max_new_tokens
    if options.max_new_tokens < 0:
        raise InvalidArgument("sampling.max_new_tokens", f"must be >= 1, got {options.max_new_tokens}")
    if max_new > max_new_tokens_cap:
        raise InvalidArgument("sampling.max_new_tokens", f"must be <= {max_new_tokens_cap}, got {max_new}")
    if len(options.stop) > MAX_STOP_STRINGS:
        raise InvalidArgument("sampling.stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(options.stop)}")
    for i, stop in enumerate(options.stop):
        if len(stop) > MAX_STOP_CHARS:
            raise InvalidArgument(f"sampling.stop[{i}]", f"at most {MAX_STOP_CHARS} characters, got {len(stop)}")
    if options.top_logprobs and not (options.logprobs or options.prompt_logprobs):
        raise InvalidArgument("sampling.top_logprobs", "needs logprobs or prompt_logprobs")
    try:
        return SamplingParams(
            max_new_tokens=max_new, temperature=options.temperature,
            top_p=options.top_p if options.HasField("top_p") else 1.0, top_k=options.top_k,
            seed=options.seed if options.HasField("seed") else None, stop=tuple(options.stop),
            ignore_eos=options.ignore_eos, min_tokens=options.min_tokens,
            min_p=options.min_p if options.HasField("min_p") else 0.0,
            presence_penalty=options.presence_penalty, frequency_penalty=options.frequency_penalty,
            repetition_penalty=options.repetition_penalty if options.HasField("repetition_penalty") else 1.0,
            logprobs=options.logprobs, top_logprobs=options.top_logprobs, prompt_logprobs=options.prompt_logprobs,
        )
    except InvalidArgument as exc:
        raise InvalidArgument(f"sampling.{exc.field}", exc.problem) from exc


def skip_of(overrides: pb.SkipOverrides, base: SkipParams, limits: OverrideLimits | None = None) -> SkipParams:
    """The profile's parameters with the request's overrides. The ranges are SkipParams's to check
    (the one statement of what the skip loop accepts); `limits`, the decoder's FFNSKIP_OVERRIDE_*
    settings, then narrow what a request may change (None: only the policies it may name at all)."""
    policy = _policy(overrides, limits.policies if limits else OVERRIDABLE_POLICIES)
    if overrides.HasField("max_skip") and overrides.max_skip < -1:  # the wire's -1 stands for None
        raise InvalidArgument("skip.max_skip", f"must be >= 0, or -1 for up to cold_end, got {overrides.max_skip}")
    changes: dict[str, Any] = {} if policy is None else {"policy": policy}
    for name in ("threshold", "quorum"):
        if overrides.HasField(name):
            changes[name] = float(getattr(overrides, name))
    if overrides.HasField("max_skip"):
        changes["max_skip"] = None if overrides.max_skip == -1 else overrides.max_skip
    if overrides.HasField("warm_up"):
        changes["warm_up"] = overrides.warm_up
    try:
        params = replace(base, **changes)
    except InvalidArgument as exc:
        raise InvalidArgument(f"skip.{exc.field}", exc.problem) from exc
    if limits is not None:
        _within(changes, limits)
    return params


def _policy(overrides: pb.SkipOverrides, allowed: tuple[Policy, ...]) -> Policy | None:
    """The policy a request names (ffnskip.rpc.convert.policy_of), if it is one the request may name."""
    try:
        policy = policy_of(overrides, "skip.policy")
    except InvalidArgument as exc:  # a value or a name no policy has
        got = f"value {overrides.policy_value}" if exc.field == "skip.policy_value" else shown(overrides.policy)
        raise InvalidArgument(exc.field, f"must be one of {', '.join(allowed)}, got {got}") from None
    if policy is not None and policy not in allowed:
        raise InvalidArgument("skip.policy", f"must be one of {', '.join(allowed)}, got {shown(policy.value)}")
    return policy


def _within(changes: dict[str, Any], limits: OverrideLimits) -> None:
    """The decoder's limits on the values a request changed (each already in SkipParams's range)."""
    if "threshold" in changes and changes["threshold"] < limits.min_threshold:
        raise InvalidArgument("skip.threshold", f"must be in [{limits.min_threshold:g}, 1], got {changes['threshold']:g}")
    if changes.get("max_skip") is not None and changes["max_skip"] > limits.max_skip:
        raise InvalidArgument("skip.max_skip",
                              f"must be in [-1, {limits.max_skip}] (-1 = up to cold_end), got {changes['max_skip']}")
    if "warm_up" in changes and changes["warm_up"] < limits.min_warm_up:
        raise InvalidArgument("skip.warm_up", f"must be >= {limits.min_warm_up}, got {changes['warm_up']}")
    if "quorum" in changes and changes["quorum"] < limits.min_quorum:
        raise InvalidArgument("skip.quorum", f"must be in [{limits.min_quorum:g}, 1], got {changes['quorum']:g}")


def validate_request(request: pb.GenerateRequest, max_new_tokens_cap: int = 4096) -> None:
    """The checks that need no model (the gateway runs these before routing)."""
    if not request.model:
        raise InvalidArgument("model", "must not be empty")
    if len(request.model) > MAX_MODEL_CHARS:
        raise InvalidArgument("model", f"at most {MAX_MODEL_CHARS} characters, got {len(request.model)}")
    prompt_of(request)
    sampling_of(request.sampling, 128, max_new_tokens_cap)
    # The gateway runs this before it routes: a request no decoder would accept is refused without
    # costing one an attempt. The rules are skip_of's own, without the limits a decoder is configured
    # with (the gateway does not know them; the decoder checks them when it runs skip_of again).
    skip_of(request.skip, DENSE)


def stats_to_proto(stats) -> pb.SkipStats:
    return pb.SkipStats(
        skip_ratio=stats.skip_ratio, decode_skip_ratio=stats.decode_skip_ratio,
        ffn_blocks_total=stats.ffn_blocks_total, ffn_blocks_skipped=stats.ffn_blocks_skipped,
        per_layer_skips=stats.per_layer_skips, generated_tokens=stats.generated_tokens,
    )
