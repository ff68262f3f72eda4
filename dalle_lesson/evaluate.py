"""Read a Shapes picture and check it against its caption: the course's scorer.

A text-to-image model is only as good as how well its pictures match their captions. For
the Shapes data we can check that attribute by attribute, because we know exactly how the
pictures are drawn (``data.render_scene``). The scorer has two halves.

**Reading the caption.** The dataset writes every caption from a handful of templates
("a picture of a small red circle to the left of a big blue star"), so a tiny grammar
turns a caption back into a :class:`~dalle_lesson.data.Scene`: the objects' shape, colour
and size, and the relation between two objects. A caption outside the grammar is
*unscorable* (``None``): it is counted, never scored as a miss.

**Reading the image**, in four steps:

1. *Colour.* Every pixel is explained as one palette colour laid over the background with
   some coverage ``alpha`` between 0 and 1 ("unmixing"), so the soft, anti-aliased edge of
   a red square reads as "red, 30 % covered" instead of as some other colour. Pixels
   covered at least half are foreground.
2. *Objects.* Touching foreground pixels form a blob; specks too small to be a shape are
   dropped (decoders leave a few). A blob is one object unless splitting it explains its
   pixels better (see step 3): into its colours (touching or overlapping objects of
   different colours), or across its thinnest neck (two touching objects of one colour).
3. *Shape and size,* by analysis by synthesis: draw every shape at every size with the
   dataset's own renderer, centred where the object is, and keep the drawing whose
   coverage differs least from the object's. No training, no weights; the mismatch that
   is left over says how sure the reading is.
4. *Relation,* from the two centres, the way ``data._place_pair`` places them: "A left of
   B" means B's centre is further right of A's than it is above or below it.

It reads a 32x32 image in about 10 ms on one CPU thread (``torch.set_num_threads(1)``:
its tensors are tiny, and more threads only wait for each other). :func:`score` compares
the two readings. Example::

    >>> from dalle_lesson.data import ShapesDataset
    >>> image, caption = ShapesDataset(1, 32, seed=0)[0]
    >>> score(image, caption).full_match
    True
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dalle_lesson.data import (
    BACKGROUND,
    COLOURS,
    RELATION_WORDS,
    SHAPES,
    SIZE_WORDS,
    SIZES,
    Scene,
    ShapeObject,
    pil_to_tensor,
    render_scene,
)

# --------------------------------------------------------------------------------------
# Reading captions
# --------------------------------------------------------------------------------------


def _alternatives(words) -> str:
    """A regex that matches any of ``words``, longest first ("to the left of" before "left of")."""
    return "|".join(re.escape(word) for word in sorted(words, key=len, reverse=True))


_WORD_TO_SIZE = {word: size for size, words in SIZE_WORDS.items() for word in words}
_WORD_TO_RELATION = {word: relation for relation, words in RELATION_WORDS.items() for word in words}


def _object_pattern(n: int) -> str:
    # "small red circle" -> groups size0, colour0, shape0
    return (
        f"(?P<size{n}>{_alternatives(_WORD_TO_SIZE)}) "
        f"(?P<colour{n}>{_alternatives(COLOURS)}) "
        f"(?P<shape{n}>{_alternatives(SHAPES)})"
    )


# The templates of data.scene_captions; "an" is accepted too, it is what a person would write.
_ONE_OBJECT = re.compile(rf"(?:an?|a picture of an?|there is an?|one) {_object_pattern(0)}")
_TWO_OBJECTS = re.compile(
    rf"(?:a picture of )?an? {_object_pattern(0)} (?P<relation>{_alternatives(_WORD_TO_RELATION)}) "
    rf"an? {_object_pattern(1)}"
)


def _parsed_object(match: re.Match, n: int) -> ShapeObject:
    # A caption says nothing about where an object is: its position is unknown (nan).
    return ShapeObject(
        shape=match[f"shape{n}"], colour=match[f"colour{n}"], size=_WORD_TO_SIZE[match[f"size{n}"]],
        x=math.nan, y=math.nan,
    )


def parse_caption(caption: str) -> Scene | None:
    """The scene a Shapes caption describes, or ``None`` if the caption is not one.

    Sizes come back canonical ("big" -> "large"), and the positions, which no caption
    gives, are ``nan``. Case, extra spaces and a final full stop do not matter.

    >>> scene = parse_caption("a picture of a little red star above a big white cross")
    >>> [(o.size, o.colour, o.shape) for o in scene.objects], scene.relation
    ([('small', 'red', 'star'), ('large', 'white', 'cross')], 'above')
    >>> parse_caption("a cat on a mat") is None
    True
    """
    if not isinstance(caption, str):
        raise TypeError(f"a caption is a str, got {type(caption).__name__}")
    text = " ".join(caption.lower().split()).rstrip(".")
    if match := _ONE_OBJECT.fullmatch(text):
        return Scene((_parsed_object(match, 0),))
    if match := _TWO_OBJECTS.fullmatch(text):
        return Scene((_parsed_object(match, 0), _parsed_object(match, 1)), _WORD_TO_RELATION[match["relation"]])
    return None


# --------------------------------------------------------------------------------------
# Reading images, step 1: colour (unmixing each pixel against the background)
# --------------------------------------------------------------------------------------

COLOUR_NAMES = tuple(COLOURS)
_PALETTE = torch.tensor([COLOURS[name] for name in COLOUR_NAMES], dtype=torch.float32) / 255  # [K, 3]
_BACKGROUND = torch.tensor(BACKGROUND, dtype=torch.float32) / 255  # [3]

FOREGROUND_ALPHA = 0.5  # a pixel covered at least this much belongs to an object
COLOUR_TOLERANCE = 0.2  # an object's colour may drift this far (RGB distance, 0..sqrt(3)) from the palette
SOLID_ALPHA = 0.75  # ... and must cover some pixel at least this much (a grey blob is not a faint white one)
MIN_OBJECT_AREA = 0.006  # fraction of the image; the smallest shape (a small star) covers about 0.02
MAY_BE_TWO_ERROR = 0.15  # a blob of one colour that fits no shape better than this may be two objects
PART_ERROR = 0.45  # ... and is cut in two only if each part then fits a shape better than this
MAX_FIT_ERROR = 0.8  # a blob that fits no shape better than this has no recognisable shape


def check_image(image: torch.Tensor) -> torch.Tensor:
    """Raise ``ValueError`` unless ``image`` is a FloatTensor[3, S, S] in [0, 1]; return it as float32.

    >>> check_image(torch.zeros(3, 32, 32)).shape
    torch.Size([3, 32, 32])
    """
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"expected an image as a torch.Tensor [3, S, S] in [0, 1], got {type(image).__name__}")
    if image.ndim != 3 or image.shape[0] != 3 or image.shape[1] != image.shape[2]:
        hint = " (a batch? use score_batch)" if image.ndim == 4 else ""
        raise ValueError(
            f"expected one square RGB image of shape [3, S, S] (channels first), got shape "
            f"{list(image.shape)}{hint}"
        )
    if image.shape[1] < 16:
        side = image.shape[1]
        raise ValueError(f"expected an image of at least 16x16 pixels to read shapes in, got {side}x{side}")
    if not image.is_floating_point():
        raise ValueError(f"expected float pixel values in [0, 1], got dtype {image.dtype} (divide by 255?)")
    image = image.detach().float().cpu()
    low, high = float(image.min()), float(image.max())
    if not (low >= -1e-6 and high <= 1 + 1e-6):  # also catches nan
        raise ValueError(f"expected pixel values in [0, 1], got values from {low:.3g} to {high:.3g}")
    return image.clamp(0, 1)


def unmix(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Explain every pixel as palette colour ``k`` over the background with coverage ``alpha``.

    ``pixel = background + alpha * (colour_k - background)``, with ``alpha`` in [0, 1] found
    by projecting onto the line from the background to each palette colour; the colour is
    the one whose line passes closest to the pixel. Returns the colour index
    ``LongTensor[S, S]`` (into :data:`COLOUR_NAMES`) and the coverage of every colour,
    ``FloatTensor[K, S, S]``.

    >>> red = torch.tensor(COLOURS["red"]) / 255
    >>> edge = (red + _BACKGROUND) / 2  # an anti-aliased pixel on the rim of a red shape
    >>> index, alpha = unmix(torch.stack([edge, red], dim=1).view(3, 1, 2))  # a 1x2 image
    >>> [COLOUR_NAMES[k] for k in index[0]], [round(a, 2) for a in alpha[COLOUR_NAMES.index("red"), 0].tolist()]
    (['red', 'red'], [0.5, 1.0])

    Background pixels have ``alpha`` near 0 for every colour, so their index means nothing.
    """
    offset = image.permute(1, 2, 0) - _BACKGROUND  # [S, S, 3]: how far each pixel is from the background
    directions = _PALETTE - _BACKGROUND  # [K, 3]
    alpha = (offset @ directions.T / directions.pow(2).sum(1)).clamp(0, 1)  # [S, S, K]
    residual = (offset.unsqueeze(2) - alpha.unsqueeze(3) * directions).norm(dim=3)  # [S, S, K]
    return residual.argmin(dim=2), alpha.permute(2, 0, 1)


# --------------------------------------------------------------------------------------
# Reading images, step 2: blobs (connected foreground pixels)
# --------------------------------------------------------------------------------------

_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
Pixels = list[tuple[int, int]]  # (row, column) pairs


def connected_components(labels: list[list[int]]) -> list[Pixels]:
    """Groups of touching pixels (8 neighbours) with the same label; label -1 is background.

    A breadth-first flood fill from each pixel not yet visited.

    >>> connected_components([[0, 0, -1], [-1, 1, 1]])
    [[(0, 0), (0, 1)], [(1, 1), (1, 2)]]
    """
    height, width = len(labels), len(labels[0])
    seen = [[False] * width for _ in range(height)]
    components = []
    for y in range(height):
        for x in range(width):
            if labels[y][x] < 0 or seen[y][x]:
                continue
            seen[y][x] = True
            queue, pixels = deque([(y, x)]), []
            while queue:
                cy, cx = queue.popleft()
                pixels.append((cy, cx))
                for dy, dx in _NEIGHBOURS:
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < height and 0 <= nx < width and not seen[ny][nx] and labels[ny][nx] == labels[y][x]:
                        seen[ny][nx] = True
                        queue.append((ny, nx))
            components.append(pixels)
    return components


def merge_specks(components: list[Pixels], min_pixels: int) -> list[Pixels]:
    """Give each speck (fewer than ``min_pixels``) to the big component it touches most.

    Specks that touch no big component, directly or through other specks, are dropped.

    >>> merge_specks([[(0, 0), (0, 1), (0, 2)], [(1, 1)], [(5, 5)]], min_pixels=2)
    [[(0, 0), (0, 1), (0, 2), (1, 1)]]
    """
    big = [list(pixels) for pixels in components if len(pixels) >= min_pixels]
    specks = [pixels for pixels in components if len(pixels) < min_pixels]
    owner = {pixel: n for n, pixels in enumerate(big) for pixel in pixels}
    while specks:  # a speck may touch a big component only through another speck: repeat
        left = []
        for pixels in specks:
            neighbours = [(y + dy, x + dx) for y, x in pixels for dy, dx in _NEIGHBOURS]
            touches = [owner[pixel] for pixel in neighbours if pixel in owner]
            if not touches:
                left.append(pixels)
                continue
            n = max(set(touches), key=touches.count)
            big[n].extend(pixels)
            owner.update({pixel: n for pixel in pixels})
        if len(left) == len(specks):
            break
        specks = left
    return big


@dataclass(frozen=True)
class Unmixed:
    """An image explained pixel by pixel (see :func:`unmix`), ready to be cut into objects."""

    image: torch.Tensor  # [3, S, S]
    index: torch.Tensor  # [S, S] colour of each pixel
    alpha: torch.Tensor  # [K, S, S] coverage by each colour
    covered: torch.Tensor  # [S, S] coverage by each pixel's own colour

    @classmethod
    def of(cls, image: torch.Tensor) -> Unmixed:
        index, alpha = unmix(image)
        return cls(image, index, alpha, alpha.gather(0, index.unsqueeze(0))[0])

    @property
    def min_pixels(self) -> int:
        return max(2, round(MIN_OBJECT_AREA * self.index.numel()))

    def mask(self, pixels: Pixels) -> torch.Tensor:
        mask = torch.zeros_like(self.index, dtype=torch.bool)
        ys, xs = zip(*pixels)
        mask[list(ys), list(xs)] = True
        return mask

    def coverage(self, pixels: Pixels, taken: torch.Tensor) -> torch.Tensor:
        """The coverage map [S, S] of one object made of ``pixels``, zero elsewhere.

        The soft rim of a shape (coverage < 1/2) lies just outside its foreground pixels:
        the map grows by one pixel to count it, but never into pixels ``taken`` by objects.
        """
        inside = self.mask(pixels)
        colour = int(self.index[inside].mode().values)
        rim = F.max_pool2d(inside[None, None].float(), 3, stride=1, padding=1)[0, 0].bool() & ~taken
        return torch.where(inside, self.covered, torch.where(rim, self.alpha[colour], 0.0))

    def blobs(self) -> list[Pixels]:
        """Connected foreground pixels, whatever their colour; lone specks are dropped."""
        labels = torch.where(self.covered >= FOREGROUND_ALPHA, 0, -1).tolist()
        return [pixels for pixels in connected_components(labels) if len(pixels) >= self.min_pixels]

    def colour_parts(self, blob: Pixels) -> list[Pixels]:
        """A blob cut into its parts of one colour; specks of colour noise join their neighbours."""
        inside = self.mask(blob)
        labels = torch.where(inside, self.index, -1).tolist()
        return merge_specks(connected_components(labels), self.min_pixels) or [blob]


# --------------------------------------------------------------------------------------
# Reading images, step 3: shape and size (analysis by synthesis)
# --------------------------------------------------------------------------------------

_WHITE_GREEN, _BACKGROUND_GREEN = COLOURS["white"][1], BACKGROUND[1]


def draw_coverage(shape: str, size: str, x: float, y: float, image_size: int) -> torch.Tensor:
    """Coverage (0..1) of one shape drawn by ``data.render_scene`` with its box centred at pixel (x, y).

    >>> coverage = draw_coverage("square", "large", 16, 16, 32)
    >>> coverage.shape, float(coverage.max()), 115 < float(coverage.sum()) < 125  # about (0.85 * 0.4 * 32) ** 2
    (torch.Size([32, 32]), 1.0, True)
    """
    scene = Scene((ShapeObject(shape, "white", size, x / image_size, y / image_size),))
    green = pil_to_tensor(render_scene(scene, image_size))[1] * 255  # white and the background differ most in green
    return ((green - _BACKGROUND_GREEN) / (_WHITE_GREEN - _BACKGROUND_GREEN)).clamp(0, 1)


BLURS = (0.0, 0.7)  # Gaussian blurs (sigma, pixels) tried on each drawing: decoders blur edges


@functools.lru_cache(maxsize=None)
def _blur_kernel(sigma: float) -> torch.Tensor:
    taps = torch.arange(-2, 3, dtype=torch.float32)
    weights = torch.exp(-(taps**2) / (2 * sigma**2))
    weights = weights / weights.sum()
    return (weights[:, None] * weights[None, :])[None, None]


def blur(coverage: torch.Tensor, sigma: float) -> torch.Tensor:
    """Coverage maps [..., S, S] blurred by a 5x5 Gaussian of standard deviation ``sigma`` pixels (0: unchanged)."""
    if sigma == 0:
        return coverage
    flat = coverage.reshape(-1, 1, *coverage.shape[-2:])
    return F.conv2d(flat, _blur_kernel(sigma), padding=2).reshape(coverage.shape)


def _centroid(coverage: torch.Tensor) -> tuple[float, float]:
    """Centre of mass (x, y) of a coverage map, in pixels (pixel i spans [i, i + 1))."""
    total = coverage.sum()
    ys = torch.arange(coverage.shape[0], dtype=torch.float32) + 0.5
    xs = torch.arange(coverage.shape[1], dtype=torch.float32) + 0.5
    return float((coverage.sum(0) * xs).sum() / total), float((coverage.sum(1) * ys).sum() / total)


@functools.lru_cache(maxsize=None)
def _centroid_offset(shape: str, size: str, image_size: int) -> tuple[float, float]:
    """Where a shape's centre of mass sits relative to the centre of its box (a triangle's is low)."""
    middle = image_size / 2
    x, y = _centroid(draw_coverage(shape, size, middle, middle, image_size))
    return x - middle, y - middle


@dataclass(frozen=True)
class Fit:
    """The drawing that best explains one object's coverage map."""

    shape: str
    size: str
    x: float  # centre of the shape's box, in pixels
    y: float
    error: float  # sum of |coverage - drawing| per covered pixel: 0 is perfect, 2 is disjoint
    area: float  # covered pixels (sum of the coverage map)


def fit_shape(coverage: torch.Tensor) -> Fit:
    """The shape and size whose drawing, centred on the object's centre of mass, matches best.

    >>> fit_shape(draw_coverage("star", "small", 10.3, 20.6, 32)).shape
    'star'
    """
    cx, cy = _centroid(coverage)
    candidates = []  # (shape, size, x, y): each drawing's box centre puts its centre of mass on the object's
    for shape, size in itertools.product(SHAPES, SIZES):
        dx, dy = _centroid_offset(shape, size, coverage.shape[0])
        candidates.append((shape, size, cx - dx, cy - dy))
    drawings = torch.stack([draw_coverage(*candidate, coverage.shape[0]) for candidate in candidates])
    # The smaller mismatch of the sharp and the blurred drawing: decoders blur edges.
    mismatch = torch.stack([(coverage - blur(drawings, sigma)).abs().sum(dim=(1, 2)) for sigma in BLURS])
    area = float(coverage.sum())
    errors = mismatch.min(dim=0).values / area
    best = int(errors.argmin())
    return Fit(*candidates[best], error=float(errors[best]), area=area)


Piece = tuple[torch.Tensor, Fit]  # one object's coverage map and the drawing that fits it best


def _total_error(pieces: list[Piece]) -> float:
    """Mismatch of several pieces together, per covered pixel."""
    return sum(fit.error * fit.area for _, fit in pieces) / sum(fit.area for _, fit in pieces)


def _split_if_better(whole: list[Piece], splits: list[list[torch.Tensor]], gain: float) -> list[Piece]:
    """The best of several ways to split a blob into parts, if it explains the blob better.

    Better means: every part looks like a shape (mismatch below :data:`PART_ERROR`) and
    the total mismatch shrinks by the factor ``gain``. Otherwise ``whole`` is kept.
    """
    best = whole
    for parts in splits:
        pieces = [(part, fit_shape(part)) for part in parts]
        looks_like_shapes = all(fit.error < PART_ERROR for _, fit in pieces)
        error = _total_error(pieces)
        if looks_like_shapes and error * gain < _total_error(whole) and error < _total_error(best):
            best = pieces
    return best


def cut_in_two(coverage: torch.Tensor) -> list[list[torch.Tensor]]:
    """Two ways to cut a blob in two where it is thinnest: across a row, and across a column.

    ``data._place_pair`` separates two objects' boxes along the relation's axis, so two
    objects of one colour that touch meet at a narrow neck on a horizontal or vertical line.
    """
    cuts = []
    for axis in (0, 1):  # 0: cut between rows (objects above each other), 1: between columns
        profile = coverage.sum(dim=1 - axis)  # coverage per row (axis 0) or per column (axis 1)
        filled = torch.nonzero(profile > 0.5).flatten()
        if len(filled) < 6:
            continue
        first, last = int(filled[0]), int(filled[-1])
        margin = 2  # each half keeps at least two rows or columns
        cut = first + margin + int(profile[first + margin : last - margin + 1].argmin())
        before, after = coverage.clone(), coverage.clone()
        if axis == 0:
            before[cut:], after[:cut] = 0, 0
        else:
            before[:, cut:], after[:, :cut] = 0, 0
        cuts.append([before, after])
    return cuts


# --------------------------------------------------------------------------------------
# Reading images: the whole reader
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectedObject:
    """One object found in an image.

    ``colour`` is ``None`` when no palette colour is within :data:`COLOUR_TOLERANCE`, and
    ``shape`` is ``None`` when no shape fits within :data:`MAX_FIT_ERROR`. ``x`` and ``y``
    are the centre of the object's box as fractions of the image, like
    :class:`~dalle_lesson.data.ShapeObject` (0 = left / top).
    """

    colour: str | None
    shape: str | None
    size: str
    x: float
    y: float
    area: float  # covered pixels
    fit_error: float  # |coverage - best drawing| summed, per covered pixel

    @property
    def centre(self) -> tuple[float, float]:
        return self.x, self.y


def object_colour(image: torch.Tensor, coverage: torch.Tensor) -> str | None:
    """Nearest palette colour to an object's own colour, or None if none is close enough.

    The object's own colour is its total colour over its total coverage, which undoes
    the blending with the background at soft edges:
    ``background + sum(pixel - background) / sum(coverage)``. That alone would read a
    grey disk as a white one half covered, so an object must also be solid somewhere
    (coverage at least :data:`SOLID_ALPHA`).

    >>> object_colour(torch.full((3, 4, 4), 0.55), torch.full((4, 4), 0.5)) is None  # grey
    True
    """
    if coverage.max() < SOLID_ALPHA:
        return None
    offset = (image - _BACKGROUND.view(3, 1, 1)) * (coverage > 0)
    colour = _BACKGROUND + offset.sum(dim=(1, 2)) / coverage.sum()
    distances = (_PALETTE - colour).norm(dim=1)
    nearest = int(distances.argmin())
    return COLOUR_NAMES[nearest] if distances[nearest] <= COLOUR_TOLERANCE else None


def find_objects(image: torch.Tensor) -> list[Piece]:
    """Steps 1-3: one (coverage map, best fit) per object in the image.

    Each blob of foreground is one object, unless splitting it explains its pixels
    better: first into its colours (touching or overlapping objects of different
    colours), then at its thinnest neck (two touching objects of one colour). A single
    object drawn with drifting colours (an orange star with a yellow patch) stays whole,
    because its patches look like no shape.
    """
    unmixed = Unmixed.of(image)
    blobs = unmixed.blobs()
    taken = torch.zeros_like(unmixed.covered, dtype=torch.bool)
    for blob in blobs:
        taken |= unmixed.mask(blob)
    objects = []
    for blob in blobs:
        coverage = unmixed.coverage(blob, taken)
        pieces = [(coverage, fit_shape(coverage))]
        parts = unmixed.colour_parts(blob)
        if len(parts) > 1:  # touching or overlapping objects of different colours?
            # Two colours are already evidence of two objects: any gain will do.
            pieces = _split_if_better(pieces, [[unmixed.coverage(part, taken) for part in parts]], gain=1)
        for coverage, fit in pieces:
            if fit.error > MAY_BE_TWO_ERROR:  # two touching objects of one colour?
                # One colour: cut only if that explains the pixels far better.
                objects += _split_if_better([(coverage, fit)], cut_in_two(coverage), gain=2)
            else:
                objects.append((coverage, fit))
    return objects


def read_image(image: torch.Tensor) -> list[DetectedObject]:
    """Every object in a Shapes image: colour, shape, size and centre, top to bottom.

    >>> from dalle_lesson.data import Scene, ShapeObject, pil_to_tensor, render_scene
    >>> scene = Scene((ShapeObject("cross", "cyan", "large", 0.3, 0.6),))
    >>> [(o.colour, o.shape, o.size) for o in read_image(pil_to_tensor(render_scene(scene, 32)))]
    [('cyan', 'cross', 'large')]
    """
    image = check_image(image)
    size = image.shape[1]
    objects = [
        DetectedObject(
            colour=object_colour(image, coverage),
            shape=fit.shape if fit.error <= MAX_FIT_ERROR else None,
            size=fit.size,
            x=fit.x / size,
            y=fit.y / size,
            area=fit.area,
            fit_error=fit.error,
        )
        for coverage, fit in find_objects(image)
    ]
    return sorted(objects, key=lambda o: (o.y, o.x))


# --------------------------------------------------------------------------------------
# Reading images, step 4: the relation
# --------------------------------------------------------------------------------------


def read_relation(first, second) -> str:
    """Where ``first`` is relative to ``second``, from their centres (anything with .x and .y).

    The same rule as ``data._place_pair``: the relation lies along the axis of the larger
    offset ("left of" when the offset is mostly horizontal and ``first`` is on the left).

    >>> read_relation(ShapeObject("star", "red", "small", 0.2, 0.5), ShapeObject("star", "red", "small", 0.7, 0.4))
    'left of'
    """
    dx, dy = second.x - first.x, second.y - first.y
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


# --------------------------------------------------------------------------------------
# Scoring an image against its caption
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectScore:
    """One object of the caption and the detected object it was matched with (None: missing)."""

    expected: ShapeObject
    found: DetectedObject | None
    colour: bool
    shape: bool
    size: bool

    @classmethod
    def compare(cls, expected: ShapeObject, found: DetectedObject | None) -> ObjectScore:
        if found is None:  # a missing object gets every attribute wrong
            return cls(expected, None, False, False, False)
        return cls(
            expected, found,
            colour=found.colour == expected.colour, shape=found.shape == expected.shape, size=found.size == expected.size,
        )

    @property
    def correct(self) -> bool:
        return self.colour and self.shape and self.size


@dataclass(frozen=True)
class Score:
    """How well one image matches one caption.

    For an unscorable caption (``scorable`` False) every judgement is ``None``.
    ``relation`` is also ``None`` for a caption with one object. ``full_match`` means every
    object of the caption is there with the right colour, shape and size, the relation
    holds, and there is no other object.
    """

    caption: str
    scorable: bool
    objects: tuple[ObjectScore, ...] = ()
    relation: bool | None = None
    count: bool | None = None
    full_match: bool | None = None
    detected: tuple[DetectedObject, ...] = ()


def _match(expected: tuple[ShapeObject, ...], relation: str | None, detected: list[DetectedObject]):
    """The pairing of caption objects with detected objects that gets the most right.

    Tries every way to give each caption object a different detected object (or none, if
    there are too few), and keeps the one with the most correct attributes and relation.
    """
    candidates = list(detected) + [None] * len(expected)
    best = None
    for chosen in itertools.permutations(range(len(candidates)), len(expected)):
        found = [candidates[i] for i in chosen]
        objects = tuple(ObjectScore.compare(e, f) for e, f in zip(expected, found))
        relation_ok = None
        if relation is not None:
            relation_ok = None not in found and read_relation(found[0], found[1]) == relation
        points = sum(o.colour + o.shape + o.size for o in objects) + bool(relation_ok)
        if best is None or points > best[0]:
            best = (points, objects, relation_ok)
    return best[1], best[2]


def score(image: torch.Tensor, caption: str) -> Score:
    """Check one image against its caption, attribute by attribute.

    >>> from dalle_lesson.data import Scene, ShapeObject, pil_to_tensor, render_scene
    >>> circle, star = ShapeObject("circle", "red", "small", 0.2, 0.5), ShapeObject("star", "blue", "large", 0.7, 0.5)
    >>> image = pil_to_tensor(render_scene(Scene((circle, star), "left of"), 32))
    >>> score(image, "a small red circle to the left of a big blue star").full_match
    True
    >>> result = score(image, "a small red circle to the right of a big green star")
    >>> result.relation, [o.colour for o in result.objects], result.full_match
    (False, [True, False], False)
    """
    scene = parse_caption(caption)
    detected = read_image(image)  # read even when the caption is unscorable: bad images still raise
    if scene is None:
        return Score(caption, scorable=False, detected=tuple(detected))
    objects, relation_ok = _match(scene.objects, scene.relation, detected)
    count_ok = len(detected) == len(scene.objects)
    full = count_ok and all(o.correct for o in objects) and relation_ok is not False
    return Score(caption, True, objects, relation_ok, count_ok, full, tuple(detected))


def score_batch(images, captions) -> list[Score]:
    """:func:`score` for each (image, caption) pair; ``images`` is [B, 3, S, S] or a list of images."""
    if isinstance(images, torch.Tensor) and images.ndim != 4:
        raise ValueError(f"expected a batch of images of shape [B, 3, S, S], got shape {list(images.shape)}")
    if isinstance(captions, str):
        raise TypeError("captions must be a list of str, one per image, not one str")
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions; expected one caption per image")
    return [score(image, caption) for image, caption in zip(images, captions)]


def summarize(scores: list[Score]) -> dict:
    """Accuracies (fractions in [0, 1]) over many scores; unscorable captions are only counted.

    colour / shape / size are per object of the captions, relation per caption with two
    objects, count and full match per image. An accuracy with nothing to count is ``None``.

    >>> from dalle_lesson.data import ShapesDataset
    >>> image, caption = ShapesDataset(1, 32, seed=0)[0]
    >>> summary = summarize([score(image, caption), score(image, "a cat on a mat")])
    >>> summary["scored"], summary["unscorable"], summary["full_match_accuracy"]
    (1, 1, 1.0)
    """
    scored = [s for s in scores if s.scorable]
    objects = [o for s in scored for o in s.objects]
    relations = [s.relation for s in scored if s.relation is not None]

    def fraction(values):
        values = list(values)
        return sum(values) / len(values) if values else None

    return {
        "images": len(scores),
        "scored": len(scored),
        "unscorable": len(scores) - len(scored),
        "objects": len(objects),
        "relations": len(relations),
        "colour_accuracy": fraction(o.colour for o in objects),
        "shape_accuracy": fraction(o.shape for o in objects),
        "size_accuracy": fraction(o.size for o in objects),
        "relation_accuracy": fraction(relations),
        "count_accuracy": fraction(s.count for s in scored),
        "full_match_accuracy": fraction(s.full_match for s in scored),
    }
