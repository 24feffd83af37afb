"""engine-extract: vectors from the example pairs steer the model along themselves (extract -> steer -> capture),
its report, and a clear error for each bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import PROMPTS, TINY, tiny_config, write_jsonl
from engine import Engine
from engine.config import CaptureDefaults, SamplingDefaults
from engine.extract import ExtractError, direction, extract_main, parse_layers, read_pairs, report_paths
from engine.steering import load_vectors

ROOT = Path(__file__).resolve().parent.parent
PAIRS = ROOT / "examples" / "pairs.jsonl"
TINY_ARGS = ["--model", TINY, "--device", "cpu", "--max-num-seqs", "8"]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    out = tmp_path_factory.mktemp("extract") / "joy.gguf"
    code = extract_main(["--pairs", str(PAIRS), "--layers", "1-2", "--method", "pca", "--output", str(out), *TINY_ARGS])
    assert code == 0
    return out


def test_writes_a_vector_per_layer_and_a_report(extracted):
    vectors = load_vectors(str(extracted), 4, 64)
    assert sorted(vectors) == [1, 2] and all(abs(v.norm().item() - 1) < 1e-5 for v in vectors.values())
    json_path, md_path, png_path = report_paths(extracted)
    assert [p.name for p in (json_path, md_path, png_path)] == ["joy.report.json", "joy.report.md", "joy.report.png"]
    report = json.loads(json_path.read_text())
    assert report["settings"]["num_pairs"] == 20 and [r["layer"] for r in report["layers"]] == [1, 2]
    for row in report["layers"]:  # pca is signed so that positives project higher
        assert row["mean_positive"] > row["mean_negative"] and row["separation"] > 0
    assert "| 2 |" in md_path.read_text() and png_path.read_bytes()[:4] == b"\x89PNG"


def test_steering_with_the_vector_moves_generated_activations_along_it(extracted):
    """Steer layer 1 at coef 0, 4, 8; the mean projection of generated-token activations onto the vector grows,
    at the steered layer and at the next one (carried there by the residual stream)."""
    vector = load_vectors(str(extracted), 4, 64)[1]
    coefs = (0.0, 4.0, 8.0)
    records = [{"id": f"{c}/{i}", "prompt": p,
                "steering": {"vector": str(extracted), "layers": [1], "coef": c, "positions": "all"}}
               for c in coefs for i, p in enumerate(PROMPTS)]
    config = tiny_config(max_num_seqs=8, sampling=SamplingDefaults(max_new_tokens=8, ignore_eos=True),
                         capture=CaptureDefaults(layers=[1, 2], positions="generated"))
    with Engine(config) as engine:
        got = engine.generate_all(records)
    for layer in (1, 2):
        means = [torch.cat([r["activations"][layer] for r in got if r["id"].startswith(f"{c}/")]).mv(vector).mean()
                 for c in coefs]
        assert means[0] < means[1] < means[2], (layer, means)


def test_mean_diff_is_the_difference_of_means_and_pca_is_signed():
    positive = torch.tensor([[2.0, 0.0], [4.0, 1.0], [3.0, -1.0]])
    negative = torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    assert torch.allclose(direction("mean_diff", positive, negative), torch.tensor([3.0, -1 / 3]))
    pca = direction("pca", positive, negative)
    assert (positive @ pca).mean() > (negative @ pca).mean() and abs(pca.norm().item() - 1) < 1e-6


@pytest.mark.parametrize("text, fragment", [
    ("12-4", "the range 12-4 runs backwards; write 4-12"),
    ("4-x", "'4-x' is not a layer or a range"),
    ("", "'' is not a layer or a range"),
])
def test_bad_layers_name_the_value(text, fragment):
    with pytest.raises(ExtractError, match=fragment):
        parse_layers(text)


def test_layers_accept_ranges_and_lists():
    assert parse_layers("4-6") == [4, 5, 6] and parse_layers("2,4-5,2") == [2, 4, 5]


def test_bad_pairs_name_the_line(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"positive": "a", "negative": "b"}, {"positive": "c"}])
    with pytest.raises(ExtractError, match=r"line 2: missing 'negative'; each line needs \"positive\" and \"negative\""):
        read_pairs(path)
    path = write_jsonl(tmp_path / "q.jsonl", [{"positive": "a", "negative": 3}])
    with pytest.raises(ExtractError, match="line 1: 'negative' is 3"):
        read_pairs(path)
    with pytest.raises(ExtractError, match="no such file"):
        read_pairs(tmp_path / "missing.jsonl")


def test_cli_errors_exit_1_with_the_reason(tmp_path, capsys):
    out = str(tmp_path / "v.safetensors")
    assert extract_main(["--pairs", str(PAIRS), "--layers", "1", "--method", "ica", "--output", out]) == 1
    assert "--method 'ica': use one of mean_diff, pca" in capsys.readouterr().err
    assert extract_main(["--pairs", str(PAIRS), "--layers", "1", "--output", str(tmp_path / "v.npy")]) == 1
    assert "write vectors as .safetensors, .pt or .gguf" in capsys.readouterr().err
    assert extract_main(["--pairs", str(PAIRS), "--layers", "3-5", "--output", out, *TINY_ARGS]) == 1
    assert "capture layer(s) [4, 5] out of range; the model has layers 0..3" in capsys.readouterr().err
