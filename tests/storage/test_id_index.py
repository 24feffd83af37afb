"""IdIndex: exact membership on disk; read_requests's skip and duplicate checks through it keep Python memory flat
whatever the number of ids."""

from __future__ import annotations

import json
import threading
import tracemalloc

from engine.config import EngineConfig
from engine.storage.id_index import IdIndex
from engine.pipeline.reader import read_requests
from engine.pipeline.writer import scan_done_ids


def test_membership_is_exact_and_counts_and_prefixes_hold():
    with IdIndex(["m/a/1", "m/a/2", "n/a/1"]) as ids:
        assert len(ids) == 3 and "m/a/1" in ids and "m/a" not in ids and "m/a/10" not in ids and 7 not in ids
        assert ids.add("m/a/3") and not ids.add("m/a/1") and len(ids) == 4
        assert ids.count_prefix("m/") == 3 and ids.count_prefix("n/") == 1 and ids.count_prefix("") == 4
        assert ids.count_prefix("o/") == 0
        odd = "caf\u00e9/\ud800/\U0001f600"  # any str an input line's JSON can hold, a lone surrogate included
        assert ids.add(odd) and odd in ids and "caf\u00e9/\ud800" not in ids and ids.count_prefix("caf\u00e9/") == 1
        ids.add_many([("s", "a.activations/00001.safetensors"), ("s", "a.activations/00002.safetensors")])
        assert ids.has_shard("s", "a.activations/00001.safetensors")  # the first shard stays
        assert not ids.has_shard("s", "a.activations/00002.safetensors") and not ids.has_shard("t", "x")


def test_threads_share_one_index():
    ids = IdIndex()
    added = []

    def add(k: int) -> None:
        added.append(sum(ids.add(f"id{i}") for i in range(k, 2000, 2)))

    threads = [threading.Thread(target=add, args=(k,)) for k in (0, 1, 0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(added) == 2000 == len(ids) and all(f"id{i}" in ids for i in range(2000))
    ids.close()


def test_resume_skips_the_done_ids_and_reports_repeats_with_flat_python_memory(tmp_path):
    num = 60_000
    results = tmp_path / "results.jsonl"
    with results.open("w") as f:
        for i in range(num):
            f.write(json.dumps({"id": f"model/point/set/prompt-{i:07d}/s0", "completion": "x"}) + "\n")
        f.write('{"id": "cut')  # a line cut short by a crash
    lines = [(i + 1, json.dumps({"id": f"model/point/set/prompt-{i:07d}/s0", "prompt": "p"}).encode())
             for i in range(2 * num)]
    lines.append((2 * num + 1, json.dumps({"id": f"model/point/set/prompt-{num:07d}/s0", "prompt": "p"}).encode()))
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        done = scan_done_ids(results)
        fed = errors = 0
        for item in read_requests(iter(lines), EngineConfig(), done):
            if isinstance(item, dict):
                errors += 1
                assert item["line"] == 2 * num + 1
                assert "duplicate id 'model/point/set/prompt-0060000/s0'" in item["error"]
            else:
                fed += 1
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert len(done) == num and fed == num and errors == 1
    assert results.read_bytes().endswith(b"}\n")  # the cut line is gone
    # 120,000 ids went through: as Python sets they would hold well over 10 MB; the indexes are on disk.
    assert peak < 2_000_000, peak
