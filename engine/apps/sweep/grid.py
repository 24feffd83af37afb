"""The grid: its axes (Grid), its points (GridPoint) in file order, and the points' keys, which go into request ids."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from engine.adapters import BASE as BASE_ADAPTER  # in grid.adapters: the base model, no adapter
from engine.apps.sweep.fields import SweepError


SWEPT_OPS = ("add", "ablate", "clamp")  # the ops a grid's vectors run under (SAE features have axes of their own)


@dataclass(slots=True)
class Grid:
    """The axes; every combination is a grid point. `layers` items are layer sets (one layer is [L]); `layers`
    empty (left out of the file): each vector at the one layer set its file names, `file_layers` (read by
    load_sweep), so the points, their keys and the report name the layers steered.

    Each vector runs under each of `ops`: add (x coefs, normalize, norm_match), ablate (x ablate_coefs, the fraction
    removed) and clamp (x clamp_values), each x positions. SAE points: each of `saes` x features x (feature_values:
    the activation set, and feature_coefs: coef times its decoder row added) x positions, at the SAE's layer. Every
    point (the baseline too) runs under each of `adapters` ("base": the model without one)."""

    vectors: list[str]
    layers: list[list[int]]
    coefs: list[float]
    positions: list = field(default_factory=lambda: ["all"])
    normalize: list[bool] = field(default_factory=lambda: [False])
    norm_match: list[bool] = field(default_factory=lambda: [False])
    baseline: bool = False
    file_layers: dict[str, list[int]] = field(default_factory=dict)  # vector name -> the layers its file names
    ops: list[str] = field(default_factory=lambda: ["add"])
    ablate_coefs: list[float] = field(default_factory=lambda: [1.0])
    clamp_values: list[float] = field(default_factory=list)
    saes: list[str] = field(default_factory=list)
    features: list[int] = field(default_factory=list)
    feature_values: list[float] = field(default_factory=list)
    feature_coefs: list[float] = field(default_factory=list)
    adapters: list[str] = field(default_factory=lambda: [BASE_ADAPTER])

    def layer_sets(self, vector: str) -> list[list[int]]:
        """The layer sets `vector` is steered at: the grid's, or the one its file names."""
        return self.layers or [self.file_layers[vector]]


@dataclass(slots=True)
class GridPoint:
    """One steering configuration of the grid (or the unsteered baseline, key `none`)."""

    key: str
    vector: str | None
    layers: list[int]
    coef: float | None
    positions: str | dict = "all"
    normalize: bool = False
    norm_match: bool = False
    op: str = "add"  # one of SWEPT_OPS, or "sae"
    sae: str | None = None  # op sae: the SAE's name, its feature, and the activation set (else coef is added)
    feature: int | None = None
    value: float | None = None  # op clamp: the projection set; op sae: the feature's activation set
    adapter: str | None = None  # the LoRA adapter (a name of the sweep's [adapters]); None: the base model

    def axes(self) -> dict:
        return {"vector": self.vector, "layers": self.layers, "coef": self.coef, "positions": self.positions,
                "normalize": self.normalize, "norm_match": self.norm_match, "op": self.op, "sae": self.sae,
                "feature": self.feature, "value": self.value, "adapter": self.adapter}

    def steering(self, vectors: dict[str, str], saes: dict[str, str] | None = None) -> dict | None:
        """The point's steering term as a record gives it (None: the baseline)."""
        if self.sae is not None:
            spec = {"op": "sae", "sae": (saes or {})[self.sae], "feature": self.feature, "positions": self.positions}
            return spec | ({"value": self.value} if self.value is not None else {"coef": self.coef})
        if self.vector is None:
            return None
        spec = {"vector": vectors[self.vector], "layers": self.layers, "positions": self.positions}
        if self.op == "clamp":
            return {"op": "clamp", **spec, "value": self.value}
        if self.op == "ablate":
            return {"op": "ablate", **spec, "coef": self.coef}
        spec["coef"] = self.coef
        return (spec | ({"normalize": True} if self.normalize else {})
                | ({"norm_match": True} if self.norm_match else {}))


BASELINE = "none"


def point_key(vector: str, layers: list[int], coef: float, positions, normalize: bool, norm_match: bool) -> str:
    """A readable, unique name of a grid point, e.g. `joy@L6*4.0` or `joy@L4,6*-2.0+generated+normalize`; axes at
    their defaults add nothing, so adding a one-value axis to the grid keeps every id."""
    key = f"{vector}@L{','.join(map(str, layers))}*{coef!r}"
    return key + _positions_key(positions) + ("+normalize" if normalize else "") + ("+norm_match" if norm_match else "")


def op_point_key(op: str, name: str, layers: list[int], number: float, positions, feature: int | None = None,
                 is_value: bool = True) -> str:
    """The name of an ablate, clamp or SAE point: `ablate:refusal@L4,6` (coef 1 left out, else `*0.5`),
    `clamp:joy@L6=0.0`, `sae:gs#123=8.0` (its activation set) or `sae:gs#123*4.0` (its decoder row added)."""
    key = f"{op}:{name}" + (f"#{feature}" if feature is not None else f"@L{','.join(map(str, layers))}")
    if op != "ablate" or number != 1.0:
        key += f"{'=' if is_value and op != 'ablate' else '*'}{number!r}"
    return key + _positions_key(positions)


def _positions_key(positions) -> str:
    if positions == "all":
        return ""
    return "+" + (positions if isinstance(positions, str) else "pos" + json.dumps(positions, separators=(",", ":")))


def grid_points(grid: Grid) -> list[GridPoint]:
    """The grid's points in file order (the baseline first); SweepError if two come out the same."""
    import itertools

    points = [GridPoint(BASELINE, None, [], None)] if grid.baseline else []
    for vector in grid.vectors:
        for op in grid.ops:
            if op == "add":
                for combo in itertools.product([vector], grid.layer_sets(vector), grid.coefs, grid.positions,
                                               grid.normalize, grid.norm_match):
                    points.append(GridPoint(point_key(*combo), *combo))
                continue
            numbers = grid.ablate_coefs if op == "ablate" else grid.clamp_values
            for layers, number, positions in itertools.product(grid.layer_sets(vector), numbers, grid.positions):
                key = op_point_key(op, vector, layers, number, positions)
                points.append(GridPoint(key, vector, layers, number if op == "ablate" else None, positions, op=op,
                                        value=number if op == "clamp" else None))
    for sae, feature, positions in itertools.product(grid.saes, grid.features, grid.positions):
        for number, is_value in [*((v, True) for v in grid.feature_values), *((c, False) for c in grid.feature_coefs)]:
            key = op_point_key("sae", sae, [], number, positions, feature, is_value)
            points.append(GridPoint(key, None, [], None if is_value else number, positions, op="sae", sae=sae,
                                    feature=feature, value=number if is_value else None))
    if grid.adapters != [BASE_ADAPTER]:  # each point under each adapter; the base model's keys stay as they are
        points = [dataclasses.replace(point, key=point.key + ("" if name == BASE_ADAPTER else f"+adapter:{name}"),
                                      adapter=None if name == BASE_ADAPTER else name)
                  for point in points for name in grid.adapters]
    seen = set()
    for point in points:
        if point.key in seen:
            raise SweepError(f"grid: the point {point.key} comes out twice; remove the repeated value from its axis")
        seen.add(point.key)
    return points
