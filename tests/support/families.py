"""Tiny random models of the Hugging Face architectures steering researchers use, saved as model directories
(weights, config.json, generation_config.json, tokenizer.json and tokenizer_config.json), so a test runs the engine on
exactly what `from_pretrained` loads; and a small byte-level BPE tokenizer for them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

HIDDEN = 64
NUM_LAYERS = 3
SLIDING_WINDOW = 8  # shorter than most test prompts, so windowed attention is exercised in prefill and decode
TINY = dict(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, bos_token_id=2, eos_token_id=1, pad_token_id=0)
GEMMA_ATTENTION = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=SLIDING_WINDOW)

# model_type -> what its tiny config sets beyond TINY: each family's own parts (sliding windows, MoE experts,
# partial rotary, layer types) small enough that a forward is cheap on a CPU.
FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": dict(head_dim=16, sliding_window=SLIDING_WINDOW),  # a window on every layer, no layer_types
    "qwen2": {},
    "qwen3": dict(head_dim=16),
    "qwen3_moe": dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    # fused qkv and gate-up projections, rotary on half of each head, a window on every layer (as Phi-3 mini has)
    "phi3": dict(partial_rotary_factor=0.5, sliding_window=SLIDING_WINDOW),
    "olmo2": {},
    "gemma": dict(head_dim=16),
    "gemma2": dict(GEMMA_ATTENTION),
    "gemma3_text": dict(GEMMA_ATTENTION, layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
    "gemma3": dict(  # the multimodal checkpoint (Gemma3ForConditionalGeneration): its language model runs on text
        text_config=dict(GEMMA_ATTENTION, layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4),
}


SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>"]  # ids 0, 1, 2: TINY's pad, eos and bos
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Don't stop: it's 3.14, isn't it?", "héllo wörld ünïcode",
          "def f(x):\n    return x * 2", "Hello! How can I help you today? Tell me a story.", "日本語のテキスト 🎉"]


def save_small_tokenizer(folder: Path, vocab_size: int = 512) -> Path:
    """A byte-level BPE tokenizer (any text encodes; a BOS is added) trained on CORPUS, saved as tokenizer.json and
    tokenizer_config.json; the test prompts, not in CORPUS, take several tokens a word. Its vocabulary keeps a
    model's embeddings and logits small: with the 262k-token Gemma tokenizer each family's directory took seconds
    more to save, load and tokenize than its model took to run."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
              "pad_token": "<pad>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def tiny_config(model_type: str, vocab_size: int, **overrides):
    """The transformers config of a tiny `model_type` model (FAMILIES' settings, then `overrides`)."""
    from transformers import AutoConfig

    settings = {**FAMILIES.get(model_type, {}), **overrides}
    if "text_config" in settings:  # a multimodal config: the language model's settings go in its text_config
        settings["text_config"] = {**TINY, "vocab_size": vocab_size, **settings["text_config"]}
        return AutoConfig.for_model(model_type, **settings)
    return AutoConfig.for_model(model_type, **{**TINY, "vocab_size": vocab_size, **settings})


def save_tiny_model(folder: Path, model_type: str, tokenizer_dir: str, seed: int = 0, **overrides) -> Path:
    """A tiny random `model_type` model (seeded) saved in `folder` with the tokenizer of `tokenizer_dir`, whose
    vocabulary sizes the model."""
    from transformers import AutoModelForCausalLM

    from engine.models import load_hf_tokenizer

    vocab_size = len(load_hf_tokenizer(tokenizer_dir))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, vocab_size, **overrides), dtype=torch.float32)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(Path(tokenizer_dir, name), folder / name)
    return folder


def edit_json(path: Path, **changes) -> None:
    """Set keys of a JSON file in place (a tokenizer_config.json's chat_template, a generation config's eos)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(changes)
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
