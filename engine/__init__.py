"""A steerable batch-generation engine for LLM research."""

from engine.config import CaptureDefaults, EngineConfig, SamplingDefaults, SteeringDefaults
from engine.pipeline import Engine, EngineError

__all__ = ["CaptureDefaults", "Engine", "EngineConfig", "EngineError", "SamplingDefaults", "SteeringDefaults"]
