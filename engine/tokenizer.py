"""RustTokenizer: what the engine uses of a Hugging Face fast tokenizer, on the Rust `tokenizers` package alone.

Workers import this instead of transformers (whose import alone costs seconds). It reproduces, for the
directories it accepts, exactly what `transformers.AutoTokenizer.from_pretrained(dir)` (5.x) gives: the same
ids from `encode_batch`, the same texts from `decode`, the same special-token ids, `len()` and chat-template
text. It does so by making the same calls on the same Rust tokenizer that transformers makes while loading.
A directory whose loading it cannot mirror (no tokenizer.json, remote code, a tokenizer class that rebuilds
the pipeline in Python, ...) raises TokenizerUnsupported, naming the directory and the reason, so the caller
can fall back to transformers; it never loads something that might tokenize differently.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors

from engine.chat_template import compiled_template, plain_data, template_message

# transformers' generic classes load tokenizer.json as it is.
GENERIC_CLASSES = frozenset({"PreTrainedTokenizerFast", "TokenizersBackend"})
GEMMA_CLASS = "GemmaTokenizer"
GEMMA_MODEL_TYPES = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text"})
# transformers 5.x MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS: for these model types AutoTokenizer ignores the
# declared class and picks its own, which this module cannot know, so they load through transformers. The union of
# the 5.x releases' lists (5.25 dropped camembertv2-base, which 5.17 forces): one too many only takes the slower
# path to the same tokenizer. tests/pipeline/test_tokenizer.py checks it holds the installed release's list.
FORCED_CLASS_MODEL_TYPES = frozenset("""
    arctic chatlm ernie4_5 ernie4_5_moe fuyu h2ovl_chat hyperclovax hyperclovax_vlm hyperclovax_vision_v2 internlm2
    internlm3 iquestcoder jamba llava llava_next minicpm3 minicpmv minimax_m2 modernbert modernbert-decoder molmo
    molmo2 nemotron nvfp4 opencua openvla paddleocr_vl phi3 phi3_v phimoe qwen2 qwen3_5 qwen3_5_moe
    qwen3_5_moe_text qwen4_exp step3_vl vipllava cohere_asr camembertv2-base siglip2 smolvlm
""".split())
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# GemmaTokenizer.__init__'s defaults, used where tokenizer_config.json names no such token.
GEMMA_DEFAULTS = {"unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
                  "mask_token": "<mask>"}
# Files or keys whose effect on loading this module does not mirror.
UNSUPPORTED_FILES = ("added_tokens.json", "additional_chat_templates")
UNSUPPORTED_KEYS = ("auto_map", "fast_tokenizer_files")


class TokenizerUnsupported(ValueError):
    """A tokenizer directory RustTokenizer cannot reproduce exactly; load it with transformers instead."""


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token(value) -> AddedToken | str | None:
    """A config value naming a token: a string, or a serialized AddedToken (transformers' `__type` dict)."""
    if isinstance(value, dict) and value.get("__type") == "AddedToken":
        return AddedToken(**{k: v for k, v in value.items() if k != "__type"})
    return value if isinstance(value, (str, AddedToken)) else None


def _tokenizer_class(directory: Path, config: dict) -> str:
    """The class AutoTokenizer would pick, as "generic" or "gemma"; TokenizerUnsupported for anything else."""
    def refuse(why: str):
        raise TokenizerUnsupported(f"tokenizer directory {directory}: {why}; load it with transformers instead")

    if not (directory / "tokenizer.json").is_file():
        refuse("no tokenizer.json (a slow-only tokenizer)")
    for key in UNSUPPORTED_KEYS:
        if key in config:
            refuse(f"tokenizer_config.json has '{key}'")
    for name in UNSUPPORTED_FILES:
        if (directory / name).exists() and not (name == "added_tokens.json" and "added_tokens_decoder" in config):
            refuse(f"it holds {name}")
    model_type = _read_json(directory / "config.json").get("model_type")
    declared = config.get("tokenizer_class")
    if model_type in FORCED_CLASS_MODEL_TYPES:
        refuse(f"transformers picks its own tokenizer class for model_type {model_type!r}")
    if declared is None:
        if model_type in GEMMA_MODEL_TYPES:
            return "gemma"
        if model_type:
            refuse(f"no tokenizer_class, and model_type {model_type!r} implies a class this module does not mirror")
        return "generic"
    if declared.removesuffix("Fast") == GEMMA_CLASS:
        return "gemma"
    if declared in GENERIC_CLASSES or declared.removesuffix("Fast") in GENERIC_CLASSES:
        return "generic"
    refuse(f"tokenizer_class {declared!r} builds its pipeline in Python, which this module does not mirror")


def _gemma_pipeline(unk: str) -> dict:
    """The parts GemmaTokenizer.__init__ rebuilds (transformers 5.x), as tokenizer.json writes them."""
    parts = {
        "normalizer": normalizers.Replace(" ", "▁"),
        "pre_tokenizer": pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False),
        "decoder": decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]),
    }
    out = {name: json.loads(part.__getstate__()) for name, part in parts.items()}
    out["model"] = {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                    "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False}
    return out


def _pipeline(tok: Tokenizer) -> dict:
    """The same parts of a loaded tokenizer, read without serializing its vocabulary."""
    out = {name: None if part is None else json.loads(part.__getstate__())
           for name, part in (("normalizer", tok.normalizer), ("pre_tokenizer", tok.pre_tokenizer),
                              ("decoder", tok.decoder))}
    model = tok.model
    out["model"] = {"type": type(model).__name__, **{key: getattr(model, key, None) for key in (
        "dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk", "byte_fallback",
        "ignore_merges")}}
    return out


def _check_gemma(directory: Path, tok: Tokenizer, unk: str) -> None:
    """GemmaTokenizer keeps only vocab, merges and post-processor of tokenizer.json: the rest must be its own."""
    loaded = _pipeline(tok)
    for name, expected in _gemma_pipeline(unk).items():
        if loaded[name] != expected:
            raise TokenizerUnsupported(
                f"tokenizer directory {directory}: its tokenizer.json {name} differs from the one GemmaTokenizer "
                f"builds, so transformers would tokenize differently from the file; load it with transformers instead")


class _Settings:
    """The part of transformers' `_from_pretrained` + `__init__` that decides special tokens and added tokens."""

    def __init__(self, directory: Path, config: dict, tok: Tokenizer, kind: str):
        kwargs = dict(config)
        template = directory / "chat_template.jinja"
        self.chat_template = template.read_text(encoding="utf-8") if template.is_file() else kwargs.get("chat_template")
        if isinstance(self.chat_template, (list, tuple)):
            self.chat_template = {t["name"]: t["template"] for t in self.chat_template}
        if "additional_special_tokens" in kwargs and not kwargs.get("extra_special_tokens"):
            kwargs["extra_special_tokens"] = kwargs.pop("additional_special_tokens")
        self.added = self._added_tokens(directory, kwargs, tok)
        by_text = {str(t): t for t in self.added.values()}
        if kind == "gemma":
            for key, value in GEMMA_DEFAULTS.items():
                kwargs.setdefault(key, value)
        self.named: dict[str, AddedToken | str] = {}
        for key, value in kwargs.items():
            is_named = key in NAMED_TOKENS or key.endswith("_token")
            if is_named and (value := _token(value)) is not None:
                self.named[key] = by_text.get(str(value), value)
        extra = kwargs.get("extra_special_tokens") or []
        if isinstance(extra, dict):
            self.named.update({k: _token(v) for k, v in extra.items() if _token(v) is not None})
            extra = []
        self.extra = [t for t in (_token(v) for v in extra) if t is not None]
        self.clean_up = bool(kwargs.get("clean_up_tokenization_spaces", False))
        self.clean_up_bpe = bool(kwargs.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"))
        self.split_special = bool(kwargs.get("split_special_tokens", False))

    @staticmethod
    def _added_tokens(directory: Path, kwargs: dict, tok: Tokenizer) -> dict[int, AddedToken]:
        """tokenizer_config.json's added_tokens_decoder, else (legacy) special_tokens_map.json + tokenizer.json's."""
        if "added_tokens_decoder" in kwargs:
            return {int(i): AddedToken(**t) for i, t in kwargs["added_tokens_decoder"].items()}
        for key, value in _read_json(directory / "special_tokens_map.json").items():
            if isinstance(value, dict) and key != "extra_special_tokens":
                value = AddedToken(**{k: v for k, v in value.items() if k != "special"}, special=True)
            elif key == "extra_special_tokens" and isinstance(value, list):
                merged = list(kwargs.get("extra_special_tokens") or [])
                for item in value:
                    item = AddedToken(**item, special=True) if isinstance(item, dict) else item
                    if item not in merged:
                        merged.append(item)
                value = merged
            kwargs[key] = value
        if "additional_special_tokens" in kwargs and "extra_special_tokens" not in kwargs:
            kwargs["extra_special_tokens"] = kwargs.pop("additional_special_tokens")
        return dict(sorted(tok.get_added_tokens_decoder().items()))

    def tokens_to_add(self, tok: Tokenizer) -> list[AddedToken]:
        """What TokenizersBackend.__init__ passes to add_tokens: every added token, then missing special ones."""
        tokens = [self.added[i] for i in sorted(self.added)]
        known = {t.content for t in tok.get_added_tokens_decoder().values()} | {str(t) for t in tokens}
        for value in [*self.named.values(), *self.extra]:
            if str(value) not in known and value not in tokens:
                tokens.append(value)
        named = {str(v) for v in self.named.values()}
        out = []
        for token in tokens:
            if isinstance(token, str):
                token = AddedToken(token, special=True)
            elif not token.special and str(token) in named:
                token.special = True
            out.append(token)
        return out


def _load_backend(directory: Path, config: dict, kind: str) -> tuple[Tokenizer, _Settings]:
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    if tok.truncation is not None or tok.padding is not None:
        raise TokenizerUnsupported(f"tokenizer directory {directory}: its tokenizer.json sets truncation or padding, "
                                   f"which transformers turns into defaults; load it with transformers instead")
    settings = _Settings(directory, config, tok, kind)
    if kind == "gemma":
        _check_gemma(directory, tok, str(settings.named.get("unk_token", "<unk>")))
        _check_gemma_ids(directory, tok)
    tokens = settings.tokens_to_add(tok)
    if tokens:
        tok.add_tokens(tokens)
    tok.encode_special_tokens = settings.split_special
    if tok.post_processor is None:
        # What update_post_processor installs when neither BOS nor EOS is added: the text alone.
        tok.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    return tok, settings


def _check_gemma_ids(directory: Path, tok: Tokenizer) -> None:
    """GemmaTokenizer adds its tokens to an empty added vocabulary, tokenizer.json's already holds some: the same
    ids come out only when each of those is the vocabulary entry of its text (new ones are then appended alike)."""
    for token_id, token in tok.get_added_tokens_decoder().items():
        if tok.model.token_to_id(token.content) != token_id:
            raise TokenizerUnsupported(
                f"tokenizer directory {directory}: added token {token.content!r} (id {token_id}) is not a vocabulary "
                f"entry, so GemmaTokenizer may number the added tokens differently; load it with transformers instead")


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization: drop the spaces WordPiece leaves before punctuation and clitics."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


class RustTokenizer:
    """A tokenizer directory loaded as transformers 5.x would, minus torch and transformers; see the module doc."""

    def __init__(self, tokenizer_dir: str | Path):
        self.directory = Path(tokenizer_dir)
        config = _read_json(self.directory / "tokenizer_config.json")
        kind = _tokenizer_class(self.directory, config)
        self.backend_tokenizer, self._settings = _load_backend(self.directory, config, kind)
        self.chat_template = self._settings.chat_template
        # HF skips its clean-up for BPE models unless told to corrupt their output anyway.
        is_bpe = type(self.backend_tokenizer.model).__name__ == "BPE"
        self.clean_up_tokenization_spaces = self._settings.clean_up  # the config's flag, as HF exposes it
        self._is_cleaning_up = self._settings.clean_up and (not is_bpe or self._settings.clean_up_bpe)
        self.special_tokens_map = {k: str(v) for k, v in self._settings.named.items()}

    def __len__(self) -> int:
        """Vocabulary plus added tokens, as `len(hf_tokenizer)`."""
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        """Token text -> id, added tokens included, as `hf_tokenizer.get_vocab()` (engine-bench's workloads)."""
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def token_id(self, name: str) -> int | None:
        """The id of a named special token ("bos_token", ...): its text through the vocabulary, else unk's id."""
        text = self.special_tokens_map.get(name)
        if text is None:
            return None
        token_id = self.backend_tokenizer.token_to_id(text)
        if token_id is None and name != "unk_token":
            return self.token_id("unk_token")
        return token_id

    bos_token_id = property(lambda self: self.token_id("bos_token"))
    eos_token_id = property(lambda self: self.token_id("eos_token"))
    pad_token_id = property(lambda self: self.token_id("pad_token"))
    unk_token_id = property(lambda self: self.token_id("unk_token"))

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids per text, as `hf_tokenizer(texts, add_special_tokens=...)["input_ids"]`."""
        if not texts:
            return []
        return [e.ids for e in self.backend_tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.encode_batch([text], add_special_tokens)[0]

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> dict[str, list]:
        """HF's call shape, `{"input_ids": ...}` for a text or a batch, so callers of HF's tokenizer work as they
        are."""
        ids = self.encode_batch([text] if isinstance(text, str) else text, add_special_tokens)
        return {"input_ids": ids[0] if isinstance(text, str) else ids}

    def _finish(self, text: str) -> str:
        return _clean_up_tokenization(text) if self._is_cleaning_up else text

    def decode(self, ids: list[int] | int, skip_special_tokens: bool = False) -> str:
        """The text of ids, as `hf_tokenizer.decode(ids, skip_special_tokens=...)`."""
        ids = [ids] if isinstance(ids, int) else list(ids)
        return self._finish(self.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))

    def decode_batch(self, id_lists: list[list[int]], skip_special_tokens: bool = False) -> list[str]:
        """The text of each id list, as `hf_tokenizer.batch_decode(...)`, decoded in parallel by the Rust side."""
        if not id_lists:
            return []
        texts = self.backend_tokenizer.decode_batch([list(ids) for ids in id_lists],
                                                    skip_special_tokens=skip_special_tokens)
        return [self._finish(text) for text in texts]

    batch_decode = decode_batch

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False) -> str:
        """The chat as text, as `hf_tokenizer.apply_chat_template(messages, add_generation_prompt=...,
        tokenize=False)`; a template's raise_exception becomes jinja2's TemplateError with its message."""
        if tokenize:
            raise ValueError("RustTokenizer.apply_chat_template renders text only: encode the text it returns")
        if not messages:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        chat = [template_message(m) for m in messages]
        return compiled_template(self._template()).render(messages=chat, tools=None, documents=None,
                                                  add_generation_prompt=add_generation_prompt,
                                                  **plain_data(self.special_tokens_map))

    def _template(self) -> str:
        template = self.chat_template
        if isinstance(template, dict):
            if "default" not in template:
                raise ValueError(f"tokenizer directory {self.directory} has several chat templates and no default: "
                                 f"{sorted(template)}")
            template = template["default"]
        if template is None:
            raise ValueError(f"tokenizer directory {self.directory} has no chat template")
        return template


__all__ = ["RustTokenizer", "TokenizerUnsupported"]
