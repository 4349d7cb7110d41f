"""The first edition's world (kept for comparison; `scenes.py` is the current one): coloured shapes and small
characters on a 3x3 grid.

Every scene is a pure function of (split, index): ``make_scene("test", 7)`` is the same picture and the
same questions on every machine with the same Pillow. Splits draw from disjoint index ranges.

Geometry (Qwen3-VL: patch 16, merge 2, so one merged token covers 32x32 px): the image holds a 3x3 grid
of cells and every cell is a whole block of merged tokens (64x64, 64x96 or 96x64 px), so images are
192x192 (36 merged tokens), 192x288 or 288x192 (54). Each cell holds nothing, one shape, or one small
character (a digit or a capital letter).

Question families (answers are 1-2 words):
- colour (global):   "what colour is the circle?"            -> "red"
- count (global):    "how many squares are there?"           -> "2"
- where (grounding): "where is the blue triangle?"           -> "top left" (one of REGIONS)
- read (fine detail): "what is written at the bottom right?" -> "7"
- exists:            "is there a green star?"                -> "yes" / "no"
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from training.scenes import _font, draw_shape  # the drawing both worlds share

FAMILIES = ("colour", "count", "where", "read", "exists")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 225),
    "yellow": (230, 195, 20),
    "purple": (140, 60, 190),
    "orange": (245, 125, 25),
}
SHAPES = ("circle", "square", "triangle", "star")
CHARS = tuple("1234579AEHKX")
REGIONS = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
# (cell height, cell width) in px; the image is 3 cells by 3 cells
CELL_SIZES = ((64, 64), (64, 64), (64, 96), (96, 64))
MERGED_PX = 32  # one merged visual token
SPLIT_BASE = {"train": 0, "val": 1 << 40, "test": 2 << 40}
SYSTEM_WORDS = "you are a helpful assistant . ,".split()

# The content class of a cell (for the optional auxiliary loss): 0 empty, then shape x colour, then chars.
N_CLASSES = 1 + len(SHAPES) * len(COLOURS) + len(CHARS)


@dataclass
class Obj:
    kind: str  # "shape" or "char"
    name: str  # shape name or the character
    colour: str  # colour word (shapes) or "" (characters)
    row: int
    col: int

    @property
    def region(self) -> str:
        return REGIONS[self.row][self.col]

    @property
    def label(self) -> int:
        if self.kind == "shape":
            return 1 + SHAPES.index(self.name) * len(COLOURS) + list(COLOURS).index(self.colour)
        return 1 + len(SHAPES) * len(COLOURS) + CHARS.index(self.name)


@dataclass
class Scene:
    image: Image.Image
    objects: list
    cell: tuple  # (cell height, cell width) in px
    qa: list = field(default_factory=list)  # [(family, question, answer)]

    def cell_labels(self) -> list:
        """The content class of the cell under each merged token, raster order over the merged grid."""
        ch, cw = self.cell
        grid = {(o.row, o.col): o.label for o in self.objects}
        rows, cols = 3 * ch // MERGED_PX, 3 * cw // MERGED_PX
        return [grid.get((r * MERGED_PX // ch, c * MERGED_PX // cw), 0) for r in range(rows) for c in range(cols)]

    def cell_regions(self) -> list:
        """The grid cell (0..8, raster) under each merged token, raster order over the merged grid."""
        ch, cw = self.cell
        rows, cols = 3 * ch // MERGED_PX, 3 * cw // MERGED_PX
        return [3 * (r * MERGED_PX // ch) + c * MERGED_PX // cw for r in range(rows) for c in range(cols)]


def render(rng: random.Random, objects, cell) -> Image.Image:
    ch, cw = cell
    bg = tuple(rng.randint(225, 255) for _ in range(3))
    img = Image.new("RGB", (3 * cw, 3 * ch), bg)
    d = ImageDraw.Draw(img)
    for o in objects:
        cy0, cx0 = o.row * ch, o.col * cw
        if o.kind == "shape":
            s = rng.randint(int(0.55 * min(ch, cw)), int(0.85 * min(ch, cw)))
            x = cx0 + (cw - s) // 2 + rng.randint(-3, 3)
            y = cy0 + (ch - s) // 2 + rng.randint(-3, 3)
            draw_shape(d, o.name, (x, y, x + s, y + s), COLOURS[o.colour])
        else:
            font = _font(rng.randint(30, 38))
            ink = tuple(rng.randint(0, 70) for _ in range(3))
            left, t, r, b = d.textbbox((0, 0), o.name, font=font, stroke_width=1)
            w, h = r - left, b - t
            x = cx0 + (cw - w) // 2 + rng.randint(-3, 3) - left
            y = cy0 + (ch - h) // 2 + rng.randint(-3, 3) - t
            d.text((x, y), o.name, fill=ink, font=font, stroke_width=1, stroke_fill=ink)
    return img


def _questions(rng: random.Random, objects) -> dict:
    """Every valid question about the scene, by family: {family: [(question, answer)]}."""
    shapes = [o for o in objects if o.kind == "shape"]
    chars = [o for o in objects if o.kind == "char"]
    out = {f: [] for f in FAMILIES}
    for s in SHAPES:
        same = [o for o in shapes if o.name == s]
        if len(same) == 1:
            out["colour"].append((f"what colour is the {s}?", same[0].colour))
        out["count"].append((f"how many {s}s are there?", str(len(same))))
    for c in COLOURS:
        n = sum(o.colour == c for o in shapes)
        out["count"].append((f"how many {c} shapes are there?", str(n)))
    out["count"].append(("how many shapes are there?", str(len(shapes))))
    for o in shapes:
        if sum(p.name == o.name and p.colour == o.colour for p in shapes) == 1:
            out["where"].append((f"where is the {o.colour} {o.name}?", o.region))
    for o in chars:
        if sum(p.name == o.name for p in chars) == 1:
            out["where"].append((f"where is the {o.name}?", o.region))
        out["read"].append((f"what is written at the {o.region}?", o.name))
    present = {(o.colour, o.name) for o in shapes}
    present_chars = {o.name for o in chars}
    yes = [(f"is there a {c} {s}?", "yes") for c, s in sorted(present)]
    yes += [(f"is there a {ch}?", "yes") for ch in sorted(present_chars)]
    # hard negatives share the shape or the colour with something in the picture
    near = [
        (c, s)
        for c in COLOURS
        for s in SHAPES
        if (c, s) not in present and any(c == pc or s == ps for pc, ps in present)
    ]
    far = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    no = [(f"is there a {c} {s}?", "no") for c, s in (near or far)]
    no += [(f"is there a {ch}?", "no") for ch in CHARS if ch not in present_chars]
    out["exists"] = [rng.choice(yes)] if yes else []
    out["exists"].append(rng.choice(no))
    return out


def _pick(rng: random.Random, family: str, options: list):
    """One question of a family, balancing answers where the natural distribution is skewed."""
    if family == "count":
        # mostly questions about shapes that are there, so answers are not dominated by "0"
        nonzero = [qa for qa in options if qa[1] != "0"]
        if nonzero and rng.random() < 0.75:
            return rng.choice(nonzero)
    if family == "exists":
        return options[0] if len(options) == 1 or rng.random() < 0.5 else options[1]
    return rng.choice(options)


def scene_rng(split: str, index: int) -> random.Random:
    return random.Random(SPLIT_BASE[split] + index)


def make_scene(
    split: str, index: int, n_questions: int = 1, families=FAMILIES, max_objects: int = 6, family_weights=None
) -> Scene:
    """The scene `index` of `split` with up to `n_questions` distinct questions from `families`
    (drawn uniformly, or by `family_weights`, a {family: weight} dict, for training mixes)."""
    rng = scene_rng(split, index)
    cell = rng.choice(CELL_SIZES)
    n = rng.randint(2, max_objects)
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], n)
    objects = []
    for r, c in cells:
        if rng.random() < 0.55:
            objects.append(Obj("shape", rng.choice(SHAPES), rng.choice(list(COLOURS)), r, c))
        else:
            objects.append(Obj("char", rng.choice(CHARS), "", r, c))
    image = render(rng, objects, cell)
    qs = _questions(rng, objects)
    fams = [f for f in families if qs[f]]
    qa, seen = [], set()
    for _ in range(4 * n_questions):
        if len(qa) == n_questions or not fams:
            break
        f = rng.choice(fams) if family_weights is None else rng.choices(fams, [family_weights[f] for f in fams])[0]
        q, a = _pick(rng, f, qs[f])
        if q not in seen:
            seen.add(q)
            qa.append((f, q, a))
    return Scene(image, objects, cell, qa)


def eval_questions(split: str, per_family: int, start: int = 0) -> list:
    """A family-balanced list of single questions [(family, image, question, answer)] from `split`.

    Scene i contributes one question of family FAMILIES[i % 5] (scenes lacking that family are skipped),
    so the list is fixed by (split, per_family, start) alone.
    """
    out, counts, i = [], {f: 0 for f in FAMILIES}, start
    while min(counts.values()) < per_family:
        fam = FAMILIES[i % len(FAMILIES)]
        if counts[fam] < per_family:
            s = make_scene(split, i, 1, families=(fam,))
            if s.qa:
                out.append((fam, s.image, s.qa[0][1], s.qa[0][2]))
                counts[fam] += 1
        i += 1
    return out


def vocabulary() -> list:
    """Every word the questions and answers use (the tokenizer's word list, special tokens excluded)."""
    words = set("what colour is the how many are there where written at a ? shapes".split())
    words |= set(SYSTEM_WORDS) | {"user", "assistant", "system", "yes", "no"}
    words |= set(COLOURS) | set(SHAPES) | {s + "s" for s in SHAPES} | set(CHARS)
    for row in REGIONS:
        for name in row:
            words |= set(name.split())
    words |= {str(i) for i in range(10)}
    return sorted(words)
