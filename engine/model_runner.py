"""ModelRunner: runs an unmodified Hugging Face causal LM over the scheduler's batches.

This first runner keeps one left-padded DynamicCache for the running cohort and drops the rows of finished
sequences from it. Steering is handed to the SteeringTable as per-token (row, coef) tensors per forward.
"""

from __future__ import annotations

import inspect

import torch

from engine.sampler import Sampler, SamplingParams
from engine.scheduler import ScheduledBatch, Sequence
from engine.steering import SteeringTable, coef_mask


class ModelRunner:
    """Prefill and decode steps for the running batch; returns next tokens on the device."""

    def __init__(self, model, steering: SteeringTable, pad_id: int):
        self.model = model
        self.steering = steering
        self.pad_id = pad_id
        self.device = next(model.parameters()).device
        params = inspect.signature(model.forward).parameters
        # transformers renamed past_key_values to cache in 5.2x; support both.
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.sampler = Sampler()
        self.rows: list[Sequence] = []
        self.cache = None
        self.mask = None
        self.lengths = None
        self.params: SamplingParams | None = None

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch, last_tokens: torch.Tensor | None) -> torch.Tensor:
        """Last-position logits [B, V] of each row: the prompt's for a prefill, the new token's for a decode."""
        return self._prefill(batch.seqs) if batch.is_prefill else self._decode(batch.seqs, last_tokens)

    @torch.inference_mode()
    def step(self, batch: ScheduledBatch, last_tokens: torch.Tensor | None) -> torch.Tensor:
        logits = self.forward(batch, last_tokens)
        steps = torch.tensor([len(s.output_ids) for s in batch.seqs], dtype=torch.int64, device=self.device)
        return self.sampler(logits.float(), self.params, steps)

    def _forward(self, input_ids, position_ids) -> torch.Tensor:
        from transformers import DynamicCache

        if self.cache is None:
            self.cache = DynamicCache(config=self.model.config)
        kwargs = {self.cache_arg: self.cache}
        out = self.model(
            input_ids=input_ids, attention_mask=self.mask, position_ids=position_ids, use_cache=True,
            logits_to_keep=1, **kwargs,
        )
        self.steering.set_inputs({})
        return out.logits[:, -1, :]

    def _prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(s.num_prompt_tokens for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.int64, device=self.device)
        self.mask = torch.zeros((len(seqs), width), dtype=torch.int64, device=self.device)
        for i, seq in enumerate(seqs):
            ids[i, width - seq.num_prompt_tokens:] = seq.prompt_ids
            self.mask[i, width - seq.num_prompt_tokens:] = 1
        positions = (self.mask.cumsum(-1) - 1).clamp_min(0)
        self.rows, self.cache = list(seqs), None
        self.lengths = torch.tensor([s.num_prompt_tokens for s in seqs], dtype=torch.int64, device=self.device)
        self.params = SamplingParams.build([s.sampling_row for s in seqs], self.device)
        self.steering.set_inputs(self._steer_inputs(seqs, self.mask.bool(), is_prompt=True))
        return self._forward(ids, positions)

    def _decode(self, seqs: list[Sequence], tokens: torch.Tensor) -> torch.Tensor:
        if len(seqs) != len(self.rows):
            self._keep(seqs)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        positions = self.lengths[:, None].clone()
        self.lengths += 1
        ones = torch.ones((len(seqs), 1), dtype=torch.bool, device=self.device)
        self.steering.set_inputs(self._steer_inputs(seqs, ones, is_prompt=False))
        return self._forward(tokens[:, None], positions)

    def _keep(self, seqs: list[Sequence]) -> None:
        """Drop the cache rows of sequences that left the batch."""
        where = {id(s): i for i, s in enumerate(self.rows)}
        keep = torch.tensor([where[id(s)] for s in seqs], dtype=torch.int64, device=self.device)
        self.cache.batch_select_indices(keep)
        self.mask, self.lengths = self.mask[keep], self.lengths[keep]
        self.rows = list(seqs)
        self.params = SamplingParams.build([s.sampling_row for s in seqs], self.device)

    def _steer_inputs(self, seqs: list[Sequence], token_mask: torch.Tensor, is_prompt: bool) -> dict:
        """Per steered layer: (row index [B, T], coef [B, T]); zero where a token is not steered."""
        layers = {layer for s in seqs for layer in s.steer_rows}
        inputs = {}
        for layer in layers:
            row_ids, coefs = [], []
            for seq in seqs:
                on = layer in seq.steer_rows and coef_mask(seq.steer_positions, is_prompt)
                row_ids.append(seq.steer_rows[layer] if on else 0)
                coefs.append(seq.steer_coef if on else 0.0)
            rows = torch.tensor(row_ids, dtype=torch.int64, device=self.device)[:, None] * token_mask
            coef = torch.tensor(coefs, dtype=torch.float32, device=self.device)[:, None] * token_mask
            inputs[layer] = (rows, coef)
        return inputs
