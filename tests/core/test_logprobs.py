"""A record's `logprobs`: each generated token's log-probability and the top k alternatives, against log_softmax of
an HF forward over the prompt and the generated tokens, for greedy and sampled rows mixed with rows that ask for
none, under slot refill (more requests than KV rows)."""

from __future__ import annotations

import pytest
import torch

from engine import Engine
from engine.pipeline.reader import read_requests
from support import PROMPTS, tiny_config


def hf_logprobs(model, prompt_ids: list[int], generated: list[int]) -> torch.Tensor:
    """log_softmax of HF's logits at the positions that predicted each generated token: [len(generated), V]."""
    ids = torch.tensor([prompt_ids + generated])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    n = len(prompt_ids)
    return torch.log_softmax(logits[n - 1:n - 1 + len(generated)], dim=-1)


def test_logprobs_equal_an_hf_forward_token_by_token(tokenizer, tiny_model):
    records = [{"id": f"r{i}", "prompt": p, "max_new_tokens": 6, "temperature": [0.0, 0.8][i % 2], "seed": i,
                **({"logprobs": [True, 3, 0][i % 3]} if i % 4 != 3 else {})} for i, p in enumerate(PROMPTS)]
    with Engine(tiny_config(max_num_seqs=3, return_tokens=False)) as engine:
        results = {r["id"]: r for r in engine.generate_all(records)}
    for i, record in enumerate(records):
        result = results[record["id"]]
        if "logprobs" not in record:
            assert "completion_logprobs" not in result and "completion_token_ids" not in result
            continue
        generated = result["completion_token_ids"]
        want = hf_logprobs(tiny_model, tokenizer(record["prompt"]).input_ids, generated)
        chosen = want.gather(-1, torch.tensor(generated)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(result["completion_logprobs"]), chosen, atol=1e-4, rtol=0)
        k = record["logprobs"] if record["logprobs"] is not True else 0
        if k == 0:
            assert "completion_top_logprobs" not in result
            continue
        top = result["completion_top_logprobs"]
        assert [len(step) for step in top] == [k] * len(generated)
        values, ids = want.topk(k, dim=-1)
        assert [[t for t, _ in step] for step in top] == ids.tolist()
        torch.testing.assert_close(torch.tensor([[v for _, v in step] for step in top]), values, atol=1e-4, rtol=0)
        if record["temperature"] == 0:  # greedy: the chosen token is the most likely one
            assert generated == [step[0][0] for step in top]


@pytest.mark.parametrize("value", [-1, 21, "3", 2.5])
def test_a_bad_logprobs_field_is_that_records_error(value):
    [error] = read_requests([(1, {"prompt": "x", "logprobs": value})], tiny_config())
    assert "field 'logprobs'" in error["error"] and "[0, 20]" in error["error"]


def test_prompt_logprobs_equal_an_hf_forward_and_leave_the_completions_as_they_were(tokenizer, tiny_model):
    records = [{"id": f"p{i}", "prompt": p, "max_new_tokens": 4, "temperature": 0.0,
                **({"prompt_logprobs": [True, 2][i % 2], "logprobs": 1} if i % 3 != 2 else {})}
               for i, p in enumerate(PROMPTS)]
    with Engine(tiny_config(max_num_seqs=3, return_tokens=True)) as engine:
        scored = {r["id"]: r for r in engine.generate_all(records)}
        plain = {r["id"]: r for r in engine.generate_all([{k: v for k, v in r.items() if "logprobs" not in k}
                                                           for r in records])}
    for record in records:
        result = scored[record["id"]]
        assert result["completion"] == plain[record["id"]]["completion"]
        if "prompt_logprobs" not in record:
            assert "prompt_logprobs" not in result
            continue
        ids = tokenizer(record["prompt"]).input_ids
        assert result["prompt_token_ids"] == ids
        with torch.no_grad():
            want = torch.log_softmax(tiny_model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
        chosen = want.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(result["prompt_logprobs"]), chosen, atol=1e-4, rtol=0)
        if record["prompt_logprobs"] is True:
            assert "prompt_top_logprobs" not in result
        else:
            assert [[t for t, _ in step] for step in result["prompt_top_logprobs"]] == want.topk(2).indices.tolist()
