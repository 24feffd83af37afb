"""SAE files in each published format, written here, read by engine.saes: arrays, activation, layer and encoding
against numpy written from each format's own definition; every file that does not fit the model a clear RecordError."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from engine.saes import load_sae, sae_layer_or_error
from engine.specs import RecordError

H, S, LAYERS = 16, 24, 4


def arrays(seed: int = 0, threshold: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {"W_enc": rng.standard_normal((H, S)).astype(np.float32), "W_dec": rng.standard_normal((S, H)).astype(
        np.float32), "b_enc": rng.standard_normal(S).astype(np.float32), "b_dec": rng.standard_normal(H).astype(
        np.float32)}
    if threshold:
        out["threshold"] = np.abs(rng.standard_normal(S)).astype(np.float32)
    return out


def saelens(folder, weights: dict, **cfg):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": H, "d_sae": S, "normalize_activations": "none", **cfg}))
    return folder


@pytest.fixture()
def x():
    return np.random.default_rng(9).standard_normal((5, H)).astype(np.float32)


def test_gemma_scope_npz_is_jumprelu_at_the_layer_its_path_names(tmp_path, x):
    a = arrays()
    path = tmp_path / "layer_3" / "width_16k" / "average_l0_50" / "params.npz"
    path.parent.mkdir(parents=True)
    np.savez(path, **a)
    sae = load_sae(str(path), LAYERS, H)
    assert (sae.activation, sae.layer, sae.d_model, sae.d_sae, sae.is_b_dec_subtracted) == ("jumprelu", 3, H, S, False)
    pre = x @ a["W_enc"] + a["b_enc"]
    np.testing.assert_allclose(sae.encode(x), pre * (pre > a["threshold"]), rtol=1e-6)
    assert load_sae(str(path.parent), LAYERS, H).layer == 3  # its folder reads the same


@pytest.mark.parametrize("case", ["lower", "upper"])
def test_params_safetensors_with_config_keys_in_either_case(tmp_path, x, case):
    a = arrays(1)
    folder = tmp_path / "resid_post" / "layer_9_width_16k_l0_big"
    folder.mkdir(parents=True)
    save_file({(k.lower() if case == "lower" else k): v for k, v in a.items()}, str(folder / "params.safetensors"))
    (folder / "config.json").write_text(json.dumps({"hf_hook_point_in": "model.layers.2.output", "width": S}))
    sae = load_sae(str(folder), LAYERS, H)
    assert (sae.activation, sae.layer) == ("jumprelu", 2)  # the config's hook point over the path's layer_9
    pre = x @ a["W_enc"] + a["b_enc"]
    np.testing.assert_allclose(sae.encode(x), np.where(pre > a["threshold"], pre, 0), rtol=1e-6)


def test_saelens_relu_subtracts_b_dec_and_reads_its_hook_layer(tmp_path, x):
    a = arrays(2, threshold=False)
    folder = saelens(tmp_path / "relu", a, architecture="standard", activation_fn_str="relu",
                     hook_name="blocks.2.hook_resid_pre", apply_b_dec_to_input=True)
    sae = load_sae(str(folder), LAYERS, H)
    assert (sae.activation, sae.layer, sae.is_b_dec_subtracted) == ("relu", 1, True)  # resid_pre of 2: 1's output
    np.testing.assert_allclose(sae.encode(x), np.maximum((x - a["b_dec"]) @ a["W_enc"] + a["b_enc"], 0), rtol=1e-5)
    assert load_sae(str(folder / "sae_weights.safetensors"), LAYERS, H).layer == 1


def test_saelens_jumprelu_with_log_threshold_and_topk(tmp_path, x):
    a = arrays(3)
    a["log_threshold"] = np.log(a.pop("threshold"))
    jump = load_sae(str(saelens(tmp_path / "jump", a, architecture="jumprelu", hook_name="blocks.0.hook_resid_post")),
                    LAYERS, H)
    pre = x @ a["W_enc"] + a["b_enc"]
    np.testing.assert_allclose(jump.threshold, np.exp(a["log_threshold"]), rtol=1e-6)
    np.testing.assert_allclose(jump.encode(x), np.where(pre > np.exp(a["log_threshold"]), pre, 0), rtol=1e-5)
    b = arrays(4, threshold=False)
    topk = load_sae(str(saelens(tmp_path / "topk", b, architecture="topk", k=5, hook_name="blocks.3.hook_resid_post")),
                    LAYERS, H)
    assert (topk.activation, topk.k, topk.layer) == ("topk", 5, 3)
    pre = x @ b["W_enc"] + b["b_enc"]
    f = topk.encode(x)
    for row, p in zip(f, pre):
        top = np.argsort(-p)[:5]
        expected = np.zeros(S, np.float32)
        expected[top] = np.maximum(p[top], 0)
        np.testing.assert_allclose(row, expected, rtol=1e-5)


def test_qwen_scope_pt_is_topk_with_w_dec_transposed(tmp_path, x):
    a = arrays(5, threshold=False)
    path = tmp_path / "layer_1.pt"
    torch.save({"W_enc": torch.from_numpy(a["W_enc"]), "W_dec": torch.from_numpy(a["W_dec"].T.copy()),
                "b_enc": torch.from_numpy(a["b_enc"]), "b_dec": torch.from_numpy(a["b_dec"]), "k": 3}, path)
    sae = load_sae(str(path), LAYERS, H)
    assert (sae.activation, sae.k, sae.layer) == ("topk", 3, 1)
    np.testing.assert_array_equal(sae.w_dec, a["W_dec"])  # back to [d_sae, d_model]


def test_layer_given_wins_and_none_anywhere_is_an_error(tmp_path):
    folder = saelens(tmp_path / "nohook", arrays(6, threshold=False), architecture="standard", activation_fn_str="relu")
    sae = load_sae(str(folder), LAYERS, H)
    assert sae_layer_or_error(sae, 2) == 2
    with pytest.raises(RecordError, match="do not say which layer"):
        sae_layer_or_error(sae, None)


def bad_files(tmp_path):
    """(path, what the error says) for each file that cannot be this model's SAE."""
    cases = []
    wide = {k: (np.zeros((H + 1, S), np.float32) if k == "W_enc" else v) for k, v in arrays(threshold=True).items()}
    np.savez(tmp_path / "wide.npz", **wide)
    cases.append((tmp_path / "wide.npz", f"width {H + 1}"))
    np.savez(tmp_path / "nothreshold.npz", **arrays(threshold=False))
    cases.append((tmp_path / "nothreshold.npz", "no 'threshold'"))
    bad_dec = {**arrays(), "W_dec": np.zeros((S + 1, H), np.float32)}
    np.savez(tmp_path / "baddec.npz", **bad_dec)
    cases.append((tmp_path / "baddec.npz", "W_dec has shape"))
    np.savez(tmp_path / "ints.npz", **{**arrays(), "b_enc": np.zeros(S, np.int32)})
    cases.append((tmp_path / "ints.npz", "is int32"))
    np.savez(tmp_path / "missing.npz", W_enc=arrays()["W_enc"])
    cases.append((tmp_path / "missing.npz", "no W_dec, b_enc, b_dec"))
    far = tmp_path / "layer_7" / "params.npz"
    far.parent.mkdir()
    np.savez(far, **arrays())
    cases.append((far, "reads layer 7, but the model has layers 0..3"))
    cases.append((saelens(tmp_path / "norm", arrays(threshold=False), normalize_activations="expected_average_only_in",
                          hook_name="blocks.0.hook_resid_post"), "normalize_activations"))
    cases.append((saelens(tmp_path / "attn", arrays(threshold=False), hook_name="blocks.0.attn.hook_z"),
                   "residual stream"))
    cases.append((saelens(tmp_path / "embed", arrays(threshold=False), hook_name="blocks.0.hook_resid_pre"),
                   "the embeddings"))
    cases.append((saelens(tmp_path / "nok", arrays(threshold=False), architecture="topk"), "needs its k"))
    cases.append((saelens(tmp_path / "jumpnothr", arrays(threshold=False), architecture="jumprelu"),
                   "needs a 'threshold'"))
    (tmp_path / "torn.npz").write_bytes(b"PK\x03\x04 not a zip")
    cases.append((tmp_path / "torn.npz", "cannot read it"))
    (tmp_path / "sae.bin").write_bytes(b"x")
    cases.append((tmp_path / "sae.bin", "unsupported format .bin"))
    cases.append((tmp_path / "absent.npz", "no such file"))
    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", "a folder with none of"))
    return cases


def test_every_file_that_does_not_fit_is_a_clear_record_error(tmp_path):
    for path, fragment in bad_files(tmp_path):
        with pytest.raises(RecordError) as info:
            load_sae(str(path), LAYERS, H)
        assert fragment in str(info.value) and str(path) in str(info.value), (path, str(info.value))
