"""Seeded procedural visual questions, second edition: shapes, characters and short words anywhere on a
canvas of any size, asked about the way people ask.

Every scene is a pure function of (split, index): ``make_scene("test", 7)`` is the same picture and the
same questions on every machine with the same Pillow. Splits draw from disjoint index ranges.

- Canvas: each side 128-448 px. Train and val sides are multiples of 16; test sides never are, so every
  test image has a size no training image had (Qwen3-VL's processor resizes it to a multiple of 32:
  16 to 196 merged visual tokens).
- Background: plain (a light tint, or white) or textured (stripes, checks or noise, low contrast).
- 1-9 objects at free positions and sizes, overlapping a little at most: a coloured shape, one character
  (digit or capital letter) or a short word in dark ink. An object's coarse position is the third of the
  canvas its centre falls in, horizontally and vertically (9 regions); centres keep out of a band around
  the lines between thirds, so every position has one answer.
- Questions: several templates per family with American and British spelling, capitals and punctuation
  varied; some templates are held out of training (`HELD_OUT`) and appear in val and test only.

| family | example | answer |
|---|---|---|
| colour | What color is the circle? | red |
| count | Count the red shapes. / How many stars are there? | 0-9 |
| where | Where's the blue triangle? | top left, top, top right, left, center, right, bottom left, ... |
| read | What does the text at the top say? | 7, A, CAT, ... |
| exists | Is there a green star? / Are there any squares? | yes / no |
| describe | Describe this image. | a red circle at the top left, the number 7 in the center |
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FAMILIES = ("colour", "count", "where", "read", "exists", "describe")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 225),
    "yellow": (230, 195, 20),
    "purple": (140, 60, 190),
    "orange": (245, 125, 25),
}
SHAPES = ("circle", "square", "triangle", "star")
DIGITS = tuple("1234579")
LETTERS = tuple("AEHKX")
WORDS = ("CAT", "DOG", "SUN", "BOX", "HAT", "MAP")
TEXTS = DIGITS + LETTERS + WORDS
REGIONS = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
MERGED_PX = 32  # one merged visual token (patch 16, merge 2)
SPLIT_BASE = {"train": 0, "val": 1 << 40, "test": 2 << 40}
MIN_SIDE, MAX_SIDE = 128, 448
BAND = 0.05  # object centres keep this share of a side away from the lines between thirds
MAX_OBJECTS = 9

# The content class under a merged token (the auxiliary loss): 0 background, shape x colour, then texts.
N_CLASSES = 1 + len(SHAPES) * len(COLOURS) + len(TEXTS)

# {family: (templates used in training, templates held out for val/test)}. {x}: the object or subject
# phrase, {r}: "at the top left" / "in the center".
TEMPLATES = {
    "colour": (
        [
            "what colour is the {x}?",
            "what's the colour of the {x}?",
            "which colour is the {x}?",
            "what colour does the {x} have?",
            "the {x} is what colour?",
        ],
        ["tell me the colour of the {x}.", "what is the colour of the {x}?"],
    ),
    "count": (
        [
            "how many {x} are there?",
            "how many {x}?",
            "count the {x}.",
            "what number of {x} are there?",
            "how many {x} can you see?",
        ],
        ["what is the number of {x}?", "how many {x} are in the picture?"],
    ),
    "where": (
        [
            "where is the {x}?",
            "where's the {x}?",
            "where is the {x} located?",
            "in which part of the image is the {x}?",
        ],
        ["whereabouts is the {x}?", "where can i find the {x}?"],
    ),
    "read": (
        ["what is written {r}?", "what does the text {r} say?", "what is the text {r}?", "read the text {r}."],
        ["what text is {r}?", "what can you read {r}?"],
    ),
    "exists": (
        ["is there {x}?", "do you see {x}?", "can you see {x}?", "is there {x} in the image?"],
        ["does the image contain {x}?", "is there {x} in the picture?"],
    ),
    "plural_exists": (["are there any {x}?", "are there {x}?"], ["do you see any {x}?"]),
    "describe": (
        [
            "describe this image.",
            "describe the picture.",
            "what is in this image?",
            "what do you see?",
            "list the objects.",
        ],
        ["what does this picture show?", "describe what you see."],
    ),
}
HELD_OUT = {t for _, held in TEMPLATES.values() for t in held}


@dataclass
class Obj:
    kind: str  # "shape" or "text"
    name: str  # shape name or the text
    colour: str  # colour word (shapes) or "" (texts)
    box: tuple  # (x0, y0, x1, y1) in px
    region: str = ""

    @property
    def label(self) -> int:
        if self.kind == "shape":
            return 1 + SHAPES.index(self.name) * len(COLOURS) + list(COLOURS).index(self.colour)
        return 1 + len(SHAPES) * len(COLOURS) + TEXTS.index(self.name)

    @property
    def phrase(self) -> str:
        """How `describe` names it: "a red circle", "the number 7", "the letter A", "the word CAT"."""
        if self.kind == "shape":
            return f"{article(self.colour)} {self.colour} {self.name}"
        return f"the {text_kind(self.name)} {self.name}"


@dataclass
class Scene:
    image: Image.Image
    objects: list
    labels: np.ndarray  # [H, W] uint8, the content class of each pixel (topmost object)
    qa: list = field(default_factory=list)  # [(family, question, answer)]
    templates: list = field(default_factory=list)  # the template behind each question
    subjects: list = field(default_factory=list)  # (kind, subject) behind each question

    def token_labels(self, rows: int, cols: int) -> tuple:
        """(content class, region 0..8) of each merged token of a rows x cols grid over the image, raster
        order. A token's class is the object covering most of its block if that covers >= 15% of it."""
        H, W = self.labels.shape
        content, region = [], []
        for r in range(rows):
            y0, y1 = r * H // rows, max(r * H // rows + 1, (r + 1) * H // rows)
            for c in range(cols):
                x0, x1 = c * W // cols, max(c * W // cols + 1, (c + 1) * W // cols)
                counts = np.bincount(self.labels[y0:y1, x0:x1].ravel(), minlength=N_CLASSES)
                counts[0] = 0
                best = int(counts.argmax())
                content.append(best if counts[best] >= 0.15 * (y1 - y0) * (x1 - x0) else 0)
                region.append(3 * min(2, 3 * r // rows) + min(2, 3 * c // cols))
        return content, region


def article(word: str) -> str:
    return "an" if word[0] in "aeiouAEHX" else "a"


def text_kind(text: str) -> str:
    return "number" if text.isdigit() else "letter" if len(text) == 1 else "word"


def region_phrase(region: str) -> str:
    return "in the center" if region == "center" else f"at the {region}"


_FONTS: dict = {}


def _font(size: int):
    if size not in _FONTS:
        _FONTS[size] = ImageFont.load_default(size=size)  # Pillow's bundled font: same on every install
    return _FONTS[size]


def _star(cx, cy, r):
    pts = []
    for i in range(10):
        a = -math.pi / 2 + i * math.pi / 5
        rr = r if i % 2 == 0 else r * 0.45
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def draw_shape(d: ImageDraw.ImageDraw, shape: str, box, fill):
    x0, y0, x1, y1 = box
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "triangle":
        d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        d.polygon(_star((x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2), fill=fill)


def _background(rng: random.Random, w: int, h: int) -> Image.Image:
    kind = rng.choice(("white", "tint", "tint", "stripes", "checks", "noise"))
    base = (255, 255, 255) if kind == "white" else tuple(rng.randint(215, 250) for _ in range(3))
    img = Image.new("RGB", (w, h), base)
    if kind in ("white", "tint"):
        return img
    other = tuple(max(0, v - rng.randint(12, 28)) for v in base)
    d = ImageDraw.Draw(img)
    step = rng.randint(6, 20)
    if kind == "stripes":
        slope = rng.choice((0, 1, -1))
        for k in range(-h, w + h, 2 * step):
            if slope == 0:
                d.rectangle((k, 0, k + step - 1, h), fill=other)
            else:
                d.polygon([(k, 0), (k + step, 0), (k + step + slope * h, h), (k + slope * h, h)], fill=other)
    elif kind == "checks":
        for y in range(0, h, step):
            for x in range((y // step) % 2 * step, w, 2 * step):
                d.rectangle((x, y, x + step - 1, y + step - 1), fill=other)
    else:
        noise = np.random.default_rng(rng.getrandbits(32)).integers(-14, 15, (h, w, 1))
        arr = np.clip(np.asarray(img).astype(np.int16) + noise, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
    return img


def _centre_ok(v: float, side: int) -> bool:
    t = v / side
    return all(abs(t - line) >= BAND for line in (1 / 3, 2 / 3)) and 0.02 < t < 0.98


def _region(cx: float, cy: float, w: int, h: int) -> str:
    return REGIONS[min(2, int(3 * cy / h))][min(2, int(3 * cx / w))]


def _place(rng: random.Random, w: int, h: int, n: int, split: str, d: ImageDraw.ImageDraw):
    """Up to n objects: boxes inside the canvas, centres out of the bands, overlap a little at most."""
    objects = []
    small = min(w, h)
    for _ in range(n):
        u = rng.random()
        kind = "shape" if u < 0.6 else "text"
        if kind == "shape":
            name, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
            size = rng.randint(max(18, int(0.09 * small)), max(22, int(0.3 * small)))
            bw = bh = size
        else:
            name = rng.choice(WORDS) if u > 0.92 else rng.choice(DIGITS + LETTERS)
            colour = ""
            fs = rng.randint(24, max(25, min(44, int(0.22 * small))))
            left, top, right, bottom = d.textbbox((0, 0), name, font=_font(fs), stroke_width=1)
            bw, bh = right - left, bottom - top
            size = fs
        for _ in range(60):
            x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            cx, cy = x0 + bw / 2, y0 + bh / 2
            if not (_centre_ok(cx, w) and _centre_ok(cy, h)):
                continue
            ok = True
            for o in objects:
                ox, oy = (o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2
                k = 0.42 if kind == o.kind == "shape" else 0.6  # texts stay readable
                need = k * (max(bw, bh) + max(o.box[2] - o.box[0], o.box[3] - o.box[1]))
                if math.hypot(cx - ox, cy - oy) < need:
                    ok = False
                    break
            if ok:
                objects.append(Obj(kind, name, colour, (x0, y0, x0 + bw, y0 + bh), _region(cx, cy, w, h)))
                objects[-1]._size = size
                break
    return objects


def _side(rng: random.Random, split: str) -> int:
    if split == "test":
        while True:
            s = rng.randint(MIN_SIDE + 2, MAX_SIDE - 2)
            if s % 16:
                return s
    return 16 * rng.randint(MIN_SIDE // 16, MAX_SIDE // 16)


def render(rng: random.Random, split: str, n: int):
    w, h = _side(rng, split), _side(rng, split)
    img = _background(rng, w, h)
    d = ImageDraw.Draw(img)
    objects = _place(rng, w, h, n, split, d)
    lab = Image.new("L", (w, h), 0)
    ld = ImageDraw.Draw(lab)
    for o in objects:
        if o.kind == "shape":
            draw_shape(d, o.name, o.box, COLOURS[o.colour])
            draw_shape(ld, o.name, o.box, o.label)
        else:
            font = _font(o._size)
            ink = tuple(rng.randint(0, 70) for _ in range(3))
            left, top, _, _ = d.textbbox((0, 0), o.name, font=font, stroke_width=1)
            d.text((o.box[0] - left, o.box[1] - top), o.name, fill=ink, font=font, stroke_width=1, stroke_fill=ink)
            ld.rectangle(o.box, fill=o.label)
    return img, objects, np.asarray(lab)


def describe(objects) -> str:
    """The describe family's answer: every object in raster order of regions, left to right within one."""
    order = {name: i for i, name in enumerate(n for row in REGIONS for n in row)}
    objs = sorted(objects, key=lambda o: (order[o.region], o.box[0], o.box[1]))
    return ", ".join(f"{o.phrase} {region_phrase(o.region)}" for o in objs)


def plural(shape: str) -> str:
    return shape + "s"


def _questions(rng: random.Random, objects) -> dict:
    """Every valid (subject, answer) of each family: {family: [(kind, subject, answer)]}; the template and the
    surface form are chosen later."""
    shapes = [o for o in objects if o.kind == "shape"]
    texts = [o for o in objects if o.kind == "text"]
    out = {f: [] for f in FAMILIES}
    for s in SHAPES:
        same = [o for o in shapes if o.name == s]
        if len(same) == 1:
            out["colour"].append(("colour", s, same[0].colour))
            out["where"].append(("where", s, same[0].region))
        out["count"].append(("count", plural(s), str(len(same))))
    for c in COLOURS:
        out["count"].append(("count", f"{c} shapes", str(sum(o.colour == c for o in shapes))))
        for s in SHAPES:
            n = sum(o.colour == c and o.name == s for o in shapes)
            if n:
                out["count"].append(("count", f"{c} {plural(s)}", str(n)))
    out["count"].append(("count", "shapes", str(len(shapes))))
    for o in shapes:
        if sum(p.name == o.name and p.colour == o.colour for p in shapes) == 1:
            out["where"].append(("where", f"{o.colour} {o.name}", o.region))
    for o in texts:
        if sum(p.name == o.name for p in texts) == 1:
            out["where"].append(("where", o.name if rng.random() < 0.5 else f"{text_kind(o.name)} {o.name}", o.region))
    for row in REGIONS:
        for r in row:
            here = [o for o in texts if o.region == r]
            if len(here) == 1:
                out["read"].append(("read", region_phrase(r), here[0].name))
    # exists: yes for something there, no mostly for a near miss (shares the shape or the colour)
    present = {(o.colour, o.name) for o in shapes}
    names = {o.name for o in shapes}
    tpresent = {o.name for o in texts}
    yes = [("exists", f"{c} {s}", "yes") for c, s in sorted(present)]
    yes += [("exists", s, "yes") for s in sorted(names)]
    yes += [("plural_exists", plural(s), "yes") for s in sorted(names)]
    yes += [("exists", t, "yes") for t in sorted(tpresent)]
    near = [
        ("exists", f"{c} {s}", "no")
        for c in COLOURS
        for s in SHAPES
        if (c, s) not in present and any(c == pc or s == ps for pc, ps in present)
    ]
    no = near or [("exists", f"{c} {s}", "no") for c in COLOURS for s in SHAPES if (c, s) not in present]
    no += [("exists", s, "no") for s in SHAPES if s not in names]
    no += [("plural_exists", plural(s), "no") for s in SHAPES if s not in names]
    no += [("exists", t, "no") for t in TEXTS if t not in tpresent]
    out["exists"] = ([rng.choice(yes)] if yes else []) + [rng.choice(no)]
    out["describe"] = [("describe", "", describe(objects))] if objects else []
    return out


def _exists_subject(subject: str, rng: random.Random) -> str:
    """ "a red circle", "an orange star", "a circle", "a 7", "the letter A", "the word CAT"."""
    if subject in TEXTS:
        if rng.random() < 0.5:
            return f"{article(subject)} {subject}" if len(subject) == 1 else f"the word {subject}"
        return f"{article(text_kind(subject))} {text_kind(subject)} {subject}"
    return f"{article(subject)} {subject}"


def surface(text: str, rng: random.Random) -> str:
    """How people type it: American or British spelling, capitals, punctuation."""
    if rng.random() < 0.5:
        text = text.replace("colour", "color")
    if rng.random() < 0.3:
        text = text.replace("center", "centre")
    u = rng.random()
    if u < 0.6:
        text = text[0].upper() + text[1:]
    elif u < 0.65:
        text = text.upper() if not any(t in text for t in TEXTS if len(t) > 1) else text
    u = rng.random()
    if u < 0.15:
        text = text.rstrip("?.")
    elif u < 0.25:
        text = text[:-1] + " " + text[-1]
    text = text.replace(" i ", " I ")
    return text


def phrase(kind: str, subject: str, rng: random.Random, held_out: float) -> tuple:
    """(question text, template) for a subject; held-out templates with probability `held_out`."""
    train, held = TEMPLATES[kind]
    template = rng.choice(held if rng.random() < held_out else train)
    if kind in ("exists",):
        x = _exists_subject(subject, rng)
    else:
        x = subject
    q = template.format(x=x, r=subject) if kind == "read" else template.format(x=x)
    return surface(q, rng), template


def _pick(rng: random.Random, family: str, options: list):
    if family == "count":
        nonzero = [qa for qa in options if qa[2] != "0"]
        if nonzero and rng.random() < 0.8:
            return rng.choice(nonzero)
    if family == "exists":
        return options[0] if len(options) == 1 or rng.random() < 0.5 else options[1]
    return rng.choice(options)


def scene_rng(split: str, index: int) -> random.Random:
    return random.Random(SPLIT_BASE[split] + index)


def make_scene(split: str, index: int, n_questions: int = 1, families=FAMILIES, family_weights=None) -> Scene:
    """The scene `index` of `split` with up to `n_questions` distinct questions from `families` (drawn
    uniformly, or by `family_weights`, a {family: weight} dict). Training questions never use a held-out
    template; val and test ones do half the time."""
    rng = scene_rng(split, index)
    n = rng.randint(1, MAX_OBJECTS)
    image, objects, labels = render(rng, split, n)
    qs = _questions(rng, objects)
    held_out = 0.0 if split == "train" else 0.5
    fams = [f for f in families if qs[f]]
    qa, seen, templates, subjects = [], set(), [], []
    for _ in range(4 * n_questions):
        if len(qa) == n_questions or not fams:
            break
        f = rng.choice(fams) if family_weights is None else rng.choices(fams, [family_weights[f] for f in fams])[0]
        kind, subject, answer = _pick(rng, f, qs[f])
        if (kind, subject) in seen:
            continue
        seen.add((kind, subject))
        q, template = phrase(kind, subject, rng, held_out)
        qa.append((f, q, answer))
        templates.append(template)
        subjects.append((kind, subject))
    return Scene(image, objects, labels, qa, templates, subjects)


def eval_questions(split: str, per_family: int, start: int = 0, families=FAMILIES, held: bool = False) -> list:
    """A family-balanced list of single questions [(family, image, question, answer)] from `split`
    (with `held`, a fifth item: whether the question's template is held out of training).

    Scene i contributes one question of family families[i % len(families)] (scenes lacking that family
    are skipped), so the list is fixed by (split, per_family, start) alone."""
    out, counts, i = [], {f: 0 for f in families}, start
    while min(counts.values()) < per_family:
        fam = families[i % len(families)]
        if counts[fam] < per_family:
            s = make_scene(split, i, 1, families=(fam,))
            if s.qa:
                item = (fam, s.image, s.qa[0][1], s.qa[0][2])
                out.append(item + (s.templates[0] in HELD_OUT,) if held else item)
                counts[fam] += 1
        i += 1
    return out


def describe_items(text: str) -> list:
    """The items of a describe answer (for the set-match score)."""
    return sorted(t.strip() for t in text.split(",") if t.strip())


def score(family: str, answer: str, got: str) -> float:
    """1.0 for a right answer: exact match, and for describe the same set of items (order free)."""
    if family == "describe":
        return float(describe_items(got) == describe_items(answer))
    return float(got.strip() == answer)


def describe_f1(answer: str, got: str) -> float:
    """The partial score of a describe answer: F1 of its items against the truth."""
    a, g = describe_items(answer), describe_items(got)
    common = sum(min(a.count(x), g.count(x)) for x in set(a))
    return 0.0 if not common else 2 * common / (len(a) + len(g))


def corpus(n_scenes: int = 3000, seed_split: str = "train") -> list:
    """Text the tokenizer is trained on: questions (every template, both spellings) and answers."""
    lines = ["You are a helpful assistant.", "user", "assistant", "system"]
    for i in range(n_scenes):
        rng = scene_rng(seed_split, (1 << 38) + i)
        s = make_scene(seed_split, (1 << 38) + i, n_questions=8)
        for _, q, a in s.qa:
            lines += [q, a]
        for train, held in TEMPLATES.values():
            t = rng.choice(train + held)
            subj = rng.choice(SHAPES)
            lines.append(surface(t.format(x=subj, r=region_phrase(rng.choice(REGIONS[1]))), rng))
    return lines
