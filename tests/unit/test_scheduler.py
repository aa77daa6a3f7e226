"""The scheduler's arithmetic without a model: admission into free rows, the prefill chunk
budget, the order prompts join the decoding rows, and freeing rows so that the decoding
rows and the prefilling rows stay contiguous (running[i].row == i throughout)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from ffnskip.engine.kv_cache import KVCache, freeing_moves
from ffnskip.engine.scheduler import Scheduler, StepPlan
from ffnskip.errors import InvalidArgument


@dataclass(eq=False)
class FakeSeq:
    name: str
    prompt: int  # prompt tokens
    row: int | None = None
    prefilled: int = 0
    finished: bool = False

    @property
    def context_ids(self) -> list[int]:
        return list(range(self.prompt))

    @property
    def prefilling(self) -> bool:
        return self.prefilled < self.prompt


class FakeRows:
    """A row store whose rows hold the name of the sequence prefilled into them (the keys and
    values a real cache would hold), recording what the scheduler asks of it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.contents: list[str] = []
        self.calls: list[tuple] = []

    @property
    def free_rows(self) -> int:
        return self.size - len(self.contents)

    def take_row(self) -> int:
        self.contents.append("")
        return len(self.contents) - 1

    def release_row(self, row: int, decoding: int = 0) -> list[tuple[int, int]]:
        moves = freeing_moves(row, decoding, len(self.contents))
        self.calls.append(("release", row, decoding, moves))
        for source, target in moves:
            self.contents[target] = self.contents[source]
        self.contents.pop()
        return moves

    def swap_rows(self, a: int, b: int) -> None:
        self.calls.append(("swap", a, b))
        self.contents[a], self.contents[b] = self.contents[b], self.contents[a]


def step(scheduler: Scheduler, rows: FakeRows) -> StepPlan:
    """A step as the engine runs it, the executor's part faked: each chunk writes its
    sequence's name into its row; the decoding rows must hold their own sequences."""
    plan = scheduler.schedule()
    for seq in plan.decode:
        assert rows.contents[seq.row] == seq.name and not seq.prefilling
    for group in plan.prefill:
        for chunk in group:
            rows.contents[chunk.row] = chunk.seq.name
    scheduler.postprocess(plan)
    check(scheduler, rows)
    return plan


def check(scheduler: Scheduler, rows: FakeRows) -> None:
    """running[i].row == i, the decoding sequences first, then the prefilling ones; each row
    holds its sequence's keys (those prefilled so far)."""
    running = scheduler.running
    assert [s.row for s in running] == list(range(len(running)))
    assert [s.prefilling for s in running] == [False] * scheduler.decoding + [True] * len(scheduler.prefilling)
    assert set(running[scheduler.decoding:]) == set(scheduler.prefilling)
    assert len(rows.contents) == len(running)
    assert all(rows.contents[s.row] == s.name for s in running if s.prefilled)


def chunks(plan: StepPlan) -> list[tuple[str, int, int]]:
    """The plan's chunks as (name, start, length), in admission order of their sequences."""
    return sorted(((c.seq.name, c.start, c.length) for g in plan.prefill for c in g), key=lambda c: c[0])


def seqs(**prompts: int) -> list[FakeSeq]:
    return [FakeSeq(name, tokens) for name, tokens in prompts.items()]


def test_waiting_sequences_take_the_free_rows_in_order_and_the_rest_wait():
    rows = FakeRows(3)
    scheduler = Scheduler(rows)
    a, b, c, d, e = seqs(a=2, b=3, c=4, d=5, e=6)
    for seq in (a, b, c, d, e):
        scheduler.add(seq)
    plan = step(scheduler, rows)
    assert [s.name for s in scheduler.running] == ["a", "b", "c"] and [s.row for s in (a, b, c)] == [0, 1, 2]
    assert list(scheduler.waiting) == [d, e] and d.row is None and rows.free_rows == 0
    assert chunks(plan) == [("a", 0, 2), ("b", 0, 3), ("c", 0, 4)] and plan.decode == []
    b.finished = True  # one leaves: the first waiting one takes its row at the next step
    plan = step(scheduler, rows)
    assert b.row is None and list(scheduler.waiting) == [e]
    assert scheduler.running[:2] == [a, c] and scheduler.running[2] is d and d.row == 2
    assert plan.decode == [a, c] and chunks(plan) == [("d", 0, 5)]


def test_a_cancelled_waiting_sequence_never_takes_a_row():
    rows = FakeRows(1)
    scheduler = Scheduler(rows)
    first, cancelled, after = seqs(first=2, cancelled=2, after=2)
    for seq in (first, cancelled, after):
        scheduler.add(seq)
    step(scheduler, rows)
    cancelled.finished = True
    first.finished = True
    step(scheduler, rows)
    assert scheduler.running == [after] and not scheduler.waiting and cancelled.row is None


def test_whole_prompts_go_while_they_fit_the_chunk():
    rows = FakeRows(4)
    scheduler = Scheduler(rows, prefill_chunk=10)
    for seq in seqs(a=4, b=5, c=3, d=1):
        scheduler.add(seq)
    # a and b fit (9 tokens); c does not fit the 1 left, and d, behind it, waits its turn too
    assert chunks(step(scheduler, rows)) == [("a", 0, 4), ("b", 0, 5)]
    assert chunks(step(scheduler, rows)) == [("c", 0, 3), ("d", 0, 1)]
    assert scheduler.decoding == 4 and not scheduler.prefilling


def test_without_a_chunk_every_admitted_prompt_goes_whole():
    rows = FakeRows(3)
    scheduler = Scheduler(rows, prefill_chunk=None)
    for seq in seqs(a=40, b=300, c=7):
        scheduler.add(seq)
    assert chunks(step(scheduler, rows)) == [("a", 0, 40), ("b", 0, 300), ("c", 0, 7)]
    assert scheduler.decoding == 3


def decoding_row(scheduler: Scheduler, rows: FakeRows) -> FakeSeq:
    """A sequence prefilled and decoding in row 0, so that chunks hold it back from here on."""
    running = FakeSeq("running", 1)
    scheduler.add(running)
    step(scheduler, rows)
    return running


def test_a_prompt_longer_than_the_chunk_goes_alone_one_chunk_a_step():
    rows = FakeRows(3)
    scheduler = Scheduler(rows, prefill_chunk=8)
    running = decoding_row(scheduler, rows)
    for seq in seqs(long=20, short=3):
        scheduler.add(seq)
    assert chunks(step(scheduler, rows)) == [("long", 0, 8)]
    assert chunks(step(scheduler, rows)) == [("long", 8, 8)]
    plan = step(scheduler, rows)
    assert chunks(plan) == [("long", 16, 4), ("short", 0, 3)]  # the rest fits, with short
    assert plan.decode == [running] and scheduler.decoding == 3


def test_a_long_prompt_behind_a_short_one_is_not_split_where_the_budget_ends():
    rows = FakeRows(3)
    scheduler = Scheduler(rows, prefill_chunk=8)
    for seq in seqs(short=3, long=20):
        scheduler.add(seq)
    assert chunks(step(scheduler, rows)) == [("short", 0, 3)]  # not long's first 5 tokens as well
    assert chunks(step(scheduler, rows)) == [("long", 0, 8)]  # short decodes now: long goes in chunks


def test_while_no_row_decodes_the_first_prompt_goes_whole_and_the_next_ones_wait_their_chunk():
    """Nobody waits for an idle decoder's forward, so its first prompt is not split; the prompts
    behind it keep the chunk budget (a burst's first prompts get their first token sooner)."""
    rows = FakeRows(4)
    scheduler = Scheduler(rows, prefill_chunk=8)
    for seq in seqs(long=20, short=3, third=8):
        scheduler.add(seq)
    assert chunks(step(scheduler, rows)) == [("long", 0, 20)]  # short does not fit behind it
    assert chunks(step(scheduler, rows)) == [("short", 0, 3)]  # long decodes now: the chunk again
    assert chunks(step(scheduler, rows)) == [("third", 0, 8)]
    assert scheduler.decoding == 3


def test_an_idle_decoder_finishes_a_prompt_begun_in_chunks_whole():
    """A prompt split while a row decoded goes on whole once that row has left."""
    rows = FakeRows(3)
    scheduler = Scheduler(rows, prefill_chunk=8)
    running = decoding_row(scheduler, rows)
    long = FakeSeq("long", 30)
    scheduler.add(long)
    assert chunks(step(scheduler, rows)) == [("long", 0, 8)]
    running.finished = True
    plan = step(scheduler, rows)
    assert chunks(plan) == [("long", 8, 22)] and plan.decode == []
    assert scheduler.running == [long] and scheduler.decoding == 1


def test_completed_prompts_join_the_decoding_rows_in_the_order_of_the_plan():
    """The plan's groups go shortest first, so the short prompt admitted after the long one
    joins first: it changes places with the long one, the first prefilling row."""
    rows = FakeRows(3)
    scheduler = Scheduler(rows)
    decoding = FakeSeq("decoding", 2)
    scheduler.add(decoding)
    step(scheduler, rows)
    long, short = seqs(long=10, short=2)
    scheduler.add(long)
    scheduler.add(short)
    plan = step(scheduler, rows)
    assert [[c.seq.name for c in group] for group in plan.prefill] == [["short"], ["long"]]
    assert rows.calls == [("swap", 2, 1)]
    assert scheduler.running == [decoding, short, long] and rows.contents == ["decoding", "short", "long"]


def test_a_prompt_completing_in_a_later_row_changes_places_with_the_first_prefilling_row():
    """A decoding row leaves while two prompts prefill: the last row (the second prompt's)
    fills its hole, so the first prompt completes in row 1 behind the second's row 0, and
    the two change places."""
    rows = FakeRows(3)
    scheduler = Scheduler(rows, prefill_chunk=6)
    leaving = FakeSeq("leaving", 2)
    scheduler.add(leaving)
    step(scheduler, rows)
    first, second = seqs(first=8, second=12)
    scheduler.add(first)
    scheduler.add(second)
    assert chunks(step(scheduler, rows)) == [("first", 0, 6)]
    leaving.finished = True
    plan = step(scheduler, rows)
    assert chunks(plan) == [("first", 6, 2)]  # second's 12 do not fit the 4 left
    assert rows.calls == [("release", 0, 1, [(2, 0)]), ("swap", 1, 0)]
    assert scheduler.running == [first, second] and scheduler.prefilling == [second]
    assert rows.contents[0] == "first"


def test_freeing_a_decoding_row_in_the_middle_keeps_both_parts_contiguous():
    """Rows [d0 d1 d2 | p3 p4]: d0 leaves; d2, the last decoding row, fills its hole and p4,
    the last row, fills d2's: [d2 d1 | p4 p3]."""
    rows = FakeRows(5)
    scheduler = Scheduler(rows, prefill_chunk=4)
    d0, d1, d2, p3, p4 = seqs(d0=1, d1=1, d2=1, p3=20, p4=20)
    for seq in (d0, d1, d2):
        scheduler.add(seq)
    step(scheduler, rows)
    scheduler.add(p3)
    scheduler.add(p4)
    step(scheduler, rows)  # p3's first chunk
    assert scheduler.running == [d0, d1, d2, p3, p4] and scheduler.decoding == 3
    d0.finished = True
    plan = step(scheduler, rows)
    assert rows.calls[0] == ("release", 0, 3, [(2, 0), (4, 2)])
    assert scheduler.running == [d2, d1, p4, p3] and scheduler.prefilling == [p3, p4]  # still in admission order
    assert plan.decode == [d2, d1] and d0.row is None
    assert chunks(plan) == [("p3", 4, 4)]  # p3 goes on from where it was, in its new row


def test_sequences_finishing_together_leave_from_the_highest_row_down():
    rows = FakeRows(4)
    scheduler = Scheduler(rows)
    a, b, c, d = seqs(a=1, b=1, c=1, d=1)
    for seq in (a, b, c, d):
        scheduler.add(seq)
    step(scheduler, rows)
    a.finished = c.finished = True
    step(scheduler, rows)
    assert rows.calls == [("release", 2, 4, [(3, 2)]), ("release", 0, 3, [(2, 0)])]
    assert scheduler.running == [d, b] and rows.contents == ["d", "b"]
    assert a.row is None and c.row is None


def test_a_prompt_cancelled_mid_prefill_gives_its_row_to_the_last_row():
    rows = FakeRows(3)
    scheduler = Scheduler(rows, prefill_chunk=8)
    running = FakeSeq("running", 2)
    scheduler.add(running)
    step(scheduler, rows)
    victim, after = seqs(victim=20, after=5)
    scheduler.add(victim)
    scheduler.add(after)
    step(scheduler, rows)
    assert victim.prefilling and victim.prefilled == 8 and victim.row == 1
    victim.finished = True
    plan = step(scheduler, rows)
    assert rows.calls == [("release", 1, 1, [(2, 1)])]
    assert victim.row is None and scheduler.running == [running, after] and not scheduler.prefilling
    assert chunks(plan) == [("after", 0, 5)] and plan.decode == [running]


def test_a_chunk_below_one_token_is_refused():
    with pytest.raises(InvalidArgument, match="prefill_chunk"):
        Scheduler(FakeRows(1), prefill_chunk=0)


def test_the_cache_moves_the_rows_as_the_scheduler_is_told():
    """KVCache.release_row copies each row's filled positions along the moves it returns."""
    cache = KVCache(num_layers=1, max_batch=5, num_kv_heads=1, max_seq_len=4, head_dim=1,
                    device=torch.device("cpu"), dtype=torch.float32)
    for row in range(5):
        assert cache.take_row() == row
        cache.keys[:, row, :, :row + 1] = float(row)
        cache.lengths[row] = row + 1
    assert cache.release_row(0, decoding=3) == [(2, 0), (4, 2)]
    assert cache.in_use == 4 and cache.lengths[:4] == [3, 2, 5, 4]
    assert [cache.keys[0, row, 0, 0].item() for row in range(4)] == [2.0, 1.0, 4.0, 3.0]
    assert cache.release_row(3) == [] and cache.release_row(0) == [(2, 0)]  # the last row; one part
    assert freeing_moves(1, decoding=2, in_use=2) == [] and freeing_moves(2, decoding=2, in_use=4) == [(3, 2)]
