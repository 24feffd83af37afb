"""The durability helpers, one copy each (engine/storage/files.py, engine.procs.stop_signals): what a reader sees
after a write that was cut short by an error or by a kill, complete-line reading, moving aside, signal drains."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from engine.procs import stop_signals
from engine.storage.files import (
    JsonUnreadable,
    aside_path,
    commit_file,
    complete_lines,
    complete_records,
    move_aside,
    parse_json,
    write_atomic,
)

ROOT = Path(__file__).resolve().parents[2]


def test_write_atomic_writes_bytes_and_streamed_chunks_that_read_the_old_file(tmp_path):
    path = tmp_path / "a.jsonl"
    write_atomic(path, b"one\n")
    write_atomic(path, (raw.upper() for raw in complete_lines(path)))  # reads the file it replaces
    assert path.read_bytes() == b"ONE\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.jsonl"]


def test_an_error_in_the_middle_of_an_atomic_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "a.jsonl"
    write_atomic(path, b"old\n")

    def chunks():
        yield b"new, part one\n"
        raise RuntimeError("the source broke")

    with pytest.raises(RuntimeError):
        write_atomic(path, chunks())
    assert path.read_bytes() == b"old\n"
    write_atomic(path, b"new\n")  # the temporary file left behind is simply written again
    assert path.read_bytes() == b"new\n"


KILLED_WRITER = """
import sys, time
from pathlib import Path
from engine.storage.files import write_atomic

def chunks():
    for i in range(1000):
        yield b"new line %d\\n" % i
        if i == 10:
            print("writing", flush=True)
            time.sleep(60)  # killed here, half-way through

write_atomic(Path(sys.argv[1]), chunks())
"""


def test_a_kill_in_the_middle_of_an_atomic_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "a.jsonl"
    write_atomic(path, b"old\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED_WRITER), str(path)], env=env,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        assert (tmp_path / ".a.jsonl.tmp").exists()  # the new content was on its way
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert path.read_bytes() == b"old\n"


def test_commit_file_puts_a_finished_file_in_place(tmp_path):
    tmp, path = tmp_path / ".x.tmp", tmp_path / "x.bin"
    path.write_bytes(b"old")
    tmp.write_bytes(b"new")
    commit_file(tmp, path)
    assert path.read_bytes() == b"new" and not tmp.exists()


def test_complete_lines_leave_out_a_cut_last_line_and_cut_truncates_it(tmp_path):
    path = tmp_path / "r.jsonl"
    assert list(complete_lines(path)) == [] and list(complete_lines(path, cut=True)) == []  # absent: nothing
    data = b'{"id": "a"}\n{"id": "b"}\n{"id": "c", "te'
    path.write_bytes(data)
    assert list(complete_lines(path)) == [b'{"id": "a"}\n', b'{"id": "b"}\n']
    assert path.read_bytes() == data  # reading alone changes nothing
    assert list(complete_lines(path, cut=True)) == [b'{"id": "a"}\n', b'{"id": "b"}\n']
    assert path.read_bytes() == b'{"id": "a"}\n{"id": "b"}\n'  # appending now goes on after the last whole line
    assert list(complete_lines(path, cut=True)) == [b'{"id": "a"}\n', b'{"id": "b"}\n']


def test_complete_records_skip_lines_that_are_not_json(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"id": "a"}\nnot json\n[1, 2]\n{"id": "cut')
    assert list(complete_records(path)) == [{"id": "a"}, [1, 2]]


def test_move_aside_renames_files_and_folders_with_one_time_and_skips_absent_ones(tmp_path):
    results, folder = tmp_path / "results.jsonl", tmp_path / "sweep"
    results.write_text("x\n")
    folder.mkdir()
    (folder / "plan.json").write_text(json.dumps({}))
    moved = move_aside([results, folder, tmp_path / "absent"], stamp="20261201T000000Z")
    assert moved == [aside_path(results, "20261201T000000Z"), aside_path(folder, "20261201T000000Z")]
    assert [p.name for p in moved] == ["results.jsonl.replaced-20261201T000000Z", "sweep.replaced-20261201T000000Z"]
    assert (moved[1] / "plan.json").is_file() and not results.exists() and not folder.exists()
    assert aside_path(results).name.startswith("results.jsonl.replaced-20")  # a UTC time when none is given


def test_stop_signals_drain_inside_the_block_and_restore_after_it():
    seen = []
    before = signal.getsignal(signal.SIGTERM)
    with stop_signals(lambda signum, frame: seen.append(signum)):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
    assert seen == [signal.SIGTERM, signal.SIGINT]
    assert signal.getsignal(signal.SIGTERM) is before


def test_stop_signals_in_another_thread_keep_the_process_handlers():
    before = signal.getsignal(signal.SIGINT)
    errors = []

    def run():
        try:
            with stop_signals(lambda signum, frame: None):
                errors.append(signal.getsignal(signal.SIGINT) is before)
        except ValueError as exc:  # signal.signal outside the main thread
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert errors == [True]


@pytest.mark.parametrize("text, words", [
    ('{"a": 1,', "Expecting property name enclosed in double quotes at column 9"),
    ('{"a":\n oops}', "Expecting value at line 2 column 2"),
    (b'{"a": "\xff"}', "it is not UTF-8 (byte 0xff at offset 7)"),
    ('{"a": NaN}', "NaN is not a JSON number"),
    ('{"a": -Infinity}', "-Infinity is not a JSON number"),
    ('{"a": ' + "[" * 50000, "it nests arrays or objects too deeply to read"),  # RecursionError in Python's parser
    ('{"a": ' + "7" * 5000 + "}", "it holds a number too long to read"),  # a plain ValueError
])
def test_every_way_json_from_outside_fails_is_one_error(text, words):
    with pytest.raises(JsonUnreadable) as info:
        parse_json(text)
    assert words in str(info.value)
    assert parse_json('{"a": [1, 2.5, null]}') == {"a": [1, 2.5, None]}
