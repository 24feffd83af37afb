"""lm-evaluation-harness' `local-completions` model against engine-serve: a generation task and a loglikelihood
(multiple-choice) task, defined over local files, with the harness using the server's own tokenizer (/tokenize,
/tokenizer_info) and sending token ids, as it does by default. Its generations equal HF greedy decoding of the same
ids, cut at the task's stop; its loglikelihoods equal an HF forward's, to float tolerance."""

from __future__ import annotations

import json

import pytest
import torch

from support import TINY
from support.reference import hf_greedy
from support.serving import ENGINE_ARGS, Server

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # the harness's API models need its `api` extra

QUESTIONS = [{"question": "The capital of France is", "answer": " Paris"},
             {"question": "Once upon a time", "answer": " there"}]
CHOICES = [{"question": "Is the sky blue?", "choices": [" yes", " no"], "label": 0},
           {"question": "Two plus two is", "choices": [" four", " five", " three"], "label": 1}]
GEN_TASK = """task: engine_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["e"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
MC_TASK = """task: engine_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_tasks(folder) -> None:
    for name, rows, task in (("gen", QUESTIONS, GEN_TASK), ("mc", CHOICES, MC_TASK)):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"{name}.yaml").write_text(task.format(data=data))


def hf_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """The harness's own encoding of a pair (no special tokens; the continuation is what the whole adds to the
    context), scored by an HF forward: the continuation's summed log-probability and whether it is greedy."""
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
    rows = logprobs[len(ctx) - 1:len(whole) - 1]
    targets = torch.tensor(whole[len(ctx):])
    return rows.gather(-1, targets[:, None]).sum().item(), bool((rows.argmax(-1) == targets).all())


@pytest.mark.slow
def test_lm_eval_harness_runs_a_generation_and_a_loglikelihood_task_against_the_server(
        tmp_path, monkeypatch, tokenizer, tiny_model):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    write_tasks(tmp_path)
    srv = Server(*ENGINE_ARGS)
    try:
        from lm_eval.tasks import TaskManager

        out = lm_eval.simple_evaluate(
            model="local-completions", tasks=["engine_gen", "engine_mc"],
            model_args={"model": TINY, "base_url": srv.url + "/v1/completions", "num_concurrent": 2,
                        "max_retries": 1, "tokenizer_backend": "remote"},
            task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
    finally:
        assert srv.stop() == 0, "".join(srv.lines)
    for sample in out["samples"]["engine_gen"]:
        prompt, settings = sample["arguments"][0]
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        text = tokenizer.decode(hf_greedy(tiny_model, ids, settings["max_gen_toks"]), skip_special_tokens=True)
        assert sample["resps"][0][0] == text.split("e")[0]
    lls = [(sample["arguments"], sample["resps"]) for sample in out["samples"]["engine_mc"]]
    assert sum(len(args) for args, _ in lls) == 5
    for args, resps in lls:
        for (context, continuation), [(ll, is_greedy)] in zip(args, resps):
            want, want_greedy = hf_loglikelihood(tiny_model, tokenizer, context, continuation)
            assert ll == pytest.approx(want, abs=1e-4) and is_greedy == want_greedy
    assert 0 <= out["results"]["engine_mc"]["acc,none"] <= 1
