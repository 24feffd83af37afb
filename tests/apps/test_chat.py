"""Chat records through engine-run on a tiny chat model (a Gemma-style template in tokenizer_config.json,
<end_of_turn> an end-of-sequence id in generation_config.json): the prompt is transformers' apply_chat_template,
and the template's end token and --stop end generation where transformers' generate and the stop rule say."""

from __future__ import annotations

import pytest
import torch

from engine.models import load_hf_tokenizer
from support import read_jsonl, write_jsonl
from support.families import edit_json, save_tiny_model
from support.processes import engine_run
from support.reference import hf_greedy

CHAT_TEMPLATE = (  # Gemma's turn structure: assistant turns are "model", each turn ends with <end_of_turn>
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
MESSAGES = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a story about a dragon."}]
MAX_NEW = 10


def hf_generate(model, ids: list[int]) -> list[int]:
    """transformers' greedy generate, stopping at the end-of-sequence ids of the directory's generation config."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_NEW, do_sample=False,
                             pad_token_id=0)
    return out[0, x.shape[1]:].tolist()


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tiny_source):
    """A tiny Gemma 3 with the embedded Gemma tokenizer and CHAT_TEMPLATE, whose <end_of_turn> is an eos id in
    generation_config.json, as in Gemma's instruction-tuned checkpoints. Random weights never pick <end_of_turn>,
    so its output row becomes 1.5x that of the third token greedy decoding picks: the model then ends its turn by
    the third token, as a chat model does. Returns (directory, the templated prompt ids)."""
    from transformers import AutoModelForCausalLM

    folder = save_tiny_model(tmp_path_factory.mktemp("chat"), "gemma3_text", tiny_source.tokenizer_dir,
                             tie_word_embeddings=False)  # so the output row changes and the input embedding does not
    edit_json(folder / "tokenizer_config.json", chat_template=CHAT_TEMPLATE)
    tok = load_hf_tokenizer(str(folder))
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    third = hf_greedy(model, ids, 3)[2]
    with torch.no_grad():
        model.lm_head.weight[end] = 1.5 * model.lm_head.weight[third]
    model.generation_config.eos_token_id = [tok.eos_token_id, end]
    model.save_pretrained(folder)
    return folder, ids


def test_chat_records_use_the_template_and_stop_at_its_end_token_and_at_stop_strings(tmp_path, chat_model):
    from transformers import AutoModelForCausalLM

    folder, ids = chat_model
    tok = load_hf_tokenizer(str(folder))
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ended = hf_generate(model, ids)  # stops at <end_of_turn>, which it keeps, as the engine does
    full = hf_greedy(model, ids, MAX_NEW)  # eos ignored
    assert ended[-1] == end and len(ended) < MAX_NEW and full[:len(ended)] == ended  # the turn ends early
    # A stop string: the text of a token generated after the turn's end, so it ends that record later still.
    stop = next(text for t in full[len(ended):-1] if (text := tok.decode([t], skip_special_tokens=True).strip()))
    text = tok.decode(full, skip_special_tokens=True)
    num_to_stop = next(n for n in range(1, MAX_NEW + 1) if stop in tok.decode(full[:n], skip_special_tokens=True))

    rows = [{"id": "eos", "messages": MESSAGES, "stop": []},
            {"id": "full", "messages": MESSAGES, "ignore_eos": True, "stop": []},
            {"id": "stop", "messages": MESSAGES, "ignore_eos": True}]  # --stop applies
    source, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    result = engine_run("--input", str(source), "--output", str(out), "--model", str(folder), "--device", "cpu",
                        "--quiet", "--max-new-tokens", str(MAX_NEW), "--return-tokens", "--stop", stop)
    assert result.returncode == 0, result.stderr
    got = {r["id"]: r for r in read_jsonl(out)}
    assert all(r["num_prompt_tokens"] == len(ids) for r in got.values())
    assert got["full"]["completion_token_ids"] == full and got["full"]["finish_reason"] == "length"
    assert got["eos"]["completion_token_ids"] == ended and got["eos"]["finish_reason"] == "stop"
    assert got["stop"]["completion_token_ids"] == full[:num_to_stop] and got["stop"]["finish_reason"] == "stop"
    assert got["stop"]["completion"] == text[:text.index(stop)]
    assert len(ended) < num_to_stop < MAX_NEW  # each end came where only it could have ended the record
