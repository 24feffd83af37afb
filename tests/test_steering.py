"""Steering vector files: every format read and written, GGUF control vectors as repeng / llama.cpp write
them, and a clear error for each bad vector."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine.request import RecordError
from engine.steering import load_vectors, save_vectors

LAYERS, HIDDEN = 6, 8


def per_layer() -> dict[int, torch.Tensor]:
    return {layer: torch.arange(HIDDEN, dtype=torch.float32) * (layer + 1) for layer in (1, 3, 5)}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".gguf"])
def test_per_layer_vectors_round_trip(tmp_path, suffix):
    path = str(tmp_path / f"v{suffix}")
    save_vectors(path, per_layer(), model_hint="gemma3")
    loaded = load_vectors(path, LAYERS, HIDDEN)
    assert set(loaded) == {1, 3, 5}
    for layer, vector in per_layer().items():
        assert torch.equal(loaded[layer], vector)


def test_single_vectors_apply_to_every_layer(tmp_path):
    v = np.linspace(-1, 1, HIDDEN, dtype=np.float32)
    np.save(tmp_path / "v.npy", v)
    torch.save(torch.from_numpy(v), tmp_path / "v.pt")
    save_file({"anything": torch.from_numpy(v)}, str(tmp_path / "v.safetensors"))
    for name in ("v.npy", "v.pt", "v.safetensors"):
        loaded = load_vectors(str(tmp_path / name), LAYERS, HIDDEN)
        assert list(loaded) == [None] and torch.equal(loaded[None], torch.from_numpy(v))
    rows = np.stack([v * i for i in range(LAYERS)])
    np.save(tmp_path / "rows.npy", rows)  # one row per layer
    assert torch.equal(load_vectors(str(tmp_path / "rows.npy"), LAYERS, HIDDEN)[4], torch.from_numpy(rows[4]))


def test_reads_a_control_vector_written_the_way_repeng_writes_it(tmp_path):
    path = tmp_path / "repeng.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", 2)
    for layer in (2, 4):
        writer.add_tensor(f"direction.{layer}", np.full(HIDDEN, layer / 10, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    loaded = load_vectors(str(path), LAYERS, HIDDEN)
    assert set(loaded) == {2, 4} and torch.allclose(loaded[4], torch.full((HIDDEN,), 0.4))


def bad_gguf(path) -> str:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("direction.1", np.zeros(HIDDEN, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.mark.parametrize("make, fragment", [
    (lambda d: str(d / "missing.npy"), "no such file"),
    (lambda d: (d / "v.txt").write_text("1 2 3") and str(d / "v.txt"), "unsupported format"),
    (lambda d: (d / "v.npy").write_bytes(b"not numpy") and str(d / "v.npy"), "cannot read it"),
    (lambda d: np.save(d / "w.npy", np.ones(HIDDEN + 1, np.float32)) or str(d / "w.npy"), "hidden size is 8"),
    (lambda d: np.save(d / "n.npy", np.array([np.nan] * HIDDEN, np.float32)) or str(d / "n.npy"), "NaN or inf"),
    (lambda d: np.save(d / "i.npy", np.ones(HIDDEN, np.int64)) or str(d / "i.npy"), "floating point"),
    (lambda d: save_file({"layer.9": torch.ones(HIDDEN)}, str(d / "o.safetensors")) or str(d / "o.safetensors"),
     "out of range"),
    (lambda d: save_file({"a": torch.ones(HIDDEN), "b": torch.ones(HIDDEN)}, str(d / "k.safetensors"))
     or str(d / "k.safetensors"), "names them layer.<L>"),
    (lambda d: bad_gguf(d / "model.gguf"), "not a control vector"),
])
def test_each_bad_vector_is_a_clear_error(tmp_path, make, fragment):
    with pytest.raises(RecordError) as info:
        load_vectors(make(tmp_path), LAYERS, HIDDEN)
    assert fragment in str(info.value)
