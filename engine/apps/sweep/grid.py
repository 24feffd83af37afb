"""The grid: its axes (Grid), its points (GridPoint) in file order, and the points' keys, which go into request ids."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from engine.apps.sweep.fields import SweepError


@dataclass(slots=True)
class Grid:
    """The axes; every combination is a grid point. `layers` items are layer sets (one layer is [L]); `layers`
    empty (left out of the file): each vector at the one layer set its file names, `file_layers` (read by
    load_sweep), so the points, their keys and the report name the layers steered."""

    vectors: list[str]
    layers: list[list[int]]
    coefs: list[float]
    positions: list = field(default_factory=lambda: ["all"])
    normalize: list[bool] = field(default_factory=lambda: [False])
    norm_match: list[bool] = field(default_factory=lambda: [False])
    baseline: bool = False
    file_layers: dict[str, list[int]] = field(default_factory=dict)  # vector name -> the layers its file names

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

    def axes(self) -> dict:
        return {"vector": self.vector, "layers": self.layers, "coef": self.coef, "positions": self.positions,
                "normalize": self.normalize, "norm_match": self.norm_match}

    def steering(self, vectors: dict[str, str]) -> dict | None:
        if self.vector is None:
            return None
        spec = {"vector": vectors[self.vector], "layers": self.layers, "coef": self.coef, "positions": self.positions}
        return (spec | ({"normalize": True} if self.normalize else {})
                | ({"norm_match": True} if self.norm_match else {}))


BASELINE = "none"


def point_key(vector: str, layers: list[int], coef: float, positions, normalize: bool, norm_match: bool) -> str:
    """A readable, unique name of a grid point, e.g. `joy@L6*4.0` or `joy@L4,6*-2.0+generated+normalize`; axes at
    their defaults add nothing, so adding a one-value axis to the grid keeps every id."""
    key = f"{vector}@L{','.join(map(str, layers))}*{coef!r}"
    if positions != "all":
        key += "+" + (positions if isinstance(positions, str) else "pos" + json.dumps(positions, separators=(",", ":")))
    return key + ("+normalize" if normalize else "") + ("+norm_match" if norm_match else "")


def grid_points(grid: Grid) -> list[GridPoint]:
    """The grid's points in file order (the baseline first); SweepError if two come out the same."""
    import itertools

    points = [GridPoint(BASELINE, None, [], None)] if grid.baseline else []
    for vector in grid.vectors:
        for combo in itertools.product([vector], grid.layer_sets(vector), grid.coefs, grid.positions, grid.normalize,
                                       grid.norm_match):
            points.append(GridPoint(point_key(*combo), *combo))
    seen = set()
    for point in points:
        if point.key in seen:
            raise SweepError(f"grid: the point {point.key} comes out twice; remove the repeated value from its axis")
        seen.add(point.key)
    return points
