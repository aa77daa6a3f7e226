"""The llama-server peer of the service bench (`ffnskip bench --target ... --peer llama-server`).

llama.cpp's server runs the very weights the service serves (a GGUF written from the
same model by `ffnskip.bench.gguf_export.ensure_gguf`), fed the token ids the decoder itself
feeds for the same chat messages, so both do the same work: the same prompts, the same
number of greedy tokens (EOS ignored), the same concurrency levels. A greedy check first
compares the two's tokens on a few prompts: the same weights and prompt must give the
same first tokens, else the comparison would be of different work.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ffnskip.bench.calls import run_level
from ffnskip.bench.llama_server import LlamaServer, context_size, find_llama_server
from ffnskip.errors import FailedPrecondition, InvalidArgument
from ffnskip.settings import cache_root

CHECK_PROMPTS = 4
CHECK_TOKENS = 32
# The same weights in fp32 may still flip a near-tie late in a sequence (the two sum in
# different orders), but a tie within the first few greedy tokens is rare enough that a
# difference there means different prompts (a template, a BOS) or different weights.
MUST_AGREE_FIRST = 4
GGUF_PRECISIONS = {"float32": "f32", "bfloat16": "bf16"}


def compare_greedy(service: Sequence[Sequence[int]], peer: Sequence[Sequence[int]]) -> dict[str, Any]:
    """How far the two's greedy tokens agree, prompt by prompt: the index of the first
    difference (None: none), and over all prompts the share of tokens before the first
    difference and the share of positions that are equal."""
    if len(service) != len(peer):
        raise ValueError(f"{len(service)} service sequences but {len(peer)} peer sequences")
    first_difference: list[int | None] = []
    agreed = equal = total = 0
    for ours, theirs in zip(service, peer):
        length = max(len(ours), len(theirs))
        differs = [i for i in range(length) if i >= min(len(ours), len(theirs)) or ours[i] != theirs[i]]
        first_difference.append(differs[0] if differs else None)
        agreed += differs[0] if differs else length
        equal += length - len(differs)
        total += length
    return {"prompts": len(service), "service_tokens": [len(s) for s in service], "first_difference": first_difference,
            "agreed_prefix_share": round(agreed / total, 4) if total else None,
            "equal_position_share": round(equal / total, 4) if total else None}


def describe_agreement(agreement: dict[str, Any]) -> str:
    return (f"{agreement['prompts']} prompts, up to {agreement['max_new_tokens']} greedy tokens each (EOS ends them); "
            f"{agreement['agreed_prefix_share']} of the tokens agree before the first difference (per prompt: "
            f"{agreement['first_difference']}, None = none)")


def require_same_start(agreement: dict[str, Any], first: int = MUST_AGREE_FIRST) -> None:
    """Refuse a peer whose greedy tokens differ from the service's within the first `first`."""
    early = [(i, at) for i, at in enumerate(agreement["first_difference"]) if at is not None and at < first]
    if early:
        where = ", ".join(f"prompt {i} at token {at}" for i, at in early)
        raise FailedPrecondition(
            f"greedy check: llama-server's tokens differ from the service's within the first {first} ({where}); "
            "it would not be doing the same work: are the service's model and precision the ones given here "
            "(--model, --dtype)?")


def chat_messages(request: Any) -> list[dict[str, str]]:
    """A GenerateRequest's chat messages as the engine takes them."""
    return [{"role": m.role, "content": m.content} for m in request.messages]


class ServerPeer:
    """The model's GGUF and tokenizer, and llama-server processes started on them."""

    def __init__(self, model: str, dtype: str, threads: int | None, precision: str | None = None) -> None:
        """llama-server on `model`'s GGUF in `precision` (f32, bf16 or q8_0; default: `dtype`'s)."""
        import torch  # here: only a run with this peer loads a model

        from ffnskip.bench.gguf_export import ensure_gguf
        from ffnskip.engine import load_model

        self.binary = find_llama_server()  # first: a missing binary is told before minutes of work
        if threads is not None and threads < 1:
            raise InvalidArgument("peer_threads", f"must be at least 1, got {threads}")
        # on the CPU whatever serves the service: the model is only read, to write its GGUF
        loaded = load_model(model, device="cpu", dtype=dtype, cache_dir=cache_root(os.environ))
        dtype = str(loaded.dtype).removeprefix("torch.")
        if precision is None and dtype not in GGUF_PRECISIONS:
            raise InvalidArgument("dtype", f"llama-server runs {', '.join(GGUF_PRECISIONS)} GGUF files here, "
                                           f"not {dtype}")
        self.dtype = precision or GGUF_PRECISIONS[dtype]  # the GGUF's precision
        self.gguf: Path = ensure_gguf(loaded.model, loaded.tokenizer, loaded.fingerprint, loaded.cache_dir / "gguf",
                                      self.dtype)
        self.fingerprint = loaded.fingerprint
        self.tokenizer = loaded.tokenizer  # the weights are not needed any more; the tokenizer is
        self.threads = threads or torch.get_num_threads()  # what the decoder's torch takes on the same machine

    def prompt_ids(self, request: Any) -> list[int]:
        """The token ids the decoder feeds for a GenerateRequest's chat messages."""
        from ffnskip.engine.prompts import encode_prompt

        return encode_prompt(self.tokenizer, None, chat_messages(request))

    def server(self, prompts: Sequence[list[int]], slots: int, new_tokens: int) -> LlamaServer:
        """A llama-server (to enter) with `slots` slots, each with room for the longest prompt."""
        ctx = context_size(slots, max(len(p) for p in prompts), new_tokens)
        return LlamaServer(self.gguf, slots=slots, threads=self.threads, ctx_size=ctx, binary=self.binary)

    def greedy_check(self, requests: Sequence[Any], service_tokens: Sequence[Sequence[int]],
                     new_tokens: int, timeout_s: float, enforce: bool = True) -> dict[str, Any]:
        """Compare llama-server's greedy tokens with the service's for the same requests (which
        stop at EOS: the two ignore it differently); raises when they differ from the start, if
        `enforce` (not for a peer asked to run another precision than the service: two roundings
        of the same weights may part at the first token)."""
        prompts = [self.prompt_ids(r) for r in requests]
        with self.server(prompts, slots=1, new_tokens=new_tokens) as server:
            peer_tokens = [server.greedy_tokens(ids, new_tokens, timeout_s, ignore_eos=False) for ids in prompts]
        agreement = {"max_new_tokens": new_tokens, **compare_greedy(service_tokens, peer_tokens)}
        print(f"greedy check: {describe_agreement(agreement)}", file=sys.stderr, flush=True)
        agreement["enforced"] = enforce
        if enforce:
            require_same_start(agreement)
        return agreement

    def rows(self, requests_by_level: dict[int, Sequence[Any]], new_tokens: int, timeout_s: float,
             progress: Callable[[dict], None],
             before_level: Callable[[int], None] = lambda concurrency: None) -> dict[str, Any]:
        """llama-server's rows, one per concurrency level, on the same requests as the service's;
        with what it ran with and its peak resident memory. `before_level(concurrency)` runs just
        before each level (the service's rows of that level, while llama-server idles), so that
        the rows compared are timed seconds apart, not minutes: machines of this kind drift."""
        prompts = {c: [self.prompt_ids(r) for r in requests] for c, requests in requests_by_level.items()}
        slots = max(prompts)
        rows = []
        with self.server([p for level in prompts.values() for p in level], slots, new_tokens) as server:
            for concurrency, level in prompts.items():
                before_level(concurrency)
                row = run_level(lambda ids: server.stream(ids, new_tokens, timeout_s), level, concurrency)
                row["policy"] = "llama-server"
                rows.append(row)
                progress(row)
            peak = server.peak_resident_bytes()
            repack = server.repack
        return {"rows": rows, "gguf": str(self.gguf), "dtype": self.dtype, "threads": self.threads, "slots": slots,
                "ctx_size": server.ctx_size, "peak_resident_bytes": peak, "weight_repacking": repack}
