"""The chat bench: what the prompt caches give a chat client, side by side with llama-server.

A chat client resends the whole conversation every turn. Two scenes, each played on the service
(through a gateway or a decoder, over gRPC) and on llama-server (its slots' prompt cache on,
`cache_prompt`), turn by turn alternately so both are timed in the same seconds:

- **shared system prompt**: two users, one after the other, each one question after the same
  long system prompt (the packaged calibration texts, about `system_tokens` tokens): the second
  one's TTFT is what the cache saves;
- **conversation**: one user, `turns` turns, each resending the system prompt, every earlier
  question and the answer it got (each side's own answers, as a client sends them back), then
  the next question; TTFT per turn.

Answers are `new_tokens` long (EOS ignored), greedy, under the service's served default
`policy` unless one is named.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ffnskip.bench.calls import CallResult
from ffnskip.datasets import texts

Messages = list[dict[str, str]]
Turn = Callable[[Messages], CallResult]


def system_prompt(count_tokens: Callable[[str], int], tokens: int) -> str:
    """A system prompt of at least `tokens` tokens (while the calibration texts last)."""
    prompt = "You are a helpful assistant. Answer the user's questions using these notes when they help.\n"
    for text in texts("calibration", "text"):
        if count_tokens(prompt) >= tokens:
            break
        prompt += text + "\n"
    return prompt


@dataclass
class ChatScenes:
    """The two scenes' messages: built once, played on both servers."""

    system: str
    questions: list[str]

    def shared_system(self) -> list[Messages]:
        """Two users' first requests: the same system prompt, different questions."""
        return [[{"role": "system", "content": self.system}, {"role": "user", "content": q}] for q in self.questions[:2]]


def play(scenes: ChatScenes, ours: Turn, theirs: Turn, turns: int) -> dict[str, Any]:
    """Both scenes on both servers, alternately (ours first); TTFTs in ms."""
    shared: dict[str, list[CallResult]] = {"service": [], "llama_server": []}
    for messages in scenes.shared_system():
        shared["service"].append(ours(messages))
        shared["llama_server"].append(theirs(messages))
    ours_turns: list[CallResult] = []
    theirs_turns: list[CallResult] = []
    # alternately: each side's conversation is its own (its own answers resent), advanced a turn at a time
    ours_messages: Messages = [{"role": "system", "content": scenes.system}]
    theirs_messages: Messages = [{"role": "system", "content": scenes.system}]
    for question in scenes.questions[2:2 + turns]:
        for messages, turn, results in ((ours_messages, ours, ours_turns), (theirs_messages, theirs, theirs_turns)):
            messages.append({"role": "user", "content": question})
            result = turn(list(messages))
            results.append(result)
            messages.append({"role": "assistant", "content": result.text})
    report: dict[str, Any] = {"turns": turns}
    for side, results in (("service", ours_turns), ("llama_server", theirs_turns)):
        report[side] = {
            "shared_system_ttft_ms": [_ms(r.ttft_s) for r in shared[side]],
            "turn_ttft_ms": [_ms(r.ttft_s) for r in results],
            "turn_ttft_p50_ms": _ms(statistics.median(r.ttft_s for r in results)),
            "errors": sum(not r.ok for r in shared[side] + results),
        }
    report["turn_ttft_p50_ratio"] = round(report["service"]["turn_ttft_p50_ms"]
                                          / report["llama_server"]["turn_ttft_p50_ms"], 3)
    return report


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)
