"""engine-serve: the engine behind an OpenAI-compatible HTTP API and a playground page (the `serve` extra)."""
