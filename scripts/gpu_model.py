"""The decoder of scripts/gpu_bench.py: config, skip plan, random weights, the decode step.

A Llama layer in plain torch with static decode state on the device; see gpu_bench.py's
docstring for what is measured and how.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ModelConfig:
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    rope_theta: float = 10000.0
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


CONFIGS = {
    "tiny": ModelConfig(hidden=64, inter=128, layers=4, heads=4, kv_heads=2, vocab=256),
    "1b": ModelConfig(hidden=2048, inter=5632, layers=22, heads=32, kv_heads=4, vocab=32000),
    "7b": ModelConfig(hidden=4096, inter=11008, layers=32, heads=32, kv_heads=32, vocab=32000),
}

PATTERNS = ("dense", "static", "adaptive")


@dataclass(frozen=True)
class SkipPlan:
    cold_start: int
    cold_end: int
    static_layers: tuple[int, ...]
    k: int  # skip run length after a firing, in hot layers

    def hot(self) -> list[int]:
        return list(range(self.cold_start, self.cold_end))


def default_plan(cfg: ModelConfig, cold_start: Optional[int] = None, cold_end: Optional[int] = None,
                 static_layers: Optional[Sequence[int]] = None, k: Optional[int] = None) -> SkipPlan:
    """Cold ends of ceil(L/10) layers each side; static: round(L * 8/30) hot layers spread evenly;
    k: half the hot layers (so a ~25% per-token skip ratio is reachable)."""
    L = cfg.layers
    edge = max(1, math.ceil(L / 10))
    cs = edge if cold_start is None else cold_start
    ce = L - edge if cold_end is None else cold_end
    if not 0 <= cs < ce <= L:
        raise ValueError(f"need 0 <= cold_start < cold_end <= {L}, got {cs}, {ce}")
    hot = ce - cs
    if static_layers is None:
        n = min(hot, max(1, round(L * 8 / 30)))
        static_layers = sorted({cs + int((j + 0.5) * hot / n) for j in range(n)})
    static_layers = tuple(sorted(set(int(layer) for layer in static_layers)))
    if any(not cs <= layer < ce for layer in static_layers):
        raise ValueError(f"static layers {static_layers} must lie in the hot range [{cs}, {ce})")
    k = max(1, hot // 2) if k is None else k
    if k < 1:
        raise ValueError("k must be >= 1")
    return SkipPlan(cs, ce, static_layers, k)


# --------------------------------------------------------------------------- weights


@dataclass
class Weights:
    embed: torch.Tensor  # [V, D]
    ln1: list[torch.Tensor]  # [D]
    wqkv: list[torch.Tensor]  # [(H + 2 KV) hd, D]
    wo: list[torch.Tensor]  # [D, H hd]
    ln2: list[torch.Tensor]  # [D]
    wgu: list[torch.Tensor]  # [2 I, D]: gate rows then up rows
    wd: list[torch.Tensor]  # [D, I]
    norm: torch.Tensor  # [D]
    lm_head: torch.Tensor  # [V, D]

    def step_bytes(self) -> tuple[int, int]:
        """(W, F): weight bytes read per decode step, and the FFN part of them."""
        size = lambda t: t.numel() * t.element_size()  # noqa: E731
        ffn = sum(size(t) for t in self.ln2 + self.wgu + self.wd)
        rest = sum(size(t) for t in self.ln1 + self.wqkv + self.wo) + size(self.norm) + size(self.lm_head)
        return rest + ffn, ffn


def init_weights(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Weights:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    D, I, hd = cfg.hidden, cfg.inter, cfg.head_dim

    def mat(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device, dtype=dtype) * 0.02).contiguous()

    def norm() -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(D, generator=gen, device=device, dtype=dtype)

    L = cfg.layers
    qkv_rows = (cfg.heads + 2 * cfg.kv_heads) * hd
    return Weights(
        embed=mat(cfg.vocab, D),
        ln1=[norm() for _ in range(L)],
        wqkv=[mat(qkv_rows, D) for _ in range(L)],
        wo=[mat(D, cfg.heads * hd) for _ in range(L)],
        ln2=[norm() for _ in range(L)],
        wgu=[mat(2 * I, D) for _ in range(L)],
        wd=[mat(D, I) for _ in range(L)],
        norm=norm(),
        lm_head=mat(cfg.vocab, D),
    )


# --------------------------------------------------------------------------- decoder


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Decoder:
    """Static decode state for one batch bucket and the decode step over it.

    Persistent device buffers: tok [B] (input token, overwritten by the greedy next token),
    pos [1] (position of tok), KV caches, logits [B, V], until [B] (adaptive state),
    thr [B] (adaptive threshold per row), ran_rows [L, B] / ran_any [L] (how often each
    conditional layer's FFN ran for a row / at all: the skip counters).
    """

    def __init__(self, cfg: ModelConfig, weights: Weights, batch: int, max_len: int, plan: SkipPlan,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.cfg, self.w, self.batch, self.max_len, self.plan = cfg, weights, batch, max_len, plan
        self.device, self.dtype = device, dtype
        L, B, hd = cfg.layers, batch, cfg.head_dim
        self.tok = torch.zeros(B, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.kc = [torch.zeros(B, cfg.kv_heads, max_len, hd, dtype=dtype, device=device) for _ in range(L)]
        self.vc = [torch.zeros(B, cfg.kv_heads, max_len, hd, dtype=dtype, device=device) for _ in range(L)]
        self.logits = torch.zeros(B, cfg.vocab, dtype=dtype, device=device)
        self.until = torch.full((B,), -1, dtype=torch.int32, device=device)
        self.thr = torch.full((B,), 2.0, dtype=torch.float32, device=device)
        self.ran_rows = torch.zeros(L, B, dtype=torch.int32, device=device)
        self.ran_any = torch.zeros(L, dtype=torch.int32, device=device)
        self.cos_scratch = torch.zeros(B, dtype=torch.float32, device=device)
        self.positions = torch.arange(max_len, device=device)
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
        freqs = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.rope_cos, self.rope_sin = emb.cos().to(dtype), emb.sin().to(dtype)
        self.scale = 1.0 / math.sqrt(hd)
        self.count_calls = False  # eager instrumentation: FFN bodies executed per layer
        self.mlp_calls: Counter = Counter()
        hot = plan.hot()
        self.hot_ordinal = {layer: j for j, layer in enumerate(hot)}
        self.n_hot = len(hot)

    # ---- per-layer roles

    def checks(self, layer: int) -> bool:
        """This hot layer computes cos(h, out): it has a following hot layer to skip."""
        j = self.hot_ordinal.get(layer)
        return j is not None and j < self.n_hot - 1

    def conditional(self, layer: int) -> bool:
        """The adaptive FFN of this layer may be skipped: a hot layer after the first."""
        j = self.hot_ordinal.get(layer)
        return j is not None and j >= 1

    @property
    def n_checked(self) -> int:
        return max(0, self.n_hot - 1)

    # ---- state

    def reset(self, pos: int, tok: torch.Tensor) -> None:
        self.pos.fill_(pos)
        self.tok.copy_(tok)

    def zero_stats(self) -> None:
        self.ran_rows.zero_()
        self.ran_any.zero_()

    def set_threshold(self, value) -> None:
        if isinstance(value, torch.Tensor):
            self.thr.copy_(value.to(self.thr))
        else:
            self.thr.fill_(float(value))

    def skipped_per_layer(self, steps: int) -> torch.Tensor:
        """[L, B] adaptive: tokens whose FFN was skipped in that layer, from the counters."""
        counts = torch.zeros(self.cfg.layers, self.batch, dtype=torch.long)
        ran = self.ran_rows.cpu().long()
        for layer in range(self.cfg.layers):
            if self.conditional(layer):
                counts[layer] = steps - ran[layer]
        return counts

    def weight_skips_per_layer(self, steps: int) -> torch.Tensor:
        """[L] adaptive: steps in which no row ran that layer's FFN."""
        ran = (self.ran_rows[:, 0] if self.batch == 1 else self.ran_any).cpu().long()
        counts = torch.zeros(self.cfg.layers, dtype=torch.long)
        for layer in range(self.cfg.layers):
            if self.conditional(layer):
                counts[layer] = steps - ran[layer]
        return counts

    # ---- pieces

    def _attention(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   invalid: torch.Tensor) -> torch.Tensor:
        cfg, B, hd = self.cfg, self.batch, self.cfg.head_dim
        H, KV = cfg.heads, cfg.kv_heads
        a = F.rms_norm(x, (cfg.hidden,), self.w.ln1[i], cfg.eps)
        q, k, v = F.linear(a, self.w.wqkv[i]).split([H * hd, KV * hd, KV * hd], dim=-1)
        q = q.reshape(B, H, hd)
        k = k.reshape(B, KV, hd)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        self.kc[i].index_copy_(2, self.pos, k.unsqueeze(2))
        self.vc[i].index_copy_(2, self.pos, v.reshape(B, KV, 1, hd))
        qg = q.reshape(B, KV, H // KV, hd)
        scores = torch.matmul(qg, self.kc[i].transpose(-1, -2)) * self.scale  # [B, KV, G, T]
        scores = scores.masked_fill(invalid, float("-inf"))
        p = torch.softmax(scores.float(), dim=-1).to(self.dtype)
        o = torch.matmul(p, self.vc[i])  # [B, KV, G, hd]
        return F.linear(o.reshape(B, H * hd), self.w.wo[i])

    def _mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        if self.count_calls:
            self.mlp_calls[i] += 1
        a = F.rms_norm(h, (self.cfg.hidden,), self.w.ln2[i], self.cfg.eps)
        gate, up = F.linear(a, self.w.wgu[i]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w.wd[i])

    @staticmethod
    def _cos(h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return F.cosine_similarity(h.float(), out.float(), dim=-1)

    def _adaptive_ffn(self, i: int, h: torch.Tensor, br) -> torch.Tensor:
        j = self.hot_ordinal[i]
        check, k = self.checks(i), self.plan.k

        def body(keep: Optional[torch.Tensor]) -> torch.Tensor:
            m = self._mlp(i, h)
            out = h + m if keep is None else torch.where(keep.unsqueeze(-1), h + m, h)
            if check:
                fire = (self._cos(h, out) >= self.thr) & (self.until == -1)  # skipping rows are not armed
                self.until.masked_fill_(fire, j + k)
            return out

        if not self.conditional(i):  # first hot layer: nobody can be skipping yet
            return body(None)
        keep = self.until < j  # rows that run this FFN
        run = keep.any()  # device predicate: the FFN runs unless every row skips

        def conditional_body() -> None:
            out = body(keep if self.batch > 1 else None)
            h.copy_(out)
            self.ran_rows[i].add_(keep)
            if self.batch > 1:
                self.ran_any[i].add_(1)

        br.cond(run, conditional_body)
        return h

    def step(self, pattern: str, br) -> None:
        """One decode step for every row: reads tok/pos, writes KV, logits, tok (greedy), pos + 1."""
        cfg = self.cfg
        cos = self.rope_cos.index_select(0, self.pos)  # [1, hd]
        sin = self.rope_sin.index_select(0, self.pos)
        invalid = self.positions > self.pos  # [T]: future cache slots
        x = self.w.embed.index_select(0, self.tok)  # [B, D]
        if pattern == "adaptive":
            self.until.fill_(-1)
        static = set(self.plan.static_layers) if pattern == "static" else ()
        for i in range(cfg.layers):
            h = x + self._attention(i, x, cos, sin, invalid)
            if pattern == "adaptive" and i in self.hot_ordinal:
                x = self._adaptive_ffn(i, h, br)
            elif i in static:
                x = h
            else:
                out = h + self._mlp(i, h)
                if pattern == "cos" and self.checks(i):
                    self.cos_scratch.copy_(self._cos(h, out))
                x = out
        logits = F.linear(F.rms_norm(x, (cfg.hidden,), self.w.norm, cfg.eps), self.w.lm_head)
        self.logits.copy_(logits)
        self.tok.copy_(logits.argmax(dim=-1))
        self.pos.add_(1)
