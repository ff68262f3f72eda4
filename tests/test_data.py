"""Tests of dalle_lesson.data: the shapes generator, its held-out split, the folder dataset."""

import errno
import itertools
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalle_lesson import data
from dalle_lesson.data import HELD_OUT_PAIRS, ImageFolderDataset, ShapesDataset

# ---- shapes: determinism ---------------------------------------------------------------


def test_same_seed_gives_identical_pixels_and_captions():
    first, second = ShapesDataset(50, 32, seed=7), ShapesDataset(50, 32, seed=7)
    for index in (0, 13, 49, 13):  # any order, repeated access
        image_a, caption_a = first[index]
        image_b, caption_b = second[index]
        assert torch.equal(image_a, image_b)
        assert caption_a == caption_b
        assert first.scene(index) == second.scene(index)


def test_different_seeds_and_splits_give_different_scenes():
    scenes = lambda **kw: [ShapesDataset(40, 32, **kw).scene(i) for i in range(40)]
    assert scenes(seed=0) != scenes(seed=1)
    assert scenes(split="train") != scenes(split="test")


@pytest.mark.parametrize("image_size", [32, 64, 256])
def test_image_sizes_and_range(image_size):
    image, caption = ShapesDataset(3, image_size)[2]
    assert image.shape == (3, image_size, image_size)
    assert image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert isinstance(caption, str) and caption


def test_out_of_range_index_and_bad_arguments():
    dataset = ShapesDataset(5, 32)
    with pytest.raises(IndexError):
        dataset[5]
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(5, 32, split="validation")


def test_vocabulary_is_at_least_what_the_course_promises():
    assert len(data.SHAPES) >= 5 and len(data.COLOURS) >= 8 and len(data.SIZES) >= 2
    assert set(data.RELATIONS) == {"left of", "right of", "above", "below"}


def test_one_and_two_object_scenes_both_occur():
    counts = {len(ShapesDataset(200, 32).scene(i).objects) for i in range(200)}
    assert counts == {1, 2}


# ---- shapes: the held-out split --------------------------------------------------------


def _pairs(scene):
    return {(obj.shape, obj.colour) for obj in scene.objects}


@pytest.mark.parametrize("split", ["train", "test"])
def test_training_splits_never_contain_a_held_out_pair(split):
    dataset = ShapesDataset(3000, 32, split=split)
    for index in range(len(dataset)):
        assert not _pairs(dataset.scene(index)) & HELD_OUT_PAIRS


def test_every_held_out_scene_contains_a_held_out_pair():
    dataset = ShapesDataset(1000, 32, split="heldout")
    seen = set()
    for index in range(len(dataset)):
        pairs = _pairs(dataset.scene(index)) & HELD_OUT_PAIRS
        assert pairs
        seen |= pairs
    assert seen == HELD_OUT_PAIRS  # every held-out pair is actually tested


def test_training_captions_never_name_a_held_out_pair():
    dataset = ShapesDataset(3000, 32, split="train")
    for index in range(len(dataset)):
        caption = dataset.caption(index)
        for shape, colour in HELD_OUT_PAIRS:
            assert f"{colour} {shape}" not in caption


def test_held_out_pairs_leave_every_shape_and_colour_in_training():
    shapes = {shape for shape, _ in HELD_OUT_PAIRS}
    colours = {colour for _, colour in HELD_OUT_PAIRS}
    # One held-out colour per shape, so each shape keeps the other colours in training.
    assert len(shapes) == len(HELD_OUT_PAIRS)
    for shape in data.SHAPES:
        trained = {c for c in data.COLOURS if (shape, c) not in HELD_OUT_PAIRS}
        assert len(trained) >= len(data.COLOURS) - 1
    assert colours <= set(data.COLOURS)


# ---- shapes: captions agree with the scene ---------------------------------------------
# An independent reading of a caption: a small parser that knows only the words.

SIZE_OF_WORD = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}
RELATION_OF_WORDS = {
    "to the left of": "left of", "left of": "left of", "to the right of": "right of", "right of": "right of",
    "above": "above", "over": "above", "below": "below", "under": "below", "beneath": "below",
}
THING = r"(small|little|tiny|large|big) (\w+) (\w+)"
ONE = re.compile(rf"^(?:a|a picture of a|there is a|one) {THING}$")
TWO = re.compile(rf"^(?:a|a picture of a) {THING} (to the left of|left of|to the right of|right of|above|over|below|under|beneath) a {THING}$")


def _parse(caption):
    """Caption -> (list of (shape, colour, size), relation or None)."""
    if match := ONE.match(caption):
        size, colour, shape = match.groups()
        return [(shape, colour, SIZE_OF_WORD[size])], None
    match = TWO.match(caption)
    assert match, f"caption does not follow any template: {caption!r}"
    size_a, colour_a, shape_a, relation, size_b, colour_b, shape_b = match.groups()
    return [(shape_a, colour_a, SIZE_OF_WORD[size_a]), (shape_b, colour_b, SIZE_OF_WORD[size_b])], RELATION_OF_WORDS[relation]


def _geometric_relation(a, b):
    """Where a is relative to b, from the positions alone."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) > abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_every_caption_is_consistent_with_its_scene(split):
    dataset = ShapesDataset(600, 32, split=split)
    for index in range(len(dataset)):
        scene = dataset.scene(index)
        for caption in data.scene_captions(scene) if index < 20 else [dataset.caption(index)]:
            described, relation = _parse(caption)
            truth = [(o.shape, o.colour, o.size) for o in scene.objects]
            if relation is None:
                assert described == truth
                continue
            assert sorted(described) == sorted(truth)
            # Which object each side of the caption names; with two identical objects either
            # reading will do, so the caption is true if some assignment makes it true.
            readings = [
                (a, b) for a, b in (scene.objects, scene.objects[::-1])
                if [(a.shape, a.colour, a.size), (b.shape, b.colour, b.size)] == described
            ]
            assert any(_geometric_relation(a, b) == relation for a, b in readings), (caption, scene)


def test_paraphrases_vary():
    dataset = ShapesDataset(300, 32)
    templates = {re.sub(r"(small|little|tiny|large|big) \w+ \w+", "X", dataset.caption(i)) for i in range(300)}
    assert len(templates) >= 6


def test_pixels_show_the_scene():
    """The colour at each object's centre is that object's colour, and the corners are background."""
    dataset = ShapesDataset(100, 64)
    for index in range(len(dataset)):
        image, _ = dataset[index]
        for obj in dataset.scene(index).objects:
            row, column = int(obj.y * 64), int(obj.x * 64)
            expected = torch.tensor(data.COLOURS[obj.colour]) / 255
            assert torch.allclose(image[:, row, column], expected, atol=0.03), (index, obj)
    background = torch.tensor(data.BACKGROUND) / 255
    blank = data.pil_to_tensor(data.render_scene(data.Scene(()), 32))
    assert torch.allclose(blank, background.view(3, 1, 1).expand(3, 32, 32))


def test_all_shapes_captions_covers_the_vocabulary():
    words = set(" ".join(data.all_shapes_captions()).split())
    assert set(data.SHAPES) | set(data.COLOURS) <= words
    assert {"beneath", "tiny", "left", "right", "over"} <= words


# ---- your own folder -------------------------------------------------------------------


def _write_image(path, colour=(200, 10, 10), size=(40, 30), mode="RGB"):
    Image.new(mode, size, colour).save(path)


@pytest.fixture
def messy_folder(tmp_path):
    _write_image(tmp_path / "red.png", (255, 0, 0))
    (tmp_path / "red.txt").write_text("a red picture\nsecond line ignored\n")
    nested = tmp_path / "more"
    nested.mkdir()
    _write_image(nested / "green.jpg", (0, 255, 0))
    (nested / "green.txt").write_text("  a green photo  ")
    _write_image(tmp_path / "see_through.png", (0, 0, 255, 0), mode="RGBA")  # fully transparent
    (tmp_path / "see_through.txt").write_text("transparent")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    (tmp_path / "corrupt.txt").write_text("never seen")
    truncated = tmp_path / "truncated.jpg"
    _write_image(truncated, (1, 2, 3), size=(64, 64))
    truncated.write_bytes(truncated.read_bytes()[:200])
    (tmp_path / "truncated.txt").write_text("cut short")
    _write_image(tmp_path / "no_caption.png")
    (tmp_path / "empty_caption.png").write_bytes((tmp_path / "red.png").read_bytes())
    (tmp_path / "empty_caption.txt").write_text("\n  \n")
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / "orphan.txt").write_text("a caption without an image")
    return tmp_path


def test_folder_dataset_skips_and_counts_bad_files(messy_folder):
    with pytest.warns(UserWarning) as caught:
        dataset = ImageFolderDataset(messy_folder, image_size=16)
    message = str(caught[0].message)
    for name in ("corrupt.png", "truncated.jpg", "no_caption.png", "empty_caption.png", "notes.md"):
        assert name in message
    assert dataset.skip_counts == {"unreadable image": 2, "missing caption": 2, "not an image": 1}
    assert len(dataset) == 3
    items = {caption: image for image, caption in (dataset[i] for i in range(len(dataset)))}
    assert set(items) == {"a red picture", "a green photo", "transparent"}
    assert items["a red picture"].shape == (3, 16, 16)
    assert torch.allclose(items["a red picture"].mean(dim=(1, 2)), torch.tensor([1.0, 0.0, 0.0]), atol=0.01)
    assert torch.allclose(items["transparent"], torch.ones(3, 16, 16))  # alpha composited on white


def test_folder_dataset_survives_a_file_breaking_mid_epoch(messy_folder):
    with pytest.warns(UserWarning):
        dataset = ImageFolderDataset(messy_folder, image_size=8)
    broken_path = dataset.items[0][0]
    broken_path.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        image, caption = dataset[0]
    assert caption == dataset.items[1][1] and image.shape == (3, 8, 8)
    assert broken_path in dataset.skipped["unreadable image"]


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no usable image-caption pairs"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "lonely.png").write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="same name"):
            ImageFolderDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nowhere")


def test_shipped_path_names_what_is_missing():
    with pytest.raises(FileNotFoundError, match="no_such_file"):
        data.shipped_path("no_such_file.bin")


# ---- your own folder: indexing ---------------------------------------------------------


def _small_folder(root, count):
    """``count`` 8x8 images with captions "caption 0", "caption 1", ..."""
    for k in range(count):
        _write_image(root / f"img{k}.png", (10 * k, 0, 0), size=(8, 8))
        (root / f"img{k}.txt").write_text(f"caption {k}")
    return ImageFolderDataset(root, image_size=8)


def test_folder_dataset_indexes_like_a_list(tmp_path):
    dataset = _small_folder(tmp_path, 3)
    # islice: on a dataset whose indices wrap around, plain iteration would never end.
    assert [caption for _, caption in itertools.islice(iter(dataset), 10)] == ["caption 0", "caption 1", "caption 2"]
    assert dataset[-1][1] == "caption 2" and dataset[-3][1] == "caption 0"
    assert dataset[np.int64(1)][1] == dataset[torch.tensor(1)][1] == "caption 1"  # what samplers hand over
    for index in (3, 10**9, -4, -(10**9)):
        with pytest.raises(IndexError, match="out of range"):
            dataset[index]


# ---- your own folder: every image mode Pillow reads ------------------------------------


def _halves(mode, left, right, size=4):
    """A size x size image in ``mode``: the left half one pixel value, the right half another."""
    image = Image.new(mode, (size, size), left)
    image.paste(right, (size // 2, 0, size, size))
    return image


def _palette_image(transparent_index=None):
    image = _halves("P", 1, 2)
    image.putpalette([0, 0, 0, 10, 20, 30, 200, 100, 50])
    if transparent_index is not None:
        image.info["transparency"] = transparent_index
    return image


RGB8 = 1.5 / 255  # 8-bit modes: right to within rounding
DEEP = 1e-4  # deep modes: no detour through 8 bits
WHITE, BLACK, RED = (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0)
grey = lambda value: (value, value, value)

# (name, image, file suffix, expected RGB of the left half, of the right half, tolerance)
MODE_CASES = [
    ("P", _palette_image(), ".png", (10 / 255, 20 / 255, 30 / 255), (200 / 255, 100 / 255, 50 / 255), RGB8),
    ("P transparent", _palette_image(transparent_index=1), ".png", WHITE, (200 / 255, 100 / 255, 50 / 255), RGB8),
    ("P transparent gif", _palette_image(transparent_index=1), ".gif", WHITE, (200 / 255, 100 / 255, 50 / 255), RGB8),
    ("1", _halves("1", 0, 1), ".png", BLACK, WHITE, RGB8),
    ("L", _halves("L", 100, 200), ".png", grey(100 / 255), grey(200 / 255), RGB8),
    ("LA", _halves("LA", (100, 255), (100, 0)), ".png", grey(100 / 255), WHITE, RGB8),
    ("RGBA", _halves("RGBA", (255, 0, 0, 255), (0, 0, 255, 128)), ".png", RED, (127 / 255, 127 / 255, 1.0), RGB8),
    ("I;16 png", _halves("I;16", 32768, 65535), ".png", grey(32768 / 65535), WHITE, DEEP),
    ("I;16B tiff", _halves("I;16B", 16384, 0), ".tif", grey(16384 / 65535), BLACK, DEEP),
    ("I with 16-bit values", _halves("I", 32768, 0), ".tif", grey(32768 / 65535), BLACK, DEEP),
    ("I with 32-bit values", _halves("I", 2**30, 2**31 - 1), ".tif", grey(2**30 / (2**31 - 1)), WHITE, DEEP),
    ("F in [0, 1]", _halves("F", 0.25, 0.75), ".tif", grey(0.25), grey(0.75), DEEP),
    ("CMYK", _halves("CMYK", (0, 255, 255, 0), (0, 0, 0, 255)), ".tif", RED, BLACK, RGB8),
    ("LAB", _halves("LAB", (255, 128, 128), (0, 128, 128)), ".tif", WHITE, BLACK, 2.5 / 255),
]


@pytest.mark.parametrize("name, image, suffix, left, right, atol", MODE_CASES, ids=[case[0] for case in MODE_CASES])
def test_every_image_mode_loads_as_rgb_in_unit_range(tmp_path, name, image, suffix, left, right, atol):
    path = tmp_path / f"picture{suffix}"
    image.save(path)
    with Image.open(path) as saved:
        assert saved.mode == image.mode  # the file really holds this mode
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these needs a guess
        tensor = data.load_image(path, 4)
    assert tensor.shape == (3, 4, 4) and tensor.dtype == torch.float32
    assert torch.allclose(tensor[:, :, :2], torch.tensor(left).view(3, 1, 1).expand(3, 4, 2), atol=atol)
    assert torch.allclose(tensor[:, :, 2:], torch.tensor(right).view(3, 1, 1).expand(3, 4, 2), atol=atol)


def test_pil_helpers_scale_deep_images_instead_of_clipping_them():
    mid_grey = Image.new("I;16", (2, 2), 32768)
    assert torch.allclose(data.pil_to_tensor(mid_grey), torch.full((3, 2, 2), 32768 / 65535))
    assert data.to_rgb_on_white(mid_grey).getpixel((0, 0)) == (128, 128, 128)
    half = Image.new("F", (2, 2), 0.5)
    assert torch.allclose(data.pil_to_tensor(half), torch.full((3, 2, 2), 0.5))
    see_through = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert torch.equal(data.pil_to_tensor(see_through), torch.ones(3, 2, 2))  # white, not black


def test_float_and_negative_images_outside_a_known_range_are_stretched_with_a_warning(tmp_path):
    for name, mode, low, high in (("depth.tif", "F", 0.0, 1000.0), ("signed.tif", "I", -500, 1500)):
        path = tmp_path / name
        _halves(mode, low, high).save(path)
        with pytest.warns(UserWarning, match=re.escape(name)):
            tensor = data.load_image(path, 4)
        assert torch.allclose(tensor[:, :, :2], torch.zeros(3, 4, 2), atol=DEEP)
        assert torch.allclose(tensor[:, :, 2:], torch.ones(3, 4, 2), atol=DEEP)


def test_exif_orientation_is_applied(tmp_path):
    # Stored left half red, right half blue, with the tag phones write for "rotate 90° clockwise
    # to view": seen upright, red is on top.
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    path = tmp_path / "phone.png"
    _halves("RGB", (255, 0, 0), (0, 0, 255)).save(path, exif=exif)
    tensor = data.load_image(path, 4)
    assert torch.allclose(tensor[:, :2, :], torch.tensor(RED).view(3, 1, 1).expand(3, 2, 4), atol=RGB8)
    assert torch.allclose(tensor[:, 2:, :], torch.tensor((0.0, 0.0, 1.0)).view(3, 1, 1).expand(3, 2, 4), atol=RGB8)


def test_folder_dataset_reads_a_16_bit_png_at_its_real_brightness(tmp_path):
    Image.new("I;16", (8, 8), 32768).save(tmp_path / "scan.png")
    (tmp_path / "scan.txt").write_text("a grey scan")
    image, caption = ImageFolderDataset(tmp_path, image_size=8)[0]
    assert caption == "a grey scan"
    assert torch.allclose(image, torch.full((3, 8, 8), 32768 / 65535), atol=DEEP)


# ---- your own folder: captions, unreadable entries, hidden entries, huge images --------


def test_captions_are_utf8_with_a_warned_fallback(tmp_path):
    for name in ("bom", "latin", "quotes", "notepad"):
        _write_image(tmp_path / f"{name}.png", size=(8, 8))
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + "une étoile rouge".encode("utf-8"))
    (tmp_path / "latin.txt").write_bytes("étoile".encode("latin-1"))
    (tmp_path / "quotes.txt").write_bytes("“star”".encode("cp1252"))
    (tmp_path / "notepad.txt").write_text("ciel étoilé", encoding="utf-16")  # with a BOM, as Notepad saves
    with pytest.warns(UserWarning) as caught:
        dataset = ImageFolderDataset(tmp_path, image_size=8)
    captions = {path.stem: caption for path, caption in dataset.items}
    assert captions == {"bom": "une étoile rouge", "latin": "étoile", "quotes": "“star”", "notepad": "ciel étoilé"}
    assert dataset.not_utf8 == [tmp_path / "latin.txt", tmp_path / "quotes.txt"]
    messages = [str(warning.message) for warning in caught]
    assert len(messages) == 1 and "not UTF-8" in messages[0]
    assert "latin.txt" in messages[0] and "quotes.txt" in messages[0] and "bom.txt" not in messages[0]


def test_unreadable_caption_is_skipped_counted_and_named(tmp_path, monkeypatch):
    for name in ("good", "boxed", "locked"):
        _write_image(tmp_path / f"{name}.png", size=(8, 8))
    (tmp_path / "good.txt").write_text("readable")
    (tmp_path / "boxed.txt").mkdir()  # a folder where the caption file should be
    locked = tmp_path / "locked.txt"
    locked.write_text("secret")
    # chmod 000 does not stop root, and tests may run as root: refuse the file the way the
    # system refuses an ordinary user.
    real_open = Path.open

    def refusing_open(self, *args, **kwargs):
        if self == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refusing_open)
    with pytest.warns(UserWarning) as caught:
        dataset = ImageFolderDataset(tmp_path, image_size=8)
    assert [caption for _, caption in dataset.items] == ["readable"]
    assert dataset.skip_counts == {"unreadable caption": 2}
    assert dataset.skipped["unreadable caption"] == [tmp_path / "boxed.txt", locked]
    assert "boxed.txt" in str(caught[0].message) and "locked.txt" in str(caught[0].message)


def test_unreadable_subfolder_is_counted_and_named(tmp_path, monkeypatch):
    _small_folder(tmp_path, 1)
    locked = tmp_path / "locked"
    locked.mkdir()
    _write_image(locked / "inside.png", size=(8, 8))
    (locked / "inside.txt").write_text("never listed")
    real_scandir = os.scandir

    def refusing_scandir(path="."):  # chmod 000 on the folder, as seen by a user who is not root
        if Path(path) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", refusing_scandir)
    with pytest.warns(UserWarning, match=r"unreadable folder: 1 \(locked\)"):
        dataset = ImageFolderDataset(tmp_path, image_size=8)
    assert [caption for _, caption in dataset.items] == ["caption 0"]
    assert dataset.skipped["unreadable folder"] == [locked]


def test_hidden_files_and_folders_are_not_data(tmp_path):
    _small_folder(tmp_path, 1)
    checkpoints = tmp_path / ".ipynb_checkpoints"  # Jupyter's autosaves
    checkpoints.mkdir()
    _write_image(checkpoints / "img0-checkpoint.png", size=(8, 8))
    (checkpoints / "img0-checkpoint.txt").write_text("a stale copy")
    _write_image(tmp_path / ".secret.png", size=(8, 8))
    (tmp_path / ".secret.txt").write_text("hidden")
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    with pytest.warns(UserWarning) as caught:
        dataset = ImageFolderDataset(tmp_path, image_size=8)
    assert [caption for _, caption in dataset.items] == ["caption 0"]
    assert dataset.skip_counts == {"hidden": 4}
    assert len(caught) == 1 and ".ipynb_checkpoints" in str(caught[0].message)


def test_too_large_images_are_skipped_or_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a bomb in miniature; the test stays fast
    _write_image(tmp_path / "small.png", size=(8, 8))
    _write_image(tmp_path / "big.png", size=(12, 12))  # 144 pixels: Pillow itself would only warn
    _write_image(tmp_path / "huge.png", size=(30, 30))  # 900 pixels: Pillow raises DecompressionBombError
    for name in ("small", "big", "huge"):
        (tmp_path / f"{name}.txt").write_text(name)
    with pytest.warns(UserWarning, match=r"image too large: 2 \(big.png, huge.png\)"):
        checked = ImageFolderDataset(tmp_path, image_size=8)
    assert [caption for _, caption in checked.items] == ["small"]

    unchecked = ImageFolderDataset(tmp_path, image_size=8, check_images=False)
    assert [caption for _, caption in unchecked.items] == ["big", "huge", "small"]
    for index, name in enumerate(("big.png", "huge.png")):
        with pytest.raises(ValueError, match=re.escape(name)) as raised:
            unchecked[index]
        assert isinstance(raised.value, data.ImageTooLargeError)
        assert "MAX_IMAGE_PIXELS" in str(raised.value) and "Shrink" in str(raised.value)
    assert unchecked[2][1] == "small"


# ---- viz and the command line -----------------------------------------------------------


def test_show_grid_draws_every_image_with_its_caption():
    from dalle_lesson.viz import show_grid

    images = torch.rand(5, 3, 8, 8)
    fig = show_grid(images, [f"caption {i}" for i in range(5)], ncols=3)
    titled = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titled == [f"caption {i}" for i in range(5)]
    assert len(fig.axes) == 6


def test_cli_data_grid_writes_a_png(tmp_path):
    from dalle_lesson.cli import main

    out = tmp_path / "grid.png"
    main(["data-grid", "--dataset", "shapes", "--image-size", "32", "--count", "4", "--out", str(out)])
    with Image.open(out) as grid:
        assert grid.size[0] > 100 and grid.size[1] > 50


@pytest.mark.parametrize("flags, message", [(["--count", "0"], "must be at least 1"),
                                            (["--seed", str(2**64)], "must lie in 0 .. 2**32 - 1")])
def test_cli_data_grid_refuses_nonsense_in_one_line(flags, message, capsys):
    from dalle_lesson.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["data-grid", *flags])
    assert stopped.value.code == 2 and message in capsys.readouterr().err
