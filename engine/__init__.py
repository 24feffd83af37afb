"""A steerable batch-generation engine for LLM research."""

from engine.config import EngineConfig, SamplingDefaults, SteeringDefaults
from engine.pipeline import Engine, EngineError

__all__ = ["Engine", "EngineConfig", "EngineError", "SamplingDefaults", "SteeringDefaults"]
