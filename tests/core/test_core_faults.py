"""A record is the unit of failure in the core: logits that became NaN or inf, or a forward whose final norm collapsed
(every logit 0), end that request with an error, and any error while admitting a request is that request's error;
batch-mates run on, token for token as without it."""

from __future__ import annotations

import logging
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from support import PROMPTS, core_request, tiny_config
from numpy.lib import format as npy_format
from safetensors.torch import save_file

from engine import Engine
from engine.core.attention import CONTEXT
from engine.core.engine_core import EngineCore, is_device_error
from engine.core.faults import CollapseCheck
from engine.pipeline.request import RecordError
from engine.core.sampler import NON_FINITE, Sampler, SamplingMetadata
from engine.core.scheduler import Scheduler, Sequence
from engine.messages import CoreRequest
from engine.models import decoder_layers

NAN, INF = float("nan"), float("inf")
MAX_NEW = 6
# an admission error is either load_vectors' own RecordError or the core's wrapper around anything else
REFUSED = ("could not admit this record: ", "steering vector ")


@pytest.fixture(scope="module")
def core(tiny_source):
    return EngineCore(tiny_config(), tiny_source)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model):
    """Vector files: `twos`, `good` (standard normal, |v| <= 2.33) and `ones` break the forward (BREAKING), the
    rest are files no loader should let kill the core."""
    hidden = tiny_model.config.hidden_size
    folder = tmp_path_factory.mktemp("faults")
    np.save(folder / "twos.npy", np.full(hidden, 2.0, dtype=np.float32))
    np.save(folder / "ones.npy", np.ones(hidden, dtype=np.float32))
    np.save(folder / "good.npy", np.random.default_rng(0).standard_normal(hidden).astype(np.float32))
    (folder / "empty.npy").write_bytes(b"")
    np.save(folder / "strings.npy", np.array(["abc"] * hidden))
    np.save(folder / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with (folder / "huge.npy").open("wb") as f:  # a header that claims 40 TB
        npy_format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (10 ** 13,)})
        f.write(b"\0" * 64)
    torch.save([1, 2, 3], folder / "ints.pt")
    (folder / "garbage.pt").write_bytes(b"not a zip archive")
    save_file({"direction": torch.ones(hidden)}, str(folder / "full.safetensors"))
    whole = (folder / "full.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(whole[:len(whole) // 2])
    return {p.stem: str(p) for p in folder.iterdir()}


BAD_FILES = ["empty", "strings", "objects", "huge", "ints", "garbage", "truncated"]


# (vector file, layers, coef) that break the tiny model's forward, every coef x vector within float32 (admission
# refuses the rest). `twos` over two layers: each table row (2e38) is finite, their sum is not, the logits become NaN.
# The others leave the residual stream finite but past ~1.8e19, where a float32 square overflows: the norms collapse
# to 0 and so does every logit, a finite row only the final-norm check tells apart (test_collapse_mechanism_in_hf).
BREAKING = {"overflow-twos-1e38": ("twos", [1, 2], 1e38), "collapse-normal-1e38": ("good", [1], 1e38),
            "collapse-ones-1e30": ("ones", [1, 2], 1e30)}
COLLAPSING = [name for name in BREAKING if name.startswith("collapse")]


def breaking(files, name: str, positions: str) -> dict:
    vector, layers, coef = BREAKING[name]
    return {"vector": files[vector], "layers": layers, "coef": coef, "positions": positions}


def overflow_error(token: int, is_steered: bool = True) -> str:
    where = (f"the model's forward became non-finite at generated token {token}: the residual stream grew too large "
             f"for float32's range (the logits became NaN or inf, or the norms' mean of squares overflowed and they "
             f"collapsed to 0)")
    if is_steered:
        return (f"{where}; the steering pushed it there: use a smaller coef (or norm_match, which scales the vector "
                f"to the residual's norm)")
    return (f"{where}; with no steering, the model itself overflowed on this prompt: check the model's weights for NaN "
            "or inf")


def request(i: int, steering=None, **kw) -> CoreRequest:
    return core_request(i, steering, **{"max_new_tokens": MAX_NEW, **kw})


def good_requests(first: int) -> list[tuple[CoreRequest, int]]:
    """Greedy and seeded-sampled requests, more than the core's 4 KV rows: later ones reuse freed KV rows."""
    settings = [{}, {"temperature": 0.8, "top_k": 20}, {}, {"temperature": 1.1, "top_p": 0.9}, {}, {"temperature": 0.7}]
    return [(request(first + i, **kw), i) for i, kw in enumerate(settings)]


def run_core(core: EngineCore, tokenizer, rows: list[tuple[CoreRequest, int]]) -> dict[int, Sequence]:
    core.scheduler = Scheduler(core.cache.num_rows, core.max_prefill_tokens)
    return core.generate([r for r, _ in rows], [tokenizer(PROMPTS[p]).input_ids for _, p in rows])


def assert_untouched(with_bad: dict[int, Sequence], alone: dict[int, Sequence]) -> None:
    for index, seq in alone.items():
        assert seq.error is None and len(seq.output_ids) == MAX_NEW
        assert with_bad[index].error is None and with_bad[index].output_ids == seq.output_ids, index


# ---- non-finite logits


def test_argmax_ranks_nan_above_every_number_on_cpu():
    """What the sampler's check rests on: the argmax of a row holding a NaN is a NaN, of one holding +inf (and no
    NaN) is +inf, of a row of -inf is -inf; in every float dtype the model may hand over."""
    rows = torch.tensor([[1.0, NAN, 3.0, INF], [INF, 2.0, -INF, 5.0], [-INF] * 4, [NAN, NAN, 7.0, -INF],
                         [-INF, 2.0, -INF, 1.0]])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        logits = rows.to(dtype)
        picked = logits.gather(-1, logits.argmax(-1)[:, None])[:, 0].float()
        assert torch.equal(logits.max(-1).values.float().isnan(), picked.isnan())
        assert picked[0].isnan() and picked[1] == INF and picked[2] == -INF and picked[3].isnan()
        assert picked[4] == 2.0


@pytest.mark.parametrize("row", [(0.0, 1.0, 0, 1), (0.9, 1.0, 0, 2), (0.9, 1.0, 5, 3), (0.9, 0.8, 0, 4)],
                         ids=["greedy", "sampled", "top_k", "top_p"])
def test_sampler_marks_rows_with_non_finite_logits(row):
    torch.manual_seed(0)
    logits = torch.randn(6, 200)
    logits[1, 17] = NAN
    logits[2, 3] = INF
    logits[3] = -INF
    logits[4, :100] = -INF  # masked, as top-k leaves a row: usable
    logits[5] = NAN
    tokens = Sampler()(logits, SamplingMetadata.build([row] * 6, "cpu"), torch.arange(6))
    assert tokens[1:4].tolist() == [NON_FINITE] * 3 and tokens[5] == NON_FINITE
    clean = Sampler()(logits[[0, 4]], SamplingMetadata.build([row] * 2, "cpu"), torch.tensor([0, 4]))
    assert tokens[[0, 4]].tolist() == clean.tolist() and tokens[4] >= 100


@pytest.mark.parametrize("row", [(0.0, 1.0, 0, 1), (0.9, 1.0, 0, 2), (0.9, 1.0, 5, 3), (0.9, 0.8, 0, 4)],
                         ids=["greedy", "sampled", "top_k", "top_p"])
def test_sampler_marks_rows_whose_final_norm_collapsed(row):
    """A collapsed forward's logits are all 0, finite: only the runner's flag tells it apart."""
    torch.manual_seed(0)
    logits = torch.randn(4, 200)
    logits[1] = 0.0
    logits[3, 5] = NAN
    is_norm_ok = torch.tensor([True, False, True, True, False, False])  # the runner's buffer: rows [:4] are read
    params, steps = SamplingMetadata.build([row] * 4, "cpu"), torch.arange(4)
    unflagged = Sampler()(logits, params, steps)
    tokens = Sampler(is_norm_ok)(logits, params, steps)
    assert unflagged[1] != NON_FINITE and tokens[[1, 3]].tolist() == [NON_FINITE] * 2
    assert tokens[[0, 2]].tolist() == unflagged[[0, 2]].tolist()


def test_a_model_without_a_final_norm_is_not_checked(caplog):
    class NoNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()

    with caplog.at_level(logging.INFO, logger="engine"):
        check = CollapseCheck(NoNorm(), 4, "cpu")
    assert check.is_norm_ok is None
    assert [r.levelno for r in caplog.records if "collapsed forwards" in r.getMessage()] == [logging.INFO]


def test_scheduler_ends_a_non_finite_sequence_and_frees_its_row():
    s = Scheduler(num_rows=2, max_prefill_tokens=100)
    for i in range(3):
        s.add(Sequence(index=i, prompt_ids=torch.zeros(4, dtype=torch.int64), max_new_tokens=4, temperature=0.0,
                       top_p=1.0, top_k=0, seed=0, ignore_eos=True, stop=[]))
    batch = s.schedule()
    finished = s.update(batch.seqs, [5, NON_FINITE], eos_ids=set())
    assert [(q.index, q.finish_reason, q.output_ids) for q in finished] == [(1, "error", [])]
    assert [(q.index, q.row) for q in s.schedule().seqs] == [(2, 1)]  # its row goes to the next at once
    assert s.update(batch.seqs, [NON_FINITE, 6], eos_ids=set())[0].index == 0  # the late token of 1 is dropped
    assert batch.seqs[1].output_ids == []


@pytest.mark.parametrize("name", COLLAPSING)
def test_collapse_mechanism_in_hf(tiny_model, tokenizer, files, name):
    """Why finite logits are not enough: steered this way (HF forward hooks, no engine), the residual stream stays
    finite, the final RMSNorm's float32 mean of squares overflows to inf, rsqrt(inf) = 0, and every logit is exactly
    0, so greedy decoding picks token 0 (`<pad>`) every step."""
    vector, layers, coef = BREAKING[name]
    added = coef * torch.from_numpy(np.load(files[vector]))
    assert added.isfinite().all()
    seen = {}

    def steer(module, args, output):
        (output[0] if isinstance(output, tuple) else output).add_(added)

    def at_norm(module, args):
        seen["hidden"] = args[0].clone()

    handles = [decoder_layers(tiny_model)[i].register_forward_hook(steer) for i in layers]
    handles.append(tiny_model.model.norm.register_forward_pre_hook(at_norm))
    try:
        with torch.inference_mode():
            logits = tiny_model(torch.tensor([tokenizer(PROMPTS[0]).input_ids])).logits
    finally:
        for handle in handles:
            handle.remove()
    hidden = seen["hidden"]
    assert hidden.isfinite().all() and not hidden.float().pow(2).mean(-1).isfinite().any()
    assert logits.isfinite().all() and (logits == 0).all()


@pytest.mark.parametrize("name", BREAKING)
def test_breaking_steering_ends_only_its_request(core, tokenizer, files, name):
    """Steering at prompt positions fails at the first token (the prefill), at generated positions at the second
    (the first decode that adds it); greedy and sampled, with a capture that is dropped. The batch-mates, some
    of them reusing the failed requests' KV rows, get the tokens they get without them."""
    capture = {"layers": [1], "positions": "generated"}
    bad = [(request(0, breaking(files, name, "all"), capture=capture), 1),
           (request(1, breaking(files, name, "generated"), temperature=0.9, top_p=0.9), 3)]
    with_bad = run_core(core, tokenizer, bad + good_requests(first=10))
    alone = run_core(core, tokenizer, good_requests(first=10))
    assert_untouched(with_bad, alone)
    for index, token in ((0, 1), (1, 2)):
        seq = with_bad[index]
        assert seq.finish_reason == "error" and len(seq.output_ids) == token - 1
        assert seq.error == overflow_error(token)
    assert 0 not in core.recorder.requests and not core.scheduler.running
    # no NaN left where a next owner reads (the trash column, which idle decode rows write, is never read)
    assert all(torch.isfinite(t[:, :, :core.cache.max_len]).all() for t in (*core.cache.k, *core.cache.v))


@contextmanager
def broken_rows(core: EngineCore, index: int, from_token: int, value: float):
    """Forward hooks on the model (not the engine) that set request `index`'s hidden states to `value` in the forward
    that samples its generated token `from_token` (counted from 1) and every later one: in the prefill through the
    embedding of a marker token its prompt ends with, in a decode through decoder layer 2's output at its KV row."""

    def running():
        return next((s for s in core.scheduler.running.values() if s.index == index), None)

    def at_embedding(module, args, output):
        if CONTEXT.is_prefill and from_token == 1:
            output[args[0] == MARKER] = value

    def at_layer(module, args, output):
        seq = running()
        if not CONTEXT.is_prefill and seq is not None and seq.num_scheduled + 1 >= from_token:
            (output[0] if isinstance(output, tuple) else output)[0, seq.row] = value  # decode: KV rows in one row

    handles = [core.model.get_input_embeddings().register_forward_hook(at_embedding),
               decoder_layers(core.model)[2].register_forward_hook(at_layer)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


MARKER = 4321


@pytest.mark.parametrize("value", [NAN, 1e30], ids=["nan", "collapse"])
@pytest.mark.parametrize("from_token,temperature", [(1, 0.0), (3, 0.0), (3, 0.8)],
                         ids=["prefill", "decode-greedy", "decode-sampled"])
def test_a_broken_forward_from_a_model_hook_ends_only_its_request(core, tokenizer, from_token, temperature, value):
    """Unsteered: hidden states of NaN, or of 1e30 (finite, but the norms collapse and every logit is 0)."""
    alone = run_core(core, tokenizer, good_requests(first=10))
    core.scheduler = Scheduler(core.cache.num_rows, core.max_prefill_tokens)
    core.add(request(0, temperature=temperature, top_k=10), torch.tensor(tokenizer(PROMPTS[1]).input_ids + [MARKER]))
    with broken_rows(core, index=0, from_token=from_token, value=value):
        rows = good_requests(first=10)
        with_bad = core.generate([r for r, _ in rows], [tokenizer(PROMPTS[p]).input_ids for _, p in rows])
    assert_untouched(with_bad, alone)
    failed = with_bad[0]
    assert failed.finish_reason == "error" and len(failed.output_ids) == from_token - 1
    assert failed.error == overflow_error(from_token, is_steered=False)


@pytest.fixture(scope="module")
def engine():
    with Engine(tiny_config(max_num_seqs=2)) as running:
        yield running


def pipeline_records(files, bad: list[dict]) -> list[dict]:
    rows = [{"id": f"g{i}", "prompt": p, "max_new_tokens": MAX_NEW, "temperature": 0.8 * (i % 2), "seed": i}
            for i, p in enumerate(PROMPTS)]
    rows.insert(1, {"id": "steered", "prompt": PROMPTS[2], "max_new_tokens": MAX_NEW,
                    "steering": {"vector": files["good"], "layers": [2], "coef": 3.0}})
    for at, record in enumerate(bad):  # early, so the records after them get their freed KV rows
        rows.insert(2 * at, record)
    return rows


def assert_records_untouched(got: list[dict], alone: list[dict], num_bad: int) -> None:
    kept = [r for r in got if "error" not in r]
    assert len(kept) == len(got) - num_bad == len(alone)
    assert [(r["id"], r["completion_token_ids"]) for r in kept] == [(r["id"], r["completion_token_ids"]) for r in alone]


def test_pipeline_turns_a_broken_forward_into_that_records_error(engine, files):
    """Every BREAKING spec, at prompt positions (failing in the prefill) and generated ones (in a decode)."""
    bad = []
    for name in BREAKING:
        bad += [{"id": f"{name}-prompt", "prompt": PROMPTS[1], "steering": breaking(files, name, "prompt"),
                 "capture": {"layers": [1], "positions": "last_prompt"}},
                {"id": f"{name}-generated", "prompt": PROMPTS[3], "steering": breaking(files, name, "generated"),
                 "temperature": 0.9, "seed": 7}]
    got = engine.generate_all(pipeline_records(files, bad))
    alone = engine.generate_all(pipeline_records(files, []))
    assert_records_untouched(got, alone, num_bad=len(bad))
    errors = {r["id"]: r["error"] for r in got if "error" in r}
    assert errors == {f"{name}-{where}": overflow_error(token) for name in BREAKING
                      for where, token in (("prompt", 1), ("generated", 2))}


# ---- admission


def test_bad_vector_files_are_refused_one_record_at_a_time_in_process(core, tokenizer, files):
    alone = run_core(core, tokenizer, good_requests(first=10))
    core.scheduler = Scheduler(core.cache.num_rows, core.max_prefill_tokens)
    ids = torch.tensor(tokenizer(PROMPTS[0]).input_ids)
    for i, name in enumerate(BAD_FILES):
        spec = [{"vector": files["good"], "layers": [1], "coef": 1.0, "positions": "all"},
                {"vector": files[name], "layers": [2], "coef": 1.0, "positions": "all"}]
        with pytest.raises(RecordError) as refused:
            core.add(request(100 + i, spec, capture={"layers": [1], "positions": "generated"}), ids)
        assert str(refused.value).startswith(REFUSED), name
        assert 100 + i not in core.recorder.requests and not core.scheduler.waiting
    rows = good_requests(first=10)
    assert_untouched(core.generate([r for r, _ in rows], [tokenizer(PROMPTS[p]).input_ids for _, p in rows]), alone)


def test_an_unexpected_admission_error_is_logged_once_and_leaves_nothing_behind(tiny_source, tokenizer, caplog):
    fresh = EngineCore(tiny_config(), tiny_source)
    ids = torch.tensor(tokenizer(PROMPTS[0]).input_ids)
    with caplog.at_level(logging.WARNING, logger="engine"):
        for index in (0, 1):
            incomplete = request(index, capture={"layers": [1], "positions": "generated"})
            del incomplete.max_new_tokens  # a request the tokenizer worker would never send: an engine bug
            with pytest.raises(RecordError, match=r"^could not admit this record: AttributeError: .*'max_new_tokens'"):
                fresh.add(incomplete, ids)
    logged = [r for r in caplog.records if "could not be admitted" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert not fresh.recorder.requests and not fresh.scheduler.waiting
    done = fresh.generate([request(2)], [ids.tolist()])
    assert len(done[2].output_ids) == MAX_NEW


def test_device_errors_are_not_turned_into_record_errors():
    fatal = [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
             RuntimeError("CUDA error: an illegal memory access was encountered"),
             RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx")]
    if hasattr(torch, "AcceleratorError"):
        fatal.append(torch.AcceleratorError("CUDA error: device-side assert triggered"))
    assert all(is_device_error(exc) for exc in fatal)
    recoverable = [RuntimeError("shape '[64]' is invalid"), MemoryError("Unable to allocate 36.4 TiB"), KeyError("x"),
                   EOFError("No data left in file"), TypeError("can't convert np.ndarray of type numpy.str_")]
    assert not any(is_device_error(exc) for exc in recoverable)


def test_pipeline_refuses_bad_vector_files_per_record(engine, files):
    bad = [{"id": name, "prompt": PROMPTS[0], "steering": {"vector": files[name], "layers": [1], "coef": 2.0},
            "capture": {"layers": [2], "positions": "generated"}} for name in BAD_FILES]
    got = engine.generate_all(pipeline_records(files, bad))
    alone = engine.generate_all(pipeline_records(files, []))
    assert_records_untouched(got, alone, num_bad=len(BAD_FILES))
    errors = {r["id"]: r["error"] for r in got if "error" in r}
    assert sorted(errors) == sorted(BAD_FILES)
    assert all(error.startswith(REFUSED) for error in errors.values()), errors
