"""Procedural scenes and their captions: the text demo's data set.

A scene is one or two shapes on a plain background, 36x36 RGB, the image a 3x3 grid
of 12-pixel cells (3x3 patches of 4 pixels each). An object has a colour (six, 60
degrees of hue apart), a shape (circle, square, triangle), a size (small: 6 pixels
across, large: 10) and a cell; two objects never share a cell or a colour. The
background is black, gray or white; a caption that does not name it means black.

A caption is drawn from a small grammar with several phrasings of every part
("a small red circle in the top left corner", "top-left: a little red disc", ...).
Some attribute combinations (HELD_OUT_PAIRS) and some sentence forms
(HELD_OUT_TEMPLATES) never occur in training: the evaluation asks for them.

The checker that judges the model's images (checker.py) is written apart from this
file and imports nothing from it.
"""

import itertools
from dataclasses import dataclass, field, replace
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

from ..demo_common.drawing import from_model as from_model
from ..demo_common.drawing import to_model as to_model

SIZE = 36
CELL = 12
COLOURS = {
    "red": (220, 40, 40),
    "yellow": (225, 215, 35),
    "green": (40, 185, 45),
    "cyan": (35, 200, 210),
    "blue": (45, 60, 230),
    "purple": (190, 45, 215),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 6.0, "large": 10.0}
SQUARE = 1.0  # a square's side against the size (a circle's diameter): as wide as the circle
JITTER = 0.25  # pixels: the most an object's size and centre vary
BACKGROUNDS = {"black": (18, 18, 18), "gray": (120, 120, 120), "white": (236, 236, 236)}

# Words of each attribute; the first is the plain one (evaluation prompts use any).
COLOUR_WORDS = {c: [c] for c in COLOURS}
COLOUR_WORDS["purple"] = ["purple", "violet"]
COLOUR_WORDS["cyan"] = ["cyan", "turquoise"]
SHAPE_WORDS = {"circle": ["circle", "disc", "disk", "dot", "ball"], "square": ["square", "box", "block"]}
SHAPE_WORDS["triangle"] = ["triangle"]
SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big"]}
BACKGROUND_WORDS = {"black": ["black", "dark"], "gray": ["gray", "grey"], "white": ["white", "light"]}
ROW_WORDS = (["top", "upper"], ["middle", "center"], ["bottom", "lower"])
COL_WORDS = (["left"], ["middle", "center"], ["right"])

# Combinations no training caption shows; the evaluation asks for exactly these.
HELD_OUT_PAIRS = {
    ("colour", "shape"): {("red", "triangle"), ("green", "square"), ("cyan", "circle"), ("purple", "triangle")},
    ("shape", "cell"): {("circle", (0, 2)), ("square", (2, 0)), ("triangle", (1, 1))},
    ("colour", "size"): {("yellow", "small"), ("blue", "large")},
}


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    size: str
    cell: Tuple[int, int]  # (row, column), 0..2


@dataclass(frozen=True)
class Scene:
    things: Tuple[Thing, ...]
    background: str = "black"


@dataclass
class Caption:
    text: str
    scene: Scene
    template: str
    mentions: dict = field(default_factory=dict)  # which attributes the text states


def held_out(thing: Thing) -> bool:
    """Does this object carry a combination that training never shows?"""
    values = {"colour": thing.colour, "shape": thing.shape, "size": thing.size, "cell": thing.cell}
    return any((values[a], values[b]) in pairs for (a, b), pairs in HELD_OUT_PAIRS.items())


def random_thing(rng, held: Optional[bool] = False, exclude_cells=(), exclude_colours=()) -> Thing:
    """An object; held=False: only training combinations, True: a held-out one, None: any."""
    for _ in range(10_000):
        t = Thing(
            str(rng.choice([c for c in COLOURS if c not in exclude_colours])),
            str(rng.choice(SHAPES)),
            str(rng.choice(list(SIZES))),
            tuple(
                int(v) for v in rng.choice([c for c in itertools.product(range(3), range(3)) if c not in exclude_cells])
            ),
        )
        if held is None or held_out(t) == held:
            return t
    raise RuntimeError("no object fits")


def random_scene(rng, n: Optional[int] = None, held: Optional[bool] = False, two_share=0.3) -> Scene:
    n = n or (2 if rng.random() < two_share else 1)
    first = random_thing(rng, held)
    things = [first]
    if n == 2:  # the second object: a training combination unless anything goes
        second = random_thing(rng, False if held is not None else None, [first.cell], [first.colour])
        things.append(second)
    return Scene(tuple(things), str(rng.choice(list(BACKGROUNDS))))


# -- drawing -----------------------------------------------------------------------

_SS = 4  # supersampling


def draw(scene: Scene, rng) -> np.ndarray:
    """One anti-aliased (36, 36, 3) uint8 image of the scene."""
    bg = np.array(BACKGROUNDS[scene.background]) + rng.uniform(-8, 8) + rng.uniform(-3, 3, 3)
    img = Image.new("RGB", (SIZE * _SS, SIZE * _SS), tuple(int(v) for v in np.clip(bg, 0, 255)))
    d = ImageDraw.Draw(img)
    for t in scene.things:
        fg = np.clip(np.array(COLOURS[t.colour]) + rng.uniform(-10, 10, 3), 0, 255)
        fill = tuple(int(v) for v in fg)
        # Little jitter of size and place: the flow predicts a cell's pixels as one
        # token, each pixel on its own given the text, so an edge whose place varies
        # is drawn as a blurred, wider halo (read as the wrong size and shape).
        s = SIZES[t.size] + rng.uniform(-JITTER, JITTER)
        cy = (t.cell[0] + 0.5) * CELL + rng.uniform(-JITTER, JITTER)
        cx = (t.cell[1] + 0.5) * CELL + rng.uniform(-JITTER, JITTER)
        if t.shape == "circle":
            r = s / 2
            box = [(cx - r) * _SS, (cy - r) * _SS, (cx + r) * _SS, (cy + r) * _SS]
            d.ellipse(box, fill=fill)
        elif t.shape == "square":
            r = SQUARE * s / 2
            d.rectangle([(cx - r) * _SS, (cy - r) * _SS, (cx + r) * _SS - 1, (cy + r) * _SS - 1], fill=fill)
        else:
            h = s * 0.9
            pts = [(cx, cy - h / 2), (cx + s / 2, cy + h / 2), (cx - s / 2, cy + h / 2)]
            d.polygon([(x * _SS, y * _SS) for x, y in pts], fill=fill)
    return np.asarray(img.resize((SIZE, SIZE), Image.Resampling.BOX))


# -- captions ------------------------------------------------------------------------


def _pick(rng, words):
    return str(words[int(rng.integers(len(words)))])


def position(cell, rng) -> Tuple[str, str]:
    """(bare phrase, phrase with its preposition) for a cell, e.g. ("top-left", "in the top left corner")."""
    r, c = cell
    row, col = _pick(rng, ROW_WORDS[r]), _pick(rng, COL_WORDS[c])
    if (r, c) == (1, 1):
        bare = _pick(rng, ["center", "middle", "centre", "center of the image", "middle of the picture"])
        return bare, f"{_pick(rng, ['in the', 'at the'])} {bare}"
    if r != 1 and c != 1:  # a corner
        joint = _pick(rng, [" ", " ", "-"])
        bare = f"{row}{joint}{col}" + _pick(rng, ["", "", " corner"])
        return bare, f"{_pick(rng, ['in the', 'at the'])} {bare}"
    if r == 1:  # left or right edge
        bare = _pick(rng, [col, f"{row} {col}", f"{col} side"])
        prep = "on the" if bare in (col, f"{col} side") else _pick(rng, ["in the", "at the"])
        return bare, f"{prep} {bare}"
    plain = ROW_WORDS[r][0]
    bare = _pick(rng, [plain, f"{row} {col}", f"{plain} edge"])  # top or bottom edge
    return bare, f"{_pick(rng, ['at the', 'in the'])} {bare}"


def noun_phrase(t: Thing, rng, article=True, size=True) -> str:
    words = ([_pick(rng, SIZE_WORDS[t.size])] if size else []) + [
        _pick(rng, COLOUR_WORDS[t.colour]),
        _pick(rng, SHAPE_WORDS[t.shape]),
    ]
    return ("a " if article else "") + " ".join(words)


# One-object sentence forms: {np} a noun phrase, {bare}/{prep} the position.
TEMPLATES = {
    "np_prep": "{np} {prep}",
    "prep_np": "{prep}, {np}",
    "there_is": "there is {np} {prep}",
    "prep_there_is": "{prep} there is {np}",
    "image_of": "an image of {np} {prep}",
    "bare": "{np_bare} {prep}",
    # held out: never in training
    "colon": "{bare}: {np}",
    "seen": "{np} can be seen {prep}",
}
HELD_OUT_TEMPLATES = ("colon", "seen")
TRAIN_TEMPLATES = tuple(k for k in TEMPLATES if k not in HELD_OUT_TEMPLATES)
TWO_TEMPLATES = {"and": "{a} and {b}", "comma": "{a}, {b}", "with": "{a} with {b}", "plus": "{a}; {b}"}
HELD_OUT_TWO = ("plus",)


def _clause(t: Thing, rng, template: str, size=True) -> str:
    bare, prep = position(t.cell, rng)
    return TEMPLATES[template].format(
        np=noun_phrase(t, rng, size=size), np_bare=noun_phrase(t, rng, article=False, size=size), bare=bare, prep=prep
    )


def caption(scene: Scene, rng, held_phrasing: Optional[bool] = False, full=False) -> Caption:
    """A caption of the scene. held_phrasing: False: training forms only; True: a
    held-out form; None: any. full: state every attribute (else the size is sometimes
    left out, the image then free there, and a black background sometimes: the
    default)."""
    pool = TRAIN_TEMPLATES if held_phrasing is False else HELD_OUT_TEMPLATES if held_phrasing else tuple(TEMPLATES)
    size = full or rng.random() < 0.85
    if len(scene.things) == 1:
        template = _pick(rng, pool)
        text = _clause(scene.things[0], rng, template, size)
    else:
        two = (
            TWO_TEMPLATES
            if held_phrasing is None
            else {k: v for k, v in TWO_TEMPLATES.items() if (k in HELD_OUT_TWO) == bool(held_phrasing)}
        )
        joint = _pick(rng, list(two))
        forms = [_pick(rng, [p for p in pool if not p.startswith("prep_")] or pool) for _ in range(2)]
        a, b = (_clause(t, rng, f, size) for t, f in zip(scene.things, forms))
        if joint == "with" and b.startswith(("there is ", "an image of ")):
            b = b.split(" ", 2)[2] if b.startswith("there is ") else b[len("an image of ") :]
        text, template = two[joint].format(a=a, b=b), f"{joint}:{forms[0]}+{forms[1]}"
    # An unstated background is black: the flow's first token (a corner, mostly
    # background) is then told by the text instead of left to a three-way guess.
    background = full or scene.background != "black" or rng.random() < 0.5
    if background:
        word = _pick(rng, BACKGROUND_WORDS[scene.background])
        text += _pick(rng, [f" on a {word} background", f" on {word}", f", {word} background"])
    return Caption(text, scene, template, {"size": size, "background": background})


def make_batch(n: int, seed: int, two_share=0.3) -> Tuple[np.ndarray, List[str]]:
    """n training images (uint8) and captions: training combinations and phrasings only."""
    rng = np.random.default_rng(seed)
    images, texts = [], []
    for _ in range(n):
        scene = random_scene(rng, held=False, two_share=two_share)
        images.append(draw(scene, rng))
        texts.append(caption(scene, rng).text)
    return np.stack(images), texts


def caption_corpus(n: int, seed: int) -> List[str]:
    """Training captions alone (the language model's pretraining text)."""
    rng = np.random.default_rng(seed)
    return [caption(random_scene(rng, held=False), rng).text for _ in range(n)]


def all_words() -> List[str]:
    """Every word the grammar can write (the tokenizer's vocabulary), held-out forms included."""
    words = set()
    for lists in (COLOUR_WORDS, SHAPE_WORDS, SIZE_WORDS, BACKGROUND_WORDS):
        for ws in lists.values():
            words.update(ws)
    for ws in ROW_WORDS + COL_WORDS:
        words.update(ws)
    texts = list(TEMPLATES.values()) + list(TWO_TEMPLATES.values())
    texts += ["a in the at the on the corner side edge centre of the image picture background", "an image of"]
    for t in texts:
        for w in t.replace("{", " {").replace("}", "} ").split():
            if not w.startswith("{"):
                words.add(w.strip(",;:"))
    return sorted(w for w in words if w)


def change(thing: Thing, attribute: str, rng, scene: Scene) -> Thing:
    """The object with one attribute changed to another value (a distractor caption's)."""
    others = [t for t in scene.things if t is not thing]
    if attribute == "colour":
        options = [c for c in COLOURS if c != thing.colour and all(c != o.colour for o in others)]
        return replace(thing, colour=str(rng.choice(options)))
    if attribute == "shape":
        return replace(thing, shape=str(rng.choice([s for s in SHAPES if s != thing.shape])))
    if attribute == "size":
        return replace(thing, size="large" if thing.size == "small" else "small")
    cells = [c for c in itertools.product(range(3), range(3)) if c != thing.cell and all(c != o.cell for o in others)]
    return replace(thing, cell=tuple(int(v) for v in cells[int(rng.integers(len(cells)))]))
