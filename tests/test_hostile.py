"""Hostile input to engine-run, one test per defect class: the run completes every valid record, the bad one is an
error record (or the command refuses in one line before start-up), and running the same command again neither
crashes nor duplicates anything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import save_file

from support import PROMPTS, read_jsonl, write_jsonl
from engine.pipeline.request import record_digest
from engine.storage.output import ErrorLog, errors_path
from support import ROOT
from support.processes import TINY_ARGS, engine_run, start_run, wait_for_records

HIDDEN = 64  # random:tiny


def run(path: Path, out: Path, *extra, timeout=300) -> subprocess.CompletedProcess:
    return engine_run("--input", str(path), "--output", str(out), *TINY_ARGS, *extra, timeout=timeout)


def no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr, result.stderr


def errors_by_id(out: Path) -> dict:
    return {e.get("id", f"line {e['line']}"): e["error"] for e in read_jsonl(errors_path(out))}


def good_vector(tmp_path: Path) -> Path:
    path = tmp_path / "good.npy"
    np.save(path, np.random.default_rng(0).standard_normal(HIDDEN).astype(np.float32))
    return path


def bad_vector_files(tmp_path: Path) -> dict[str, Path]:
    """Vector files that are cut short or not what their suffix says."""
    whole = tmp_path / "whole.safetensors"
    save_file({"v": torch.ones(HIDDEN)}, str(whole))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(whole.read_bytes()[:40])
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    (tmp_path / "text.safetensors").write_text("not a tensor file")
    (tmp_path / "folder.npy").mkdir()
    return {name: tmp_path / name for name in ("cut.safetensors", "empty.npy", "empty.pt", "list.pt",
                                               "text.safetensors", "folder.npy")}


def steered(record_id: str, vector: Path, **term) -> dict:
    return {"id": record_id, "prompt": "Hello there", "steering": {"vector": str(vector), "layers": [1], **term}}


def assert_second_run_changes_nothing(path: Path, out: Path, first: subprocess.CompletedProcess, *extra) -> None:
    results, errors = out.read_bytes(), errors_path(out).read_bytes()
    again = run(path, out, *extra)
    no_traceback(again)
    assert again.returncode == first.returncode, again.stderr
    assert out.read_bytes() == results, "a second run must not add or change results"
    assert errors_path(out).read_bytes() == errors, "a second run must not duplicate or lose errors"


# ---- 1. one bad record kills the run
def test_bad_vector_files_and_values_the_wire_cannot_carry_are_each_their_records_error(tmp_path):
    bad = bad_vector_files(tmp_path)
    records = [{"id": "ok1", "prompt": PROMPTS[0]}, {"id": "big-extra", "prompt": PROMPTS[1], "note": 2 ** 70,
                                                    "neg": -(2 ** 80)}]
    records += [steered(name, path) for name, path in bad.items()]
    records += [steered("big-position", good_vector(tmp_path), positions={"prompt": [0, 2 ** 64]}),
                {"id": "big-top-k", "prompt": "x", "top_k": 2 ** 63, "temperature": 1.0},
                {"id": "big-seed", "prompt": "x", "seed": 2 ** 64},
                {"id": "ok2", "prompt": PROMPTS[2], "steering": {"vector": str(good_vector(tmp_path)), "layers": [1]}}]
    lines = [json.dumps(r) for r in records]
    lines += ['{"id": "surrogate", "prompt": "a\\ud800b"}', '{"id": "\\udfff", "prompt": 5}']
    path, out = write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    first = run(path, out)
    no_traceback(first)
    assert first.returncode == 3, first.stderr
    done = {r["id"]: r for r in read_jsonl(out)}
    assert set(done) == {"ok1", "big-extra", "ok2"}
    assert done["big-extra"]["note"] == 2 ** 70 and done["big-extra"]["neg"] == -(2 ** 80)  # carried through as is
    errors = errors_by_id(out)
    for name in ("cut.safetensors", "empty.npy", "empty.pt", "text.safetensors"):
        assert "cannot read it as a" in errors[name] and name in errors[name]
    assert "must hold a tensor" in errors["list.pt"]
    assert "is a directory" in errors["folder.npy"]
    assert "field 'steering'" in errors["big-position"] and "cannot carry" in errors["big-position"]
    assert "field 'top_k'" in errors["big-top-k"] and "field 'seed'" in errors["big-seed"]
    assert "lone surrogate" in errors["surrogate"] and "lone surrogate" in errors[f"line {len(lines)}"]
    assert_second_run_changes_nothing(path, out, first)


# ---- 2. errors.jsonl is shared and truncated
def test_each_output_keeps_its_own_errors_across_runs(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "a1", "prompt": "x"}, {"id": "a-bad", "prompt": 3}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": "b1", "prompt": "y"}, "{broken"])
    out_a, out_b = tmp_path / "a.out.jsonl", tmp_path / "b.out.jsonl"
    first_a, first_b = run(a, out_a), run(b, out_b)
    assert first_a.returncode == first_b.returncode == 3
    assert list(errors_by_id(out_a)) == ["a-bad"] and list(errors_by_id(out_b)) == ["line 2"]
    assert_second_run_changes_nothing(a, out_a, first_a)  # and b's errors are untouched by a's run
    assert list(errors_by_id(out_b)) == ["line 2"]
    write_jsonl(a, [{"id": "a1", "prompt": "x"}, {"id": "a-bad", "prompt": "fixed now"}])  # an error fixed
    fixed = run(a, out_a)
    assert fixed.returncode == 0, fixed.stderr
    assert errors_by_id(out_a) == {} and {r["id"] for r in read_jsonl(out_a)} == {"a1", "a-bad"}


def test_error_log_appends_without_duplicates_and_keeps_errors_until_a_complete_run(tmp_path):
    path = tmp_path / "out.errors.jsonl"
    log = ErrorLog(path)
    for line in ('{"line": 1}\n', '{"line": 2}\n'):
        log.write(line)
    log.close(is_complete=True)
    log = ErrorLog(path)  # a resume that is interrupted after re-deriving one error
    log.write('{"line": 2}\n')
    log.write('{"line": 3}\n')
    log.close(is_complete=False)
    assert path.read_text() == '{"line": 1}\n{"line": 2}\n{"line": 3}\n'
    with path.open("a") as f:
        f.write('{"line": 4')  # cut short by a crash
    log = ErrorLog(path)  # a run to the end: only what it re-derived stays
    log.write('{"line": 3}\n')
    log.close(is_complete=True)
    assert path.read_text() == '{"line": 3}\n'


# ---- 3. two runs on one output
def test_a_second_run_on_an_output_being_written_is_refused_and_a_dead_holder_blocks_nothing(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": PROMPTS[i % 7], "max_new_tokens": 48}
                                               for i in range(40)])
    out = tmp_path / "out.jsonl"
    first = start_run("--input", str(path), "--output", str(out), "--max-num-seqs", "1", *TINY_ARGS)
    wait_for_records(out, 2, first)
    for other_input in (path, write_jsonl(tmp_path / "other.jsonl", [{"prompt": "z"}])):
        second = run(other_input, out)
        assert second.returncode == 1 and f"pid {first.pid}" in second.stderr, second.stderr
        assert "being written by another process" in second.stderr
    os.kill(first.pid, signal.SIGKILL)  # its lock goes with it, though its lock file stays
    first.communicate(timeout=60)
    resumed = run(path, out)
    assert resumed.returncode == 0, resumed.stderr
    ids = [r["id"] for r in read_jsonl(out)]
    assert sorted(ids) == sorted(f"r{i}" for i in range(40))


# ---- 4. resume trusts ids when the input changed
def test_a_shifted_or_edited_input_is_refused_and_rerun_with_force(tmp_path):
    prompts = [{"prompt": p} for p in PROMPTS[:4]]
    path, out = write_jsonl(tmp_path / "in.jsonl", prompts), tmp_path / "out.jsonl"
    assert run(path, out).returncode == 0
    write_jsonl(path, [{"prompt": "a new first line"}] + prompts)  # every line-number id shifts
    refused = run(path, out)
    no_traceback(refused)
    assert refused.returncode == 1 and "4 input record(s)" in refused.stderr and "line 1 (id '1')" in refused.stderr
    assert "--force" in refused.stderr and "line number" in refused.stderr
    forced = run(path, out, "--force")
    assert forced.returncode == 0, forced.stderr
    lines = {str(i): json.loads(raw) for i, raw in enumerate(path.read_text().splitlines(), 1)}
    results = read_jsonl(out)
    assert sorted(r["id"] for r in results) == sorted(lines)
    assert all(r["input_digest"] == record_digest(lines[r["id"]]) for r in results)
    assert list(tmp_path.glob("out.jsonl.replaced-*"))

    explicit = [{"id": "a", "prompt": "one"}, {"id": "b", "prompt": "two"}]
    path2, out2 = write_jsonl(tmp_path / "ids.jsonl", explicit), tmp_path / "ids.out.jsonl"
    assert run(path2, out2).returncode == 0
    write_jsonl(path2, [explicit[0], {"id": "b", "prompt": "two, edited"}, {"id": "c", "prompt": "three"}])
    refused = run(path2, out2)
    assert refused.returncode == 1 and "line 2 (id 'b')" in refused.stderr, refused.stderr
    write_jsonl(path2, explicit + [{"id": "c", "prompt": "three"}])  # appending records stays a resume
    appended = run(path2, out2)
    assert appended.returncode == 0 and "skipped 2 done" in appended.stderr, appended.stderr
    assert sorted(r["id"] for r in read_jsonl(out2)) == ["a", "b", "c"]


# ---- 5. the input, or a file engine-run did not write, taken as a resume source
def test_output_equal_to_input_or_without_manifest_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    before = path.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(path)
    for output in (path, tmp_path / "link.jsonl"):
        same = run(path, output)
        assert same.returncode == 1 and "is the input file" in same.stderr, same.stderr
    assert path.read_bytes() == before
    foreign = write_jsonl(tmp_path / "foreign.jsonl", [{"id": "1", "text": "someone else's data"}])
    refused = run(path, foreign)
    assert refused.returncode == 1 and "has no manifest" in refused.stderr and "--force" in refused.stderr
    assert read_jsonl(foreign) == [{"id": "1", "text": "someone else's data"}]
    forced = run(path, foreign, "--force")
    assert forced.returncode == 0, forced.stderr
    assert [r["id"] for r in read_jsonl(foreign)] == ["1"] and "completion" in read_jsonl(foreign)[0]
    assert len(list(tmp_path.glob("foreign.jsonl.replaced-*"))) == 1


# ---- 6. a damaged line in the middle of an output
def test_damaged_lines_in_the_middle_are_kept_aside_and_later_records_stay(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": PROMPTS[i]} for i in range(6)])
    out = tmp_path / "out.jsonl"
    assert run(path, out).returncode == 0
    lines = out.read_text().splitlines(keepends=True)
    lines[1] = "{not json at all\n"  # a torn write that later writes went past
    lines[3] = "[1, 2, 3]\n"  # JSON, but not a record
    kept = {json.loads(lines[i])["id"]: lines[i] for i in (0, 2, 4, 5)}
    out.write_text("".join(lines))
    resumed = run(path, out)
    assert resumed.returncode == 0, resumed.stderr
    assert "2 line(s) (line 2, 4) are not complete JSON records" in resumed.stderr
    assert "skipped 4 done" in resumed.stderr
    [aside] = tmp_path.glob("out.jsonl.damaged-*")
    assert aside.read_text() == "{not json at all\n[1, 2, 3]\n"
    results = out.read_text().splitlines(keepends=True)
    assert sorted(json.loads(r)["id"] for r in results) == [f"r{i}" for i in range(6)]
    assert all(line in results for line in kept.values())  # the records after the damage, byte for byte


# ---- 7. flag values the record parser would refuse
@pytest.mark.parametrize("flags, fragment", [
    (["--stop", ""], "stop is ['']"),
    (["--temperature", "nan"], "temperature is nan"),
    (["--top-p", "nan"], "top_p is nan"),
    (["--seed", "-3"], "seed is -3"),
    (["--steer-coef", "nan"], "--steer-coef must be a finite number"),
    (["--steer-coef", "inf"], "--steer-coef must be a finite number"),
    (["--steer-coef", "1e39"], "beyond float32's range"),
    (["--max-num-seqs", "99999999999"], "--max-num-seqs 99999999999: use a value in [1, 65,536]"),
    (["--tokenizer-workers", "0"], "--tokenizer-workers 0: use a value in [1, 256]"),
])
def test_flags_share_the_record_validation(tmp_path, flags, fragment):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    steer = ["--steer", str(good_vector(tmp_path)), "--steer-layer", "1"] if "--steer-coef" in flags else []
    result = run(path, tmp_path / "out.jsonl", *steer, *flags)
    assert result.returncode == 1 and fragment in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.jsonl").exists()


# ---- 8. numbers that overflow
def test_coefficients_beyond_float32_or_that_overflow_the_model_are_errors_not_empty_completions(tmp_path):
    vector = good_vector(tmp_path)
    records = [{"id": "ok", "prompt": PROMPTS[0]}, steered("1e39", vector, coef=1e39),
               steered("-1e39", vector, coef=-1e39),
               steered("1e38", vector, coef=1e38), steered("3e38", vector, coef=3e38)]
    path, out = write_jsonl(tmp_path / "in.jsonl", records), tmp_path / "out.jsonl"
    first = run(path, out)
    no_traceback(first)
    assert first.returncode == 3, first.stderr
    assert [r["id"] for r in read_jsonl(out)] == ["ok"]
    errors = errors_by_id(out)
    assert "beyond float32's range" in errors["1e39"] and "beyond float32's range" in errors["-1e39"]
    assert "non-finite" in errors["1e38"] and "non-finite" in errors["3e38"]
    assert_second_run_changes_nothing(path, out, first)


# ---- 10. bad output paths
def test_bad_output_paths_are_refused_before_start_up(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    (tmp_path / "adir").mkdir()
    cases = [(tmp_path / "adir", "is a directory"), (Path("/proc/engine-test/out.jsonl"), "cannot create its folder"),
             (Path("/proc/out.jsonl"), "/proc"), (Path("/dev/null"), "not a regular file"),
             (tmp_path / "x.errors.jsonl", "errors, manifest or lock file")]
    for output, fragment in cases:
        started = time.monotonic()
        result = run(path, output)
        no_traceback(result)
        assert result.returncode == 1 and fragment in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert time.monotonic() - started < 60  # refused before the model loads


@pytest.fixture
def small_disk(tmp_path):
    """A real 96 KiB file system (tmpfs), grown on request; skipped where this process may not mount."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_is_a_one_line_error_and_the_same_command_resumes(tmp_path, small_disk):
    records = [{"id": f"r{i}", "prompt": PROMPTS[i % 7], "pad": "x" * 2000} for i in range(80)]
    path, out = write_jsonl(tmp_path / "in.jsonl", records), small_disk / "out.jsonl"
    full = run(path, out, "--min-free-gb", "0")
    no_traceback(full)
    assert full.returncode == 1 and "No space left on device" in full.stderr, full.stderr
    assert "run the same command to resume" in full.stderr
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    resumed = run(path, out, "--min-free-gb", "0")
    assert resumed.returncode == 0, resumed.stderr
    ids = [r["id"] for r in read_jsonl(out)]
    assert sorted(ids) == sorted(r["id"] for r in records)


# ---- 11. signals during start-up
def engine_children(proc: subprocess.Popen, timeout=120) -> list[psutil.Process]:
    """The run's child processes once its engine core has started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = psutil.Process(proc.pid).children(recursive=True)
        if any(c.name() == "engine-core" for c in children):
            return children
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the engine core did not start")


def gone(processes: list[psutil.Process], timeout=15) -> bool:
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return not alive


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_start_up_exits_130_and_leaves_no_process(tmp_path, sig):
    path, out = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}]), tmp_path / "out.jsonl"
    proc = start_run("--input", str(path), "--output", str(out), *TINY_ARGS)
    children = engine_children(proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert gone(children)
    assert not (tmp_path / "out.jsonl.lock").exists()


def test_children_die_with_a_killed_parent(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    proc = start_run("--input", str(path), "--output", str(tmp_path / "out.jsonl"), *TINY_ARGS)
    children = engine_children(proc)
    proc.kill()
    proc.communicate(timeout=30)
    assert gone(children)


# ---- 12. messages that mislead
def test_inputs_that_are_not_regular_files_say_what_they_are(tmp_path):
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    (tmp_path / "folder.jsonl").mkdir()
    cases = [("-", "standard input"), (str(fifo), "FIFO"), (str(tmp_path / "folder.jsonl"), "is a directory"),
             (str(tmp_path / "missing.jsonl"), "no such file")]
    for source, fragment in cases:
        result = engine_run("--input", source, *TINY_ARGS)
        assert result.returncode == 1 and fragment in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    piped = subprocess.run([sys.executable, "-m", "engine.apps.run", "--input", "/dev/stdin", *TINY_ARGS], cwd=ROOT,
                           input='{"prompt": "x"}\n', capture_output=True, text=True, timeout=120)
    assert piped.returncode == 1 and "FIFO" in piped.stderr, piped.stderr


def test_id_collisions_and_vector_folders_are_named_as_they_are(tmp_path):
    (tmp_path / "vectors").mkdir()
    lines = [{"id": "2", "prompt": "explicit id two"}, {"prompt": "no id, so line number 2"},
             {"id": "x", "prompt": "a"}, {"id": "x", "prompt": "b"}, {"prompt": "c"}, {"id": "5", "prompt": "d"},
             steered("dir", tmp_path / "vectors")]
    path, out = write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    first = run(path, out)
    assert first.returncode == 3, first.stderr
    errors = {e["line"]: e["error"] for e in read_jsonl(errors_path(out))}
    assert "line 2 has no 'id', so its id is its line number '2', which line 1 already gives" in errors[2]
    assert "duplicate id 'x': line 3 already has it as its id" in errors[4]
    assert "duplicate id '5': line 5 already has it by its line number" in errors[6]
    assert "is a directory" in errors[7]
    assert_second_run_changes_nothing(path, out, first)
