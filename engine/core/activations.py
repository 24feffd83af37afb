"""Activations: the ActivationRecorder that captures hidden states inside the engine's own forwards (the
ActivationStore in engine.storage.activations writes them beside the results, and its `load` reads them back).

What is captured is the output of decoder layer L: the residual stream after layer L, the tensor Hugging Face
returns as hidden_states[L + 1] (for the last layer HF returns the final-normed state instead; the engine still
gives the layer's output). By default after steering at that layer; with is_before_steering, before it.
Positions, per request:
  last_prompt  [H]     the last prompt token
  mean_prompt  [H]     the mean over the prompt tokens
  all_prompt   [T, H]  every prompt token
  generated    [N-1, H] row k is the residual at generated token k's own position T + k: the decode forward that
                       *consumes* token k (and samples token k + 1), as a forward over prompt + completion gives
                       it, and as steering counts `generated` positions. The last of the N completion tokens is
                       never fed back, so it has no row; the residual that produced token 0 is last_prompt.
With an SAE (`capture.sae`), the same positions of the SAE's layer are also encoded on the device, in the step that
captured them (engine.core.sae_capture), and kept as the top_k largest feature activations per position (values in
the capture dtype, largest first) and their feature indices (int32): [top_k] for the one-row modes, [T, top_k] /
[N-1, top_k] for the others (mean_prompt encodes the mean residual).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from engine.config import CaptureDefaults
from engine.pipeline.request import RecordError
from engine.specs import CaptureSpec
from engine.models import decoder_layers
from engine.core.sae_capture import SaeEncoder
from engine.core.transfer import to_device


@dataclass(slots=True)
class _Capture:
    """One request's capture settings and what has been read back to the host so far."""

    layers: list[int]
    positions: str
    columns: list[tuple[int, int]] = field(default_factory=list)  # generated: (layer, column of the decode buffer)
    prompt: dict[int, np.ndarray] = field(default_factory=dict)  # prompt modes: layer -> [H] or [T, H]
    rows: list[np.ndarray] = field(default_factory=list)  # generated: one [layers, H] per consumed token
    sae: SaeEncoder | None = None  # with an SAE: its encoder, the layer it reads, and how many features are kept
    sae_layer: int = -1
    top_k: int = 0
    features: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (values, indices) per step or prefill


class ActivationRecorder:
    """Forward hooks on every decoder layer, armed per forward for the layers requests capture: prefill reduces on
    the device into per-request tensors; decode writes every running KV row into a static [num_kv_rows, num_layers, H]
    buffer (read inside the CUDA graphs), whose captured layers the core copies to pinned host memory with the
    step's tokens, one step ahead.

    The hooks exist from the start and the decode buffer, made when a request first captures generated tokens, has
    a column for every layer; a CUDA graph of a capturing decode step writes them all. So a request capturing a
    layer no earlier one did needs no new hook and no re-capture (`graph_key` only says whether a step captures).
    """

    def __init__(self, model, steering, device, num_kv_rows: int, capture: CaptureDefaults):
        self.layers = decoder_layers(model)
        self.num_layers = len(self.layers)
        self.hidden_size = model.config.get_text_config().hidden_size
        self.steering, self.device, self.num_kv_rows = steering, torch.device(device), num_kv_rows
        self.model_dtype = next(model.parameters()).dtype
        self.dtype_name = capture.dtype
        self.dtype = getattr(torch, capture.dtype)
        self.is_before_steering = capture.is_before_steering
        self.requests: dict[int, _Capture] = {}  # Sequence.index -> its capture
        self.prefill = PrefillCapture(self.device, self.dtype)
        self.decode = DecodeCapture(num_kv_rows, self.num_layers, self.hidden_size, self.dtype, self.device)
        self._active: dict[int, partial] = {}  # layer -> what the hook does in the running forward
        self._encoders: dict[int, SaeEncoder] = {}  # id(Sae) -> its encoder on the device (the Sae kept inside)
        for index, layer in enumerate(self.layers):
            handle = layer.register_forward_hook(self._make_hook(index))
            if self.is_before_steering:  # ahead of the steering hooks (which the SteeringTable registered first)
                layer._forward_hooks.move_to_end(handle.id, last=False)

    # ---- requests
    def register(self, index: int, spec: CaptureSpec | None) -> None:
        """Capture for one request (its parsed `capture`; None: nothing); RecordError if a layer is out of range."""
        if spec is None:
            return
        bad = [layer for layer in spec.layers if not 0 <= layer < self.num_layers]
        if bad:
            raise RecordError(f"capture layer(s) {bad} out of range; the model has layers 0..{self.num_layers - 1}")
        capture = _Capture(list(spec.layers), spec.positions)
        if spec.sae is not None:
            capture.sae, capture.top_k = self._encoder(spec), spec.top_k
            capture.sae_layer = self._sae_layer(spec, capture.sae)
        if capture.positions == "generated":
            capture.columns = [(layer, self.decode.column(layer)) for layer in capture.layers]
            if capture.sae is not None:
                self.decode.column(capture.sae_layer)  # written by eager decode steps too
        self.requests[index] = capture

    def _encoder(self, spec: CaptureSpec) -> SaeEncoder:
        """The device encoder of the capture's SAE (read through the steering resolver's file cache)."""
        sae = self.steering.resolver.sae(spec.sae)
        if spec.top_k > sae.d_sae:
            raise RecordError(f"capture.top_k is {spec.top_k}, but SAE {spec.sae} has {sae.d_sae} features")
        if id(sae) not in self._encoders:
            self._encoders = {key: e for key, e in self._encoders.items() if e.sae.path != sae.path}  # a rewritten file
            # on a GPU in the model's dtype (float32 on the CPU, where a bfloat16 matmul is slow)
            dtype = self.model_dtype if self.device.type == "cuda" else torch.float32
            self._encoders[id(sae)] = SaeEncoder(sae, self.device, dtype)
        return self._encoders[id(sae)]

    def _sae_layer(self, spec: CaptureSpec, encoder: SaeEncoder) -> int:
        from engine.saes import sae_layer_or_error

        layer = sae_layer_or_error(encoder.sae, spec.sae_layer)
        if not 0 <= layer < self.num_layers:
            raise RecordError(f"capture.layer {layer} out of range; the model has layers 0..{self.num_layers - 1}")
        return layer

    def pop(self, index: int) -> dict | None:
        """A finished request's activations as a message: {positions, dtype, is_before_steering,
        layers: {layer: [shape, raw bytes]}}; None if it captured nothing."""
        capture = self.requests.pop(index, None)
        if capture is None:
            return None
        arrays = capture.prompt
        if capture.positions == "generated":
            rows = np.stack(capture.rows, axis=1) if capture.rows else self._empty_rows(len(capture.layers))
            arrays = dict(zip(capture.layers, rows))
        message = {"positions": capture.positions, "dtype": self.dtype_name,
                   "is_before_steering": self.is_before_steering,
                   "layers": {layer: [list(a.shape), a.tobytes()] for layer, a in arrays.items()}}
        if capture.sae is not None:
            message["sae"] = {capture.sae_layer: self._features(capture)}
        return message

    def _features(self, capture: _Capture) -> dict:
        """The SAE features' message: values and indices, each [shape, raw bytes]."""
        if capture.positions == "generated":
            empty = (_numpy(torch.empty(0, capture.top_k, dtype=self.dtype)), np.empty((0, capture.top_k), np.int32))
            values, indices = (np.stack(part) for part in zip(*capture.features)) if capture.features else empty
        else:
            values, indices = capture.features[0]
        return {"values": [list(values.shape), values.tobytes()], "indices": [list(indices.shape), indices.tobytes()]}

    def _empty_rows(self, num_layers: int) -> np.ndarray:
        return _numpy(torch.empty(num_layers, 0, self.hidden_size, dtype=self.dtype))

    # ---- hooks
    def _make_hook(self, layer: int):
        def hook(module, args, output):
            write = self._active.get(layer)
            if write is not None:  # transformers 5 decoder layers return a Tensor, older ones a tuple
                write(output[0] if isinstance(output, tuple) else output)

        return hook

    def graph_key(self, batch) -> bool:
        """Whether a decode step captures (any of its sequences records generated tokens): part of its graph's key."""
        return any(self._generated(s.index) for s in batch.seqs)

    def stop(self) -> None:
        self._active = {}

    # ---- the forwards: arm the hooks
    def start_prefill(self, seqs, starts, owner: torch.Tensor) -> None:
        """Arm the hooks for a packed prefill: sequence j's prompt is columns starts[j]:starts[j + 1] of the one
        row, and owner [N] holds each column's j."""
        active = self.prefill.start(seqs, starts, owner, self.requests)
        if active is not None:
            self._active = active

    def start_decode(self, num_rows: int, is_capturing: bool, is_graph: bool) -> None:
        """Arm the hooks to write the first num_rows KV rows into the decode buffer: in a captured graph every layer's
        column (see the class doc), else the captured layers' only; nothing for a step that captures nothing."""
        if not is_capturing:
            return
        layers = range(self.num_layers) if is_graph else self.decode.generated_layers
        self._active = {layer: partial(self.decode.write, num_rows, layer) for layer in layers}

    # ---- to the host, one step ahead
    def stage(self, batch) -> tuple | None:
        """Start the copies of a launched step's captures into pinned host memory (no wait); None if none."""
        if batch.is_prefill:
            return self.prefill.stage()
        if not any(self._generated(s.index) for s in batch.seqs):
            return None
        return self.decode.stage(batch.num_rows), None, self._stage_features(batch)

    def _stage_features(self, batch) -> list:
        """A decode step's SAE features, per encoder and layer: the KV rows of the sequences that capture them
        encoded on the device (top-k of the largest top_k asked), copied to pinned host memory (no wait)."""
        groups: dict[tuple, list] = defaultdict(list)
        for seq in batch.seqs:
            capture = self.requests.get(seq.index)
            if capture is not None and capture.sae is not None and capture.positions == "generated":
                groups[id(capture.sae), capture.sae_layer].append((seq, capture))
        staged = []
        for (_, layer), members in groups.items():
            rows = to_device([seq.row for seq, _ in members], torch.int64, self.device)
            encoder = members[0][1].sae
            values, indices = encoder.top(self.decode.buffer[:, layer].index_select(0, rows),
                                          max(capture.top_k for _, capture in members))
            pin = self.device.type == "cuda"
            host = (torch.empty(values.shape, dtype=self.dtype, pin_memory=pin),
                    torch.empty(indices.shape, dtype=torch.int32, pin_memory=pin))
            host[0].copy_(values.to(self.dtype), non_blocking=True)
            host[1].copy_(indices, non_blocking=True)
            staged.append(([seq.index for seq, _ in members], host))
        return staged

    def _generated(self, index: int) -> bool:
        capture = self.requests.get(index)
        return capture is not None and capture.positions == "generated"

    def collect(self, batch, staged: tuple | None) -> None:
        """After the step's copy is done: hand each live sequence its values (before its new token is appended)."""
        if staged is None:
            return
        host, shapes, extra = staged
        values = _numpy(host)
        if shapes is not None:
            self.prefill.collect(values, shapes, self.requests, None if extra is None else extra.numpy())
            return
        live = set()
        for seq in batch.seqs:  # a sequence that already ended (EOS read late) gets nothing, as it gets no token
            capture = self.requests.get(seq.index)
            if seq.finish_reason is None and capture is not None:
                live.add(seq.index)
                if capture.columns:
                    capture.rows.append(values[seq.row, [column for _, column in capture.columns]])
        for indices, (host_values, host_indices) in extra:
            features, feature_ids = _numpy(host_values), host_indices.numpy()
            for i, index in enumerate(indices):
                if index in live:
                    capture = self.requests[index]
                    capture.features.append((features[i, :capture.top_k].copy(), feature_ids[i, :capture.top_k].copy()))


class PrefillCapture:
    """A packed prefill's prompt captures (last_prompt, mean_prompt, all_prompt), reduced on the device into
    per-request tensors and copied to the host in one pinned copy."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self._pending: list[tuple[int, int, torch.Tensor]] = []  # the last prefill's (index, layer, device tensor)
        self._features: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # its SAE (index, values, indices)

    def start(self, seqs, starts, owner: torch.Tensor, requests: dict[int, _Capture]) -> dict[int, partial] | None:
        """What the hooks do in a packed prefill (see ActivationRecorder.start_prefill): layer -> its reduction;
        None when no sequence captures prompt positions."""
        self._pending, self._features = [], []
        by_layer: dict[int, list[tuple[int, int, str, SaeEncoder | None]]] = defaultdict(list)
        for j, seq in enumerate(seqs):
            capture = requests.get(seq.index)
            if capture is None or capture.positions == "generated":  # generated rows come from the decode steps
                continue
            for layer in capture.layers:
                by_layer[layer].append((j, seq.index, capture.positions, None))
            if capture.sae is not None:
                by_layer[capture.sae_layer].append((j, seq.index, capture.positions, capture))
        if not by_layer:
            return None
        spans = (starts, owner, len(seqs))
        return {layer: partial(self._reduce, layer, items, spans) for layer, items in by_layer.items()}

    def _reduce(self, layer: int, items: list, spans: tuple, hidden: torch.Tensor) -> None:
        """The layer's output reduced per item (index, mode): the row(s) kept as they are, or SAE-encoded."""
        starts, owner, num_seqs = spans
        tokens = hidden[0]
        last = [(j, item) for j, *item in items if item[1] == "last_prompt"]
        if last:
            self._keep(layer, last, tokens[to_device([starts[j + 1] - 1 for j, _ in last], torch.int64, self.device)])
        mean = [(j, item) for j, *item in items if item[1] == "mean_prompt"]
        if mean:  # every prompt's sum in one index_add, then the wanted ones
            sums = torch.zeros(num_seqs, tokens.shape[-1], dtype=torch.float32, device=tokens.device)
            sums.index_add_(0, owner, tokens.float())
            count = to_device([starts[j + 1] - starts[j] for j, _ in mean], torch.float32, self.device)
            self._keep(layer, mean, sums[self._rows(mean)] / count[:, None])
        for j, index, mode, capture in items:
            if mode == "all_prompt":
                values = tokens[starts[j]:starts[j + 1]]
                if capture is None:
                    self._pending.append((index, layer, values.to(self.dtype)))
                else:
                    self._encode(index, capture, values)

    def _rows(self, items: list) -> torch.Tensor:
        return to_device([row for row, _ in items], torch.int64, self.device)

    def _keep(self, layer: int, items: list, values: torch.Tensor) -> None:
        """One row per item: kept (a hidden-state capture) or encoded (an SAE's, its item's capture given)."""
        for i, (_, (index, _, capture)) in enumerate(items):
            if capture is None:
                self._pending.append((index, layer, values[i].to(self.dtype)))
            else:
                self._encode(index, capture, values[i:i + 1], squeeze=True)

    def _encode(self, index: int, capture: _Capture, rows: torch.Tensor, squeeze: bool = False) -> None:
        values, indices = capture.sae.top(rows, capture.top_k)
        if squeeze:
            values, indices = values[0], indices[0]
        self._features.append((index, values.to(self.dtype), indices))

    def stage(self) -> tuple | None:
        """Start the copy of the last prefill's captures into pinned host memory (no wait): (host, their
        (index, layer, shape), the SAE features' int32 indices host copy); None if none. SAE values travel in the
        capture dtype with the hidden states, under layer None."""
        pending, self._pending = self._pending, []
        features, self._features = self._features, []
        pending += [(index, None, values) for index, values, _ in features]
        if not pending:
            return None
        flat = torch.cat([t.reshape(-1) for _, _, t in pending])
        host = torch.empty(flat.shape, dtype=self.dtype, pin_memory=flat.is_cuda)
        host.copy_(flat, non_blocking=True)
        indices = None
        if features:
            ints = torch.cat([i.reshape(-1) for _, _, i in features])
            indices = torch.empty(ints.shape, dtype=torch.int32, pin_memory=ints.is_cuda)
            indices.copy_(ints, non_blocking=True)
        return host, [(index, layer, tuple(t.shape)) for index, layer, t in pending], indices

    def collect(self, flat: np.ndarray, shapes: list, requests: dict[int, _Capture],
                indices: np.ndarray | None) -> None:
        """Hand each request its prompt values from the staged copy (`flat`, read as numpy), and its SAE features
        (values under layer None, their indices from `indices` in the same order)."""
        offset, at = 0, 0
        for index, layer, shape in shapes:
            size = math.prod(shape)
            value = flat[offset:offset + size].reshape(shape).copy()
            offset += size
            capture = requests.get(index)  # None: cancelled since its prefill was launched
            if layer is not None:
                if capture is not None:
                    capture.prompt[layer] = value
            else:
                if capture is not None:
                    capture.features.append((value, indices[at:at + size].reshape(shape).copy()))
                at += size


class DecodeCapture:
    """The decode buffer: every running KV row's layer outputs, written by the hooks into a static
    [num_kv_rows, num_layers, H] tensor (read inside the CUDA graphs), and the captured layers' pinned host copies."""

    def __init__(self, num_kv_rows: int, num_layers: int, hidden_size: int, dtype: torch.dtype, device: torch.device):
        self.num_kv_rows, self.num_layers, self.hidden_size = num_kv_rows, num_layers, hidden_size
        self.dtype, self.device = dtype, device
        self.generated_layers: list[int] = []  # layers captured at generated positions, first use first
        self.buffer: torch.Tensor | None = None  # [num_kv_rows, num_layers, H], made on first need
        self._columns: torch.Tensor | None = None  # generated_layers on the device, for the copy to the host
        self._host: list[torch.Tensor] = []  # two pinned [num_kv_rows, len(generated_layers), H] copies, used in turn
        self._flip = 0

    def column(self, layer: int) -> int:
        """The column of `layer` in the host copy of a decode step (stable: layers are only appended)."""
        if self.buffer is None:
            self.buffer = torch.zeros(self.num_kv_rows, self.num_layers, self.hidden_size, dtype=self.dtype,
                                      device=self.device)
        if layer not in self.generated_layers:
            self.generated_layers.append(layer)
            self._columns = to_device(self.generated_layers, torch.int64, self.device)  # no host sync
            shape = (self.num_kv_rows, len(self.generated_layers), self.hidden_size)
            pin = self.device.type == "cuda"
            self._host = [torch.zeros(shape, dtype=self.dtype, pin_memory=pin) for _ in range(2)]
        return self.generated_layers.index(layer)

    def write(self, num_rows: int, layer: int, hidden: torch.Tensor) -> None:
        """The hook's write in a decode step: the first num_rows KV rows' output of `layer`."""
        self.buffer[:num_rows, layer].copy_(hidden[0])  # decode: the B tokens packed in one row

    def stage(self, num_rows: int) -> torch.Tensor:
        """Start the copy of the first num_rows KV rows' captured layers into the next pinned host copy (no wait)."""
        host = self._host[self._flip][:num_rows]
        self._flip ^= 1
        host.copy_(self.buffer[:num_rows].index_select(1, self._columns), non_blocking=True)
        return host


def _numpy(host: torch.Tensor) -> np.ndarray:
    """A host tensor as numpy; bfloat16 (which numpy lacks) as its raw 16-bit words."""
    return (host.view(torch.int16) if host.dtype == torch.bfloat16 else host).numpy()
