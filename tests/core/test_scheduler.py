"""Scheduler: KV rows freed at once and refilled, prefill token budget, bucketed decode rows, requeue."""

import torch

from engine.core.scheduler import PREFILL_WAIT_STEPS, Scheduler, Sequence, batch_sizes


def seq(index: int, prompt_len: int = 4, max_new: int = 3) -> Sequence:
    return Sequence(index=index, prompt_ids=torch.zeros(prompt_len, dtype=torch.int64), max_new_tokens=max_new,
                    temperature=0.0, top_p=1.0, top_k=0, seed=0, ignore_eos=False, stop=[])


def step(s: Scheduler, tokens_of=lambda q: 5):
    batch = s.schedule()
    for q in batch.seqs:
        q.num_scheduled += 1
    return batch, s.update(batch.seqs, [tokens_of(q) for q in batch.seqs], eos_ids={1})


def test_prefill_admits_into_the_lowest_rows_within_the_token_budget():
    s = Scheduler(num_rows=4, max_prefill_tokens=20)
    for i in range(6):
        s.add(seq(i, prompt_len=6))
    batch = s.schedule()
    assert batch.is_prefill and [q.row for q in batch.seqs] == [0, 1, 2]  # 3 x 6 tokens fit 20; 4 would not
    assert len(s.waiting) == 3


def test_prefill_budget_counts_real_tokens_in_arrival_order():
    s = Scheduler(num_rows=8, max_prefill_tokens=20)
    for i, n in enumerate([3, 15, 2, 30, 1]):
        s.add(seq(i, prompt_len=n))
    assert [q.index for q in s.schedule().seqs] == [0, 1, 2]  # 3 + 15 + 2 = 20: packed, no padding counted
    assert [q.index for q in s.schedule().seqs] == [3]  # longer than the budget alone: admitted by itself
    assert [q.index for q in s.schedule().seqs] == [4]


def test_prefill_ready_once_the_waiting_fill_the_budget_or_the_free_rows():
    s = Scheduler(num_rows=4, max_prefill_tokens=20)
    s.add(seq(0, prompt_len=12))
    assert not s.prefill_ready()  # 12 of 20 tokens, 1 of 4 rows: admitting more would make a fuller prefill
    s.add(seq(1, prompt_len=8))
    assert s.prefill_ready()  # 20 tokens
    s.schedule()
    for i in range(2, 4):
        s.add(seq(i, prompt_len=1))
    assert s.prefill_ready()  # 2 tokens, but they take both free rows


def test_finished_row_is_freed_at_once_and_refilled():
    s = Scheduler(num_rows=2, max_prefill_tokens=100)
    s.add(seq(0, max_new=1))
    s.add(seq(1, max_new=3))
    s.add(seq(2, max_new=2))
    batch, finished = step(s)  # prefill 0 and 1; 0 is done after one token
    assert [q.index for q in finished] == [0] and finished[0].finish_reason == "length"
    batch, _ = step(s)  # row 0 is free again: 2 is prefilled into it
    assert batch.is_prefill and [(q.index, q.row) for q in batch.seqs] == [(2, 0)]
    batch, _ = step(s)
    assert not batch.is_prefill and batch.num_rows == 2 and {q.index for q in batch.seqs} == {1, 2}


def test_eos_finishes_with_stop_and_late_tokens_are_dropped():
    s = Scheduler(num_rows=1, max_prefill_tokens=100)
    s.add(seq(0, max_new=5))
    batch, finished = step(s, tokens_of=lambda q: 1)
    assert finished[0].finish_reason == "stop" and finished[0].output_ids == [1]
    assert s.update(batch.seqs, [7], eos_ids={1}) == [] and finished[0].output_ids == [1]


def test_sequences_waiting_for_the_host_are_not_scheduled():
    s = Scheduler(num_rows=1, max_prefill_tokens=100)
    s.add(seq(0, max_new=1))
    batch = s.schedule()
    batch.seqs[0].num_scheduled = 1  # its only token is in flight
    assert s.schedule() is None


def test_requeue_puts_a_batch_back_in_order():
    s = Scheduler(num_rows=4, max_prefill_tokens=100)
    for i in range(3):
        s.add(seq(i))
    batch = s.schedule()
    s.requeue(batch.seqs)
    assert [q.index for q in s.waiting] == [0, 1, 2] and not s.running
    assert [q.row for q in s.schedule().seqs] == [0, 1, 2]


def test_batch_buckets():
    assert batch_sizes(256) == [2, 4, 8, 16, 32, 64, 128, 256]
    assert batch_sizes(6) == [2, 4, 6]
    assert batch_sizes(1) == [1]


def test_a_few_late_requests_wait_some_decode_steps_for_others_to_share_their_prefill():
    s = Scheduler(num_rows=64, max_prefill_tokens=1000)  # refill_at 8
    s.add(seq(0, max_new=100))
    assert step(s)[0].is_prefill  # nothing runs: at once
    s.add(seq(1, max_new=100))
    s.add(seq(2, max_new=100))
    kinds = [step(s)[0].is_prefill for _ in range(PREFILL_WAIT_STEPS + 1)]
    assert kinds == [False] * PREFILL_WAIT_STEPS + [True]  # two waited PREFILL_WAIT_STEPS decode steps, then went in
    for i in range(3, 3 + s.refill_at):
        s.add(seq(i, max_new=100))
    batch, _ = step(s)  # refill_at of them fill a prefill: no wait
    assert batch.is_prefill and len(batch.seqs) == s.refill_at
    s.add(seq(20, prompt_len=1000))
    assert step(s)[0].is_prefill  # one that fills the token budget: no wait either
