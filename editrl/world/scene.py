"""ShapesWorld scenes: objects on a 3x3 grid, the palette, and the ground-truth effect of every edit.

Geometry (canvas S = 64 by default, all lengths scale with S/64): the grid's cells are
20 px wide starting 2 px in from the border, so cell centres sit at 12, 32 and 52; a large
object spans 16 px and a small one 12 px, which leaves at least 4 px between neighbours and
a 2 px background ring around the canvas. Hollow objects are the shape minus the same shape
scaled by HOLE_SCALE about its inner centre.

An edit is (type, target object id, params). `apply_edit` returns the next scene: it is the
single definition of ground truth, used by the session grammar, the renderer of targets
and the judge.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

COLORS: dict[str, tuple[int, int, int]] = {
    # chosen so that no blend of a background with one colour passes near another colour
    # (the closest is 0.52 in RGB distance on [0, 1]): blurred edges never read as a third colour
    "red": (245, 45, 40),
    "green": (10, 205, 20),
    "blue": (10, 40, 250),
    "yellow": (240, 235, 30),
    "purple": (185, 20, 220),
    "cyan": (10, 225, 245),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
FILLS = ("solid", "hollow")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
CELL_NAMES = (
    "top left", "top center", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom center", "bottom right",
)
EDIT_TYPES = ("add", "remove", "replace", "color", "material", "position", "count", "background", "size")
ATTRS = ("color", "shape", "size", "fill", "cell")

BASE_CANVAS = 64
HOLE_SCALE = 0.45


@dataclass(frozen=True)
class Geometry:
    canvas: int = BASE_CANVAS

    @property
    def scale(self) -> float:
        return self.canvas / BASE_CANVAS

    @property
    def cell(self) -> float:
        return 20 * self.scale

    @property
    def margin(self) -> float:
        return 2 * self.scale

    def half(self, size: str) -> float:
        return (8 if size == "large" else 6) * self.scale

    def center(self, cell: int) -> tuple[float, float]:
        """(x, y) of a cell's centre in continuous pixel coordinates (pixel i spans [i, i+1))."""
        r, c = divmod(cell, 3)
        return self.margin + self.cell * (c + 0.5), self.margin + self.cell * (r + 0.5)

    def cell_of(self, x: float, y: float) -> int | None:
        c = int((x - self.margin) // self.cell)
        r = int((y - self.margin) // self.cell)
        if 0 <= r < 3 and 0 <= c < 3:
            return r * 3 + c
        return None


@dataclass(frozen=True)
class Obj:
    id: int
    shape: str
    color: str
    size: str
    fill: str
    cell: int

    def attrs(self) -> dict[str, Any]:
        return {"color": self.color, "shape": self.shape, "size": self.size, "fill": self.fill, "cell": self.cell}

    def category(self) -> tuple[str, str, str, str]:
        return (self.color, self.shape, self.size, self.fill)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "shape": self.shape, "color": self.color, "size": self.size,
                "fill": self.fill, "cell": CELL_NAMES[self.cell]}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Obj":
        cell = d["cell"]
        cell = CELL_NAMES.index(cell) if isinstance(cell, str) else int(cell)
        o = Obj(id=int(d["id"]), shape=d["shape"], color=d["color"], size=d["size"], fill=d["fill"], cell=cell)
        o.validate()
        return o

    def validate(self) -> None:
        for name, val, allowed in (("shape", self.shape, SHAPES), ("color", self.color, COLORS),
                                   ("size", self.size, SIZES), ("fill", self.fill, FILLS)):
            if val not in allowed:
                raise ValueError(f"unknown {name} {val!r} (expected one of {', '.join(allowed)})")
        if not 0 <= self.cell < 9:
            raise ValueError(f"cell {self.cell} out of range 0..8")

    def describe(self) -> str:
        """Canonical unambiguous name used inside brackets: 'red circle at top left'."""
        return f"{self.color} {self.shape} at {CELL_NAMES[self.cell]}"

    def full_name(self) -> str:
        return f"{self.size} {self.color} {self.fill} {self.shape}"


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...] = ()
    canvas: int = BASE_CANVAS
    next_id: int = field(default=0)

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}")
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError("two objects share a cell")
        if self.objects and self.next_id <= max(o.id for o in self.objects):
            object.__setattr__(self, "next_id", max(o.id for o in self.objects) + 1)

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.canvas)

    def get(self, oid: int) -> Obj:
        for o in self.objects:
            if o.id == oid:
                return o
        raise KeyError(f"no object with id {oid}")

    def has(self, oid: int) -> bool:
        return any(o.id == oid for o in self.objects)

    def at(self, cell: int) -> Obj | None:
        for o in self.objects:
            if o.cell == cell:
                return o
        return None

    def free_cells(self) -> list[int]:
        used = {o.cell for o in self.objects}
        return [c for c in range(9) if c not in used]

    def sorted_objects(self) -> list[Obj]:
        return sorted(self.objects, key=lambda o: o.cell)

    def with_objects(self, objs: list[Obj] | tuple[Obj, ...], next_id: int | None = None) -> "Scene":
        return Scene(self.background, tuple(sorted(objs, key=lambda o: o.cell)), self.canvas,
                     self.next_id if next_id is None else next_id)

    def category_members(self, cat: tuple[str, str, str, str]) -> list[Obj]:
        return [o for o in self.sorted_objects() if o.category() == cat]

    def pairs_unique_except_categories(self) -> bool:
        """(colour, shape) pairs are unique, except for exact copies made by count edits."""
        by_pair: dict[tuple[str, str], set] = {}
        for o in self.objects:
            by_pair.setdefault((o.color, o.shape), set()).add(o.category())
        return all(len(v) == 1 for v in by_pair.values())

    def to_dict(self) -> dict[str, Any]:
        return {"background": self.background, "canvas": self.canvas, "next_id": self.next_id,
                "objects": [o.to_dict() for o in self.sorted_objects()]}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Scene":
        objs = tuple(Obj.from_dict(o) for o in d.get("objects", []))
        return Scene(d["background"], objs, int(d.get("canvas", BASE_CANVAS)), int(d.get("next_id", 0)))


@dataclass(frozen=True)
class Edit:
    type: str
    target: int | None = None              # object id (None for add/background)
    params: dict[str, Any] = field(default_factory=dict)


def apply_edit(scene: Scene, edit: Edit) -> Scene:
    """The ground-truth next scene. Raises ValueError for an edit that cannot apply."""
    t, p = edit.type, edit.params
    objs = list(scene.objects)
    if t == "add":
        cell = int(p["cell"])
        if scene.at(cell) is not None:
            raise ValueError(f"cell {CELL_NAMES[cell]} is occupied")
        new = Obj(scene.next_id, p["shape"], p["color"], p["size"], p["fill"], cell)
        new.validate()
        return scene.with_objects(objs + [new], scene.next_id + 1)
    if t == "background":
        if p["background"] not in BACKGROUNDS:
            raise ValueError(f"unknown background {p['background']!r}")
        return Scene(p["background"], scene.objects, scene.canvas, scene.next_id)
    target = scene.get(edit.target)
    others = [o for o in objs if o.id != target.id]
    if t == "remove":
        return scene.with_objects(others)
    if t == "count":
        n = int(p["count"])
        members = scene.category_members(target.category())
        if n < 1:
            raise ValueError("count must be at least 1")
        if n == len(members):
            raise ValueError("count unchanged")
        if n < len(members):  # keep the first n in reading order
            keep = {o.id for o in members[:n]}
            return scene.with_objects([o for o in objs if o.category() != target.category() or o.id in keep])
        free = scene.free_cells()
        need = n - len(members)
        if need > len(free):
            raise ValueError("not enough free cells")
        nid = scene.next_id
        copies = []
        for cell in free[:need]:  # copies go to the first free cells in reading order
            copies.append(replace(target, id=nid, cell=cell))
            nid += 1
        return scene.with_objects(objs + copies, nid)
    # single-object attribute edits; a global rule may add attributes via params["also"]
    changes: dict[str, Any] = {}
    if t == "replace":
        changes["shape"] = p["shape"]
    elif t == "color":
        changes["color"] = p["color"]
    elif t == "material":
        changes["fill"] = p["fill"]
    elif t == "size":
        changes["size"] = p["size"]
    elif t == "position":
        cell = int(p["cell"])
        if scene.at(cell) is not None:
            raise ValueError(f"cell {CELL_NAMES[cell]} is occupied")
        changes["cell"] = cell
    else:
        raise ValueError(f"unknown edit type {t!r}")
    changes.update(p.get("also", {}))
    new = replace(target, **changes)
    new.validate()
    return scene.with_objects(others + [new])
