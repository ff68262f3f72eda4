"""The course's three image-caption datasets, all with one interface.

Every dataset here is a ``torch.utils.data.Dataset`` whose items are
``(image, caption)``: ``image`` is a ``FloatTensor[3, S, S]`` with values in [0, 1]
and ``caption`` is a ``str``. So every later lesson works on any of them.

* :class:`ShapesDataset` -- captioned scenes of one or two coloured shapes, made on the fly
  and deterministic from a seed. Every item carries its ground-truth scene, and a held-out
  split holds shape-colour pairs that never appear in training (zero-shot composition).
* :class:`EmojiDataset` -- a few thousand real pictures (emoji) named by their Unicode
  names, shipped in ``data/emoji``.
* :class:`ImageFolderDataset` -- your own folder of images with same-named ``.txt``
  captions.
"""

from __future__ import annotations

import importlib.resources
import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

# --------------------------------------------------------------------------------------
# Finding the files that ship with the course
# --------------------------------------------------------------------------------------


def shipped_path(name: str) -> Path:
    """Path of a file in the repository's ``data/`` folder.

    Works both in a git checkout (editable install) and in an installed wheel, where the
    same folder travels as the ``dalle_lesson.shipped`` package.
    """
    checkout = Path(__file__).resolve().parent.parent / "data" / name
    if checkout.exists():
        return checkout
    try:
        installed = Path(str(importlib.resources.files("dalle_lesson.shipped") / name))
    except ModuleNotFoundError:
        installed = None
    if installed is not None and installed.exists():
        return installed
    raise FileNotFoundError(
        f"the shipped file data/{name} was not found (looked in {checkout.parent} and in "
        "the installed package). Reinstall the course package from a full checkout."
    )


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a FloatTensor[3, H, W] in [0, 1]."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255.0


def to_rgb_on_white(image: Image.Image) -> Image.Image:
    """Drop transparency by compositing onto white (emoji and PNGs with alpha)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# --------------------------------------------------------------------------------------
# Shapes: the vocabulary of the scenes
# --------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "cyan": (40, 200, 220),
    "blue": (40, 80, 230),
    "purple": (150, 60, 200),
    "white": (245, 245, 245),
}
BACKGROUND = (30, 30, 36)
SIZES = {"small": 0.24, "large": 0.40}  # side of the shape's bounding box, as a fraction of the image
RELATIONS = ("left of", "right of", "above", "below")

# Shape-colour pairs that never occur in the training (or test) split. One colour per
# shape, so every shape and every colour is still seen in training, only never together.
# Scenes in the "heldout" split contain at least one of these pairs.
HELD_OUT_PAIRS = frozenset(
    {
        ("circle", "purple"),
        ("square", "yellow"),
        ("triangle", "blue"),
        ("diamond", "red"),
        ("star", "green"),
        ("cross", "orange"),
    }
)

SPLITS = ("train", "test", "heldout")

# Words a caption may use for each attribute; the first is the canonical one.
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
RELATION_WORDS = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass(frozen=True)
class ShapeObject:
    """One object in a scene: what it is, and where its centre is (fractions of the image)."""

    shape: str
    colour: str
    size: str
    x: float
    y: float  # 0 = top, 1 = bottom, as in image coordinates


@dataclass(frozen=True)
class Scene:
    """The ground truth behind a shapes image.

    With two objects, ``relation`` says where ``objects[0]`` is relative to ``objects[1]``
    (e.g. ``"left of"``); with one object it is ``None``.
    """

    objects: tuple[ShapeObject, ...]
    relation: str | None = None


def _random_object_kind(rng: random.Random, split: str, force_held_out: bool) -> tuple[str, str, str]:
    """Draw (shape, colour, size) allowed in this split."""
    if force_held_out:
        shape, colour = rng.choice(sorted(HELD_OUT_PAIRS))
    else:
        while True:
            shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
            if split == "heldout" or (shape, colour) not in HELD_OUT_PAIRS:
                break
    return shape, colour, rng.choice(list(SIZES))


def _place_one(rng: random.Random, size: str) -> tuple[float, float]:
    half = SIZES[size] / 2
    return rng.uniform(half, 1 - half), rng.uniform(half, 1 - half)


def _place_pair(rng: random.Random, first_size: str, second_size: str, relation: str):
    """Centres for two objects so that ``relation`` clearly holds and they do not overlap.

    "Clearly" means the offset along the relation's axis is at least twice the offset
    across it, and the two bounding boxes are separated along that axis.
    """
    half_a, half_b = SIZES[first_size] / 2, SIZES[second_size] / 2
    while True:
        ax, ay = rng.uniform(half_a, 1 - half_a), rng.uniform(half_a, 1 - half_a)
        bx, by = rng.uniform(half_b, 1 - half_b), rng.uniform(half_b, 1 - half_b)
        along, across = {
            "left of": (bx - ax, by - ay),
            "right of": (ax - bx, by - ay),
            "above": (by - ay, bx - ax),
            "below": (ay - by, bx - ax),
        }[relation]
        if along > half_a + half_b + 0.02 and abs(across) * 2 <= along:
            return (ax, ay), (bx, by)


def random_scene(rng: random.Random, split: str = "train") -> Scene:
    """Draw one scene for ``split`` from ``rng`` (see :data:`HELD_OUT_PAIRS`)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    n_objects = rng.choice((1, 2))
    # In the held-out split the first object always carries a held-out pair; which object
    # is drawn first is random, so held-out pairs appear on either side of a relation.
    kinds = [_random_object_kind(rng, split, force_held_out=(split == "heldout" and k == 0)) for k in range(n_objects)]
    if n_objects == 1:
        (shape, colour, size), = kinds
        x, y = _place_one(rng, size)
        return Scene((ShapeObject(shape, colour, size, x, y),))
    if rng.random() < 0.5:
        kinds.reverse()
    relation = rng.choice(RELATIONS)
    (ax, ay), (bx, by) = _place_pair(rng, kinds[0][2], kinds[1][2], relation)
    first = ShapeObject(*kinds[0], ax, ay)
    second = ShapeObject(*kinds[1], bx, by)
    return Scene((first, second), relation)


# --------------------------------------------------------------------------------------
# Shapes: captions
# --------------------------------------------------------------------------------------


def _describe(obj: ShapeObject, size_word: str) -> str:
    return f"{size_word} {obj.colour} {obj.shape}"


def scene_captions(scene: Scene) -> list[str]:
    """Every caption the dataset may give ``scene``: templates x paraphrases, all true."""
    captions = []
    if scene.relation is None:
        (obj,) = scene.objects
        for size_word in SIZE_WORDS[obj.size]:
            thing = _describe(obj, size_word)
            captions += [f"a {thing}", f"a picture of a {thing}", f"there is a {thing}", f"one {thing}"]
        return captions
    first, second = scene.objects
    # The same scene said both ways round: "A left of B" and "B right of A".
    for (a, b, relation) in ((first, second, scene.relation), (second, first, INVERSE_RELATION[scene.relation])):
        for relation_word in RELATION_WORDS[relation]:
            for size_a in SIZE_WORDS[a.size][:2]:
                for size_b in SIZE_WORDS[b.size][:2]:
                    thing_a, thing_b = _describe(a, size_a), _describe(b, size_b)
                    captions += [
                        f"a {thing_a} {relation_word} a {thing_b}",
                        f"a picture of a {thing_a} {relation_word} a {thing_b}",
                    ]
    return captions


def canonical_caption(scene: Scene) -> str:
    """The one plain caption of a scene (first template, canonical words)."""
    return scene_captions(scene)[0]


# --------------------------------------------------------------------------------------
# Shapes: drawing
# --------------------------------------------------------------------------------------


def _shape_polygon(shape: str, cx: float, cy: float, half: float) -> list[tuple[float, float]]:
    """Outline of a shape centred at (cx, cy) inside a box of half-side ``half`` (pixels)."""
    if shape == "square":
        s = half * 0.85  # a square fills its box more than a circle does; keep areas similar
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - half), (cx + half, cy + half * 0.8), (cx - half, cy + half * 0.8)]
    if shape == "diamond":
        return [(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = half if k % 2 == 0 else half * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if shape == "cross":
        arm = half * 0.36
        return [
            (cx - arm, cy - half), (cx + arm, cy - half), (cx + arm, cy - arm), (cx + half, cy - arm),
            (cx + half, cy + arm), (cx + arm, cy + arm), (cx + arm, cy + half), (cx - arm, cy + half),
            (cx - arm, cy + arm), (cx - half, cy + arm), (cx - half, cy - arm), (cx - arm, cy - arm),
        ]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_scene(scene: Scene, image_size: int = 64, supersample: int = 4) -> Image.Image:
    """Draw a scene as an RGB PIL image of ``image_size`` x ``image_size`` pixels.

    Drawn ``supersample`` times larger, then box-filtered down, so edges are smooth at any size.
    """
    big = image_size * supersample
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        cx, cy, half = obj.x * big, obj.y * big, SIZES[obj.size] * big / 2
        colour = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=colour)
        else:
            draw.polygon(_shape_polygon(obj.shape, cx, cy, half), fill=colour)
    return canvas.reduce(supersample) if supersample > 1 else canvas


class ShapesDataset(Dataset):
    """Captioned scenes of one or two coloured shapes, generated on the fly.

    Item ``i`` is a pure function of ``(seed, split, i)``: the same arguments always give
    the same pixels and caption, on any machine, in any order of access.

    Args:
        length: number of items.
        image_size: side of the square images in pixels (32, 64, 256, ...).
        split: ``"train"`` and ``"test"`` (same distribution, different scenes) never contain
            a pair in :data:`HELD_OUT_PAIRS`; every ``"heldout"`` scene contains at least one.
        seed: selects the whole sequence of scenes.
    """

    def __init__(self, length: int = 10_000, image_size: int = 64, split: str = "train", seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
        self.length, self.image_size, self.split, self.seed = length, image_size, split, seed

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> random.Random:
        # A string seed is hashed deterministically by random.Random (unlike hash()).
        return random.Random(f"shapes/{self.seed}/{self.split}/{index}")

    def scene(self, index: int) -> Scene:
        """Ground truth of item ``index``."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length} items")
        return random_scene(self._rng(index), self.split)

    def caption(self, index: int) -> str:
        rng = self._rng(index)
        scene = random_scene(rng, self.split)
        return rng.choice(scene_captions(scene))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length} items")
        rng = self._rng(index)
        scene = random_scene(rng, self.split)
        caption = rng.choice(scene_captions(scene))
        return pil_to_tensor(render_scene(scene, self.image_size)), caption


def all_shapes_captions() -> list[str]:
    """Every caption any shapes scene can have, up to object positions (for tokenizers)."""
    captions = set()
    for shape in SHAPES:
        for colour in COLOURS:
            for size in SIZES:
                obj = ShapeObject(shape, colour, size, 0.5, 0.5)
                captions.update(scene_captions(Scene((obj,))))
    objects = [ShapeObject(s, c, z, 0.5, 0.5) for s in SHAPES for c in COLOURS for z in SIZES]
    rng = random.Random(0)
    for _ in range(2000):  # a sample of pairs covers every word and every template
        a, b = rng.sample(objects, 2)
        captions.update(scene_captions(Scene((a, b), rng.choice(RELATIONS))))
    return sorted(captions)


# --------------------------------------------------------------------------------------
# Emoji: real pictures with real names
# --------------------------------------------------------------------------------------

EMOJI_CELL = 64  # pixels per emoji in the shipped sprite sheets


class EmojiDataset(Dataset):
    """Emoji pictures captioned with their lower-case Unicode names (e.g. "grinning face").

    The pictures ship in ``data/emoji/`` as sprite sheets (``sheet_*.png``, 64x64 cells,
    row by row) with ``emoji.tsv`` listing index, code points and name; see
    ``data/README.md`` for the licence and the script that built them.
    """

    def __init__(self, image_size: int = 64, root: str | Path | None = None):
        self.root = Path(root) if root is not None else shipped_path("emoji")
        table = (self.root / "emoji.tsv").read_text(encoding="utf-8").splitlines()
        rows = [line.split("\t") for line in table if line and not line.startswith("#")]
        for number, row in enumerate(rows):
            if len(row) != 3 or row[0] != str(number):
                raise ValueError(
                    f"{self.root / 'emoji.tsv'}: entry {number} should read 'index<TAB>codepoints<TAB>name' "
                    f"with index {number}, got {row!r}; rebuild the set with data/emoji/build_emoji.py"
                )
        self.codepoints = [row[1] for row in rows]
        self.names = [row[2] for row in rows]
        self.image_size = image_size
        self._sheets: dict[int, Image.Image] = {}
        self._per_sheet = None

    def __len__(self) -> int:
        return len(self.names)

    def _sheet(self, number: int) -> Image.Image:
        if number not in self._sheets:
            with Image.open(self.root / f"sheet_{number:02d}.png") as sheet:
                self._sheets[number] = sheet.convert("RGB")
        return self._sheets[number]

    def picture(self, index: int) -> Image.Image:
        """Emoji ``index`` as a 64x64 RGB PIL image (white background)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} emoji")
        columns = self._sheet(0).width // EMOJI_CELL
        per_sheet = columns * (self._sheet(0).height // EMOJI_CELL)
        sheet = self._sheet(index // per_sheet)
        row, column = divmod(index % per_sheet, columns)
        box = (column * EMOJI_CELL, row * EMOJI_CELL, (column + 1) * EMOJI_CELL, (row + 1) * EMOJI_CELL)
        return sheet.crop(box)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        picture = self.picture(index)
        if self.image_size != EMOJI_CELL:
            picture = picture.resize((self.image_size, self.image_size), Image.BICUBIC)
        return pil_to_tensor(picture), self.names[index]


# --------------------------------------------------------------------------------------
# Your own data: a folder of images with same-named .txt captions
# --------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def load_image(path: str | Path, image_size: int) -> torch.Tensor:
    """Open an image file, drop alpha onto white, resize and centre-crop to a square."""
    with Image.open(path) as image:
        image = to_rgb_on_white(image)
        image = ImageOps.fit(image, (image_size, image_size), Image.BICUBIC)
    return pil_to_tensor(image)


class ImageFolderDataset(Dataset):
    """Images in ``root`` (searched recursively) captioned by same-named ``.txt`` files.

    ``cat.jpg`` is captioned by ``cat.txt`` (first non-empty line). Images that cannot be
    read, images without a caption and files that are not images are skipped when the
    folder is scanned; they are counted in :attr:`skipped` and named in one warning, so a
    bad file never stops an epoch half-way. A folder with no usable pair is an error.
    """

    def __init__(self, root: str | Path, image_size: int = 64, check_images: bool = True):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a folder")
        self.image_size = image_size
        self.skipped: dict[str, list[Path]] = {"unreadable image": [], "missing caption": [], "not an image": []}
        self.items: list[tuple[Path, str]] = []
        for path in sorted(p for p in self.root.rglob("*") if p.is_file()):
            if path.suffix.lower() == ".txt" or path.name.startswith("."):
                continue
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                self.skipped["not an image"].append(path)
                continue
            caption = self._read_caption(path.with_suffix(".txt"))
            if caption is None:
                self.skipped["missing caption"].append(path)
            elif check_images and not self._readable(path):
                self.skipped["unreadable image"].append(path)
            else:
                self.items.append((path, caption))
        self._warn_skipped()
        if not self.items:
            raise ValueError(
                f"no usable image-caption pairs in {self.root}: put image files (e.g. cat.jpg) next "
                f"to caption files with the same name (cat.txt). Skipped: {self.skip_counts}"
            )

    @property
    def skip_counts(self) -> dict[str, int]:
        return {reason: len(paths) for reason, paths in self.skipped.items()}

    @staticmethod
    def _read_caption(path: Path) -> str | None:
        if not path.is_file():
            return None
        lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
        lines = [line for line in lines if line]
        return lines[0] if lines else None

    @staticmethod
    def _readable(path: Path) -> bool:
        try:
            with Image.open(path) as image:
                image.load()  # decode fully: verify() alone misses truncated pixel data
            return True
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
            return False

    def _warn_skipped(self) -> None:
        lines = [
            f"  {reason}: {len(paths)} ({', '.join(p.name for p in paths[:5])}{', ...' if len(paths) > 5 else ''})"
            for reason, paths in self.skipped.items()
            if paths
        ]
        if lines:
            warnings.warn(f"ImageFolderDataset({self.root}) skipped some files:\n" + "\n".join(lines), stacklevel=3)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        # A file can break after the scan (or check_images=False): count it, warn, and hand
        # back the next readable item instead of crashing the epoch.
        for attempt in range(len(self.items)):
            path, caption = self.items[(index + attempt) % len(self.items)]
            try:
                return load_image(path, self.image_size), caption
            except (OSError, UnidentifiedImageError, ValueError) as error:
                if path not in self.skipped["unreadable image"]:
                    self.skipped["unreadable image"].append(path)
                warnings.warn(f"skipping unreadable image {path}: {error}", stacklevel=2)
        raise RuntimeError(f"no image in {self.root} can be read any more; see the warnings above")
