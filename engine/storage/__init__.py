"""Durable files: the helpers every writer uses (files) and the rules of one engine-run output (output)."""
