"""engine-extract: steering vectors from contrastive prompt pairs, through the engine's activation capture (cli is
the command; pairs, directions and output its steps; spec its terms)."""
