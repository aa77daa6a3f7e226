"""The chat bench's scenes (ffnskip.bench.chat): each side's conversation resends its own answers,
turn by turn, alternately with the other side's; two users share the system prompt."""

from __future__ import annotations

import pytest

from ffnskip.bench.calls import CallResult
from ffnskip.bench.chat import ChatScenes, Messages, play, system_prompt
from ffnskip.bench.service import build_requests
from ffnskip.errors import InvalidArgument


def recorder(name: str, seen: list[tuple[str, Messages]]):
    def turn(messages: Messages) -> CallResult:
        seen.append((name, messages))
        result = CallResult(ok=True, ttft_s=0.001 * len(seen), text=f"{name} answer {len(seen)}")
        return result
    return turn


def test_each_side_resends_its_own_answers_turn_by_turn():
    seen: list[tuple[str, Messages]] = []
    scenes = ChatScenes("SYSTEM", ["q-a", "q-b", "q1", "q2", "q3"])
    report = play(scenes, recorder("ours", seen), recorder("theirs", seen), turns=3)
    assert [name for name, _ in seen] == ["ours", "theirs"] * 5  # alternately, the two users first
    assert seen[0][1] == [{"role": "system", "content": "SYSTEM"}, {"role": "user", "content": "q-a"}]
    assert seen[2][1][1]["content"] == "q-b" and seen[3][1][1]["content"] == "q-b"
    last_ours, last_theirs = seen[8][1], seen[9][1]
    assert [m["content"] for m in last_ours] == ["SYSTEM", "q1", "ours answer 5", "q2", "ours answer 7", "q3"]
    assert [m["content"] for m in last_theirs] == ["SYSTEM", "q1", "theirs answer 6", "q2", "theirs answer 8", "q3"]
    assert report["service"]["shared_system_ttft_ms"] == [1.0, 3.0]
    assert report["service"]["turn_ttft_ms"] == [5.0, 7.0, 9.0] and report["llama_server"]["turn_ttft_p50_ms"] == 8.0
    assert report["turn_ttft_p50_ratio"] == round(7 / 8, 3) and report["service"]["errors"] == 0


def test_the_system_prompt_is_at_least_the_tokens_asked_for():
    words = lambda text: len(text.split())  # noqa: E731
    assert words(system_prompt(words, 120)) >= 120
    assert words(system_prompt(words, 10)) < words(system_prompt(words, 120))


def test_lengthened_questions_each_start_with_a_note_of_their_own():
    requests = build_requests("m", 6, 4, "dense", prompt_words=100)
    contents = [r.messages[0].content for r in requests]
    assert all(len(c.split()) >= 100 for c in contents)
    assert len({c[:200] for c in contents}) == 6  # no two share a start a prompt cache could hold
    plain = build_requests("m", 6, 4, "dense")
    assert all(c.endswith(p.messages[0].content) for c, p in zip(contents, plain))

    with pytest.raises(InvalidArgument, match="prompt_words"):
        build_requests("m", 1, 4, "dense", prompt_words=-1)
