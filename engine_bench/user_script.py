"""The write-up's batched Hugging Face loop as the script a user would write; engine-bench --e2e runs it as a command.

It reads a JSONL of prompts, loads the model and tokenizer from a local directory, tokenizes in chunks of four
batches with left padding (each batch trimmed to its own longest prompt), calls `generate` once per batch,
`batch_decode`s and writes one JSONL record per prompt. It imports only the standard library, torch and
transformers, never `engine`: its start-up is what a user's own script pays.

What is the bench's rather than the recipe's: EOS is disabled so every row runs to its `max_new_tokens` (the engine
runs with ignore_eos), each record also carries its completion's token ids (for the greedy agreement check), and
--timings writes when the process started, finished importing and loading, and wrote its first and last results.
Sampling settings are read from each batch's first record (the bench writes the same ones on every record).

    python bench_user_script.py --input prompts.jsonl --output out.jsonl --model DIR --batch-size 64 \\
        --dtype bfloat16 --device cuda [--seed 0] [--timings timings.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

CHUNK_BATCHES = 4  # the write-up tokenizes four batches at a time and moves them to the device together


def process_start() -> float:
    """time.time() at this process's start, from /proc (the same clock engine-run's --timings uses; the script may
    not import engine, so engine.core.trace.process_age is restated here); now where /proc is missing."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return time.time()
    return time.time() - max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="JSONL of {\"id\", \"prompt\", \"max_new_tokens\", sampling}")
    p.add_argument("--output", required=True)
    p.add_argument("--model", required=True, help="a local Hugging Face model directory with its tokenizer")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timings", help="write the stamps as JSON here")
    return p.parse_args()


def load(model_dir: str, dtype: str, device: str):
    """(model, tokenizer) as the write-up loads them: fast tokenizer padding on the left, flash attention where
    installed, else SDPA; EOS disabled so generate runs every row to max_new_tokens."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    attn = "flash_attention_2" if device.startswith("cuda") and importlib.util.find_spec("flash_attn") else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), device_map=device,
                                                 attn_implementation=attn)
    model.eval()
    if tok.pad_token is None:
        pad_id = tok.eos_token_id if tok.eos_token_id is not None else model.config.pad_token_id
        if pad_id is None:
            raise SystemExit(f"{model_dir}: the tokenizer has no pad or EOS token and the config no pad_token_id")
        tok.pad_token = tok.convert_ids_to_tokens(int(pad_id))
    model.generation_config.eos_token_id = None
    return model, tok


def sampling_kwargs(record: dict, pad_id: int) -> dict:
    """generate() settings of a record: greedy at temperature 0, else temperature / top-p / top-k (top_k is passed
    even when 0, since generate's own default is 50)."""
    common = {"use_cache": True, "num_beams": 1, "pad_token_id": pad_id}
    temperature = record.get("temperature", 0.0)
    if temperature == 0:
        return {**common, "do_sample": False}
    return {**common, "do_sample": True, "temperature": temperature, "top_p": record.get("top_p", 1.0),
            "top_k": record.get("top_k", 0)}


@torch.inference_mode()
def generate_all(model, tok, records: list[dict], batch_size: int, out, stamps: dict) -> None:
    """Chunked tokenization, one generate per batch (to the batch's largest max_new_tokens, each row cut to its
    own), batch_decode, one line per prompt."""
    for chunk_start in range(0, len(records), CHUNK_BATCHES * batch_size):
        chunk = records[chunk_start:chunk_start + CHUNK_BATCHES * batch_size]
        enc = tok([r["prompt"] for r in chunk], padding=True, return_tensors="pt").to(model.device)
        for start in range(0, len(chunk), batch_size):
            batch = chunk[start:start + batch_size]
            ids = enc["input_ids"][start:start + batch_size]
            mask = enc["attention_mask"][start:start + batch_size]
            first = int(mask.any(dim=0).int().argmax())  # columns that are padding in every row of this batch
            ids, mask = ids[:, first:], mask[:, first:]
            max_new = max(r["max_new_tokens"] for r in batch)
            generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                                       **sampling_kwargs(batch[0], tok.pad_token_id))
            rows = [row[:r["max_new_tokens"]] for row, r in zip(generated[:, ids.shape[1]:].tolist(), batch)]
            for record, row, text in zip(batch, rows, tok.batch_decode(rows, skip_special_tokens=True)):
                out.write(json.dumps({"id": record["id"], "completion": text, "completion_token_ids": row}) + "\n")
            stamps.setdefault("first_result", time.time())


def write_timings(path: str, stamps: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(stamps, f, indent=1)
    os.replace(tmp, path)


def main() -> None:
    stamps = {"process_start": process_start(), "imports_done": time.time()}
    args = parse_args()
    with open(args.input, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    model, tok = load(args.model, args.dtype, args.device)
    stamps["load_done"] = time.time()
    stamps["attn_implementation"] = model.config._attn_implementation
    torch.manual_seed(args.seed)
    with open(args.output, "w", encoding="utf-8") as out:
        generate_all(model, tok, records, args.batch_size, out, stamps)
        stamps["last_result"] = time.time()
    if args.timings:
        stamps["exit"] = time.time()
        write_timings(args.timings, stamps)


if __name__ == "__main__":
    main()
