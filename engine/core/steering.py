"""Steering: the SteeringTable that adds per-request vectors inside the decoder layers (the host side that resolves
specs to table rows: engine.core.steering_plan; vector files: engine.vectors).

The table holds every loaded vector in one device tensor whose row 0 is zero. For each forward, each steered
layer gets a per-token row index; its hook adds `table[row]` to the layer's output (the residual stream after
layer L). Unsteered tokens point at row 0, so they get exactly zero added.

A token's row is the sum, coefficients included, of the terms whose positions cover it. Layers where some term
uses norm_match or normalize get a second per-token row, scaled by the residual's norm h (float32) before it is
added, and a flag: h' = h + a + ||h|| b, then h' *= ||h|| / ||h'|| where any covering term has normalize. Other
layers keep the single gather-add (of the rows cast once to the model's dtype: the same numbers as casting each
gathered row).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from engine.models import decoder_layers, residual_writes
from engine.specs import SteeringSpec
from engine.core.interventions import ABLATING, MAX_GATES, OpTable, ablate, ablate_write, apply_ops
from engine.core.steering_plan import UNSTEERED, LayerRows, SteeringResolver, SteerPlan, VectorTable
from engine.core.transfer import to_device


class SteeringTable:
    """Device table of loaded vectors plus per-layer row inputs read by forward hooks.

    Every decoder layer is hooked from the start, so no request adds a hook mid-run. The runner's CUDA graphs of
    steered decode steps run every layer's gather-add (row 0 adds exactly zero), so whichever layers a later request
    steers, those graphs already do it; eager forwards (prefill, CPU) run only the layers some request has steered.
    The graphs' other inputs: the table, preallocated and grown only by reallocation, which bumps `version` (the
    runner drops the steered graphs then), and the set of layers whose hook also does norm_match / normalize
    (`graph_key`). The decode inputs per KV row (the KV-row buffers, of table rows) are [num_layers, num_kv_rows]
    device buffers written between steps.

    Its parts: `vectors` (the VectorTable), `resolver` (spec -> SteerPlan) and `kv_buffers` (KVRowBuffers).
    """

    def __init__(self, model, device, num_kv_rows: int, capacity: int = 1024):
        self.layers = decoder_layers(model)
        self.num_layers = len(self.layers)
        self.hidden_size = model.config.get_text_config().hidden_size
        self.device = torch.device(device)
        self.vectors = VectorTable(self.hidden_size, device, capacity, next(model.parameters()).dtype)
        self.ops = OpTable(device)
        self.kv_buffers = KVRowBuffers(self.num_layers, num_kv_rows, device)
        self.num_kv_rows = num_kv_rows
        self.used: list[int] = []  # layers some request has steered (what eager forwards run), in first-use order
        self.norm_layers: set[int] = set()  # layers whose hook also does norm_match / normalize
        self.has_ops = False  # whether some request has used a clamp, an SAE value or a gate (the hooks apply ops)
        self.has_ablate = False  # whether some request has ablated a direction (the write hooks ablate)
        self.resolver = SteeringResolver(self.vectors, self.ops, self.num_layers, self.hidden_size,
                                         self.mark_steered)
        self.active: dict[int, tuple] = {}
        for layer in range(self.num_layers):
            # prepend: runs before transformers' own output-capture hooks, so captured states include steering.
            self.layers[layer].register_forward_hook(self._make_hook(layer), prepend=True)
        # Every residual write calls the ablate_write op through one shared hook, with its module's [table, layer]
        # buffer: the hooks run inside the compiled layers, which then stay one graph for every layer.
        ABLATING[id(self)] = self
        embeddings = model.get_input_embeddings()
        for layer, module in [(0, embeddings), *((layer, module) for layer in range(self.num_layers)
                                                 for module in residual_writes(self.layers[layer]))]:
            module.register_buffer("engine_write", torch.tensor([id(self), layer]), persistent=False)
            module.register_forward_hook(_ablate_hook)

    @property
    def version(self) -> int:
        """The vector and op tables' reallocation count: the steered graphs read the tables as they were captured."""
        return self.vectors.version + self.ops.version

    def graph_key(self, is_steered: bool) -> tuple | None:
        """What a captured decode step's steering depends on besides the KV-row buffers: None for a step where no
        sequence is steered (no steering op is captured), else the tables' version, the norm-aware layers and
        whether the hooks apply ops and ablations (a new key, captured on first use: no graph is captured again)."""
        return (self.version, (tuple(sorted(self.norm_layers)), self.has_ops, self.has_ablate)) if is_steered else None

    def resolve(self, spec: SteeringSpec | None, num_prompt_tokens: int) -> SteerPlan | None:
        """A request's steering spec -> its SteerPlan (None: unsteered); RecordError if it cannot apply (the
        resolver's `resolve`; it marks the layers the spec steers)."""
        return self.resolver.resolve(spec, num_prompt_tokens)

    def mark_steered(self, layer: int, uses_norm: bool, uses_ops: bool = False, uses_ablate: bool = False) -> None:
        """Mark `layer` steered (its hook already exists), norm-aware if a term there needs it, the hooks
        op-applying once any term uses ops, and the write hooks ablating once any term ablates."""
        if layer not in self.used:
            self.used.append(layer)
        if uses_norm:
            self.norm_layers.add(layer)
        self.has_ops = self.has_ops or uses_ops
        self.has_ablate = self.has_ablate or uses_ablate

    @property
    def has_op_rows(self) -> bool:
        """Whether the forwards carry op rows (some request has used ops or ablations)."""
        return self.has_ops or self.has_ablate

    def ablate_write(self, write: torch.Tensor, layer: int) -> None:
        """A write into the residual stream at `layer` (the embeddings count as layer 0's): its tokens' ablated
        directions removed in place (engine.core.interventions.ablate), when some request has ablated."""
        inputs = self.active.get(layer)
        if self.has_ablate and inputs is not None and inputs.ops is not None:
            ablate(write, inputs.ops, self.ops, self.vectors.table, inputs.gates)

    def _make_hook(self, layer: int):
        def hook(module, args, output):
            inputs = self.active.get(layer)
            if inputs is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            vectors = self.vectors
            rows = vectors.cast if vectors.cast.dtype == hidden.dtype else vectors.table
            base = hidden if inputs.ops is None or not self.has_ops else apply_ops(hidden, inputs.ops, self.ops,
                                                                                   vectors.table, inputs.gates)
            steered = base + rows[inputs.plain].to(hidden.dtype)  # row 0 is zero: unsteered tokens get +0
            if layer in self.norm_layers:
                steered = self._norm_terms(hidden, steered, inputs.matched, inputs.normalize)
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        return hook

    def _norm_terms(self, hidden, steered, matched, normalize):
        """Add ||h|| * table[matched], then rescale to ||h|| where `normalize`, in float32 (h: the residual before
        steering). Tokens with neither keep `steered` bit for bit."""
        norm = hidden.float().norm(dim=-1, keepdim=True)
        out = steered.float() + norm * self.vectors.table[matched]
        scale = norm / out.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        out = torch.where(normalize[..., None], out * scale, out).to(hidden.dtype)
        return torch.where(((matched != 0) | normalize)[..., None], out, steered)

    def assign(self, seqs) -> None:
        """Set each admitted sequence's decode-time table rows in its KV row (KVRowBuffers.assign)."""
        self.kv_buffers.assign(seqs, self.used)

    def advance(self) -> None:
        """Before a decode step: upload new table rows, then switch the table rows of KV rows whose sequence reaches
        a generated-range bound (KVRowBuffers.advance)."""
        self.vectors.upload_rows()
        self.ops.upload_rows()
        self.kv_buffers.advance()

    def set_active(self, per_layer: dict) -> None:
        """Per-token (row, norm-matched row, normalize) tensors of each layer it names for the next forward;
        {} turns steering off."""
        self.active = per_layer

    def decode_inputs(self, num_rows: int, is_steered: bool, is_graph: bool) -> dict:
        """The decode step's per-layer inputs: none when no row is steered; in a captured graph every layer's (see
        the class doc), else those of the layers some request has steered."""
        if not is_steered:
            return {}
        kv = self.kv_buffers
        gates = kv.gates[None, :num_rows] if self.has_op_rows else None
        layers = range(self.num_layers) if is_graph else self.used
        return {layer: LayerInputs(kv.plain[layer, None, :num_rows], kv.matched[layer, None, :num_rows],  # [1, B]
                                   kv.normalize[layer, None, :num_rows],
                                   kv.ops[layer, None, :num_rows] if self.has_op_rows else None, gates)
                for layer in layers}

    def prefill_inputs(self, seqs, starts) -> dict:
        """Per steered layer (`used`): its LayerInputs, each [1, N], for a packed prefill: prompt token i of sequence
        j sits at column starts[j] + i; {} when no sequence is steered. Uploads new table rows first.

        Built as runs of equal rows: [fields, layers] values per run and one np.repeat, not a slice per sequence,
        piece and layer (a 256-prompt prefill would be ~800 slice writes)."""
        self.vectors.upload_rows()
        self.ops.upload_rows()
        if not self.used or all(seq.steering is None for seq in seqs):
            return {}
        # the LayerRows fields the hooks read: plain; matched and normalize for norm-aware hooks; ops
        fields = [0, *((1, 2) if self.norm_layers else ()), *((3,) if self.has_op_rows else ())]
        unsteered = np.zeros((len(fields), len(self.used)), dtype=np.int64)
        values, lengths, at = [], [], 0
        for seq, offset in zip(seqs, starts):
            for start, end, rows in seq.steering.prompt if seq.steering is not None else ():
                layer_rows = np.array([rows.get(layer, UNSTEERED) for layer in self.used], dtype=np.int64)
                values += [unsteered, layer_rows[:, fields].T]
                lengths += [offset + start - at, end - start]
                at = offset + end
        values.append(unsteered)
        lengths.append(int(starts[-1]) - at)
        host = np.repeat(np.stack(values, axis=-1), lengths, axis=-1)[:, :, None]  # [fields, layers, 1, N]
        device = to_device(torch.from_numpy(host), torch.int64, self.device)
        got = dict(zip(fields, device))
        gates = None
        if self.has_op_rows:  # this forward's gates, column 0 "always"
            gates = torch.zeros(1, host.shape[-1], 1 + MAX_GATES, dtype=torch.float32, device=self.device)
            gates[..., 0] = 1.0
        return {layer: LayerInputs(got[0][j], *((got[1][j], got[2][j] != 0) if 1 in got else (None, None)),
                                   got[3][j] if 3 in got else None, gates)
                for j, layer in enumerate(self.used)}


def _ablate_hook(module, args, output) -> None:
    """The forward hook of every residual write (one function, so a compiled layer's graph does not depend on which
    layer it is): the write's ablations, in place, through the ablate_write op."""
    ablate_write(output[0] if isinstance(output, tuple) else output, module.engine_write)


class LayerInputs(NamedTuple):
    """One steered layer's per-token inputs in a forward, each [1, T]: the LayerRows fields as tensors (matched and
    normalize only for norm-aware layers, ops once any request uses them) and the forward's gate state
    [1, T, 1 + MAX_GATES]."""

    plain: torch.Tensor
    matched: torch.Tensor | None = None
    normalize: torch.Tensor | None = None
    ops: torch.Tensor | None = None
    gates: torch.Tensor | None = None


class KVRowBuffers:
    """The KV-row buffers: per (layer, KV row), the table rows its decode token gets, set when a sequence is admitted
    and switched when its generated ranges start or end; [num_layers, num_kv_rows] device tensors, never
    reallocated (the captured decode graphs read them)."""

    def __init__(self, num_layers: int, num_kv_rows: int, device):
        self.device = torch.device(device)
        shape = (num_layers, num_kv_rows)  # per (layer, KV row): the table rows its decode token gets
        self.plain = torch.zeros(shape, dtype=torch.int64, device=device)  # table row added at decode
        self.matched = torch.zeros(shape, dtype=torch.int64, device=device)  # table row added times ||h||
        self.normalize = torch.zeros(shape, dtype=torch.bool, device=device)
        self.ops = torch.zeros(shape, dtype=torch.int64, device=device)  # OpTable row applied at decode
        self.gates = torch.zeros(num_kv_rows, 1 + MAX_GATES, dtype=torch.float32, device=device)  # a step's gates
        self.gates[:, 0] = 1.0  # gate 0: "always"
        self._following: dict[int, tuple] = {}  # KV row -> (sequence, its generated changes still ahead, last first)

    def assign(self, seqs, used: list[int]) -> None:
        """Set each admitted sequence's decode-time table rows (those of generated position 0) in its KV row,
        for every layer some request has steered (`used`); `advance` follows those whose rows change later."""
        if not used:
            return
        updates = []
        for seq in seqs:
            plan = seq.steering
            first = plan.generated[0][1] if plan is not None else {}
            updates += [(layer, seq.row, first.get(layer, UNSTEERED)) for layer in used]
            if plan is not None and len(plan.generated) > 1:
                self._following[seq.row] = (seq, list(reversed(plan.generated[1:])))
            else:
                self._following.pop(seq.row, None)
        self._write(updates)

    def advance(self) -> None:
        """Before a decode step: switch the table rows of KV rows whose sequence reaches a generated-range bound. The
        step consumes generated token num_scheduled - 1, which is generated position k. (SteeringTable.advance
        uploads new table rows first.)"""
        updates = []
        for kv_row, (seq, changes) in list(self._following.items()):
            k = seq.num_scheduled - 1
            rows = None
            while changes and changes[-1][0] <= k:
                rows = changes.pop()[1]
            if rows is not None:
                updates += [(layer, kv_row, r) for layer, r in rows.items()]
            if not changes:
                del self._following[kv_row]
        if updates:
            self._write(updates)

    def _write(self, updates: list[tuple[int, int, LayerRows]]) -> None:
        """Write (layer, KV row, table rows) into the KV-row buffers: one small copy, no host sync."""
        host = torch.tensor([[layer, kv_row, *rows] for layer, kv_row, rows in updates], dtype=torch.int64)
        layer, kv_row, plain, matched, normalize, ops = to_device(host.T.contiguous(), torch.int64, self.device)
        self.plain.index_put_((layer, kv_row), plain)
        self.matched.index_put_((layer, kv_row), matched)
        self.normalize.index_put_((layer, kv_row), normalize != 0)
        self.ops.index_put_((layer, kv_row), ops)
