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

import codecs
import hashlib
import importlib.resources
import math
import operator
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
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


# Pillow modes whose pixels are deeper than 8 bits: 16-bit integers (I;16 and its byte
# orders), 32-bit integers (I) and 32-bit floats (F). All of them are one grey channel.
DEEP_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """Any PIL image as a FloatTensor[3, H, W] in [0, 1].

    Deep grey images (16-bit, 32-bit, float) are scaled by :func:`unit_grey` without a
    detour through 8 bits; every other mode goes through :func:`to_rgb_on_white`.
    """
    if image.mode in DEEP_GREY_MODES:
        return _grey_to_tensor(unit_grey(image))
    return _rgb_to_tensor(to_rgb_on_white(image))


def _rgb_to_tensor(image: Image.Image) -> torch.Tensor:
    """An 8-bit RGB PIL image as a FloatTensor[3, H, W] in [0, 1]."""
    pixels = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255.0


def _grey_to_tensor(image: Image.Image) -> torch.Tensor:
    """A mode "F" PIL image with values in [0, 1] as a grey FloatTensor[3, H, W]."""
    # Clipped because bicubic resizing of float pixels can overshoot a little past 0 and 1.
    grey = torch.from_numpy(np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0))
    return grey.expand(3, *grey.shape).clone()


def unit_grey(image: Image.Image, source: str | Path | None = None) -> Image.Image:
    """A 16-bit, 32-bit or float grey image as a mode "F" image with values in [0, 1].

    ``Image.convert("RGB")`` just clips these pixels to 0..255, so a mid-grey 16-bit PNG
    (32768) turns white and a float image in [0, 1] turns black. Here each mode is scaled
    by the range its pixels follow:

    * ``I;16``: divided by 65535.
    * ``I`` (32-bit integers): 16-bit data if every value lies in 0..65535 (Pillow often
      hands back 16-bit files in this mode), else the positive 32-bit range 0..2**31-1;
      negative values are stretched as below.
    * ``F`` (floats): taken as they are if they lie in [0, 1], else stretched from their
      minimum to their maximum, with a warning that names ``source``.
    """
    if image.mode not in DEEP_GREY_MODES:
        raise ValueError(f"unit_grey takes one of the modes {DEEP_GREY_MODES}, not {image.mode!r}")
    values = np.asarray(image, dtype=np.float64)  # float64 holds every 32-bit integer exactly
    values = np.where(np.isfinite(values), values, 0.0)  # NaN and inf carry no brightness
    low, high = values.min(), values.max()
    if image.mode.startswith("I;16"):
        scaled = values / 65535
    elif image.mode == "I" and low >= 0:
        scaled = values / (65535 if high <= 65535 else 2**31 - 1)
    elif image.mode == "F" and low >= 0 and high <= 1:
        scaled = values
    else:  # floats outside [0, 1] or negative integers: no convention fits
        scaled = _stretch(values, image.mode, source)
    return Image.fromarray(scaled.astype(np.float32))


def _stretch(values: np.ndarray, mode: str, source: str | Path | None) -> np.ndarray:
    """Map the smallest value to 0 and the largest to 1, and say so: brightness is guessed."""
    low, high = float(values.min()), float(values.max())
    warnings.warn(
        f"image {source or '(in memory)'} (mode {mode}) has pixel values in [{low:g}, {high:g}], "
        "not a range with a known meaning; stretched them to [0, 1]. Save it as 8- or 16-bit "
        "to keep its real brightness.",
        stacklevel=3,
    )
    if high == low:  # a flat image has no range to stretch
        return np.clip(values, 0.0, 1.0)
    return (values - low) / (high - low)


def _has_alpha(image: Image.Image) -> bool:
    """Whether ``image`` carries transparency: an alpha band, or a transparent colour."""
    # "transparency" in info: a palette index (P) or one colour (L, RGB) that is see-through.
    return image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info


def to_rgb_on_white(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of any PIL image, with transparent parts composited onto white.

    ``convert("RGB")`` knows each mode's colour maths (palette, grey, CMYK, YCbCr, LAB) but
    drops alpha, which would show the colour hidden under transparent pixels (often black).
    Deep grey modes are scaled by :func:`unit_grey` first, since ``convert`` would clip them.
    """
    if image.mode in DEEP_GREY_MODES:
        grey = np.asarray(unit_grey(image), dtype=np.float32)
        return Image.fromarray(np.round(grey * 255).astype(np.uint8)).convert("RGB")
    if _has_alpha(image):
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


class ImageTooLargeError(ValueError):
    """An image has more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` allows.

    Pillow's limit guards against "decompression bombs": small files that decode to
    gigabytes of pixels. This is not a broken file, so it is raised rather than skipped:
    shrink the picture, or raise the limit if you trust the file.
    """


def _too_large(path: str | Path, detail: str) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"{path}: {detail}, more than PIL.Image.MAX_IMAGE_PIXELS ({Image.MAX_IMAGE_PIXELS}) "
        "allows, so it was not decoded (it may be a decompression bomb). Shrink the image, "
        "or if you trust the file, raise the limit first: PIL.Image.MAX_IMAGE_PIXELS = <pixels>"
    )


def _open_image(path: str | Path) -> Image.Image:
    """``Image.open``, refusing images over ``Image.MAX_IMAGE_PIXELS`` with ImageTooLargeError."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns up to twice the limit, then raises; we refuse all of it below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise _too_large(path, str(error).rstrip(".")) from None
    limit = Image.MAX_IMAGE_PIXELS  # read now: a user may have changed it
    if limit is not None and image.width * image.height > limit:
        image.close()
        raise _too_large(path, f"{image.width}x{image.height} = {image.width * image.height} pixels")
    return image


def load_image(path: str | Path, image_size: int) -> torch.Tensor:
    """An image file as a FloatTensor[3, image_size, image_size] in [0, 1].

    Turned upright by its EXIF orientation (phone photos are stored sideways with a tag
    saying so), transparency composited onto white, any mode Pillow reads turned into RGB
    (see :func:`to_rgb_on_white` and :func:`unit_grey`), then resized and centre-cropped
    to a square. Raises :class:`ImageTooLargeError` for images over Pillow's pixel limit.
    """
    with _open_image(path) as image:
        image = ImageOps.exif_transpose(image)
        # Deep grey images are resized as floats (mode "F"), so they keep their precision.
        deep = image.mode in DEEP_GREY_MODES
        image = unit_grey(image, source=path) if deep else to_rgb_on_white(image)
        image = ImageOps.fit(image, (image_size, image_size), Image.BICUBIC)
    return _grey_to_tensor(image) if deep else _rgb_to_tensor(image)


def _decode_caption(raw: bytes) -> tuple[str, bool]:
    """Caption bytes as text, and whether they were Unicode (UTF-8 or UTF-16 with a BOM).

    Text that is not valid UTF-8 is most likely from an older Windows or Western-European
    editor: Windows-1252 (Latin-1 plus curly quotes and the like), or Latin-1, which can
    decode any bytes at all.
    """
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # Notepad's "Unicode"
        return raw.decode("utf-16"), True
    try:
        return raw.decode("utf-8-sig"), True  # utf-8-sig also drops a leading BOM
    except UnicodeDecodeError:
        pass
    try:
        return raw.decode("cp1252"), False
    except UnicodeDecodeError:  # cp1252 leaves five byte values undefined
        return raw.decode("latin-1"), False


# Why a file can be left out of an ImageFolderDataset, in the order the warning lists them.
SKIP_REASONS = (
    "unreadable image",
    "missing caption",
    "not an image",
    "image too large",
    "unreadable caption",
    "unreadable folder",
    "hidden",
)


class ImageFolderDataset(Dataset):
    """Images in ``root`` (searched recursively) captioned by same-named ``.txt`` files.

    ``cat.jpg`` is captioned by ``cat.txt`` (first non-empty line, UTF-8; other bytes are
    read as Windows-1252 with a warning). Whatever cannot be used is skipped when the folder
    is scanned: unreadable or too large images (with ``check_images=True``), images
    without a caption or whose caption cannot be read, files that are not images, folders
    that cannot be listed, and hidden files and folders (names starting with ".", such as
    ``.ipynb_checkpoints``). They are kept in :attr:`skipped`, counted in
    :attr:`skip_counts` and named in one warning, so a bad file never stops an epoch
    half-way. A folder with no usable pair is an error.

    Indexing works like a list's: ``dataset[-1]`` is the last item, and an index out of
    range raises IndexError (which is also how ``for image, caption in dataset`` ends).
    """

    def __init__(self, root: str | Path, image_size: int = 64, check_images: bool = True):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a folder")
        self.image_size = image_size
        self.skipped: dict[str, list[Path]] = {reason: [] for reason in SKIP_REASONS}
        self.not_utf8: list[Path] = []  # caption files read as Windows-1252 / Latin-1
        self.items: list[tuple[Path, str]] = []
        for path in self._list_files():
            self._add(path, check_images)
        self._warn_skipped()
        if not self.items:
            raise ValueError(
                f"no usable image-caption pairs in {self.root}: put image files (e.g. cat.jpg) next "
                f"to caption files with the same name (cat.txt). Skipped: {self.skip_counts}"
            )

    def fingerprint(self) -> str:
        """A digest of what the data is: every pair's file name, size, modification time and
        caption, and the image size. Change any image or caption and it changes."""
        digest = hashlib.sha256(str(self.image_size).encode())
        for path, caption in self.items:
            stat = path.stat()
            digest.update(f"{path.relative_to(self.root)}\0{stat.st_size}\0{stat.st_mtime_ns}\0{caption}\0".encode())
        return digest.hexdigest()[:16]

    @property
    def skip_counts(self) -> dict[str, int]:
        """How many entries were skipped, for each reason that occurred (see SKIP_REASONS)."""
        # Reasons with nothing skipped are left out, so the summary stays short.
        return {reason: len(paths) for reason, paths in self.skipped.items() if paths}

    def _list_files(self) -> list[Path]:
        """Every file under root that is not hidden, sorted; notes hidden and unreadable entries."""

        def unreadable(error: OSError) -> None:
            # os.walk calls this for a folder it cannot list, then carries on with the rest.
            self.skipped["unreadable folder"].append(Path(error.filename))

        files = []
        for folder, subfolders, names in os.walk(self.root, onerror=unreadable):
            folder = Path(folder)
            hidden = sorted(name for name in subfolders + names if name.startswith("."))
            self.skipped["hidden"] += [folder / name for name in hidden]
            subfolders[:] = [name for name in subfolders if not name.startswith(".")]  # os.walk skips removed ones
            files += [folder / name for name in names if not name.startswith(".")]
        return sorted(files)

    def _add(self, path: Path, check_images: bool) -> None:
        """Add ``path`` and its caption to :attr:`items`, or note in :attr:`skipped` why not."""
        suffix = path.suffix.lower()
        if suffix == ".txt":
            return  # captions are read next to their images
        if suffix not in IMAGE_EXTENSIONS:
            self.skipped["not an image"].append(path)
            return
        caption_path = path.with_suffix(".txt")
        try:
            caption = self._read_caption(caption_path)
        except OSError:  # no permission, a folder named cat.txt, a disk error...
            self.skipped["unreadable caption"].append(caption_path)
            return
        if caption is None:
            self.skipped["missing caption"].append(path)
            return
        problem = self._image_problem(path) if check_images else None
        if problem is not None:
            self.skipped[problem].append(path)
        else:
            self.items.append((path, caption))

    def _read_caption(self, path: Path) -> str | None:
        """The first non-empty line of a caption file; None if there is none. OSError if unreadable."""
        if not path.exists():
            return None
        text, unicode = _decode_caption(path.read_bytes())
        if not unicode:
            self.not_utf8.append(path)
        lines = [line.strip() for line in text.splitlines()]
        lines = [line for line in lines if line]
        return lines[0] if lines else None

    def _image_problem(self, path: Path) -> str | None:
        """Why ``path`` cannot be used (a key of :attr:`skipped`), or None if it loads."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # warnings about the pixels come again when the item loads
                # The same function as __getitem__, so what passes here also loads there.
                load_image(path, self.image_size)
        except ImageTooLargeError:
            return "image too large"
        except (OSError, ValueError):  # includes UnidentifiedImageError and truncated files
            return "unreadable image"
        return None

    def _names(self, paths: list[Path]) -> str:
        """The first few paths, relative to root, for a warning."""
        shown = [str(p.relative_to(self.root)) if p.is_relative_to(self.root) else str(p) for p in paths[:5]]
        return ", ".join(shown) + (", ..." if len(paths) > 5 else "")

    def _warn_skipped(self) -> None:
        lines = [f"  {reason}: {len(paths)} ({self._names(paths)})" for reason, paths in self.skipped.items() if paths]
        if lines:
            warnings.warn(f"ImageFolderDataset({self.root}) skipped some files:\n" + "\n".join(lines), stacklevel=3)
        if self.not_utf8:
            warnings.warn(
                f"ImageFolderDataset({self.root}): {len(self.not_utf8)} caption file(s) are not UTF-8 "
                f"and were read as Windows-1252 / Latin-1: {self._names(self.not_utf8)}. "
                "Save them as UTF-8 if any accented letters look wrong.",
                stacklevel=3,
            )

    def __len__(self) -> int:
        return len(self.items)

    def _position(self, index: int) -> int:
        """``index`` as a position in :attr:`items`, counting from the end if negative, like a list."""
        index = operator.index(index)  # ints and integer tensors / numpy ints; not floats or slices
        if not -len(self.items) <= index < len(self.items):
            raise IndexError(f"index {index} out of range for a dataset of {len(self.items)} items")
        return index % len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        start = self._position(index)
        # A file can break after the scan (or was never checked, with check_images=False):
        # count it, warn, and hand back the next readable item instead of ending the epoch.
        for attempt in range(len(self.items)):
            path, caption = self.items[(start + attempt) % len(self.items)]
            try:
                return load_image(path, self.image_size), caption
            except ImageTooLargeError:
                raise  # not broken: only the user can decide (shrink it, or raise the limit)
            except (OSError, ValueError) as error:
                if path not in self.skipped["unreadable image"]:
                    self.skipped["unreadable image"].append(path)
                warnings.warn(f"skipping unreadable image {path}: {error}", stacklevel=2)
        raise RuntimeError(f"no image in {self.root} can be read any more; see the warnings above")
