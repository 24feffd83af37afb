"""Steering's host side: a request's steering spec -> its SteerPlan of rows in the VectorTable, the device table of
every loaded vector (engine.core.steering's SteeringTable applies the plans inside the layers; vector files:
engine.vectors).

A token's row is the sum, coefficients included, of the terms whose positions cover it; terms that use norm_match
get a second row (scaled by the residual's norm at the hook), and the LayerRows say whether the hook normalizes.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from engine.specs import Ranges, RecordError, SteeringSpec, SteeringTerm
from engine.vectors import load_vectors, unnamed_layers_error
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
    # per term, the layers it steers, when a term took its vector file's layers (the result record states them);
    # None when every term gave its own
    term_layers: tuple[tuple[int, ...], ...] | None = None


@dataclass(slots=True)
class _Prepared:
    """What a spec's terms need whatever the prompt: their vectors per layer and, per set of covering terms, the
    table rows. Cached by the terms themselves (frozen, hashable), so requests that share a spec resolve with no
    vector arithmetic."""

    terms: tuple[SteeringTerm, ...]
    added: list[dict]  # per term: {layer: float32 array it adds there}
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
    """Resolves steering specs to SteerPlans of VectorTable rows; keeps each vector file and each distinct spec's
    prepared vectors, and tells `on_steer(layer, uses_norm)` which layers a spec steers."""

    def __init__(self, vectors: VectorTable, num_layers: int, hidden_size: int, on_steer):
        self.vectors, self.num_layers, self.hidden_size, self.on_steer = vectors, num_layers, hidden_size, on_steer
        # path -> (its file's stamp, {layer or None: float32 array} or the error reading it gave)
        self._files: dict[str, tuple[tuple | None, dict | RecordError]] = {}
        # a spec's terms and their files' stamps -> their _Prepared, least recent first
        self._prepared: OrderedDict[tuple, _Prepared] = OrderedDict()

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
        return SteerPlan(tuple(prompt), tuple(generated), prepared.term_layers)

    def _prepare(self, terms: tuple[SteeringTerm, ...]) -> _Prepared:
        """The spec's vectors and hooks, once per distinct spec (the most recent MAX_PREPARED_SPECS are kept). The
        terms are the key, with their files' stamps (a file written again is read again: a resident engine outlives
        one run's files); a list of one term and the term given alone share their entry."""
        key = (terms, tuple(file_stamp(term.vector) for term in terms))
        prepared = self._prepared.get(key)
        if prepared is not None:
            self._prepared.move_to_end(key)
            return prepared
        added = [self._term_vectors(term) for term in terms]
        for term, vectors in zip(terms, added):  # the layers each term steers: its own, or its file's
            for layer in vectors:
                self.on_steer(layer, term.normalize or term.norm_match)
        term_layers = tuple(tuple(vectors) for vectors in added) if any(t.is_file_layers for t in terms) else None
        prepared = _Prepared(terms, added, sorted({layer for vectors in added for layer in vectors}), term_layers)
        self._prepared[key] = prepared
        if len(self._prepared) > MAX_PREPARED_SPECS:
            self._prepared.popitem(last=False)
        return prepared

    def _term_vectors(self, term: SteeringTerm) -> dict[int, np.ndarray]:
        """{layer: what the term adds there}, in layer order: coef * v, or for norm_match coef * v / ||v|| (times
        ||h|| later). A term without layers steers every layer its file names (load_vectors checked them against
        the model); a file of one unnamed vector then has none to steer, and says to give them."""
        bad = [layer for layer in term.layers if not 0 <= layer < self.num_layers]
        if bad:
            raise RecordError(f"steering layer(s) {bad} out of range; the model has layers 0..{self.num_layers - 1}")
        vectors = self._file(term.vector)
        layers = term.layers or tuple(sorted(layer for layer in vectors if layer is not None))
        if not layers:
            raise unnamed_layers_error(term.vector)
        missing = [layer for layer in layers if layer not in vectors and None not in vectors]
        if missing:
            raise RecordError(f"steering vector {term.vector}: no vector for layer(s) {missing} "
                              f"(it has layer.{sorted(vectors)})")
        added, scaled = {}, {}  # scaled: one product per source vector (a file's one vector serves every layer)
        for layer in layers:
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
                    rows[id(v)] = (self.vectors.row(v), v)
            out[layer] = LayerRows(*(0 if v is None else rows[id(v)][0] for v in sums), normalize)
        return out

    def _file(self, path: str) -> dict:
        stamp = file_stamp(path)
        if path not in self._files or self._files[path][0] != stamp:
            try:
                vectors = load_vectors(path, self.num_layers, self.hidden_size)
                self._files[path] = stamp, {layer: v.numpy() for layer, v in vectors.items()}
            except RecordError as exc:
                self._files[path] = stamp, exc
        entry = self._files[path][1]
        if isinstance(entry, RecordError):
            raise entry
        return entry


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
