"""engine-extract: steering vectors from contrastive prompt pairs, through the engine's activation capture.

Each pair's positive and negative prompt runs once (max_new_tokens=1) with capture at the chosen layers and
position; per layer the vector is either the difference of the class means (mean_diff, as in CAA) or the first
principal component of the paired differences (pca, as repeng's pca_diff: the differences are centered first),
unit length and signed so that positives project higher. A report beside the vector gives, per layer, its norm,
the mean projection of positives and negatives onto its direction, and their separation (on the same pairs).

A layer with nothing to extract is refused by name, never written as a zero or arbitrary vector. Measured against
`scale`, the mean L2 norm of the layer's activations (both sides): the mean difference's norm at most
MIN_RELATIVE_DIFF = 1e-5 x scale is zero (float32 noise between identical prompts is ~1e-7 x scale, a concept's
difference far above 1e-5); for pca, so is a spread of the paired differences around their mean (RMS norm) at most
1e-5 x scale (all pairs differ by one vector: no variance for a component). A pairs file whose every positive is
its negative's text is refused before anything runs (bf16 noise could pass the numeric test). Separation is None
("n/a") with fewer than 2 pairs or a pooled std at most 1e-5 x scale. The output path is checked before the engine
starts; vectors that cannot be written after the capture go to a fallback file in the temp folder, named in the
message. Exit codes as engine-run's: 0 all written, 1 nothing (or only the fallback), 3 some layers refused.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


from engine.apps.run import EXIT_FATAL, EXIT_INTERRUPTED
from engine.config import (
    DTYPES,
    CaptureDefaults,
    ConfigError,
    EngineConfig,
    SamplingDefaults,
)
from engine.models import ModelNotFound
from engine.engine import EngineError
from engine.apps.extract.directions import extract
from engine.apps.extract.output import check_output, refused_message, save, say
from engine.apps.extract.pairs import check_method, read_pairs
from engine.apps.extract.spec import ExtractError, METHODS, OUTPUT_SUFFIXES, POSITIONS, parse_layers


# ---- the command
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engine-extract", description="Steering vectors from contrastive prompt pairs.")
    p.add_argument("--pairs", required=True, help="JSONL: {\"positive\": ..., \"negative\": ...} per line")
    p.add_argument("--layers", required=True, help="decoder layers: 4-12, 4,8,12 or a mix")
    p.add_argument("--method", default="mean_diff", help=f"{' | '.join(METHODS)} (default mean_diff)")
    p.add_argument("--output", required=True, help=f"vector file: {', '.join(OUTPUT_SUFFIXES)}")
    p.add_argument("--positions", default="last_prompt", choices=POSITIONS)
    p.add_argument("--model", default="embedded", help="embedded | local HF dir | file.gguf | random:<preset>")
    p.add_argument("--tokenizer", help="tokenizer.json (or its dir) to use instead of the model's")
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--max-num-seqs", type=int,
                   help="sequences decoded together (default: 512 on a GPU as memory allows, 64 on a CPU)")
    return p


def extract_main(argv: list[str] | None = None) -> int:
    """engine-extract: 0 every layer written, 1 nothing written (or the vector file only to a fallback), 3 some
    layers refused and the others written, 130 interrupted; every message is one stderr line, never a traceback."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    output = Path(args.output)
    try:
        check_output(output)
        layers = parse_layers(args.layers)
        pairs = read_pairs(Path(args.pairs))
        check_method(args.method, pairs)
        config = EngineConfig(model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device,
                              max_num_seqs=args.max_num_seqs, sampling=SamplingDefaults(max_new_tokens=1),
                              capture=CaptureDefaults(layers=layers, positions=args.positions))
        vectors, reports, refusals = extract(config, pairs, args.method)
    except (ExtractError, ConfigError, ModelNotFound, EngineError) as exc:
        say(str(exc))
        return EXIT_FATAL
    except KeyboardInterrupt:
        say("interrupted; nothing written")
        return EXIT_INTERRUPTED
    if not vectors:
        say(refused_message(refusals, 0))
        return EXIT_FATAL
    settings = {"pairs": args.pairs, "num_pairs": len(pairs), "layers": layers, "method": args.method,
                "positions": args.positions, "model": args.model, "output": str(output)}
    return save(output, vectors, settings, reports, refusals)


if __name__ == "__main__":
    sys.exit(extract_main())
