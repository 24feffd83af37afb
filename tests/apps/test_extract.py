"""engine-extract: vectors from the example pairs steer the model along themselves (extract -> steer -> capture),
its report, and a clear error for each bad input."""

from __future__ import annotations

import errno
import json
import tempfile
from pathlib import Path

import pytest
import torch
from support import PROMPTS, TINY, tiny_config, write_jsonl

import engine.apps.extract.directions as directions_module
import engine.apps.extract.output as output_module
from engine import Engine
from engine.config import CaptureDefaults, SamplingDefaults
from engine.apps.extract.cli import extract_main
from engine.apps.extract.directions import degeneracy, direction
from engine.apps.extract.output import report_paths
from engine.apps.extract.pairs import capture_pairs, read_pairs
from engine.apps.extract.spec import CONCEPT_FIX, METHODS, DegenerateLayer, ExtractError, parse_layers
from engine.vectors import load_vectors

ROOT = Path(__file__).resolve().parents[2]
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
    with pytest.raises(ExtractError,
                       match=r"line 2: missing 'negative'; each line needs \"positive\" and \"negative\""):
        read_pairs(path)
    path = write_jsonl(tmp_path / "q.jsonl", [{"positive": "a", "negative": 3}])
    with pytest.raises(ExtractError, match="line 1: 'negative' is 3"):
        read_pairs(path)
    with pytest.raises(ExtractError, match="no such file"):
        read_pairs(tmp_path / "missing.jsonl")
    path = write_jsonl(tmp_path / "deep.jsonl", [{"positive": "a", "negative": "b"}, "[" * 50000])
    with pytest.raises(ExtractError, match="line 2: not valid JSON: it nests arrays or objects too deeply"):
        read_pairs(path)
    path.write_text('{"positive": "a", "negative": "b", "n": ' + "1" * 5000 + "}\n")
    with pytest.raises(ExtractError, match="line 1: not valid JSON: it holds a number too long to read .*digits"):
        read_pairs(path)


def test_cli_errors_exit_1_with_the_reason(tmp_path, capsys):
    out = str(tmp_path / "v.safetensors")
    assert extract_main(["--pairs", str(PAIRS), "--layers", "1", "--method", "ica", "--output", out]) == 1
    assert "--method 'ica': use one of mean_diff, pca" in capsys.readouterr().err
    assert extract_main(["--pairs", str(PAIRS), "--layers", "1", "--output", str(tmp_path / "v.npy")]) == 1
    assert "write vectors as .safetensors, .pt or .gguf" in capsys.readouterr().err
    assert extract_main(["--pairs", str(PAIRS), "--layers", "3-5", "--output", out, *TINY_ARGS]) == 1
    assert "capture layer(s) [4, 5] out of range; the model has layers 0..3" in capsys.readouterr().err


# ---------------------------------------------------------------- nothing to extract
SAME_TEXT = [{"positive": "Hello there", "negative": "Hello there"}, {"positive": "I am sad", "negative": "I am sad"}]
SAME_CHAT = [{"positive": [{"role": "user", "content": "Hi"}], "negative": [{"role": "user", "content": "Hi"}]}]


def no_engine(config, pairs):
    raise AssertionError("the engine must not start")


@pytest.mark.parametrize("rows, method", [(SAME_TEXT, "mean_diff"), (SAME_TEXT, "pca"), (SAME_CHAT, "mean_diff")])
def test_pairs_whose_sides_are_all_the_same_text_are_refused_before_the_engine_starts(tmp_path, capsys, monkeypatch,
                                                                                       rows, method):
    monkeypatch.setattr(directions_module, "capture_pairs", no_engine)
    pairs = write_jsonl(tmp_path / "same.jsonl", rows)
    out = tmp_path / "v.gguf"
    assert extract_main(["--pairs", str(pairs), "--layers", "1-2", "--method", method, "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "the positive and the negative prompt are the same text" in err and CONCEPT_FIX in err, err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == [pairs]


@pytest.mark.parametrize("rows, fragment", [
    ([{"positive": "a", "negative": "b"}], "there is 1 pair"),
    ([{"positive": "a", "negative": "b"}] * 3, "all 3 pairs are the same pair"),
])
def test_pca_needs_two_different_pairs_before_the_engine_starts(tmp_path, capsys, monkeypatch, rows, fragment):
    monkeypatch.setattr(directions_module, "capture_pairs", no_engine)
    pairs = write_jsonl(tmp_path / "p.jsonl", rows)
    assert extract_main(["--pairs", str(pairs), "--layers", "1", "--method", "pca", "--output",
                         str(tmp_path / "v.pt")]) == 1
    err = capsys.readouterr().err
    assert "--method pca needs at least 2 different pairs" in err and fragment in err and "mean_diff" in err, err


def test_a_pair_with_the_same_text_on_both_sides_among_others_is_warned_about(tmp_path, caplog):
    path = write_jsonl(tmp_path / "p.jsonl",
                       [{"positive": "a", "negative": "b"}, "", {"positive": "c", "negative": "c"}])
    assert len(read_pairs(path)) == 2
    assert "line 3: the positive and the negative prompt are the same text" in caplog.text


def test_identical_prompts_through_the_engine_give_no_direction_at_any_layer():
    """The numeric test on real activations: float noise between identical prompts is far below the threshold."""
    pairs = [{"positive": p, "negative": p} for p in PROMPTS[:3]]
    config = tiny_config(max_num_seqs=3, sampling=SamplingDefaults(max_new_tokens=1),
                         capture=CaptureDefaults(layers=[0, 1, 2, 3], positions="last_prompt"))
    positives, negatives = capture_pairs(config, pairs)
    for layer in positives:
        assert degeneracy("mean_diff", positives[layer], negatives[layer]) is not None
        for method in METHODS:
            with pytest.raises(DegenerateLayer, match=r"the mean difference of positives and negatives is \S+ of the "
                                                      r"activations' norm"):
                direction(method, positives[layer], negatives[layer])


def scaled(n: int, hidden: int = 16, scale: float = 100.0, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, hidden, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("gap", [0.0, 1e-9, 1e-7])  # relative to the activations' norm
def test_a_zero_or_float_noise_difference_is_refused_with_its_size(method, gap):
    positive = scaled(4)
    negative = positive + gap * positive.norm(dim=1, keepdim=True) * torch.eye(16)[:4]
    with pytest.raises(DegenerateLayer) as info:
        direction(method, positive, negative)
    assert "of the activations' norm" in str(info.value) and CONCEPT_FIX in str(info.value)


def test_a_small_real_difference_is_kept():
    positive = scaled(4)
    shift = torch.zeros(16)
    shift[3] = 1e-3 * positive.norm(dim=1).mean()  # 1e-3 of the activations' norm: far above noise
    vector = direction("mean_diff", positive + shift, positive)
    assert torch.allclose(vector, shift, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("shift", [torch.eye(16)[2] * 5, torch.ones(16)])
def test_pca_refuses_pairs_that_all_differ_by_the_same_vector_and_mean_diff_takes_it(shift):
    positive = scaled(5, seed=1)
    with pytest.raises(DegenerateLayer, match="every pair differs by the same vector .* use --method mean_diff"):
        direction("pca", positive + shift, positive)
    assert torch.allclose(direction("mean_diff", positive + shift, positive), shift, atol=1e-3)


def test_activations_with_nan_are_refused():
    positive = scaled(3)
    positive[1, 2] = float("nan")
    with pytest.raises(DegenerateLayer, match="NaN or inf"):
        direction("mean_diff", positive, scaled(3, seed=4))


@pytest.mark.parametrize("positive, negative", [
    (torch.tensor([[3.0, 1.0]]), torch.tensor([[1.0, 1.0]])),  # one pair: no spread to divide by
    (torch.tensor([[3.0, 1.0]] * 4), torch.tensor([[1.0, 1.0]] * 4)),  # four copies of it: a zero pooled std
])
def test_separation_is_undefined_with_one_pair_or_no_spread(positive, negative):
    vector = direction("mean_diff", positive, negative)
    row = directions_module.layer_report(1, vector, positive, negative)
    assert row.separation is None and row.pair_accuracy == 1.0 and row.mean_positive > row.mean_negative
    text = output_module.markdown({"output": "v.pt", "num_pairs": len(positive), "pairs": "p", "method": "mean_diff",
                                    "positions": "last_prompt", "model": TINY}, [row])
    assert "| 1 | 2 | 3 | 1 | n/a | 100% |" in text


def test_a_single_pair_writes_its_vector_and_reports_separation_as_n_a(tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "one.jsonl", [{"positive": "I feel wonderful", "negative": "I feel miserable"}])
    out = tmp_path / "one.safetensors"
    assert extract_main(["--pairs", str(pairs), "--layers", "1-2", "--output", str(out), *TINY_ARGS]) == 0
    assert "separation n/a" in capsys.readouterr().err
    assert sorted(load_vectors(str(out), 4, 64)) == [1, 2]
    json_path, md_path, png_path = report_paths(out)
    assert [row["separation"] for row in json.loads(json_path.read_text())["layers"]] == [None, None]
    assert md_path.read_text().count("| n/a |") == 2 and png_path.read_bytes()[:4] == b"\x89PNG"


def fake_capture(zero_layers: tuple[int, ...], layers=(1, 2, 3)):
    """capture_pairs without the engine: random activations; at `zero_layers` each positive equals its negative."""
    def capture(config, pairs):
        positives = {layer: scaled(len(pairs), 64, 10.0, seed=layer) for layer in layers}
        negatives = {layer: positives[layer] if layer in zero_layers else scaled(len(pairs), 64, 10.0, seed=9 + layer)
                     for layer in layers}
        return positives, negatives
    return capture


@pytest.mark.parametrize("method", METHODS)
def test_degenerate_layers_are_refused_by_name_and_the_others_written_with_exit_3(tmp_path, capsys, monkeypatch,
                                                                                 method):
    monkeypatch.setattr(directions_module, "capture_pairs", fake_capture(zero_layers=(2,)))
    out = tmp_path / "v.gguf"
    code = extract_main(["--pairs", str(PAIRS), "--layers", "1-3", "--method", method, "--output", str(out),
                         *TINY_ARGS])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "no vector at layer(s) 2, the other 2 layer(s) are written" in err and "layer 2: the mean difference" in err
    assert sorted(load_vectors(str(out), 4, 64)) == [1, 3]
    report = json.loads(report_paths(out)[0].read_text())
    assert [r["layer"] for r in report["layers"]] == [1, 3] and [r["layer"] for r in report["refused"]] == [2]
    assert report["refused"][0]["fix"] == CONCEPT_FIX and "of the activations' norm" in report["refused"][0]["reason"]
    assert "- layer 2: the mean difference" in report_paths(out)[1].read_text()


@pytest.mark.parametrize("method", METHODS)
def test_when_every_layer_is_degenerate_nothing_is_written_and_it_exits_1(tmp_path, capsys, monkeypatch, method):
    monkeypatch.setattr(directions_module, "capture_pairs", fake_capture(zero_layers=(1, 2, 3)))
    out = tmp_path / "v.safetensors"
    assert extract_main(["--pairs", str(PAIRS), "--layers", "1-3", "--method", method, "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "no vector at layer(s) 1, 2, 3, nothing is written" in err
    assert all(f"layer {layer}: the mean difference" in err for layer in (1, 2, 3)) and CONCEPT_FIX in err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the output path
def bad_outputs(tmp_path: Path) -> list[tuple[Path, str]]:
    (tmp_path / "folder.gguf").mkdir()
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "joy.report.json").mkdir()
    cases = [(tmp_path / "folder.gguf", "is a folder; give a file path for the vectors"),
             (tmp_path / "a-file" / "sub" / "v.gguf", "a-file is a file, not a folder"),
             (tmp_path / "v.txt", "write vectors as .safetensors, .pt or .gguf"),
             (tmp_path / "joy.gguf", "its report " + str(tmp_path / "joy.report.json") + " would replace the folder"),
             (tmp_path / ("x" * 300 + ".pt"), "cannot use it (File name too long)")]
    if Path("/proc/self").is_dir():  # a folder nobody may write in, even root
        cases.append((Path("/proc/engine-extract-test/v.pt"), "cannot write in /proc ("))
    return cases


def test_a_bad_output_path_is_refused_before_the_engine_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(directions_module, "capture_pairs", no_engine)
    for output, fragment in bad_outputs(tmp_path):
        assert extract_main(["--pairs", str(PAIRS), "--layers", "1", "--output", str(output)]) == 1, output
        err = capsys.readouterr().err
        assert err.startswith(f"engine-extract: --output {output}") and fragment in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_an_output_in_a_new_folder_is_made(tmp_path, monkeypatch):
    monkeypatch.setattr(directions_module, "capture_pairs", fake_capture(zero_layers=()))
    out = tmp_path / "new" / "deeper" / "v.pt"
    assert extract_main(["--pairs", str(PAIRS), "--layers", "1-3", "--output", str(out)]) == 0
    assert sorted(load_vectors(str(out), 4, 64)) == [1, 2, 3] and not list(out.parent.glob(".*"))


def folder_replaced_by_a_file(out: Path):
    """capture_pairs whose run ends with the output's folder gone (a file in its place): the write then fails."""
    def capture(config, pairs):
        got = fake_capture(zero_layers=())(config, pairs)
        out.parent.rmdir()
        out.parent.write_text("not a folder any more")
        return got
    return capture


def full_disk(error: BaseException):
    """save_vectors that fails as on a full disk outside the temp folder."""
    real = output_module.save_vectors

    def save(path, vectors, model_hint=""):
        if not path.startswith(tempfile.gettempdir()):
            raise error
        real(path, vectors, model_hint)
    return save


@pytest.mark.parametrize("suffix, error", [
    (".gguf", None),  # the folder is replaced by a file during the run
    (".safetensors", OSError(errno.ENOSPC, "No space left on device")),
    (".pt", RuntimeError("basic_ios::clear: iostream error")),  # how torch.save reports a full disk
])
def test_vectors_that_cannot_be_written_go_to_a_fallback_file_named_in_the_message(tmp_path, capsys, monkeypatch,
                                                                                  suffix, error):
    out = tmp_path / "out" / f"joy{suffix}"
    out.parent.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    if error is None:
        monkeypatch.setattr(directions_module, "capture_pairs", folder_replaced_by_a_file(out))
    else:
        monkeypatch.setattr(directions_module, "capture_pairs", fake_capture(zero_layers=()))
        monkeypatch.setattr(output_module, "save_vectors", full_disk(error))
    assert extract_main(["--pairs", str(PAIRS), "--layers", "1-3", "--output", str(out)]) == 1
    err = capsys.readouterr().err
    fallback = next((tmp_path / "tmp").glob(f"joy.*{suffix}"))
    assert f"cannot write {out}" in err and f"the 3 layer vectors are saved instead in {fallback}" in err, err
    expected = fake_capture(zero_layers=())(None, [None] * 20)
    vectors = load_vectors(str(fallback), 4, 64)
    for layer in (1, 2, 3):
        assert torch.allclose(vectors[layer], expected[0][layer].mean(0) - expected[1][layer].mean(0))
    assert report_paths(fallback)[0].is_file() and "Traceback" not in err


def test_when_the_fallback_fails_too_the_message_says_the_vectors_are_lost(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-temp"))
    monkeypatch.setattr(directions_module, "capture_pairs", fake_capture(zero_layers=()))
    monkeypatch.setattr(output_module, "save_vectors", full_disk(OSError(errno.ENOSPC, "No space left on device")))
    assert extract_main(["--pairs", str(PAIRS), "--layers", "1-3", "--output", str(tmp_path / "v.pt")]) == 1
    err = capsys.readouterr().err
    assert "nor a fallback" in err and "the vectors are lost" in err and "Traceback" not in err, err
