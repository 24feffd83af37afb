"""Steering: the SteeringTable that adds per-request vectors inside the decoder layers (vector files: engine.vectors).

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

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from engine.models import decoder_layers
from engine.specs import Ranges, RecordError, SteeringSpec, SteeringTerm
from engine.vectors import load_vectors
from engine.core.transfer import to_device

class LayerRows(NamedTuple):
    """What a token gets at one layer: a table row added as is, a row added times the residual's norm
    (norm_match terms), and whether the result is rescaled to the residual's norm (normalize)."""

    plain: int = 0
    matched: int = 0
    normalize: bool = False


UNSTEERED = LayerRows()


@dataclass(frozen=True, slots=True)
class SteerPlan:
    """A request's steering resolved to table rows, for every layer its spec touches.

    Generated position k is the residual stream of the forward that consumes generated token k (sequence position
    num_prompt_tokens + k); the prefill, which consumes the prompt, is all prompt positions.
    """

    prompt: tuple  # (start, end, {layer: LayerRows}): prompt tokens [start, end) get these rows
    generated: tuple  # (k, {layer: LayerRows}): from generated position k on; the first has k = 0


@dataclass(slots=True)
class _Prepared:
    """What a spec's terms need whatever the prompt: their vectors per layer and, per set of covering terms, the
    table rows. Cached by the terms themselves (frozen, hashable), so requests that share a spec resolve with no
    vector arithmetic."""

    terms: tuple[SteeringTerm, ...]
    added: list[dict]  # per term: {layer: float32 array it adds there}
    layers: list[int]
    rows: dict = field(default_factory=dict)  # covering term indices -> {layer: LayerRows}


MAX_PREPARED_SPECS = 4096


class SteeringTable:
    """Device table of loaded vectors plus per-layer row inputs read by forward hooks.

    Every decoder layer is hooked from the start, so no request adds a hook mid-run. The runner's CUDA graphs of
    steered decode steps run every layer's gather-add (row 0 adds exactly zero), so whichever layers a later request
    steers, those graphs already do it; eager forwards (prefill, CPU) run only the layers some request has steered.
    The graphs' other inputs: the table, preallocated and grown only by reallocation, which bumps `version` (the
    runner drops the steered graphs then), and the set of layers whose hook also does norm_match / normalize
    (`graph_key`). The decode inputs per KV row (the KV-row buffers, of table rows) are [num_layers, num_kv_rows]
    device buffers written between steps.
    """

    def __init__(self, model, device, num_kv_rows: int, capacity: int = 1024):
        self.layers = decoder_layers(model)
        self.num_layers = len(self.layers)
        self.hidden_size = model.config.get_text_config().hidden_size
        self.device = torch.device(device)
        self.table = torch.zeros(capacity, self.hidden_size, dtype=torch.float32, device=device)
        dtype = next(model.parameters()).dtype
        # what a plain row adds, cast once to the model's dtype (a float32 model adds the table itself)
        self.cast = self.table if dtype == torch.float32 else self.table.to(dtype)
        self.num_rows = 1  # row 0 stays zero: "no vector"
        shape = (self.num_layers, num_kv_rows)  # per (layer, KV row): the table rows its decode token gets
        self.kv_plain = torch.zeros(shape, dtype=torch.int64, device=device)  # table row added at decode
        self.kv_matched = torch.zeros(shape, dtype=torch.int64, device=device)  # table row added times ||h||
        self.kv_normalize = torch.zeros(shape, dtype=torch.bool, device=device)
        self.num_kv_rows = num_kv_rows
        self.version = 0
        self.used: list[int] = []  # layers some request has steered (what eager forwards run), in first-use order
        self.norm_layers: set[int] = set()  # layers whose hook also does norm_match / normalize
        self._rows: dict[bytes, int] = {}
        self._files: dict[str, dict | RecordError] = {}  # path -> {layer or None: float32 array}
        # a spec's terms -> their _Prepared, least recent first
        self._prepared: OrderedDict[tuple[SteeringTerm, ...], _Prepared] = OrderedDict()
        self._following: dict[int, tuple] = {}  # KV row -> (sequence, its generated changes still ahead, last first)
        self._new_rows: list[tuple[int, np.ndarray]] = []  # (row, vector) not yet in the device table
        self.active: dict[int, tuple] = {}
        for layer in range(self.num_layers):
            # prepend: runs before transformers' own output-capture hooks, so captured states include steering.
            self.layers[layer].register_forward_hook(self._make_hook(layer), prepend=True)

    def graph_key(self, is_steered: bool) -> tuple | None:
        """What a captured decode step's steering depends on besides the KV-row buffers: None for a step where no
        sequence is steered (no steering op is captured), else the table's version and the norm-aware layers."""
        return (self.version, tuple(sorted(self.norm_layers))) if is_steered else None

    def resolve(self, spec: SteeringSpec | None, num_prompt_tokens: int) -> SteerPlan | None:
        """A request's steering spec -> its SteerPlan (None: unsteered); RecordError if it cannot apply.

        The terms covering a token are summed per layer (coefficients included) into one table row (two with
        norm_match), so any number of terms costs one gather-add per steered layer.
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
                prepared.rows[covering] = self._layer_rows([(terms[i], prepared.added[i]) for i in covering],
                                                           prepared.layers)
            return prepared.rows[covering]

        prompt = [(a, b, rows(c)) for a, b, c in _pieces([p for p, _ in spans], num_prompt_tokens) if c]
        generated = []
        for k, _, covering in _pieces([g for _, g in spans], None):
            if not generated or rows(covering) != generated[-1][1]:
                generated.append((k, rows(covering)))
        return SteerPlan(tuple(prompt), tuple(generated))

    def _prepare(self, terms: tuple[SteeringTerm, ...]) -> _Prepared:
        """The spec's vectors and hooks, once per distinct spec (the most recent MAX_PREPARED_SPECS are kept). The
        terms are the key: a list of one term and the term given alone share their entry."""
        prepared = self._prepared.get(terms)
        if prepared is not None:
            self._prepared.move_to_end(terms)
            return prepared
        added = [self._term_vectors(term) for term in terms]
        for term in terms:
            for layer in term.layers:
                self._hook(layer, term.normalize or term.norm_match)
        prepared = _Prepared(terms, added, sorted({layer for vectors in added for layer in vectors}))
        self._prepared[terms] = prepared
        if len(self._prepared) > MAX_PREPARED_SPECS:
            self._prepared.popitem(last=False)
        return prepared

    def _term_vectors(self, term: SteeringTerm) -> dict[int, np.ndarray]:
        """{layer: what the term adds there}: coef * v, or for norm_match coef * v / ||v|| (times ||h|| later)."""
        bad = [layer for layer in term.layers if not 0 <= layer < self.num_layers]
        if bad:
            raise RecordError(f"steering layer(s) {bad} out of range; the model has layers 0..{self.num_layers - 1}")
        vectors = self._file(term.vector)
        missing = [layer for layer in term.layers if layer not in vectors and None not in vectors]
        if missing:
            raise RecordError(f"steering vector {term.vector}: no vector for layer(s) {missing} "
                              f"(it has layer.{sorted(vectors)})")
        added, scaled = {}, {}  # scaled: one product per source vector (a file's one vector serves every layer)
        for layer in term.layers:
            vector = vectors.get(layer, vectors.get(None))
            if id(vector) in scaled:
                added[layer] = scaled[id(vector)]
                continue
            source = vector
            if term.norm_match:
                direction = torch.from_numpy(vector)
                norm = direction.norm()
                if norm == 0:
                    raise RecordError(f"steering vector {term.vector}: zero at layer {layer}; norm_match needs a "
                                      f"non-zero direction (or drop norm_match)")
                vector = (direction / norm).numpy()
            added[layer] = scaled[id(source)] = np.float32(term.coef) * vector  # float32, as torch does it
        return added

    def _layer_rows(self, covering: list[tuple[SteeringTerm, dict]], layers: list[int]) -> dict[int, LayerRows]:
        """The rows of tokens covered by these (term, vectors): sums per layer; normalize if any term says so."""
        # rows: by array identity, so a vector shared by several layers is hashed once; each entry keeps its array
        # alive, so a later temporary cannot reuse the id
        out, rows = {}, {}
        for layer in layers:
            sums: list = [None, None]  # plain, norm-matched
            normalize = False
            for term, vectors in covering:
                if layer in vectors:
                    i = int(term.norm_match)
                    sums[i] = vectors[layer] if sums[i] is None else sums[i] + vectors[layer]
                    normalize = normalize or term.normalize
            for v in sums:
                if v is not None and id(v) not in rows:
                    rows[id(v)] = (self._row(v), v)
            out[layer] = LayerRows(*(0 if v is None else rows[id(v)][0] for v in sums), normalize)
        return out

    def _file(self, path: str) -> dict:
        if path not in self._files:
            try:
                vectors = load_vectors(path, self.num_layers, self.hidden_size)
                self._files[path] = {layer: v.numpy() for layer, v in vectors.items()}
            except RecordError as exc:
                self._files[path] = exc
        entry = self._files[path]
        if isinstance(entry, RecordError):
            raise entry
        return entry

    def _row(self, vector: np.ndarray) -> int:
        """The table row holding `vector` (rows are shared by content)."""
        key = hashlib.blake2b(vector.tobytes(), digest_size=16).digest()
        if key not in self._rows:
            self._check_representable(vector)
            if self.num_rows == self.table.shape[0]:
                self._upload_rows()  # into the old table, copied over with the rest
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

    def _upload_rows(self) -> None:
        """Copy the rows added since the last forward into the device table, all in one copy, not one per new
        vector (256 distinct specs arrive while a run is going; a `.to()` from pageable memory waits for the GPU).
        Called by the steps' entry points, prefill_inputs and advance."""
        if not self._new_rows:
            return
        rows = to_device([row for row, _ in self._new_rows], torch.int64, self.device)
        vectors = to_device(torch.from_numpy(np.stack([vector for _, vector in self._new_rows])), torch.float32,
                            self.device)
        self.table.index_copy_(0, rows, vectors)
        if self.cast is not self.table:
            self.cast.index_copy_(0, rows, vectors.to(self.cast.dtype))
        self._new_rows = []

    def _hook(self, layer: int, uses_norm: bool) -> None:
        """Mark `layer` steered (its hook already exists), and norm-aware if a term there needs it."""
        if layer not in self.used:
            self.used.append(layer)
        if uses_norm:
            self.norm_layers.add(layer)

    def _make_hook(self, layer: int):
        def hook(module, args, output):
            inputs = self.active.get(layer)
            if inputs is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            rows = self.cast if self.cast.dtype == hidden.dtype else self.table
            steered = hidden + rows[inputs[0]].to(hidden.dtype)  # row 0 is zero: unsteered tokens get +0
            if layer in self.norm_layers:
                steered = self._norm_terms(hidden, steered, *inputs[1:])
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        return hook

    def _norm_terms(self, hidden, steered, matched, normalize):
        """Add ||h|| * table[matched], then rescale to ||h|| where `normalize`, in float32 (h: the residual before
        steering). Tokens with neither keep `steered` bit for bit."""
        norm = hidden.float().norm(dim=-1, keepdim=True)
        out = steered.float() + norm * self.table[matched]
        scale = norm / out.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        out = torch.where(normalize[..., None], out * scale, out).to(hidden.dtype)
        return torch.where(((matched != 0) | normalize)[..., None], out, steered)

    def assign(self, seqs) -> None:
        """Set each admitted sequence's decode-time table rows (those of generated position 0) in its KV row,
        for every layer some request has steered (`used`); `advance` follows those whose rows change later."""
        if not self.used:
            return
        updates = []
        for seq in seqs:
            plan = seq.steering
            first = plan.generated[0][1] if plan is not None else {}
            updates += [(layer, seq.row, first.get(layer, UNSTEERED)) for layer in self.used]
            if plan is not None and len(plan.generated) > 1:
                self._following[seq.row] = (seq, list(reversed(plan.generated[1:])))
            else:
                self._following.pop(seq.row, None)
        self._write_kv_rows(updates)

    def advance(self) -> None:
        """Before a decode step: switch the table rows of KV rows whose sequence reaches a generated-range bound. The
        step consumes generated token num_scheduled - 1, which is generated position k. Uploads new table rows first."""
        self._upload_rows()
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
            self._write_kv_rows(updates)

    def _write_kv_rows(self, updates: list[tuple[int, int, LayerRows]]) -> None:
        """Write (layer, KV row, table rows) into the KV-row buffers: one small copy, no host sync."""
        host = torch.tensor([[layer, kv_row, *rows] for layer, kv_row, rows in updates], dtype=torch.int64)
        layer, kv_row, plain, matched, normalize = to_device(host.T.contiguous(), torch.int64, self.device)
        self.kv_plain.index_put_((layer, kv_row), plain)
        self.kv_matched.index_put_((layer, kv_row), matched)
        self.kv_normalize.index_put_((layer, kv_row), normalize != 0)


    def set_active(self, per_layer: dict) -> None:
        """Per-token (row, norm-matched row, normalize) tensors of each layer it names for the next forward;
        {} turns steering off."""
        self.active = per_layer

    def decode_inputs(self, num_rows: int, is_steered: bool, is_graph: bool) -> dict:
        """The decode step's per-layer inputs: none when no row is steered; in a captured graph every layer's (see
        the class doc), else those of the layers some request has steered."""
        if not is_steered:
            return {}
        buffers = (self.kv_plain, self.kv_matched, self.kv_normalize)
        layers = range(self.num_layers) if is_graph else self.used
        return {layer: tuple(b[layer, None, :num_rows] for b in buffers) for layer in layers}  # [1, B]: one row

    def prefill_inputs(self, seqs, starts) -> dict:
        """Per steered layer (`used`): (row, norm-matched row, normalize), each [1, N], for a packed prefill: prompt
        token i of sequence j sits at column starts[j] + i; {} when no sequence is steered. Uploads new table rows
        first.

        Built as runs of equal rows: [kinds, layers] values per run and one np.repeat, not a slice per sequence,
        piece and layer (a 256-prompt prefill would be ~800 slice writes)."""
        self._upload_rows()
        if not self.used or all(seq.steering is None for seq in seqs):
            return {}
        kinds = 3 if self.norm_layers else 1  # plain, matched, normalize; the last two only for norm-aware hooks
        unsteered = np.zeros((kinds, len(self.used)), dtype=np.int64)
        values, lengths, at = [], [], 0
        for seq, offset in zip(seqs, starts):
            for start, end, rows in seq.steering.prompt if seq.steering is not None else ():
                values += [unsteered, np.array([rows.get(layer, UNSTEERED)[:kinds] for layer in self.used]).T]
                lengths += [offset + start - at, end - start]
                at = offset + end
        values.append(unsteered)
        lengths.append(int(starts[-1]) - at)
        host = np.repeat(np.stack(values, axis=-1), lengths, axis=-1)[:, :, None]  # [kinds, layers, 1, N]
        device = to_device(torch.from_numpy(host), torch.int64, self.device)
        norm_inputs = (device[1], device[2] != 0) if kinds == 3 else ()
        return {layer: (device[0][j], *(x[j] for x in norm_inputs)) for j, layer in enumerate(self.used)}


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
