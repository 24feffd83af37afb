"""RustTokenizer against transformers.AutoTokenizer on the same directories: ids, texts, ids of special tokens,
len(), chat templates; the directories it must refuse; and that loading it pulls in neither torch nor transformers."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from engine.tokenizer import FORCED_CLASS_MODEL_TYPES, RustTokenizer, TokenizerUnsupported, _gemma_pipeline

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Don't stop: it's 3.14, isn't it?", "héllo wörld ünïcode",
          "def f(x):\n    return x * 2", "日本語のテキスト", "emoji 🎉 party", "a  b   c\t\td"] * 20
TEXTS = ["Hello world", "", " ", "   leading and trailing   ", "a  b   c\n\n\td\r\n", "<bos>hi<eos>", "x<eos>y",
         "<s>not a bos</s>", "[CLS] [SEP] [MASK] [BOS]", "héllo wörld 日本語 🎉 \u200b\u00a0", "Don't , stop . ok ?",
         "word " * 3000, "🎉" * 500, "\n" * 50, "tab\there"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ bos_token if loop.first else '' }}<|{{ m['role'] }}|>\n{{ m['content'] | trim }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
JINJA_FILE_TEMPLATE = (
    "{%- set ns = namespace(n=0) -%}\n{% for m in messages %}\n  {% set ns.n = ns.n + 1 %}\n"
    "  [{{ ns.n }}] {{ m.role }}: {{ m.content | tojson }}\n{% if loop.index > 5 %}{% break %}{% endif %}\n"
    "{% endfor %}\n{% if add_generation_prompt %}{{ mask_token }} go{% endif %}"
)
CHATS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "  Bonjour 🎉  "}, {"role": "assistant", "content": "Salut"},
     {"role": "user", "content": "<eos> inside \"quotes\" and ünïcode", "name": None}],
]


def _bpe_dir(path: Path) -> Path:
    """A byte-level BPE with a TemplateProcessing post-processor that adds <s>, declared PreTrainedTokenizerFast."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "pad_token": "<pad>", "clean_up_tokenization_spaces": True, "chat_template": CHAT_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def _wordpiece_dir(path: Path) -> Path:
    """A BERT-style WordPiece with no post-processor, add_bos_token in its config (which transformers 5 ignores when
    tokenizer.json exists), clean-up on, a BOS and a mask token tokenizer.json lacks, special_tokens_map.json and
    chat_template.jinja (which wins over the config's template)."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS + ["[MASK]"], trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]"]))
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "TokenizersBackend", "add_bos_token": True, "add_eos_token": True,
              "bos_token": "[BOS]", "eos_token": "[SEP]", "unk_token": "[UNK]", "pad_token": "[PAD]",
              "cls_token": "[CLS]", "mask_token": "[MASK]", "clean_up_tokenization_spaces": True,
              "chat_template": "{{ 'the config template, which the .jinja file overrides' }}"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "special_tokens_map.json").write_text(json.dumps({"additional_special_tokens": ["<extra>"]}))
    (path / "chat_template.jinja").write_text(JINJA_FILE_TEMPLATE)
    return path


def _gemma_chat_dir(path: Path, embedded: str) -> Path:
    """The embedded Gemma tokenizer as a local model directory has it: config.json's model_type picks the class,
    tokenizer_config.json carries a chat template and model-specific tokens."""
    path.mkdir()
    os.symlink(Path(embedded) / "tokenizer.json", path / "tokenizer.json")
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "image_token": "<image_soft_token>",
              "chat_template": CHAT_TEMPLATE.replace("<|{{ m['role'] }}|>", "<start_of_turn>{{ m['role'] }}")}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    return path


@pytest.fixture(scope="module")
def layouts(tiny_source, tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("tokenizers")
    return {"embedded": tiny_source.tokenizer_dir, "bpe": str(_bpe_dir(base / "bpe")),
            "wordpiece": str(_wordpiece_dir(base / "wordpiece")),
            "gemma_chat": str(_gemma_chat_dir(base / "gemma_chat", tiny_source.tokenizer_dir))}


@pytest.fixture(scope="module", params=["embedded", "bpe", "wordpiece", "gemma_chat"])
def pair(request, layouts):
    from transformers import AutoTokenizer

    directory = layouts[request.param]
    return AutoTokenizer.from_pretrained(directory, local_files_only=True), RustTokenizer(directory)


def test_backend_is_the_one_transformers_builds(pair):
    hf, rust = pair
    assert json.loads(rust.backend_tokenizer.to_str()) == json.loads(hf.backend_tokenizer.to_str())


def test_encode_matches_token_for_token(pair):
    hf, rust = pair
    for add_special_tokens in (True, False):
        want = hf(TEXTS, add_special_tokens=add_special_tokens)["input_ids"]
        assert rust.encode_batch(TEXTS, add_special_tokens) == want
        assert [rust.encode(t, add_special_tokens) for t in TEXTS[:4]] == [
            hf(t, add_special_tokens=add_special_tokens)["input_ids"] for t in TEXTS[:4]]


def _id_lists(hf) -> list[list[int]]:
    rng = random.Random(0)
    specials = sorted(hf.added_tokens_decoder)
    encoded = hf(TEXTS, add_special_tokens=True)["input_ids"]
    mixed = [ids[:3] + [rng.choice(specials)] + ids[3:] + [specials[-1]] for ids in encoded]
    noise = [[rng.randrange(len(hf)) for _ in range(rng.randrange(1, 40))] for _ in range(50)]
    return encoded + mixed + noise + [[], specials]


def test_decode_matches_text_for_text(pair):
    hf, rust = pair
    id_lists = _id_lists(hf)
    for skip in (True, False):
        assert [rust.decode(ids, skip_special_tokens=skip) for ids in id_lists] == [
            hf.decode(ids, skip_special_tokens=skip) for ids in id_lists]
        want = hf.batch_decode(id_lists, skip_special_tokens=skip)
        assert rust.decode_batch(id_lists, skip_special_tokens=skip) == want
    assert rust.decode(id_lists[0][1]) == hf.decode(id_lists[0][1])
    assert rust.decode_batch([]) == hf.batch_decode([]) == []


def test_special_ids_len_and_settings_match(pair):
    hf, rust = pair
    assert len(rust) == len(hf)
    assert rust.get_vocab() == hf.get_vocab()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(rust, name) == getattr(hf, name), name
    assert rust.special_tokens_map == hf.special_tokens_map
    assert rust.chat_template == hf.chat_template


def test_chat_template_renders_the_same_text(pair):
    hf, rust = pair
    if hf.chat_template is None:
        assert rust.chat_template is None
        return
    for chat in CHATS:
        for add_generation_prompt in (True, False):
            expected = hf.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, tokenize=False)
            assert rust.apply_chat_template(chat, add_generation_prompt=add_generation_prompt) == expected
            want = hf(expected, add_special_tokens=False)["input_ids"]
            assert rust.encode(expected, add_special_tokens=False) == want


def test_raise_exception_in_a_template_is_a_clear_error(pair):
    hf, rust = pair
    if hf.chat_template != CHAT_TEMPLATE and "raise_exception" not in (hf.chat_template or ""):
        pytest.skip("this layout's template does not raise")
    bad = [{"role": "assistant", "content": "I speak first"}]
    with pytest.raises(jinja2.TemplateError) as theirs:
        hf.apply_chat_template(bad, add_generation_prompt=True, tokenize=False)
    with pytest.raises(jinja2.TemplateError, match="roles must alternate") as ours:
        rust.apply_chat_template(bad, add_generation_prompt=True)
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(ValueError, match="empty conversation"):
        rust.apply_chat_template([], add_generation_prompt=True)


def test_embedded_tokenizer_adds_bos_as_hf_does(layouts, tokenizer):
    rust = RustTokenizer(layouts["embedded"])
    assert rust.encode("Hello")[0] == rust.bos_token_id == tokenizer.bos_token_id == 2
    assert rust.eos_token_id == tokenizer.eos_token_id and len(rust) == len(tokenizer)


def _refused(path: Path, why: str) -> None:
    with pytest.raises(TokenizerUnsupported, match=why) as exc:
        RustTokenizer(path)
    assert str(path) in str(exc.value)


def test_refuses_what_it_cannot_reproduce(layouts, tmp_path):
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "tokenizer_config.json").write_text("{}")
    _refused(tmp_path / "slow", "no tokenizer.json")
    for name, config in {"llama": {"tokenizer_class": "LlamaTokenizer"}, "remote": {"auto_map": {}},
                         "qwen": {"tokenizer_class": "PreTrainedTokenizerFast"}}.items():
        directory = tmp_path / name
        directory.mkdir()
        os.symlink(Path(layouts["bpe"]) / "tokenizer.json", directory / "tokenizer.json")
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
        if name == "qwen":
            (directory / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    _refused(tmp_path / "llama", "LlamaTokenizer")
    _refused(tmp_path / "remote", "auto_map")
    _refused(tmp_path / "qwen", "qwen2")
    altered = json.loads((Path(layouts["embedded"]) / "tokenizer.json").read_text(encoding="utf-8"))
    altered["normalizer"] = None
    (tmp_path / "gemma").mkdir()
    (tmp_path / "gemma" / "tokenizer.json").write_text(json.dumps(altered))
    (tmp_path / "gemma" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer"}))
    _refused(tmp_path / "gemma", "normalizer")


def test_copied_transformers_facts_are_current():
    from transformers import GemmaTokenizer
    from transformers.models.auto.tokenization_auto import MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS

    assert FORCED_CLASS_MODEL_TYPES >= MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS  # the union over 5.x releases
    backend = GemmaTokenizer().backend_tokenizer
    built = json.loads(backend.to_str())
    expected = _gemma_pipeline("<unk>")
    for name in ("normalizer", "pre_tokenizer", "decoder"):
        assert built[name] == expected[name], name
    assert {k: v for k, v in built["model"].items() if k not in ("vocab", "merges")} == expected["model"]


def test_loading_and_using_it_imports_neither_torch_nor_transformers(layouts):
    script = f"""
import sys
import engine.tokenizer as t
for d in {[layouts["embedded"], layouts["wordpiece"]]!r}:
    tok = t.RustTokenizer(d)
    tok.decode_batch(tok.encode_batch(["hello <eos> world"]), skip_special_tokens=True)
    if tok.chat_template: tok.apply_chat_template([{{"role": "user", "content": "hi"}}], add_generation_prompt=True)
assert "torch" not in sys.modules and "transformers" not in sys.modules, sorted(sys.modules)
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, timeout=120)


def test_added_token_flags_survive(layouts):
    rust = RustTokenizer(layouts["wordpiece"])
    added = {t.content: t for t in rust.backend_tokenizer.get_added_tokens_decoder().values()}
    assert {"[BOS]", "[MASK]", "<extra>"} <= set(added) and all(added[k].special for k in ("[BOS]", "[MASK]"))
    assert isinstance(added["[BOS]"], AddedToken)


def test_hf_call_shape_lets_the_worker_code_run_unchanged(pair):
    from engine.pipeline.decoder_worker import decode_texts
    from engine.stops import cut_at_stop
    from engine.pipeline.tokenizer_worker import encode

    hf, rust = pair
    requests = [(text, None) for text in TEXTS[:6]]
    if hf.chat_template is not None:
        requests += [(None, chat) for chat in CHATS]
    assert encode(rust, requests) == encode(hf, requests)
    id_lists = _id_lists(hf)
    assert decode_texts(rust, id_lists) == decode_texts(hf, id_lists)
    ids = hf("stop here, then more words", add_special_tokens=False)["input_ids"]
    text = hf.decode(ids, skip_special_tokens=True)
    assert cut_at_stop(rust, ids, text, ["then"]) == cut_at_stop(hf, ids, text, ["then"])


def test_load_tokenizer_is_rust_where_it_can_be_and_transformers_where_not(layouts, tmp_path, caplog):
    from engine.models import load_tokenizer

    assert isinstance(load_tokenizer(layouts["embedded"]), RustTokenizer)
    llama = tmp_path / "llama"
    llama.mkdir()
    os.symlink(Path(layouts["bpe"]) / "tokenizer.json", llama / "tokenizer.json")
    (llama / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizerFast"}))
    with caplog.at_level("INFO", logger="engine"):
        fallback = load_tokenizer(str(llama))
    assert not isinstance(fallback, RustTokenizer) and type(fallback).__module__.startswith("transformers")
    [line] = [r for r in caplog.records if "AutoTokenizer" in r.getMessage()]
    assert line.levelname == "INFO" and "LlamaTokenizerFast" in line.getMessage() and str(llama) in line.getMessage()


def test_tokenizer_facts_are_recorded_once_and_follow_the_files(layouts, tmp_path, monkeypatch):
    # The core takes len(tok) and the EOS id from a record under the cache dir instead of loading the tokenizer
    # (~1 s); the record is keyed by the files' bytes, so an edited tokenizer gives new facts, and a damaged
    # record is recomputed.
    import engine.models as models

    directory = tmp_path / "tok"
    directory.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((Path(layouts["bpe"]) / name).read_bytes())
    loads = []
    real = models.load_tokenizer
    monkeypatch.setattr(models, "load_tokenizer", lambda d: loads.append(d) or real(d))
    tok = real(str(directory))
    want = {"vocab_size": len(tok), "eos_token_id": tok.eos_token_id}
    cache = str(tmp_path / "cache")
    assert models.tokenizer_facts(str(directory), cache) == want and len(loads) == 1
    assert models.tokenizer_facts(str(directory), cache) == want and len(loads) == 1  # from the record
    [record] = (tmp_path / "cache" / "tokenizer-facts").iterdir()
    record.write_text("{not json")
    assert models.tokenizer_facts(str(directory), cache) == want and len(loads) == 2
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["eos_token"] = config.get("bos_token") or config.get("unk_token")
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    edited = models.tokenizer_facts(str(directory), cache)
    assert len(loads) == 3 and edited["eos_token_id"] == real(str(directory)).eos_token_id
    assert edited["eos_token_id"] != want["eos_token_id"]


@pytest.mark.parametrize("layout", ["embedded", "bpe", "wordpiece", "gemma_chat"])
def test_the_decoders_tokenizer_without_merges_decodes_as_the_whole_one(layouts, layout, tmp_path, monkeypatch,
                                                                         caplog):
    # Decoder workers load a copy of a BPE tokenizer without its merges (Gemma's loads in ~0.4 s, not ~1.1 s);
    # every id, special ones too, must decode to the same text, with and without skipping special tokens, and the
    # stop-string cut must agree. A WordPiece tokenizer has no merges: it is loaded as it is.
    import engine.models as models
    from engine.models import load_tokenizer
    from engine.stops import cut_at_stop

    whole = load_tokenizer(layouts[layout])
    writes = []
    real_write = models._write_decoding_copy
    monkeypatch.setattr(models, "_write_decoding_copy", lambda *a: writes.append(a) or real_write(*a))
    cache = str(tmp_path / "cache")
    light = models.decoding_tokenizer(layouts[layout], cache)
    copies = list((tmp_path / "cache" / "decoding-tokenizers").glob("*/tokenizer.json"))
    assert len(copies) == (0 if layout == "wordpiece" else 1)
    rng = random.Random(0)
    id_lists = [[rng.randrange(len(whole)) for _ in range(rng.randrange(1, 40))] for _ in range(300)]
    id_lists += [sorted(whole.get_vocab().values())[:64]]  # the lowest ids: special and byte tokens
    for skip in (True, False):
        assert light.batch_decode(id_lists, skip_special_tokens=skip) == whole.batch_decode(id_lists,
                                                                                          skip_special_tokens=skip)
    ids = whole("stop here, then more words", add_special_tokens=False)["input_ids"]
    text = whole.decode(ids, skip_special_tokens=True)
    assert cut_at_stop(light, ids, text, ["then"]) == cut_at_stop(whole, ids, text, ["then"])
    if layout == "wordpiece":
        return
    assert len(writes) == 1
    models.decoding_tokenizer(layouts[layout], cache)
    assert len(writes) == 1  # the copy is kept
    copies[0].write_text("{damaged")
    with caplog.at_level("INFO", logger="engine"):
        again = models.decoding_tokenizer(layouts[layout], cache)
    assert again.batch_decode(id_lists[:20]) == whole.batch_decode(id_lists[:20])
    assert any("decoding with the whole tokenizer" in r.getMessage() for r in caplog.records)
