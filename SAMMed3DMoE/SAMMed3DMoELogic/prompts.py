"""Prompts from Markups: positive and negative point lists and an ROI, read in world RAS
millimetres (whatever view they were placed in), and snapshots to restore them on undo."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import vtk

POSITIVE_COLOUR, NEGATIVE_COLOUR, BOX_COLOUR = (0.2, 0.8, 0.3), (0.9, 0.2, 0.2), (1.0, 0.85, 0.1)


@dataclass(frozen=True)
class PointPrompt:
    """A click in world RAS mm; ``key`` identifies the control point it came from."""

    key: tuple
    ras: Tuple[float, float, float]
    positive: bool


@dataclass(frozen=True)
class BoxPrompt:
    """An axis-aligned box in world RAS mm (the ROI's world bounds)."""

    key: tuple
    ras_min: Tuple[float, float, float]
    ras_max: Tuple[float, float, float]


@dataclass(frozen=True)
class Prompts:
    """Everything the user placed, in world coordinates, positive points first."""

    points: Tuple[PointPrompt, ...] = ()
    box: Optional[BoxPrompt] = None

    @property
    def empty(self) -> bool:
        return not self.points and self.box is None

    @property
    def has_object_prompt(self) -> bool:
        """A positive point or a box: something the model can segment from."""
        return self.box is not None or any(p.positive for p in self.points)


@dataclass(frozen=True)
class MarkupsSnapshot:
    """The control points of the prompt nodes in their local coordinates (to restore on undo)."""

    positive: Tuple[Tuple[float, float, float], ...] = ()
    negative: Tuple[Tuple[float, float, float], ...] = ()
    box: Optional[Tuple[Tuple[float, float, float], Tuple[float, float, float]]] = None  # centre, size


def _defined_points(node) -> List[Tuple[str, Tuple[float, float, float], Tuple[float, float, float]]]:
    """(control point id, local position, world position) of the placed points of ``node``."""
    if node is None:
        return []
    out = []
    for n in range(node.GetNumberOfControlPoints()):
        if node.GetNthControlPointPositionStatus(n) != node.PositionDefined:
            continue  # a point being placed (preview) is not a prompt yet
        local, world = [0.0] * 3, [0.0] * 3
        node.GetNthControlPointPosition(n, local)
        node.GetNthControlPointPositionWorld(n, world)
        out.append((node.GetNthControlPointID(n), tuple(local), tuple(world)))
    return out


def _box_defined(node) -> bool:
    return node is not None and node.GetNumberOfControlPoints() > 0 and node.GetNthControlPointPositionStatus(0) == node.PositionDefined


@dataclass
class PromptNodes:
    """The three Markups nodes that hold the user's prompts (each may be None)."""

    positive: object = None
    negative: object = None
    box: object = None

    def prompts(self) -> Prompts:
        """The prompts in world RAS (parent transforms of the markups applied)."""
        from .geometry import node_to_world

        for node in (self.positive, self.negative, self.box):
            if node is not None:
                node_to_world(node)  # refuses a non-linear transform with a clear message
        points = []
        for role, node, positive in (("positive", self.positive, True), ("negative", self.negative, False)):
            for point_id, _local, world in _defined_points(node):
                points.append(PointPrompt((role, node.GetID(), point_id), world, positive))
        box = None
        if _box_defined(self.box):
            bounds = [0.0] * 6
            self.box.GetRASBounds(bounds)  # world, axis-aligned (a rotated ROI gives its enclosing box)
            box = BoxPrompt(("box", self.box.GetID()), tuple(bounds[0::2]), tuple(bounds[1::2]))
        return Prompts(tuple(points), box)

    def snapshot(self) -> MarkupsSnapshot:
        box = None
        if _box_defined(self.box):
            centre = [0.0] * 3
            self.box.GetCenter(centre)
            box = (tuple(centre), tuple(self.box.GetSize()))
        return MarkupsSnapshot(
            positive=tuple(local for _, local, _ in _defined_points(self.positive)),
            negative=tuple(local for _, local, _ in _defined_points(self.negative)),
            box=box,
        )

    def restore(self, snapshot: MarkupsSnapshot) -> None:
        """Put the control points back as they were in ``snapshot``."""
        for node, points in ((self.positive, snapshot.positive), (self.negative, snapshot.negative)):
            if node is None:
                continue
            node.RemoveAllControlPoints()
            for position in points:
                node.AddControlPoint(vtk.vtkVector3d(*position))
        if self.box is not None:
            self.box.RemoveAllControlPoints()
            if snapshot.box is not None:
                centre, size = snapshot.box
                self.box.SetCenter(*centre)
                self.box.SetSize(*size)

    def clear(self) -> None:
        for node in (self.positive, self.negative, self.box):
            if node is not None:
                node.RemoveAllControlPoints()
