"""Steering's host side: a request's steering spec -> its SteerPlan of rows in the VectorTable, the device table of
every loaded vector (engine.core.steering's SteeringTable applies the plans inside the layers; vector files:
engine.vectors).

A token's row is the sum, coefficients included, of the terms whose positions cover it; terms that use norm_match
get a second row (scaled by the residual's norm at the hook), and the LayerRows say whether the hook normalizes.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from engine.specs import Ranges, RecordError, SteeringSpec, SteeringTerm, gate_order_check
from engine.vectors import load_vectors, unnamed_layers_error
from engine.core.interventions import MAX_ABLATIONS, MAX_GATES, MAX_SLOTS, Ablation, GateRead, OpTable, Slot
from engine.core.transfer import to_device


class LayerRows(NamedTuple):
    """What a token gets at one layer: a table row added as is, a row added times the residual's norm
    (norm_match terms), whether the result is rescaled to the residual's norm (normalize), and its row of gates and
    projection slots in the OpTable (engine.core.interventions; 0: none), applied before the additions."""

    plain: int = 0
    matched: int = 0
    normalize: bool = False
    ops: int = 0


UNSTEERED = LayerRows()


@dataclass(frozen=True, slots=True)
class SteerPlan:
    """A request's steering resolved to table rows, for every layer its spec touches.

    Generated position k is the residual stream of the forward that consumes generated token k (sequence position
    num_prompt_tokens + k); the prefill, which consumes the prompt, is all prompt positions.
    """

    prompt: tuple  # (start, end, {layer: LayerRows}): prompt tokens [start, end) get these rows
    generated: tuple  # (k, {layer: LayerRows}): from generated position k on; the first has k = 0
    # per term, the layers it steers, when a term took its vector file's layers (the result record states them);
    # None when every term gave its own
    term_layers: tuple[tuple[int, ...], ...] | None = None


@dataclass(frozen=True, slots=True)
class SlotVectors:
    """A projection slot before its vectors have table rows (see engine.core.interventions.Slot); a None: zero."""

    a: np.ndarray | None
    b: np.ndarray
    bias: float = 0.0
    theta: float = -math.inf
    lo: float = -math.inf
    hi: float = math.inf


@dataclass(frozen=True, slots=True)
class GateVectors:
    """A request's gate (1..MAX_GATES): read at `layer`, `probe` against the threshold, above (sign 1) or below."""

    index: int
    layer: int
    probe: np.ndarray
    threshold: float
    sign: float


@dataclass(slots=True)
class _Prepared:
    """What a spec's terms need whatever the prompt: their vectors per layer and, per set of covering terms, the
    table rows. Cached by the terms themselves (frozen, hashable), so requests that share a spec resolve with no
    vector arithmetic."""

    terms: tuple[SteeringTerm, ...]
    added: list[dict]  # per term: {layer: float32 array it adds there} (ungated add terms, SAE coef terms)
    slots: list[dict]  # per term: {layer: [SlotVectors]} (clamps, SAE values, gated additions)
    ablations: list[dict]  # per term: {layer: (unit direction, coef)} (ablate terms)
    gates: list  # per term: its GateVectors, or None
    layers: list[int]
    term_layers: tuple[tuple[int, ...], ...] | None  # SteerPlan.term_layers
    rows: dict = field(default_factory=dict)  # covering term indices -> {layer: LayerRows}


MAX_PREPARED_SPECS = 4096


class VectorTable:
    """The device table of steering vectors, one float32 row per distinct vector (row 0 is zero), and its copy in the
    model's dtype; rows are shared by content, and new ones reach the device in one copy before the next forward."""

    def __init__(self, hidden_size: int, device, capacity: int, dtype: torch.dtype):
        self.hidden_size = hidden_size
        self.device = torch.device(device)
        self.table = torch.zeros(capacity, hidden_size, dtype=torch.float32, device=device)
        # what a plain row adds, cast once to the model's dtype (a float32 model adds the table itself)
        self.cast = self.table if dtype == torch.float32 else self.table.to(dtype)
        self.num_rows = 1  # row 0 stays zero: "no vector"
        self.version = 0  # bumped when the table is reallocated (grown)
        self._rows: dict[bytes, int] = {}
        self._new_rows: list[tuple[int, np.ndarray]] = []  # (row, vector) not yet in the device table

    def row(self, vector: np.ndarray) -> int:
        """The table row holding `vector` (rows are shared by content)."""
        key = hashlib.blake2b(vector.tobytes(), digest_size=16).digest()
        if key not in self._rows:
            self._check_representable(vector)
            if self.num_rows == self.table.shape[0]:
                self.upload_rows()  # into the old table, copied over with the rest
                grown = torch.zeros(2 * self.num_rows, self.hidden_size, dtype=torch.float32, device=self.device)
                grown[:self.num_rows] = self.table
                self.table = grown
                self.cast = grown if self.cast.dtype == torch.float32 else grown.to(self.cast.dtype)
                self.version += 1
            self._new_rows.append((self.num_rows, vector))  # uploaded with the others before the next forward
            self._rows[key] = self.num_rows
            self.num_rows += 1
        return self._rows[key]

    def _check_representable(self, vector: np.ndarray) -> None:
        """RecordError if what steering adds overflows float32 (coef x vector) or the model's dtype (the table is cast
        to it): the residual stream would become non-finite."""
        limit = float(torch.finfo(self.cast.dtype).max)
        peak = float(np.abs(vector).max(initial=0.0))
        if not peak <= limit:
            raise RecordError(f"steering would add values up to {peak:.3g}, beyond what {self.cast.dtype} holds "
                              f"({limit:.3g}): the residual stream would become non-finite; use a smaller coef")

    def upload_rows(self) -> None:
        """Copy the rows added since the last forward into the device table, all in one copy, not one per new
        vector (256 distinct specs arrive while a run is going; a `.to()` from pageable memory waits for the GPU).
        Called by the steps' entry points, SteeringTable.prefill_inputs and advance."""
        if not self._new_rows:
            return
        rows = to_device([row for row, _ in self._new_rows], torch.int64, self.device)
        vectors = to_device(torch.from_numpy(np.stack([vector for _, vector in self._new_rows])), torch.float32,
                            self.device)
        self.table.index_copy_(0, rows, vectors)
        if self.cast is not self.table:
            self.cast.index_copy_(0, rows, vectors.to(self.cast.dtype))
        self._new_rows = []


class SteeringResolver:
    """Resolves steering specs to SteerPlans of VectorTable and OpTable rows; keeps each vector and SAE file and each
    distinct spec's prepared vectors, and tells `on_steer(layer, uses_norm, uses_ops, uses_ablate)` which layers a spec
    steers."""

    def __init__(self, vectors: VectorTable, ops: OpTable, num_layers: int, hidden_size: int, on_steer):
        self.vectors, self.ops, self.on_steer = vectors, ops, on_steer
        self.num_layers, self.hidden_size = num_layers, hidden_size
        # path -> (its file's stamp, {layer or None: float32 array} or an Sae, or the error reading it gave)
        self._files: dict[str, tuple[tuple | None, object]] = {}
        # a spec's terms and their files' stamps -> their _Prepared, least recent first
        self._prepared: OrderedDict[tuple, _Prepared] = OrderedDict()

    def resolve(self, spec: SteeringSpec | None, num_prompt_tokens: int) -> SteerPlan | None:
        """A request's steering spec -> its SteerPlan (None: unsteered); RecordError if it cannot apply.

        The additions covering a token are summed per layer (coefficients included) into one table row (two with
        norm_match), so any number of them costs one gather-add per steered layer; clamps, SAE values and gated
        terms take a projection slot each, gates a read each, in one OpTable row per layer.
        """
        if spec is None:
            return None
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is this record's error (_check_representable)
            return self._resolve(spec.terms, num_prompt_tokens)

    def _resolve(self, terms: tuple[SteeringTerm, ...], num_prompt_tokens: int) -> SteerPlan:
        prepared = self._prepare(terms)
        spans = [_spans(term.positions, num_prompt_tokens) for term in terms]

        def rows(covering: tuple) -> dict[int, LayerRows]:
            if covering not in prepared.rows:
                prepared.rows[covering] = self._layer_rows(prepared, covering)
            return prepared.rows[covering]

        prompt = [(a, b, rows(c)) for a, b, c in _pieces([p for p, _ in spans], num_prompt_tokens) if c]
        generated = []
        for k, _, covering in _pieces([g for _, g in spans], None):
            if not generated or rows(covering) != generated[-1][1]:
                generated.append((k, rows(covering)))
        return SteerPlan(tuple(prompt), tuple(generated), prepared.term_layers)

    def _prepare(self, terms: tuple[SteeringTerm, ...]) -> _Prepared:
        """The spec's vectors and hooks, once per distinct spec (the most recent MAX_PREPARED_SPECS are kept). The
        terms are the key, with their files' stamps (a file written again is read again: a resident engine outlives
        one run's files); a list of one term and the term given alone share their entry."""
        key = (terms, tuple(file_stamp(path) for term in terms for path in term.paths))
        prepared = self._prepared.get(key)
        if prepared is not None:
            self._prepared.move_to_end(key)
            return prepared
        gate_index: dict = {}
        added, slots, ablations, gates, term_layers, marks = [], [], [], [], [], []
        for term in terms:
            layers = self._term_layers(term)
            gate = None if term.when is None else self._gate(term, layers, gate_index)
            effects = self._term_effects(term, layers)
            is_addition = term.op != "ablate" and not isinstance(next(iter(effects.values())), list)
            added.append(effects if is_addition and gate is None else {})
            ablations.append(effects if term.op == "ablate" else {})
            if term.op == "ablate" or (is_addition and gate is None):
                slots.append({})
            else:  # a gated addition takes a slot: x += gate * v
                slots.append({layer: [SlotVectors(None, v, lo=1.0, hi=1.0)] for layer, v in effects.items()}
                             if is_addition else effects)
            gates.append(gate)
            term_layers.append(layers)
            uses_ops = (not is_addition and term.op != "ablate") or gate is not None  # slots or gate reads
            marks += [(layer, term.normalize or term.norm_match, uses_ops, term.op == "ablate")
                      for layer in (*layers, *(() if gate is None else (gate.layer,)))]
        for mark in marks:  # once every term has resolved: a spec that fails marks nothing
            self.on_steer(*mark)
        touched = {layer for layers in term_layers for layer in layers} | {g.layer for g in gates if g is not None}
        is_named = any(t.is_file_layers or t.is_all_layers for t in terms)
        prepared = _Prepared(terms, added, slots, ablations, gates, sorted(touched),
                             tuple(term_layers) if is_named else None)
        self._prepared[key] = prepared
        if len(self._prepared) > MAX_PREPARED_SPECS:
            self._prepared.popitem(last=False)
        return prepared

    def _term_layers(self, term: SteeringTerm) -> tuple[int, ...]:
        """The layers a term acts at: its own, every layer ("all"), the layer its SAE reads, or its file's."""
        bad = [layer for layer in term.layers if not 0 <= layer < self.num_layers]
        if bad:
            raise RecordError(f"steering layer(s) {bad} out of range; the model has layers 0..{self.num_layers - 1}")
        if term.is_all_layers:
            return tuple(range(self.num_layers))
        if term.op == "sae":
            if len(term.layers) > 1:
                raise RecordError(f"an SAE term acts at the one layer its SAE reads; got layers {list(term.layers)}")
            from engine.saes import sae_layer_or_error

            return (sae_layer_or_error(self.sae(term.vector), term.layers[0] if term.layers else None),)
        if term.layers:
            return term.layers
        layers = tuple(sorted(layer for layer in self._file(term.vector) if layer is not None))
        if not layers:
            raise unnamed_layers_error(term.vector)
        return layers

    def _gate(self, term: SteeringTerm, layers: tuple[int, ...], gate_index: dict) -> GateVectors:
        """The term's gate, numbered within the spec (one number per distinct gate, at most MAX_GATES)."""
        gate = term.when
        if not 0 <= gate.layer < self.num_layers:
            raise RecordError(f"when.layer {gate.layer} out of range; the model has layers 0..{self.num_layers - 1}")
        gate_order_check(gate.layer, layers[0], term.op, "when")
        if term.norm_match or term.normalize:
            raise RecordError("a gated term (when) cannot use norm_match or normalize; scale its vector instead")
        if gate not in gate_index:
            if len(gate_index) == MAX_GATES:
                raise RecordError(f"a request's terms use more than {MAX_GATES} distinct gates (when); share one")
            probe = self._vector_at(gate.vector, gate.layer)
            gate_index[gate] = GateVectors(len(gate_index) + 1, gate.layer, probe, gate.threshold,
                                           1.0 if gate.is_above else -1.0)
        return gate_index[gate]

    def _term_effects(self, term: SteeringTerm, layers: tuple[int, ...]) -> dict:
        """{layer: what the term adds there} (add, SAE coef), or {layer: [SlotVectors]} (clamp, SAE value)."""
        if term.op == "sae":
            return {layers[0]: sae_effect(self.sae(term.vector), term)}
        effects, done = {}, {}  # done: one product per source vector (a file's one vector serves every layer)
        for layer in layers:
            vector = self._vector_at(term.vector, layer)
            if id(vector) not in done:
                done[id(vector)] = self._effect(term, vector, layer)
            effects[layer] = done[id(vector)]
        return effects

    def _effect(self, term: SteeringTerm, vector: np.ndarray, layer: int):
        """coef * v, for norm_match coef * v / ||v|| (times ||h|| later); a clamp's slot on v / ||v||; an ablation's
        (v / ||v||, coef)."""
        if term.op == "add" and not term.norm_match:
            return np.float32(term.coef) * vector  # float32, as torch does it
        direction = torch.from_numpy(vector)
        norm = direction.norm()
        if norm == 0:
            raise RecordError(f"steering vector {term.vector}: zero at layer {layer}; "
                              + ("norm_match needs a non-zero direction (or drop norm_match)" if term.op == "add"
                                 else f"{'an ablation' if term.op == 'ablate' else 'a clamp'} needs a non-zero "
                                      "direction"))
        unit = (direction / norm).numpy()
        if term.op == "add":
            return np.float32(term.coef) * unit
        if term.op == "ablate":
            return unit, term.coef
        lo, hi = (term.value, term.value) if term.value is not None else term.bounds
        return [SlotVectors(unit, unit, lo=-math.inf if lo is None else lo, hi=math.inf if hi is None else hi)]

    def _vector_at(self, path: str, layer: int) -> np.ndarray:
        vectors = self._file(path)
        if layer not in vectors and None not in vectors:
            raise RecordError(f"steering vector {path}: no vector for layer {layer} (it has layer.{sorted(vectors)}); "
                              "to use one of its vectors at every layer, save that one as an unnamed vector (a 1-D "
                              ".npy), or give the layers it has")
        return vectors.get(layer, vectors.get(None))

    def _layer_rows(self, prepared: _Prepared, covering: tuple) -> dict[int, LayerRows]:
        """The rows of tokens covered by these terms: per layer the additions summed, normalize if any term says
        so, and the op row of their slots (in term order) and of the gates read there."""
        # rows: by array identity, so a vector shared by several layers is hashed once; each entry keeps its array
        # alive, so a later temporary cannot reuse the id
        out, rows = {}, {}

        def row(v):
            if v is None:
                return 0
            if id(v) not in rows:
                rows[id(v)] = (self.vectors.row(v), v)
            return rows[id(v)][0]

        gates = {g.index: g for g in (prepared.gates[i] for i in covering) if g is not None}
        for layer in prepared.layers:
            sums: list = [None, None]  # plain, norm-matched
            normalize, slots, ablations = False, [], []
            for i in covering:
                term, gate = prepared.terms[i], prepared.gates[i]
                if layer in prepared.added[i]:
                    k = int(term.norm_match)
                    v = prepared.added[i][layer]
                    sums[k] = v if sums[k] is None else sums[k] + v
                    normalize = normalize or term.normalize
                slots += [Slot(row(v.a), row(v.b), v.bias, v.theta, v.lo, v.hi, 0 if gate is None else gate.index)
                          for v in prepared.slots[i].get(layer, ())]
                if layer in prepared.ablations[i]:
                    unit, coef = prepared.ablations[i][layer]
                    ablations.append(Ablation(row(unit), coef, 0 if gate is None else gate.index))
            if len(slots) > MAX_SLOTS:
                raise RecordError(f"at layer {layer} this request has {len(slots)} clamps, SAE features and gated "
                                  f"terms over one token; at most {MAX_SLOTS} fit")
            if len(ablations) > MAX_ABLATIONS:
                raise RecordError(f"at layer {layer} this request ablates {len(ablations)} directions over one token; "
                                  f"at most {MAX_ABLATIONS} fit (combine them into fewer terms, or ablate at other "
                                  "layers)")
            reads = tuple(GateRead(g.index, row(g.probe), g.threshold, g.sign) for g in gates.values()
                          if g.layer == layer)
            ops = self.ops.row(tuple(slots), reads, tuple(ablations)) if slots or reads or ablations else 0
            out[layer] = LayerRows(*(row(v) for v in sums), normalize, ops)
        return out

    def _file(self, path: str) -> dict:
        return self._cached(path, lambda: {layer: v.numpy() for layer, v in
                                           load_vectors(path, self.num_layers, self.hidden_size).items()})

    def sae(self, path: str):
        from engine.saes import load_sae

        return self._cached(path, lambda: load_sae(path, self.num_layers, self.hidden_size))

    def _cached(self, path: str, load):
        """What load() reads from `path`, read again when the file's stamp changes; its RecordError likewise."""
        stamp = file_stamp(path)
        if path not in self._files or self._files[path][0] != stamp:
            try:
                self._files[path] = stamp, load()
            except RecordError as exc:
                self._files[path] = stamp, exc
        entry = self._files[path][1]
        if isinstance(entry, RecordError):
            raise entry
        return entry


def sae_effect(sae, term: SteeringTerm):
    """An SAE term's effect at its layer: coef * the features' decoder rows summed (an addition), or a slot per
    feature setting its activation to `value` (its encoder column and bias, threshold, decoder row)."""
    bad = [i for i in term.features if i >= sae.d_sae]
    if bad:
        raise RecordError(f"SAE {term.vector}: feature(s) {bad} out of range; it has features 0..{sae.d_sae - 1}")
    features = list(term.features)
    if term.value is None:
        return np.float32(term.coef) * sae.w_dec[features].sum(axis=0, dtype=np.float32)
    if sae.activation == "topk":
        raise RecordError(f"SAE {term.vector}: a TopK SAE's feature activation depends on every feature, so \"value\" "
                          f"cannot set one here yet; use \"coef\" to add its decoder row")
    slots = []
    for i in features:
        column = np.ascontiguousarray(sae.w_enc[:, i])
        bias = float(sae.b_enc[i]) - (float(sae.b_dec @ column) if sae.is_b_dec_subtracted else 0.0)
        theta = float(sae.threshold[i]) if sae.activation == "jumprelu" else 0.0
        slots.append(SlotVectors(column, np.ascontiguousarray(sae.w_dec[i]), bias, theta, term.value, term.value))
    return slots


def file_stamp(path: str) -> tuple | None:
    """A file's identity and version (inode, size, mtime); None when it cannot be read (its loading says why)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _spans(positions: str | Ranges, num_prompt_tokens: int) -> tuple[list, list]:
    """A term's positions -> ([start, end) prompt token spans, [start, end or None) generated spans)."""
    if isinstance(positions, str):
        prompt = [(0, num_prompt_tokens)] if positions != "generated" else []
        return prompt, [(0, None)] if positions != "prompt" else []
    prompt = [range(num_prompt_tokens)[start:end] for start, end in positions.prompt]
    return [(r.start, r.stop) for r in prompt if r], list(positions.generated)


def _pieces(term_spans: list[list[tuple]], end: int | None) -> list[tuple]:
    """[0, end) (None: unbounded) cut at every span bound -> (start, stop, indices of the terms covering it)."""
    cuts = {0, *(b for spans in term_spans for span in spans for b in span if b is not None)}
    starts = sorted(c for c in cuts if end is None or c < end)
    return [(a, b, tuple(i for i, spans in enumerate(term_spans)
                         if any(s <= a and (e is None or a < e) for s, e in spans)))
            for a, b in zip(starts, starts[1:] + [end])]
