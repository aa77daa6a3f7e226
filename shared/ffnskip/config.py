"""Frozen, validated parameter objects shared by the engine, the CLI and the services.

Validation lives in __post_init__ so that an object that exists is a valid one;
every failure names its field through InvalidArgument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

from ffnskip.errors import InvalidArgument

# The formats an engine holds its weight matrices in: "full" in the model's dtype, "int8" one byte
# a value with a scale per output row (engine.layers.quantise), activations kept in the dtype;
# "w8a8" the same int8 matrices whose products round the activations to int8 too, a scale per
# row (engine.layers.int8_product).
WEIGHT_FORMATS = ("full", "int8", "w8a8")
# The roles a chat message may have, as the chat templates of Llama-family models take them.
CHAT_ROLES = ("system", "user", "assistant")


class Policy(str, Enum):
    """The skip policies (tabled in the README). A member is its name as a string too, so
    JSON, the CLI and the wire carry the same spelling: `Policy("aligned") is Policy.ALIGNED`."""

    DENSE = "dense"  # never skip: the baseline
    ADAPTIVE = "adaptive"  # the paper's rule, per row
    ALIGNED = "aligned"  # the paper's rule, decided together by a batch's rows (a quorum of votes)
    RANDOM = "random"  # each FFN with `probability`
    NON_ADAPTIVE = "non_adaptive"  # each hot-region FFN with `probability`
    STATIC = "static"  # the fixed set `static_layers`
    OBSERVE = "observe"  # never skip; record cos(h, out) per layer (the calibrator's instrument)

    def __str__(self) -> str:  # "aligned", not "Policy.ALIGNED", in f-strings and logs
        return self.value

    @property
    def planned(self) -> bool:
        """Its skips for a token are known before the token's first layer runs."""
        return self in (Policy.STATIC, Policy.RANDOM, Policy.NON_ADAPTIVE)

    @property
    def adaptive(self) -> bool:
        """It decides layer by layer from the hidden state's similarity across the FFN."""
        return self in (Policy.ADAPTIVE, Policy.ALIGNED)

    @staticmethod
    def parse(value: object, field: str = "policy") -> Policy:
        """A policy from its name; InvalidArgument naming `field` otherwise."""
        try:
            return Policy(value)
        except ValueError:
            raise InvalidArgument(field, f"unknown policy {value!r}; expected one of {', '.join(POLICIES)}") from None


POLICIES: tuple[str, ...] = tuple(policy.value for policy in Policy)


@dataclass(frozen=True)
class SkipParams:
    """What the skip loop does (the policies are tabled in the README).

    cold_end = None means "the last layer stays cold" (L - 1, where cosine similarity is
    low in every model measured), resolved against the model by `resolved(num_layers)`;
    max_skip = None means "up to cold_end".
    """

    policy: Policy = Policy.ADAPTIVE  # a policy's name is accepted and made a Policy
    cold_start: int = 1
    cold_end: int | None = None
    threshold: float = 0.97
    max_skip: int | None = 4
    warm_up: int = 16
    probability: float = 0.25  # random / non_adaptive
    static_layers: tuple[int, ...] = ()  # static
    seed: int = 0  # random / non_adaptive draws
    quorum: float = 0.5  # aligned: share of a batch's rows that must vote skip for all to skip

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", Policy.parse(self.policy))
        if self.cold_start < 0:
            raise InvalidArgument("cold_start", f"must be >= 0, got {self.cold_start}")
        if self.cold_end is not None and self.cold_end <= self.cold_start:
            raise InvalidArgument("cold_end", f"must be > cold_start ({self.cold_start}), got {self.cold_end}")
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and 0.0 < self.threshold <= 1.0):
            raise InvalidArgument("threshold", f"must be in (0, 1], got {self.threshold}")
        if self.max_skip is not None and self.max_skip < 0:
            raise InvalidArgument("max_skip", f"must be >= 0 (or null for up to cold_end), got {self.max_skip}")
        if self.warm_up < 0:
            raise InvalidArgument("warm_up", f"must be >= 0, got {self.warm_up}")
        if not (0.0 <= self.probability <= 1.0):
            raise InvalidArgument("probability", f"must be in [0, 1], got {self.probability}")
        if not (0.0 < self.quorum <= 1.0):
            raise InvalidArgument("quorum", f"must be in (0, 1], got {self.quorum}")
        if any(layer < 0 for layer in self.static_layers):
            raise InvalidArgument("static_layers", "layer indices must be >= 0")
        object.__setattr__(self, "static_layers", tuple(sorted(set(self.static_layers))))

    def resolved(self, num_layers: int) -> SkipParams:
        """Check against a model with `num_layers` layers and fill in cold_end."""
        cold_end = max(num_layers - 1, self.cold_start + 1) if self.cold_end is None else self.cold_end
        if cold_end > num_layers:
            raise InvalidArgument("cold_end", f"must be <= the model's {num_layers} layers, got {cold_end}")
        if self.cold_start >= cold_end:
            raise InvalidArgument("cold_start", f"must be < cold_end ({cold_end}), got {self.cold_start}")
        bad = [layer for layer in self.static_layers if layer >= num_layers]
        if bad:
            raise InvalidArgument("static_layers", f"layers {bad} do not exist in a {num_layers}-layer model")
        return replace(self, cold_end=cold_end)

    def with_overrides(self, **overrides: object) -> SkipParams:
        """A copy with the given non-None fields replaced (validated again)."""
        changes: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
        return replace(self, **changes) if changes else self


DENSE = SkipParams(policy=Policy.DENSE)


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen and when a sequence stops. temperature 0 = greedy.

    The logits are adjusted first (penalties; end-of-sequence masked before `min_tokens`), then
    a greedy row takes the most likely token and a sampled row draws after temperature, top_k,
    top_p and min_p. `seed` None = a fresh random seed per sequence (reported back)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0  # end-of-sequence and stop strings are ignored until this many tokens
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability
    presence_penalty: float = 0.0  # OpenAI's: once per distinct generated token
    frequency_penalty: float = 0.0  # OpenAI's: once per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # CTRL's, over prompt and generated tokens (1 = off)
    logprobs: bool = False  # record each generated token's log-probability
    top_logprobs: int = 0  # with logprobs or prompt_logprobs: this many alternatives per position
    prompt_logprobs: bool = False  # record each prompt token's log-probability

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidArgument("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            raise InvalidArgument("temperature", f"must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidArgument("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgument("top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2 ** 64:
            raise InvalidArgument("seed", f"must be in [0, 2^64), got {self.seed}")
        if any(not s for s in self.stop):
            raise InvalidArgument("stop", "stop strings must be non-empty")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise InvalidArgument("min_tokens", f"must be in [0, max_new_tokens = {self.max_new_tokens}], got {self.min_tokens}")
        if not (0.0 <= self.min_p <= 1.0):
            raise InvalidArgument("min_p", f"must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -2.0 <= value <= 2.0):
                raise InvalidArgument(name, f"must be in [-2, 2], got {value}")
        if not (math.isfinite(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0):
            raise InvalidArgument("repetition_penalty", f"must be in (0, 10], got {self.repetition_penalty}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidArgument("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        """Whether the logits depend on the tokens so far (a penalty is set)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


MAX_TOP_LOGPROBS = 20  # as OpenAI's API


@dataclass(frozen=True)
class EngineConfig:
    """How a model is loaded and how many sequences decode at once."""

    model: str = "smollm2-135m"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    max_batch: int = 16
    max_seq_len: int | None = 2048  # None = the model's context window

    def __post_init__(self) -> None:
        if not self.model:
            raise InvalidArgument("model", "must not be empty")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise InvalidArgument("dtype", f"must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise InvalidArgument("device", f"must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.max_batch < 1:
            raise InvalidArgument("max_batch", f"must be >= 1, got {self.max_batch}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise InvalidArgument("max_seq_len", f"must be >= 2, got {self.max_seq_len}")


# The default budget, read off references no skip set enters (docs/quality.md, "The budget,
# decided before the candidates"; scripts/budget_references.py), on the embedded SmolLM2-135M:
# the KL is the lower end of the 95% interval of what rounding dense's linear weights once more
# to 4 bits (llama.cpp's Q4_0) costs, 0.229-0.293; rounded down to two significant digits.
DEFAULT_MAX_KL = 0.22  # nats per token, teacher-forced, after the warm-up
# dense's NLL of the free-running answers over its NLL of its own greedy ones: the smallest of
# three seeds of dense's own answers sampled at temperature 0.3 (1.120, 1.175, 1.149), rounded down
DEFAULT_MAX_RELATIVE_NLL = 1.11


@dataclass(frozen=True)
class QualityBudget:
    """What skipping may cost against dense, on the tokens after the warm-up: the mean
    teacher-forced KL(dense || policy) per token, and dense's NLL of the policy's free-running
    answers relative to its NLL of its own answers."""

    max_kl: float = DEFAULT_MAX_KL
    max_relative_nll: float = DEFAULT_MAX_RELATIVE_NLL

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_kl) and 0.0 < self.max_kl <= 10.0):
            raise InvalidArgument("max_kl", f"must be in (0, 10] nats per token, got {self.max_kl}")
        if not (math.isfinite(self.max_relative_nll) and 1.0 <= self.max_relative_nll <= 10.0):
            raise InvalidArgument("max_relative_nll", f"must be in [1, 10], got {self.max_relative_nll}")

    def kept_by(self, kl: float, relative_nll: float) -> bool:
        return kl <= self.max_kl and relative_nll <= self.max_relative_nll

    def to_dict(self) -> dict:
        return {"max_kl": self.max_kl, "max_relative_nll": self.max_relative_nll}
