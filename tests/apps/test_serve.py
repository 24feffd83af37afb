"""engine-serve as a client meets it: the server in a child process on a free port, the official openai client (and
raw HTTP for what a client library would not send). Completions equal engine-run's for the same records (greedy,
same seed), with and without steering and capture, streaming and not; concurrent clients; every bad request a 4xx
in OpenAI's shape, the server serving on; SIGTERM drains the requests in flight."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from engine.storage.activations import load
from support import PROMPTS, ROOT, TINY, read_jsonl, write_jsonl
from support.families import edit_json
from support.lora import LINEARS, make_lora
from support.serving import ENGINE_ARGS, Server

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
                 "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_source, tiny_model):
    """A tokenizer with a chat template (the tiny model's, plus Gemma's turn template), a vector folder and a PEFT
    LoRA adapter."""
    root = tmp_path_factory.mktemp("serve")
    tok = root / "tokenizer"
    tok.mkdir()
    for name in os.listdir(tiny_source.tokenizer_dir):
        shutil.copy(Path(tiny_source.tokenizer_dir, name), tok / name)
    edit_json(tok / "tokenizer_config.json", chat_template=CHAT_TEMPLATE)
    (root / "vectors").mkdir()
    torch.manual_seed(0)
    torch.save(torch.randn(64) * 8, root / "vectors" / "joy.pt")
    make_lora(tiny_model, root / "poet", seed=3, r=8, lora_alpha=16, target_modules=LINEARS)
    return root


def engine_args(files) -> list[str]:
    """The engine settings the server and engine-run share: the tiny model, the chat tokenizer, the adapter."""
    return [*ENGINE_ARGS, "--tokenizer", str(files / "tokenizer"), "--adapter", f"poet={files / 'poet'}"]


@pytest.fixture(scope="module")
def server(files):
    srv = Server(*engine_args(files), "--output", str(files / "served.jsonl"),
                 "--vectors", str(files / "vectors"), "--max-request-bytes", "65536")
    yield srv
    assert srv.stop() == 0, "".join(srv.lines)


def engine_run(files, records: list[dict], name: str) -> list[dict]:
    """engine-run's results for the same records and engine settings, in input order."""
    source = write_jsonl(files / f"{name}.jsonl", records)
    out = files / f"{name}.out.jsonl"
    done = subprocess.run([sys.executable, "-m", "engine.apps.run", *engine_args(files), "--input", str(source),
                           "--output", str(out), "--ordered", "--quiet"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return read_jsonl(out)


def steering(files, coef=6.0):
    return [{"vector": str(files / "vectors" / "joy.pt"), "layers": [1], "coef": coef}]


def cases(files) -> list[dict]:
    """(prompt, seed, steering, capture) records, greedy: plain, steered, captured, and both."""
    capture = {"layers": [1, 2], "positions": "generated"}
    out = []
    for i, prompt in enumerate(PROMPTS[:4]):
        extra = [{}, {"steering": steering(files)}, {"capture": capture},
                 {"steering": steering(files, -4.0), "capture": capture}][i]
        out.append({"id": f"case{i}", "prompt": prompt, "max_new_tokens": MAX_TOKENS, "temperature": 0.0,
                    "seed": 11 + i, **extra})
    return out


def ask(client, record: dict, stream: bool):
    """One completion through the openai client; (text, finish_reason, the engine's fields of the choice)."""
    extra = {k: record[k] for k in ("steering", "capture") if k in record}
    kwargs = dict(model=TINY, prompt=record["prompt"], max_tokens=record["max_new_tokens"], temperature=0.0,
                  seed=record["seed"], extra_body=extra)
    if not stream:
        choice = client.completions.create(**kwargs).choices[0]
        return choice.text, choice.finish_reason, choice.model_extra
    text, reason, fields = "", None, {}
    for piece in client.completions.create(stream=True, **kwargs):
        choice = piece.choices[0]
        text += choice.text
        reason = choice.finish_reason or reason
        fields.update(choice.model_extra or {})
    return text, reason, fields


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_completions_equal_engine_runs_with_steering_and_capture(server, files, stream):
    records = cases(files)
    expected = engine_run(files, records, f"cases-{stream}")
    client = server.client()
    mine = load(files / f"cases-{stream}.out.jsonl")
    for record, want in zip(records, expected):
        text, reason, fields = ask(client, record, stream)
        assert (text, reason) == (want["completion"], want["finish_reason"]), record["id"]
        if "steering" in record:
            assert fields["steering"] == want["steering"]
        if "capture" in record:
            pointer = fields["capture"]
            assert Path(pointer["output"]) == files / "served.jsonl" and pointer["layers"] == [1, 2]
            got = load(pointer["output"], ids=[pointer["id"]])[pointer["id"]]
            for layer in (1, 2):
                torch.testing.assert_close(got[layer], mine[record["id"]][layer], rtol=1e-5, atol=1e-5)
        else:
            assert "capture" not in fields


def test_chat_completions_equal_engine_runs(server, files):
    messages = [{"role": "user", "content": "Tell me a story about a dragon."}]
    want = engine_run(files, [{"messages": messages, "max_new_tokens": MAX_TOKENS, "temperature": 0.0, "seed": 3}],
                      "chat")[0]
    client = server.client()
    reply = client.chat.completions.create(model=TINY, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                           seed=3)
    assert reply.choices[0].message.content == want["completion"] and reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens == want["num_completion_tokens"]
    pieces = list(client.chat.completions.create(model=TINY, messages=messages, max_tokens=MAX_TOKENS,
                                                 temperature=0, seed=3, stream=True,
                                                 stream_options={"include_usage": True}))
    assert pieces[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in pieces if p.choices) == want["completion"]
    assert pieces[-1].usage.prompt_tokens == want["num_prompt_tokens"]


def test_logprobs_are_engine_runs_with_each_token_spelled(server, files):
    record = {"prompt": PROMPTS[1], "max_new_tokens": MAX_TOKENS, "temperature": 0.0, "seed": 5, "logprobs": 2}
    want = engine_run(files, [record], "logprobs")[0]
    client = server.client()
    reply = client.completions.create(model=TINY, prompt=record["prompt"], max_tokens=MAX_TOKENS, temperature=0,
                                      seed=5, logprobs=2)
    lp = reply.choices[0].logprobs
    assert lp.token_logprobs == want["completion_logprobs"] and "".join(lp.tokens) == want["completion"]
    assert [len(top) for top in lp.top_logprobs] == [2] * MAX_TOKENS
    assert [max(top.values()) for top in lp.top_logprobs] == lp.token_logprobs  # greedy: the top one was taken
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    chat = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=1)
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    assert all(len(t.top_logprobs) == 1 and t.top_logprobs[0].logprob == t.logprob for t in content)


def test_streamed_logprobs_are_the_whole_answers_token_by_token(server):
    """Each chunk's logprobs are those of the tokens that came with it: joined, the non-streamed answer's (tokens,
    log-probabilities, alternatives, text offsets), over a request long enough that some come before its end."""
    client = server.client()
    asked = dict(model=TINY, prompt="Once upon a time", max_tokens=48, temperature=0, logprobs=2)
    whole = client.completions.create(**asked).choices[0]
    pieces = [p.choices[0] for p in client.completions.create(stream=True, **asked)]
    scored = [p.logprobs for p in pieces if p.logprobs is not None]
    assert len(scored) >= 2  # some logprobs came as the tokens were sampled, not only with the result
    joined = {name: [v for lp in scored for v in getattr(lp, name)]
              for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    assert joined == {name: getattr(whole.logprobs, name) for name in joined}
    assert "".join(p.text for p in pieces) == whole.text == "".join(joined["tokens"])
    chat = dict(model=TINY, messages=[{"role": "user", "content": "Hi"}], max_tokens=24, temperature=0,
                logprobs=True, top_logprobs=1)
    want = client.chat.completions.create(**chat).choices[0].logprobs.content
    got = [t for p in client.chat.completions.create(stream=True, **chat)
           if p.choices and p.choices[0].logprobs is not None for t in p.choices[0].logprobs.content]
    assert [t.model_dump() for t in got] == [t.model_dump() for t in want]


def test_a_stream_ends_at_its_stop_string_as_the_whole_answer_does(server):
    """The core scans for stop strings every few tokens, so tokens past a stop reach the server before the sequence
    ends; the stream sends neither their text nor their logprobs."""
    client = server.client()
    asked = dict(model=TINY, prompt=["Once upon a time", "Hello"], max_tokens=20, temperature=1.0, seed=3, n=2,
                 logprobs=1, stop=["e"])
    whole = {c.index: (c.text, c.logprobs.tokens, c.logprobs.token_logprobs, c.finish_reason)
             for c in client.completions.create(**asked).choices}
    assert len(whole) == 4 and all(reason == "stop" and len(tokens) < 20 for _, tokens, _, reason in whole.values())
    streamed = {i: ["", [], [], None] for i in whole}
    for piece in client.completions.create(stream=True, **asked):
        for c in piece.choices:
            got = streamed[c.index]
            got[0] += c.text
            if c.logprobs is not None:
                got[1] += c.logprobs.tokens
                got[2] += c.logprobs.token_logprobs
            got[3] = c.finish_reason or got[3]
    assert {i: tuple(got) for i, got in streamed.items()} == whole


def test_echo_streams_the_prompt_first_and_a_scored_prompt_streams_nothing_else(server):
    client = server.client()
    for max_tokens in (0, 4):
        asked = dict(model=TINY, prompt=PROMPTS[2], max_tokens=max_tokens, temperature=0, echo=True)
        whole = client.completions.create(**asked)
        pieces = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **asked))
        assert pieces[0].choices[0].text == PROMPTS[2]
        assert "".join(p.choices[0].text for p in pieces if p.choices) == whole.choices[0].text
        assert pieces[-1].usage.completion_tokens == whole.usage.completion_tokens == max_tokens
    refused = server.post("/v1/completions", {**asked, "logprobs": 1, "stream": True})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "logprobs"
    assert "ask without 'stream'" in refused.json()["error"]["message"]


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_with_logprobs_scores_the_prompt_as_engine_run_does(server, files, max_tokens):
    """What lm-evaluation-harness' loglikelihood requests send: echo, logprobs, max_tokens 0 or 1."""
    prompt = PROMPTS[0]
    want = engine_run(files, [{"prompt": prompt, "max_new_tokens": 1, "temperature": 0.0, "prompt_logprobs": 1,
                               "logprobs": 1}], f"scored{max_tokens}")[0]
    reply = server.client().completions.create(model=TINY, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                               echo=True, logprobs=1)
    choice, lp = reply.choices[0], reply.choices[0].logprobs
    kept = max_tokens  # the one generated token is kept with max_tokens 1, dropped with 0
    assert choice.text == prompt + want["completion"][:len(want["completion"]) * kept]
    assert lp.token_logprobs == [None, *want["prompt_logprobs"], *want["completion_logprobs"][:kept]]
    assert len(lp.tokens) == len(want["prompt_token_ids"]) + kept and lp.top_logprobs[0] is None
    assert [max(top.values()) for top in lp.top_logprobs[1:]] == [
        step[0][1] for step in want["prompt_top_logprobs"] + want["completion_top_logprobs"][:kept]]
    assert reply.usage.completion_tokens == kept


def test_token_id_prompts_run_as_they_are(server, tokenizer):
    ids = tokenizer(PROMPTS[2]).input_ids  # with its BOS, as the server tokenizes the text
    client = server.client()
    text = client.completions.create(model=TINY, prompt=PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0)
    both = client.completions.create(model=TINY, prompt=[ids, ids[1:]], max_tokens=MAX_TOKENS, temperature=0,
                                     echo=True)
    assert both.choices[0].text == tokenizer.decode(ids, skip_special_tokens=True) + text.choices[0].text
    assert both.usage.prompt_tokens == 2 * len(ids) - 1  # the second ran without the BOS


def test_n_choices_and_prompt_lists_seed_each_choice(server, files):
    """n choices of each prompt in a list: choice i of a prompt samples with seed + i, as an engine-run record with
    that seed does."""
    prompts = PROMPTS[4:6]
    records = [{"prompt": p, "max_new_tokens": MAX_TOKENS, "temperature": 1.0, "seed": 40 + i}
               for p in prompts for i in range(2)]
    want = [r["completion"] for r in engine_run(files, records, "choices")]
    reply = server.client().completions.create(model=TINY, prompt=prompts, n=2, max_tokens=MAX_TOKENS,
                                               temperature=1.0, seed=40)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert [c.text for c in reply.choices] == want and want[0] != want[1]


def test_sixteen_concurrent_clients_are_all_answered_as_alone(server, files):
    records = [{"prompt": f"{PROMPTS[i % len(PROMPTS)]} {i}", "max_new_tokens": MAX_TOKENS, "seed": i}
               for i in range(16)]
    client = server.client()
    alone = [ask(client, r, stream=False)[0] for r in records[:4]]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda r: ask(server.client(), r, stream=r["seed"] % 2 == 1)[0], records))
    assert together[:4] == alone
    assert all(together) and len(together) == 16


BAD = [  # (body changes, status, param, words in the message)
    ({"bogus": 1}, 400, "bogus", "unknown field"),
    ({"max_tokens": "eight"}, 400, "max_tokens", "must be an integer"),
    ({"temperature": [1]}, 400, "temperature", "must be a number"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ({"model": "gpt-4"}, 404, "model", "does not exist"),
    ({"prompt": [1, True]}, 400, "prompt", "token ids"),
    ({"prompt": [10**9]}, 400, "prompt", "vocabulary"),
    ({"logprobs": 50}, 400, "logprobs", "must be an integer"),
    ({"max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ({"steering": [{"vector": "/nonexistent/v.pt", "layers": [1], "coef": 1}]}, 400, "steering", "no such file"),
    ({"steering": [{"vector": "VEC", "layers": [99], "coef": 1}]}, 400, "steering", "99"),
    ({"capture": {"layers": ["x"]}}, 400, "capture", "capture"),
    ({"prompt": "hello " * 200}, 400, "prompt", "lower max_tokens, or start engine-serve with --truncate"),
    ({"max_tokens": 500}, 400, "max_tokens", "max_tokens=500 leaves no room"),
    ({"top_p": 7}, 400, "top_p", "top_p"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_bad_requests_get_4xx_naming_the_field_and_the_server_serves_on(server, files, stream):
    good = {"model": TINY, "prompt": "Hello", "max_tokens": 4, "stream": stream}
    vector = str(files / "vectors" / "joy.pt")
    for changes, status, param, words in BAD:
        changes = json.loads(json.dumps(changes).replace("VEC", vector))
        reply = server.post("/v1/completions", {**good, **changes})
        error = reply.json()["error"]
        assert (reply.status_code, error["param"]) == (status, param), (changes, error)
        assert words in error["message"] and error["type"], error
    for body, status in ((b"{not json", 400), (b"[1, 2]", 400), (b"[" * 50000, 400), (b"x" * 70000, 413)):
        assert server.post("/v1/completions", body).status_code == status
    assert httpx.get(server.url + "/v1/nowhere").json()["error"]["type"] == "not_found_error"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert server.post("/v1/completions", good).status_code == 200
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        server.client().completions.create(model="other", prompt="x", max_tokens=2)
    chat = server.post("/v1/chat/completions", {"model": TINY, "messages": [{"role": "user"}]})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"


def test_a_client_that_goes_away_ends_its_request_in_the_engine(server, files):
    """A stream closed after its first chunk: the request leaves the engine at once (/health runs none), and never
    finishes (the server's output never gets its result); a whole request whose client hangs up likewise."""
    body = {"model": TINY, "prompt": "Once", "max_tokens": 90, "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as reply:
        first = next(line for line in reply.iter_lines() if line.startswith("data: "))
    job = json.loads(first[6:])["id"].removeprefix("cmpl-")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 30
    while httpx.get(server.url + "/health").json()["running"]:
        assert time.monotonic() < deadline, "the abandoned requests kept running"
        time.sleep(0.05)
    time.sleep(1.0)
    served = [r for r in read_jsonl(files / "served.jsonl") if r["num_completion_tokens"] == 90]
    assert not served and job


def test_an_adapter_serves_as_a_model_of_its_own_and_by_the_body_field(server, files):
    record = {"prompt": PROMPTS[4], "max_new_tokens": MAX_TOKENS, "temperature": 0.0, "seed": 2}
    base, poet = (r["completion"] for r in engine_run(files, [record, {**record, "adapter": "poet"}], "adapters"))
    client = server.client()
    kwargs = dict(prompt=record["prompt"], max_tokens=MAX_TOKENS, temperature=0, seed=2)
    by_model = client.completions.create(model="poet", **kwargs).choices[0]
    by_field = client.completions.create(model=TINY, extra_body={"adapter": "poet"}, **kwargs).choices[0]
    assert by_model.text == by_field.text == poet != base
    assert by_model.model_extra["adapter"] == "poet"
    assert client.completions.create(model=TINY, **kwargs).choices[0].text == base
    models = {m.id: m for m in client.models.list()}
    assert models["poet"].model_extra["parent"] == TINY
    wrong = server.post("/v1/completions", {"model": TINY, "prompt": "x", "adapter": "lawyer"})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "adapter"
    assert "poet" in wrong.json()["error"]["message"]


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list()] == [TINY, "poet"]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["device"] == "cpu"


def test_an_api_key_is_required_when_set_and_sigterm_drains_the_requests_in_flight(files):
    srv = Server(*ENGINE_ARGS, env={"ENGINE_API_KEY": "sesame"})
    try:
        body = {"model": TINY, "prompt": "Hello", "max_tokens": 4}
        assert srv.post("/v1/completions", body).status_code == 401
        wrong = srv.post("/v1/completions", body, {"Authorization": "Bearer open"})
        assert wrong.status_code == 401 and "wrong" in wrong.json()["error"]["message"]
        with pytest.raises(openai.AuthenticationError):
            srv.client(api_key="open").completions.create(**body)
        assert srv.client(api_key="sesame").completions.create(**body).choices[0].text
        assert httpx.get(srv.url + "/health").status_code == 200  # probes need no key

        # A long streamed request, then SIGTERM: it runs to its end, then the server exits 0.
        client = srv.client(api_key="sesame")
        stream = client.completions.create(model=TINY, prompt="Once", max_tokens=80, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        first = next(iter(stream))
        srv.proc.send_signal(signal.SIGTERM)
        rest = list(stream)
        assert rest[-1].choices[0].finish_reason == "length"
        text = first.choices[0].text + "".join(p.choices[0].text for p in rest)
        assert srv.proc.wait(timeout=60) == 0, "".join(srv.lines)
        assert "stopped; 2 request(s) served" in "".join(srv.lines)
        assert text
    finally:
        srv.stop(signal.SIGKILL)


@pytest.mark.slow
def test_the_embedded_model_serves_what_engine_run_generates(tmp_path):
    srv = Server("--model", "embedded", "--device", "cpu", "--max-num-seqs", "4")
    try:
        prompt = "The capital of France is"
        source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": prompt, "max_new_tokens": 12, "temperature": 0}])
        done = subprocess.run([sys.executable, "-m", "engine.apps.run", "--model", "embedded", "--device", "cpu",
                               "--input", str(source), "--quiet"], cwd=ROOT, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr
        want = read_jsonl(tmp_path / "in.out.jsonl")[0]["completion"]
        reply = srv.client().completions.create(model="embedded", prompt=prompt, max_tokens=12, temperature=0)
        assert reply.choices[0].text == want and want.strip()
    finally:
        assert srv.stop() == 0


@pytest.mark.parametrize("flags, words", [(["--drain-timeout", "-1"], "--drain-timeout -1.0: give the seconds"),
                                          (["--max-request-bytes", "10"], "--max-request-bytes 10: give at least"),
                                          (["--vectors", "/nowhere"], "--vectors /nowhere: not a folder")])
def test_a_bad_start_up_flag_is_one_line_before_anything_starts(capsys, flags, words):
    from engine.apps.serve.cli import serve_main

    assert serve_main(["--model", TINY, "--device", "cpu", *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("engine-serve: ") and words in err and "Traceback" not in err
