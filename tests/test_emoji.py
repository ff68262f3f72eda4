"""The emoji dataset: the shipped sheets in data/emoji/ and the loader that reads them."""

from __future__ import annotations

import importlib.util
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dalle_lesson.data import EMOJI_CELL, EmojiDataset, shipped_path


@pytest.fixture(scope="module")
def emoji() -> EmojiDataset:
    return EmojiDataset()


def table_rows() -> list[list[str]]:
    """emoji.tsv parsed here, independently of the loader."""
    lines = (shipped_path("emoji") / "emoji.tsv").read_text(encoding="utf-8").splitlines()
    return [line.split("\t") for line in lines if not line.startswith("#")]


def code_points_of(dataset: EmojiDataset, name: str) -> str:
    return dataset.codepoints[dataset.names.index(name)]


# ---------------------------------------------------------------------------------------
# The shipped set
# ---------------------------------------------------------------------------------------


def test_count_is_in_the_thousands_and_matches_the_table(emoji):
    assert 3000 <= len(emoji) < 10000
    rows = table_rows()
    assert len(rows) == len(emoji)
    assert [int(row[0]) for row in rows] == list(range(len(rows)))  # index = sheet order
    assert all(len(row) == 3 for row in rows)


def test_sheets_hold_exactly_the_listed_emoji():
    folder = shipped_path("emoji")
    sheets = sorted(folder.glob("sheet_*.png"))
    sizes = set()
    for sheet in sheets:
        with Image.open(sheet) as image:
            assert image.mode == "RGB"
            sizes.add(image.size)
    assert len(sizes) == 1, f"sheets differ in size: {sizes}"
    width, height = sizes.pop()
    per_sheet = (width // EMOJI_CELL) * (height // EMOJI_CELL)
    count = len(table_rows())
    assert len(sheets) == -(-count // per_sheet)  # no missing and no extra sheet


def test_every_picture_is_a_visible_rgb_image_in_unit_range(emoji):
    for index in range(len(emoji)):
        image, caption = emoji[index]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert image.std() > 0.02, f"emoji {index} ({caption}) looks blank"
        # drawn on white: the border of the cell is mostly background
        border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)
        assert (border > 0.95).all(dim=0).float().mean() > 0.3, caption


def test_names_are_clean_unique_lower_case(emoji):
    assert len(set(emoji.names)) == len(emoji.names)
    for name in emoji.names:
        assert name and name == name.strip() and name == name.lower()
        assert "\t" not in name and "\n" not in name


def test_code_points_are_hex_and_unique(emoji):
    assert len(set(emoji.codepoints)) == len(emoji.codepoints)
    for codes in emoji.codepoints:
        for code in codes.split(" "):
            assert 0 < int(code, 16) <= 0x10FFFF


def test_known_emoji_have_their_names(emoji):
    assert emoji.names[0] == "grinning face"
    assert code_points_of(emoji, "grinning face") == "1F600"
    assert chr(0x1F600) == unicodedata.lookup("GRINNING FACE")  # the Unicode name agrees
    assert code_points_of(emoji, "red heart") == "2764 FE0F"
    assert code_points_of(emoji, "thumbs up") == "1F44D"
    assert code_points_of(emoji, "thumbs up: medium skin tone") == "1F44D 1F3FD"
    assert code_points_of(emoji, "flag: france") == "1F1EB 1F1F7"
    assert code_points_of(emoji, "man health worker") == "1F468 200D 2695 FE0F"


def mean_colour(image: torch.Tensor) -> torch.Tensor:
    """Mean RGB over the pixels that are not white background."""
    drawn = (image < 0.9).any(dim=0)
    return image[:, drawn].mean(dim=1)


def test_pictures_match_their_names_in_colour(emoji):
    red, green, blue = mean_colour(emoji[emoji.names.index("grinning face")][0])
    assert red > 0.7 and green > 0.55 and blue < 0.3  # a yellow face
    red, green, blue = mean_colour(emoji[emoji.names.index("red heart")][0])
    assert red > 0.7 and green < 0.3 and blue < 0.3
    red, green, blue = mean_colour(emoji[emoji.names.index("green heart")][0])
    assert green > red + 0.2 and green > blue + 0.2
    flag = emoji[emoji.names.index("flag: france")][0]
    left, right = flag[:, 24:40, 8:18].mean(dim=(1, 2)), flag[:, 24:40, 46:56].mean(dim=(1, 2))
    assert left[2] > left[0] + 0.3  # blue stripe on the left
    assert right[0] > right[2] + 0.3  # red stripe on the right


def test_resized_load_is_the_same_picture_smaller(emoji):
    small = EmojiDataset(image_size=32)
    assert len(small) == len(emoji)
    for index in (0, 1234, len(emoji) - 1):
        image, caption = small[index]
        assert caption == emoji.names[index]
        assert image.shape == (3, 32, 32)
        assert 0.0 <= image.min() and image.max() <= 1.0
        pooled = F.avg_pool2d(emoji[index][0][None], 2)[0]  # an independent 2x shrink
        assert (image - pooled).abs().mean() < 0.03


def load_build_script():
    path = Path(__file__).resolve().parent.parent / "data" / "emoji" / "build_emoji.py"
    spec = importlib.util.spec_from_file_location("build_emoji", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_script_reproduces_shipped_cells(emoji):
    """Re-render a few emoji with the font (if installed) and compare pixel for pixel."""
    build = load_build_script()
    if not build.FONT_PATH.exists():
        pytest.skip("fonts-noto-color-emoji is not installed")
    from PIL import ImageFont, features

    if not features.check("raqm"):
        pytest.skip("this Pillow has no libraqm")
    font = ImageFont.truetype(str(build.FONT_PATH), build.FONT_SIZE, layout_engine=ImageFont.Layout.RAQM)
    for name in ("grinning face", "thumbs up: medium skin tone", "flag: france", "man health worker"):
        index = emoji.names.index(name)
        text = "".join(chr(int(code, 16)) for code in emoji.codepoints[index].split())
        rendered = np.asarray(build.render(text, font))
        assert np.array_equal(rendered, np.asarray(emoji.picture(index))), name


# ---------------------------------------------------------------------------------------
# The loader, on sheets this test writes
# ---------------------------------------------------------------------------------------


def cell_colour(index: int) -> tuple[int, int, int]:
    return (10 * index + 5, 255 - 10 * index, (37 * index) % 256)


def write_tiny_set(root: Path, count: int, columns: int = 3, rows: int = 2) -> None:
    """`count` solid-colour cells on sheets of columns x rows cells, plus emoji.tsv."""
    per_sheet = columns * rows
    for number in range(-(-count // per_sheet)):
        sheet = Image.new("RGB", (columns * EMOJI_CELL, rows * EMOJI_CELL), (255, 255, 255))
        for slot in range(per_sheet):
            index = number * per_sheet + slot
            if index < count:
                row, column = slot // columns, slot % columns
                x, y = column * EMOJI_CELL, row * EMOJI_CELL
                sheet.paste(cell_colour(index), (x, y, x + EMOJI_CELL, y + EMOJI_CELL))
        sheet.save(root / f"sheet_{number:02d}.png")
    lines = ["# a tiny test set", "# index\tcodepoints\tname"]
    lines += [f"{index}\t{0x1F600 + index:X}\tthing number {index}" for index in range(count)]
    (root / "emoji.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_loader_reads_the_right_cell(tmp_path):
    # 3 columns x 2 rows per sheet (not square, so a row/column mix-up shows), 8 emoji:
    # a full sheet 0 and two cells of sheet 1
    write_tiny_set(tmp_path, count=8)
    dataset = EmojiDataset(root=tmp_path)
    assert len(dataset) == 8
    assert dataset.names[5] == "thing number 5" and dataset.codepoints[5] == "1F605"
    for index in range(8):
        image, caption = dataset[index]
        assert caption == f"thing number {index}"
        assert image.shape == (3, 64, 64)
        expected = torch.tensor(cell_colour(index), dtype=torch.float32) / 255.0
        assert torch.allclose(image, expected[:, None, None].expand(3, 64, 64)), index
    with pytest.raises(IndexError):
        dataset[8]


def test_loader_resizes_tiny_set(tmp_path):
    write_tiny_set(tmp_path, count=4)
    image, caption = EmojiDataset(image_size=16, root=tmp_path)[3]
    assert image.shape == (3, 16, 16) and caption == "thing number 3"
    expected = torch.tensor(cell_colour(3), dtype=torch.float32) / 255.0
    assert torch.allclose(image, expected[:, None, None].expand(3, 16, 16), atol=1 / 255)
