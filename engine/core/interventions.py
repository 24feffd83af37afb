"""Interventions beyond adding, inside the steering hooks: projection slots (clamp, SAE features, gated terms) and
the per-token gates that switch terms on, as rows of one device table (the OpTable) that a token's op row indexes.

At a layer's output a token's op row gives, in this order:
1. gates: up to MAX_GATES probes read here, each `h . probe` against a threshold, stored per token for this and
   later layers of the same forward (gate 0 is "always");
2. slots: up to MAX_SLOTS projection ops, applied in turn, each
       p = x . a + bias;  f = p * (p > theta);  x += gate * (clip(f, lo, hi) - f) * b
   which is a clamp (a = b = the unit direction, theta = -inf: the projection set to lo = hi, or clipped into
   [lo, hi]), an SAE feature set to a value (a = its encoder column, bias its encoder bias, theta its JumpReLU
   threshold or 0 for ReLU, b its decoder row, lo = hi = the value: only the delta is added, never the SAE's
   reconstruction error), or a gated addition (a = 0, lo = hi = 1: x += gate * b).
Then the additions (engine.core.steering) follow. Before all of it, inside the layer, a row's ablations (up to
MAX_ABLATIONS directions) act at every write into the residual stream: each covered layer's attention and MLP
outputs (after the post-norms of the families that have them) and, for layer 0, the embeddings, each write w made
    w -= gate * coef * (w . d) d
for each unit direction d in turn (`ablate_write`, a custom op the compiled layers call, so one graph serves every
layer). An unused slot, gate or ablation has zero rows and open bounds, so it changes exactly nothing: tokens without
ops are left bit for bit as they were.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from engine.core.transfer import to_device

MAX_SLOTS = 4  # projection ops (clamps, SAE features, gated terms) covering one token at one layer
MAX_GATES = 2  # distinct gates (`when`) of one request
MAX_ABLATIONS = 2  # directions ablated at one layer's writes for one token
# Column layout of a row: ints [slot a, slot b, slot gate] * MAX_SLOTS, then a probe row per gate, then [direction,
# gate] per ablation; floats [bias, theta, lo, hi] * MAX_SLOTS, then (threshold, sign) per gate (sign +1 above, -1
# below, 0: no gate read here), then coef per ablation.
GATE_INTS, ABLATE_INTS = 3 * MAX_SLOTS, 3 * MAX_SLOTS + MAX_GATES
GATE_FLOATS, ABLATE_FLOATS = 4 * MAX_SLOTS, 4 * MAX_SLOTS + 2 * MAX_GATES
NUM_INTS = ABLATE_INTS + 2 * MAX_ABLATIONS
NUM_FLOATS = ABLATE_FLOATS + MAX_ABLATIONS
OPEN = (0.0, -math.inf, -math.inf, math.inf)  # an unused slot's floats: no bias, no threshold, no bounds


@dataclass(frozen=True, slots=True)
class Slot:
    """One projection op at one layer, with its vectors as table rows (0: zero) and its gate (0: always)."""

    a: int
    b: int
    bias: float = 0.0
    theta: float = -math.inf
    lo: float = -math.inf
    hi: float = math.inf
    gate: int = 0


@dataclass(frozen=True, slots=True)
class Ablation:
    """One direction ablated at a layer's writes: its unit vector's table row, the fraction removed, its gate."""

    direction: int
    coef: float = 1.0
    gate: int = 0


@dataclass(frozen=True, slots=True)
class GateRead:
    """A gate read at one layer: gate `index` (1..MAX_GATES) passes where h . table[probe] is above (sign 1) or
    below (sign -1) the threshold."""

    index: int
    probe: int
    threshold: float
    sign: float


class OpTable:
    """The device table of op rows ([C, NUM_INTS] int64 and [C, NUM_FLOATS] float32; row 0: no ops), shared by
    content, grown by reallocation (which bumps `version`: the steered graphs read the old tensors)."""

    def __init__(self, device, capacity: int = 256):
        self.device = torch.device(device)
        self.ints = torch.zeros(capacity, NUM_INTS, dtype=torch.int64, device=device)
        self.floats = torch.zeros(capacity, NUM_FLOATS, dtype=torch.float32, device=device)
        self.floats[0] = torch.tensor(_floats((), (), ()), dtype=torch.float32)
        self.num_rows = 1
        self.version = 0
        self._rows: dict[bytes, int] = {_key(*_encode((), (), ())): 0}
        self._new_rows: list[tuple[int, list, list]] = []

    def row(self, slots: tuple[Slot, ...], gates: tuple[GateRead, ...], ablations: tuple[Ablation, ...] = ()) -> int:
        """The row holding these slots, gate reads and ablations (0 when there are none)."""
        ints, floats = _encode(slots, gates, ablations)
        key = _key(ints, floats)
        if key not in self._rows:
            if self.num_rows == self.ints.shape[0]:
                self.upload_rows()
                self.ints = torch.cat([self.ints, torch.zeros_like(self.ints)])
                self.floats = torch.cat([self.floats, torch.zeros_like(self.floats)])
                self.version += 1
            self._new_rows.append((self.num_rows, ints, floats))
            self._rows[key] = self.num_rows
            self.num_rows += 1
        return self._rows[key]

    def upload_rows(self) -> None:
        """Copy the rows added since the last forward into the device tables, in one copy each."""
        if not self._new_rows:
            return
        rows = to_device([r for r, _, _ in self._new_rows], torch.int64, self.device)
        self.ints.index_copy_(0, rows, to_device([i for _, i, _ in self._new_rows], torch.int64, self.device))
        self.floats.index_copy_(0, rows, to_device([f for _, _, f in self._new_rows], torch.float32, self.device))
        self._new_rows = []


def _encode(slots: tuple[Slot, ...], gates: tuple[GateRead, ...], ablations: tuple[Ablation, ...]) -> tuple:
    ints = [0] * NUM_INTS
    for s, slot in enumerate(slots):
        ints[3 * s:3 * s + 3] = slot.a, slot.b, slot.gate
    for gate in gates:
        ints[GATE_INTS + gate.index - 1] = gate.probe
    for k, ablation in enumerate(ablations):
        ints[ABLATE_INTS + 2 * k:ABLATE_INTS + 2 * k + 2] = ablation.direction, ablation.gate
    return ints, _floats(slots, gates, ablations)


def _floats(slots, gates, ablations) -> list:
    floats = list(OPEN) * MAX_SLOTS + [0.0] * (2 * MAX_GATES + MAX_ABLATIONS)
    for s, slot in enumerate(slots):
        floats[4 * s:4 * s + 4] = slot.bias, slot.theta, slot.lo, slot.hi
    for gate in gates:
        at = GATE_FLOATS + 2 * (gate.index - 1)
        floats[at:at + 2] = gate.threshold, gate.sign
    for k, ablation in enumerate(ablations):
        floats[ABLATE_FLOATS + k] = ablation.coef
    return floats


def _key(ints: list, floats: list) -> bytes:
    return hashlib.blake2b(np.array(ints, dtype=np.int64).tobytes() + np.array(floats, dtype=np.float64).tobytes(),
                           digest_size=16).digest()


def apply_ops(hidden: torch.Tensor, op_rows: torch.Tensor, ops: OpTable, table: torch.Tensor,
              gate_state: torch.Tensor) -> torch.Tensor:
    """The residual [1, T, H] after this layer's gates and slots (float32 math, the model's dtype out); op_rows
    [1, T] index `ops`, whose vector columns index `table` (float32 rows); gate_state [1, T, 1 + MAX_GATES] holds
    the gates of this forward (column 0 is 1: "always"), written here where a row reads one. On CUDA one Triton
    kernel (engine.core.kernels.interventions) does the same."""
    if hidden.is_cuda:
        from engine.core.kernels.interventions import apply_ops_cuda

        return apply_ops_cuda(hidden, op_rows, ops.ints, ops.floats, table, gate_state, MAX_SLOTS, MAX_GATES)
    ints, floats = ops.ints[op_rows], ops.floats[op_rows]  # [1, T, NUM_INTS], [1, T, NUM_FLOATS]
    x = hidden.float()
    for g in range(MAX_GATES):
        at = GATE_FLOATS + 2 * g
        threshold, sign = floats[..., at], floats[..., at + 1]
        projection = (x * table[ints[..., GATE_INTS + g]]).sum(-1)
        passed = ((projection - threshold) * sign > 0).float()
        gate_state[..., g + 1] = torch.where(sign != 0, passed, gate_state[..., g + 1])
    for s in range(MAX_SLOTS):
        bias, theta, lo, hi = (floats[..., 4 * s + k] for k in range(4))
        p = (x * table[ints[..., 3 * s]]).sum(-1) + bias
        f = p * (p > theta)
        on = gate_state.gather(-1, ints[..., 3 * s + 2, None])[..., 0]
        x = x + (on * (torch.clamp(f, lo, hi) - f))[..., None] * table[ints[..., 3 * s + 1]]
    return x.to(hidden.dtype)


def ablate(write: torch.Tensor, op_rows: torch.Tensor, ops: OpTable, table: torch.Tensor,
           gate_state: torch.Tensor) -> None:
    """Remove the rows' ablated directions from one write into the residual stream [1, T, H], in place (float32
    math; a token with no ablation gets `- 0`, which leaves it bit for bit). On CUDA one Triton kernel."""
    if write.is_cuda and write.stride(-1) == 1 and write.dim() == 3 and write.shape[0] == 1:
        from engine.core.kernels.interventions import ablate_cuda

        ablate_cuda(write, op_rows, ops.ints, ops.floats, table, gate_state,
                    (ABLATE_INTS, ABLATE_FLOATS, MAX_ABLATIONS))
        return
    ints = ops.ints[op_rows][..., ABLATE_INTS:]  # [1, T, 2 * MAX_ABLATIONS]
    coefs = ops.floats[op_rows][..., ABLATE_FLOATS:]  # [1, T, MAX_ABLATIONS]
    x = write.float()
    for k in range(MAX_ABLATIONS):
        direction = table[ints[..., 2 * k]]
        on = gate_state.gather(-1, ints[..., 2 * k + 1, None])[..., 0]
        x = x - (on * coefs[..., k] * (x * direction).sum(-1))[..., None] * direction
    write.copy_(x.to(write.dtype))


# The steering tables whose layers' write hooks call ablate_write: id -> table (engine.core.steering registers it;
# more than one in a process where tests build several engines).
ABLATING: dict[int, object] = {}


@torch.library.custom_op("engine::ablate_write", mutates_args=("write",))
def ablate_write(write: torch.Tensor, where: torch.Tensor) -> None:
    """Ablate the current forward's directions from `write` in place; `where` is the write's module's CPU buffer
    [table id, layer]. Opaque to torch.compile, so the one compiled graph of every decoder layer calls it with that
    layer's buffer (a Python int would be a constant, and a graph per layer), and it reads the forward's op rows when
    it runs (in a captured decode graph: the static KV-row buffers)."""
    table_id, layer = where.tolist()
    table = ABLATING.get(table_id)
    if table is not None:
        table.ablate_write(write, layer)


@ablate_write.register_fake
def _(write: torch.Tensor, where: torch.Tensor) -> None:
    return None
