"""Admission: a tokenized request becomes a Sequence queued on the scheduler, or that request's RecordError."""

from __future__ import annotations

import logging

import torch

from engine.core.activations import ActivationRecorder
from engine.core.faults import is_device_error
from engine.core.lora import LoraTable
from engine.core.scheduler import Scheduler, Sequence
from engine.core.steering import SteeringTable
from engine.messages import CoreRequest
from engine.pipeline.request import RecordError

log = logging.getLogger("engine")


class Admission:
    """Queues requests as Sequences with their steering resolved and their capture registered, all or nothing."""

    def __init__(self, steering: SteeringTable, recorder: ActivationRecorder, lora: LoraTable):
        self.steering, self.recorder, self.lora = steering, recorder, lora
        self._is_unexpected_logged = False  # whether an admission error other than RecordError has been logged

    def add(self, request: CoreRequest, prompt_ids: torch.Tensor, scheduler: Scheduler) -> Sequence:
        """Queue one request as a Sequence (returned), or raise RecordError and keep nothing of it: whatever goes
        wrong while admitting one request (its steering or capture, an unreadable vector file) is that request's
        error, not the core's.
        Errors that may leave the device unusable (out of memory, CUDA errors: `is_device_error`) propagate, so
        the core dies of them loudly instead of running on a poisoned device."""
        try:
            return self._add(request, prompt_ids, scheduler)
        except RecordError:
            raise
        except Exception as exc:  # a record is the unit of failure; device errors are re-raised below
            if is_device_error(exc):
                raise
            self._log_unexpected(request, exc)
            raise RecordError(f"could not admit this record: {type(exc).__name__}: {exc}") from exc

    def _add(self, request: CoreRequest, prompt_ids: torch.Tensor, scheduler: Scheduler) -> Sequence:
        # What resolve leaves behind if it fails half-way is shared by content, not owned by the request (cached
        # vector files and specs, table rows, hooks on layers that add zero to unsteered rows), so it is harmless.
        problem = self.lora.check(request.adapter)
        if problem is not None:
            raise RecordError(problem)
        plan = self.steering.resolve(request.steering, int(prompt_ids.shape[0]))
        seq = Sequence(
            index=request.index, prompt_ids=prompt_ids, max_new_tokens=request.max_new_tokens,
            temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
            seed=request.seed, ignore_eos=request.ignore_eos, stop=request.stop, steering=plan,
            num_streamed=0 if request.stream else -1, num_logprobs=request.logprobs,
            num_prompt_logprobs=request.prompt_logprobs,
            adapter=request.adapter,
        )
        # The capture is registered last, when nothing after it can fail, so a refused request leaves none behind
        # (register itself checks every layer before it keeps anything).
        self.recorder.register(seq.index, request.capture)
        scheduler.add(seq)
        return seq

    def _log_unexpected(self, request: CoreRequest, exc: Exception) -> None:
        """Log the first unexpected admission error with its traceback: an engine bug stays visible, once."""
        if self._is_unexpected_logged:
            return
        self._is_unexpected_logged = True
        log.warning("request %s could not be admitted (%s: %s); it becomes that record's error, and later such "
                    "errors are not logged", request.index, type(exc).__name__, exc, exc_info=exc)
