"""What crosses from the engine to its caller and its writer: Outcome, one input item's end. (The messages between
processes are still dict literals with a "t" kind; DESIGN.md's Layout has them typed here.)"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Outcome:
    """One input item's end: its position in the input and its output record (a result or an error)."""

    position: int
    record: dict
    is_error: bool
    activations: dict | None = None  # captured activations as the core sent them (engine.core.activations.tensors_of)
