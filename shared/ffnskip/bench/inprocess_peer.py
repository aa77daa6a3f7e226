"""The in-process bench's llama.cpp peer (`ffnskip bench`'s llamacpp_f32/_bf16 rows).

`LlamaCppPeer` runs a GGUF file written from our own weights (ffnskip.bench.gguf_export)
through llama-cpp-python with our exact prompt token ids. llama-cpp-python is an optional
extra (`pip install ffnskip[peer]`): nothing here imports it until a peer is opened.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch


def peer_available() -> bool:
    """Whether llama-cpp-python (the `peer` extra) is installed."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


class LlamaCppPeer:
    """A GGUF model in llama.cpp (CPU), decoding greedily from given token ids."""

    def __init__(self, path: Path, n_ctx: int = 4096, n_threads: int | None = None) -> None:
        import llama_cpp  # optional dependency: only needed once a peer is opened

        threads = n_threads or torch.get_num_threads()  # the same thread count as our engine
        self.n_ctx = n_ctx
        self.path = Path(path)
        self._lib = llama_cpp
        self._llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
            n_gpu_layers=0, verbose=False,
        )
        self._n_vocab = self._llm.n_vocab()

    def _last_logits(self) -> np.ndarray:
        # Llama.eval keeps no logits unless logits_all (which would compute every prompt
        # row), so read the last output row straight from the context.
        pointer = self._lib.llama_get_logits_ith(self._llm.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))

    def greedy(self, prompt_ids: list[int], new_tokens: int) -> tuple[list[int], float, float]:
        """Exactly `new_tokens` argmax tokens after `prompt_ids` (EOS does not stop it), the
        wall seconds of the whole call (prefill included) and of its decode steps (from the
        first token to the last), as our bench measures them."""
        if new_tokens < 1 or not prompt_ids:
            raise ValueError("greedy needs a non-empty prompt and new_tokens >= 1")
        if len(prompt_ids) + new_tokens > self.n_ctx:
            raise ValueError(f"{len(prompt_ids)} prompt + {new_tokens} new tokens exceed n_ctx {self.n_ctx}")
        llm = self._llm
        started = time.perf_counter()
        # reset() forgets the previous sequence, so eval() clears its KV cells and prefills
        # the whole prompt again instead of reusing a matching prefix.
        llm.reset()
        llm.eval(list(prompt_ids))
        out: list[int] = []
        while True:
            # our own argmax over the last logits: no sampler, penalties or EOS handling
            token = int(np.argmax(self._last_logits()))
            out.append(token)
            if len(out) == 1:
                first_token_at = time.perf_counter()
            if len(out) == new_tokens:
                break  # the last token is only sampled, never fed back (as in HF generate)
            llm.eval([token])
        finished = time.perf_counter()
        return out, finished - started, finished - first_token_at

    def close(self) -> None:
        close = getattr(self._llm, "close", None)
        if close is not None:
            close()
