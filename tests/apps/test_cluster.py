"""engine-ray on a local Ray instance with CPU actors and the tiny model: every request done once, results as one
engine-run gives them (greedy and seeded, captured activations too), a stopped job resumed, a killed actor's part
finished by a new actor, a sweep; and the refusals that need no actor. Ray is a test dependency: no skipping."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray", reason="the Ray path needs the [test] extra's ray")

from support import PROMPTS, read_jsonl, write_jsonl
from engine.storage.activations import load
from engine.apps.run import run_main
from engine.apps.cluster.cli import job_options, job_spec, ray_main, ray_parser
from engine.apps.cluster.driver import ClusterJob
from engine.apps.cluster.parts import ClusterError, line_id, part_of
from engine.apps.sweep.plan import Plan
from engine.apps.sweep.spec import load_sweep
from engine.pipeline.writer import ManifestMismatch

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ["--model", "random:tiny", "--device", "cpu", "--max-num-seqs", "2", "--max-new-tokens", "12",
         "--ignore-eos", "--capture-layers", "1", "--return-tokens", "--quiet"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 << 20, log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()


def prompts_file(tmp_path: Path, count: int) -> Path:
    """Greedy records, seeded sampled ones and sampled ones whose seed comes from their id; some without an id."""
    rows = []
    for i in range(count):
        row = {"prompt": f"{PROMPTS[i % len(PROMPTS)]} {i}"}
        if i % 5:
            row["id"] = f"r{i}"
        if i % 3 == 1:
            row |= {"temperature": 0.9, "top_p": 0.95, "seed": 1000 + i}
        elif i % 3 == 2:
            row |= {"temperature": 0.7, "top_k": 20}
        rows.append(row)
    return write_jsonl(tmp_path / "in.jsonl", rows)


def cluster_job(source: Path, out: Path, *extra: str, num_actors: int = 2) -> ClusterJob:
    parser = ray_parser()
    args = parser.parse_args(["--input", str(source), "--output", str(out), "--num-actors", str(num_actors),
                              "--progress-seconds", "1", *FLAGS, *extra])
    return ClusterJob(job_spec(parser, args), job_options(args))


def reference(source: Path, tmp_path: Path) -> tuple[dict, dict]:
    """One engine-run over the same input with the same flags: records by id, activations by id."""
    out = tmp_path / "reference" / "results.jsonl"
    assert run_main(["--input", str(source), "--output", str(out), *FLAGS]) == 0
    return {r["id"]: r for r in read_jsonl(out)}, load(out)


def assert_same(out: Path, expected: dict, expected_activations: dict) -> None:
    records = read_jsonl(out / "results.jsonl")  # fails on any line that is not whole JSON
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == len(expected), "a record is missing or duplicated"
    strip = lambda r: {k: v for k, v in r.items() if k != "activations"}  # noqa: E731 - pointers differ by folder
    for record in records:
        assert strip(record) == strip(expected[record["id"]]), record["id"]
    parts = [r["id"] for p in sorted((out / "parts").iterdir()) for r in read_jsonl(p / "results.jsonl")]
    assert sorted(parts) == sorted(ids), "the parts hold other records than the merged file"
    activations = load(out / "results.jsonl")
    assert set(activations) == set(expected)
    for request_id, layers in activations.items():
        torch.testing.assert_close(layers[1], expected_activations[request_id][1], rtol=1e-4, atol=1e-4)


@pytest.fixture
def background():
    """Runs jobs in threads; a job still running when the test ends is stopped and waited for, since Ray ends the
    whole process when a thread calls it after ray.shutdown."""
    started: list[tuple[ClusterJob, threading.Thread]] = []

    def run(job: ClusterJob) -> tuple[threading.Thread, dict]:
        ended: dict = {}
        thread = threading.Thread(target=lambda: ended.setdefault("how", job.run()), daemon=True)
        thread.start()
        started.append((job, thread))
        return thread, ended

    yield run
    for job, thread in started:
        job.stop("the test ended")
        thread.join(timeout=120)


def wait_until(condition, thread: threading.Thread, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert thread.is_alive(), f"the job ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def running_actor(job: ClusterJob) -> dict | None:
    """An actor's progress while it generates with records of its part written, else None."""
    for slot in list(job.slots):
        try:
            progress = ray.get(slot.handle.progress.remote(), timeout=10)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            continue
        if progress["state"] == "running" and progress["part_done"] >= 1:
            return progress
    return None


def test_stopped_job_resumes_and_a_killed_actor_part_finishes_elsewhere(local_ray, background, tmp_path):
    # Enough records that the resumed run is still generating when the test looks for an actor to kill: with 24,
    # a first run that got far left the second too little to catch mid-part.
    source = prompts_file(tmp_path, 60)
    expected, expected_activations = reference(source, tmp_path)
    out = tmp_path / "job"

    first = cluster_job(source, out)
    thread, ended = background(first)
    wait_until(lambda: running_actor(first) is not None, thread, "a first record")
    first.stop("test")
    thread.join(timeout=120)
    assert ended["how"] == "interrupted"
    partial = [r["id"] for p in (out / "parts").iterdir() for r in read_jsonl(p / "results.jsonl")]
    assert 1 <= len(partial) < len(expected) and len(partial) == len(set(partial))
    assert not (out / "results.jsonl").exists(), "an unfinished job is merged only when every part is complete"
    assert json.loads((out / "status.json").read_text())["state"] == "interrupted"

    second = cluster_job(source, out)
    thread, ended = background(second)
    wait_until(lambda: (actor := running_actor(second)) is not None and not os.kill(actor["pid"], signal.SIGKILL),
               thread, "an actor to kill")
    thread.join(timeout=400)
    assert ended["how"] == "done", second.failure
    assert second.num_restarts >= 1
    assert second.num_done_before == len(partial), "the second run does not start from what the first wrote"
    assert_same(out, expected, expected_activations)
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "done" and status["restarts"] >= 1 and status["actors"]

    third = cluster_job(source, out)  # complete: no actor starts, the merge is rewritten from the parts, same records
    assert third.run() == "done" and not third.slots
    assert_same(out, expected, expected_activations)


def test_sweep_on_ray_matches_its_plan(local_ray, tmp_path):
    vector = tmp_path / "v.pt"
    torch.save(torch.randn(64, generator=torch.Generator().manual_seed(0)), vector)
    write_jsonl(tmp_path / "p.jsonl", [{"id": f"q{i}", "prompt": p} for i, p in enumerate(PROMPTS[:3])])
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(f'output = "sweep-out"\nsamples = 2\nmodels = [{{model = "random:tiny", label = "tiny"}}]\n'
                     f'prompts = ["p.jsonl"]\n[vectors]\nv = "{vector}"\n[grid]\nvectors = ["v"]\nlayers = [1]\n'
                     f'coefs = [4]\nbaseline = true\n[generation]\nmax_new_tokens = 4\ntemperature = 0.8\n'
                     f'[engine]\ndevice = "cpu"\nmax_num_seqs = 4\n')
    assert ray_main(["--sweep", str(sweep), "--num-actors", "2", "--num-parts", "2", "--quiet"]) == 0
    out = tmp_path / "sweep-out"
    records = read_jsonl(out / "results.jsonl")
    plan = Plan(load_sweep(sweep))
    plan_ids = {record["id"]: record["seed"] for _, record in plan.requests(plan.config.models[0])}
    assert len(records) == len(plan_ids) == 12 and {r["id"]: r["seed"] for r in records} == plan_ids
    assert {r["sweep"]["point"] for r in records} == {"none", "v@L1*4.0"}
    assert sorted(p.name for p in (out / "parts" / "tiny").iterdir()) == ["part-00000", "part-00001"]
    assert (out / "summary.md").exists(), "the sweep's report is written at the end"


def test_parts_are_stable_and_ids_stay_together():
    assert part_of("r7", 4) == part_of("r7", 4) and {part_of(f"r{i}", 4) for i in range(100)} == {0, 1, 2, 3}
    assert line_id(3, b'{"prompt": "x"}') == "3" and line_id(3, b'{"id": "a", "prompt": "x"}') == "a"
    assert line_id(3, b'{"id": 5, "prompt": "x"}') == "3" and line_id(4, b'{"id": "b", bad json') == "4"
    assert line_id(5, b'{"id": "c", "prompt": ' + b"[" * 50000) == "5"  # too deep for Python's parser


def test_without_ray_the_message_says_how_to_install(tmp_path, monkeypatch, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    assert ray_main(["--input", str(source), "--model", "random:tiny", "--device", "cpu"]) == 1
    assert "pip install 'steer-engine[ray]'" in capsys.readouterr().err


def test_refusals_name_the_value_and_the_way_out(local_ray, tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    out = tmp_path / "job"
    cluster_job(source, out, "--num-parts", "3").prepare()
    with pytest.raises(ClusterError, match=re.escape("--num-parts 2: ") + ".*split into 3 parts"):
        cluster_job(source, out, "--num-parts", "2").prepare()
    with pytest.raises(ManifestMismatch, match="max_new_tokens.*--force"):
        cluster_job(source, out, "--max-new-tokens", "5").prepare()
    cluster_job(source, out, "--max-new-tokens", "5", "--force").prepare()
    assert list(tmp_path.glob("job.replaced-*"))
    for argv, fragment in ((["--device", "cuda:1"], "device cuda:1: under Ray"),
                           (["--devices", "0,1"], "--devices 0,1: under Ray")):
        with pytest.raises(ClusterError, match=re.escape(fragment)):
            cluster_job(source, tmp_path / "other", *argv).prepare()
    assert ray_main(["--sweep", str(source), "--max-new-tokens", "3"]) == 1
    assert "--max-new-tokens: with --sweep" in capsys.readouterr().err


def test_nothing_but_the_cluster_module_imports_ray():
    importers = [p.name for p in (ROOT / "engine").glob("*.py")
                 if re.search(r"^\s*(import ray|from ray)", p.read_text(), re.M) and p.name != "cluster.py"]
    assert importers == []
