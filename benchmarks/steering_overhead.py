"""Steering overhead of the engine core: the same 512 prompts x 150 tokens (greedy, warm) with no steering,
one spec, 256 distinct specs on 3 layers, and 256 distinct specs on every layer. Also times HF generate()
per token against one eager forward, which is what bounds the naive loop.

    python benchmarks/steering_overhead.py --tokenizer tokenizer.json   # on a CUDA machine
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.models import load_model, resolve_model
from engine.tokenizer_worker import load_tokenizer

WORDS = "the a river mountain light question answer model token steering vector layer night city".split()


def generate_per_token(source, tok) -> tuple[float, float]:
    """(one eager forward at batch 1, HF generate() per token), in seconds."""
    model = load_model(source, torch.bfloat16, "cuda", len(tok))
    model.generation_config.eos_token_id = None
    x = torch.tensor([tok("the river " * 50).input_ids], device="cuda")
    with torch.inference_mode():
        for _ in range(3):
            model(x[:, :8])
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(20):
            model(x[:, :1])
        torch.cuda.synchronize()
        forward = (time.perf_counter() - started) / 20
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        started = time.perf_counter()
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=100, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
    return forward, (time.perf_counter() - started) / 100


class Runner:
    def __init__(self, core: EngineCore, prompts: list[list[int]]):
        self.core, self.prompts, self.next_index = core, prompts, 0

    def tok_per_s(self, spec_of) -> float:
        """Warm throughput: one pass to load vectors and capture graphs, then the timed pass."""
        for timed in (False, True):
            for i, prompt in enumerate(self.prompts):
                request = dict(index=self.next_index, max_new_tokens=150, temperature=0.0, top_p=1.0, top_k=0,
                               seed=i, ignore_eos=True, stop=[], steering=spec_of(i))
                self.next_index += 1
                self.core.add(request, torch.tensor(prompt, device="cuda"))
            torch.cuda.synchronize()
            started = time.perf_counter()
            while self.core.has_work:
                self.core.step()
            torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
        return len(self.prompts) * 150 / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:gemma-2b")
    parser.add_argument("--tokenizer")
    args = parser.parse_args()
    config = EngineConfig(model=args.model, tokenizer=args.tokenizer, max_num_seqs=256, max_model_len=512)
    source = resolve_model(config.model, config.tokenizer, config.cache_dir)
    tok = load_tokenizer(source.tokenizer_dir)
    forward, per_token = generate_per_token(source, tok)
    print(f"HF eager forward, batch 1: {forward * 1e3:.1f} ms; HF generate() per token: {per_token * 1e3:.1f} ms")
    torch.cuda.empty_cache()
    core = EngineCore(config, source)
    random.seed(0)
    prompts = [tok(" ".join(random.choice(WORDS) for _ in range(random.randint(20, 200)))).input_ids
               for _ in range(512)]
    folder = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    hidden = core.steering.hidden_size
    paths = []
    for i in range(256):
        paths.append(str(folder / f"v{i}.npy"))
        np.save(paths[-1], (rng.standard_normal(hidden) * 0.3).astype(np.float32))
    last = core.steering.num_layers
    runner = Runner(core, prompts)
    cases = {
        "no steering": lambda i: None,
        "1 spec, layers 4,8,12": lambda i: {"vector": paths[0], "layers": [4, 8, 12], "coef": 4.0, "positions": "all"},
        "256 distinct specs, layers 4,8,12": lambda i: {"vector": paths[i % 256], "layers": [4, 8, 12], "coef": 4.0,
                                                        "positions": "all"},
        f"256 distinct specs, all {last} layers": lambda i: {"vector": paths[i % 256], "layers": list(range(last)),
                                                             "coef": 1.0, "positions": "all"},
    }
    base = None
    for label, spec_of in cases.items():
        rate = runner.tok_per_s(spec_of)
        base = base or rate
        print(f"| {label} | {rate:,.0f} | {rate / base:.3f} |")


if __name__ == "__main__":
    main()
