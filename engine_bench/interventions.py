"""engine-bench's intervention rows (--interventions): each name one more engine row in the same run, every record
under that op, with the files it needs written (seeded) into the run's folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np

INTERVENTIONS = {
    "ablate": "a direction ablated at every residual write of every layer, every record",
    "clamp": "the projection on one of 256 distinct directions clamped to 1 at the --steering-layers (record i: "
             "direction i % 256)",
    "sae": "SAE feature steering: a 16k-wide random JumpReLU SAE at the first --steering-layers layer, record i "
           "setting feature i % 256 to 8",
    "sae-capture": "SAE capture: the top-32 features of that SAE at every generated token",
    "gated": "an add of one vector (coef 4) at the --steering-layers, gated per token by a probe read at the first of "
             "them (h . probe above 0)",
}
SAE_WIDTH = 16384
NUM_DISTINCT = 256


def intervention_records(name: str, records: list[dict], hidden: int, layers: list[int], seed: int,
                         folder: Path) -> list[dict]:
    """The records with `name`'s steering or capture (see INTERVENTIONS)."""
    rng = np.random.default_rng(seed)

    def vector(tag: str) -> str:
        path = folder / f"{tag}.npy"
        if not path.exists():
            np.save(path, (rng.standard_normal(hidden) / np.sqrt(hidden)).astype(np.float32))
        return str(path)

    if name == "ablate":
        spec = {"op": "ablate", "vector": vector("ablate"), "layers": "all"}
        return [{**r, "steering": spec} for r in records]
    if name == "clamp":
        paths = [vector(f"clamp{i}") for i in range(NUM_DISTINCT)]
        return [{**r, "steering": {"op": "clamp", "vector": paths[i % NUM_DISTINCT], "layers": layers, "value": 1.0}}
                for i, r in enumerate(records)]
    if name in ("sae", "sae-capture"):
        sae = random_sae(folder, hidden, layers[0], rng)
        if name == "sae-capture":
            capture = {"sae": sae, "top_k": 32, "positions": "generated"}
            return [{**r, "capture": capture} for r in records]
        return [{**r, "steering": {"op": "sae", "sae": sae, "feature": i % NUM_DISTINCT, "value": 8.0}}
                for i, r in enumerate(records)]
    if name == "gated":
        spec = {"vector": vector("gated"), "layers": layers, "coef": 4.0,
                "when": {"vector": vector("probe"), "layer": layers[0], "above": 0.0}}
        return [{**r, "steering": spec} for r in records]
    raise ValueError(f"unknown intervention {name!r}")


def random_sae(folder: Path, hidden: int, layer: int, rng) -> str:
    """A Gemma-Scope-style params.npz of SAE_WIDTH random JumpReLU features reading `layer` (its path names it)."""
    path = folder / f"layer_{layer}" / "width_16k" / "params.npz"
    if not path.exists():
        path.parent.mkdir(parents=True)
        scale = 1 / np.sqrt(hidden)
        np.savez(path, W_enc=(rng.standard_normal((hidden, SAE_WIDTH)) * scale).astype(np.float32),
                 W_dec=(rng.standard_normal((SAE_WIDTH, hidden)) * scale).astype(np.float32),
                 b_enc=np.zeros(SAE_WIDTH, np.float32), b_dec=np.zeros(hidden, np.float32),
                 threshold=np.full(SAE_WIDTH, 0.1, np.float32))
    return str(path)
