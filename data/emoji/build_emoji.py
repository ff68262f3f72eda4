"""Rebuild the emoji dataset in data/emoji/ from the Noto Color Emoji font.

What it makes (the format dalle_lesson.data.EmojiDataset reads):

* ``sheet_00.png``, ``sheet_01.png``, ...  RGB sprite sheets, 32x32 cells of 64x64 pixels,
  filled row by row; the last sheet may end in empty (white) cells.
* ``emoji.tsv``  ``index<TAB>codepoints<TAB>name``, one line per emoji in sheet order,
  after a few ``#`` comment lines; codepoints like ``1F600`` or ``1F44D 1F3FD``.
* ``LICENSE.txt``  where the pictures and names come from, with Debian's copyright files
  (the font's SIL Open Font License 1.1 and the Unicode data license) copied verbatim.

Where the pictures and the names come from (Debian 12 packages):

* pictures: ``fonts-noto-color-emoji`` (Noto Color Emoji 2.042, SIL Open Font License 1.1),
  a colour bitmap (CBDT) font whose glyphs are 136x128 pixels at size 109;
* names: ``unicode-data`` (Unicode 15.0), whose ``emoji/emoji-test.txt`` lists every
  recommended emoji with its CLDR short name: "grinning face", "thumbs up: medium skin
  tone", "flag: france", "man health worker". These read better as captions than Python's
  ``unicodedata`` names ("thumbs up sign", "heavy black heart" for the red heart) and also
  cover flags, skin tones and ZWJ sequences.

To rebuild (from the repository root; about 20 seconds on one CPU core)::

    apt-get install -y fonts-noto-color-emoji unicode-data
    python data/emoji/build_emoji.py            # writes data/emoji/
    python data/emoji/build_emoji.py --out DIR  # or somewhere else

Needs Pillow built with libraqm (``PIL.features.check("raqm")``): raqm applies the
font's ligature tables, which turn a sequence such as U+1F44D U+1F3FD into one picture.
The same font and data versions give the same files (checked byte for byte with Debian 12's
fonts-noto-color-emoji 2.042-0+deb12u1 and unicode-data 15.0.0-1, Pillow 13.0.0 and its
bundled FreeType 2.14.3; another Pillow or zlib may compress the PNGs to other bytes).

How each emoji is made: draw it in colour on a transparent canvas, find the drawn
pixels' bounding box, centre that box in a square (136 px, the font's glyph width, or
larger if the drawing is), composite onto white and shrink to 64x64 with a Lanczos
filter. Emoji whose sequence the font does not join into one picture (drawn wider than
one glyph) or that draw (almost) nothing are skipped and counted, and so are couples with
a different skin tone per person (260 long names for near-duplicate pictures).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

FONT_PATH = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST_PATH = Path("/usr/share/unicode/emoji/emoji-test.txt")
FONT_COPYRIGHT = Path("/usr/share/doc/fonts-noto-color-emoji/copyright")
UNICODE_COPYRIGHT = Path("/usr/share/doc/unicode-data/copyright")
FONT_SIZE = 109  # the only size a CBDT font like Noto Color Emoji renders at
GLYPH = 136  # width in pixels of one emoji glyph at that size
CELL = 64  # pixels per emoji in the sheets
SHEET_CELLS = 32  # sheets are 32x32 cells = 2048x2048 pixels
def has_two_skin_tones(name: str) -> bool:
    """Couples with a different skin tone per person ("kiss: woman, man, light skin tone,
    dark skin tone"): long captions for near-duplicate pictures, so we leave them out."""
    return name.count("skin tone") > 1


def read_emoji_test(path: Path) -> list[tuple[list[int], str]]:
    """Fully-qualified emoji from emoji-test.txt as (code points, lower-case name).

    Only "fully-qualified" lines: the others are the same emoji without their variation
    selector, or "component" lines (lone skin-tone swatches and hair pieces)."""
    emoji = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#") or ";" not in line:
            continue
        fields, comment = line.split("#", 1)
        codes, status = (part.strip() for part in fields.split(";"))
        if status != "fully-qualified":
            continue
        # comment looks like " 😀 E1.0 grinning face": drop the picture and the version
        name = comment.strip().split(" ", 2)[2]
        emoji.append(([int(code, 16) for code in codes.split()], name.lower()))
    return emoji


def render(text: str, font: ImageFont.FreeTypeFont) -> Image.Image | None:
    """One emoji as a 64x64 RGB picture on white, or None if it does not draw as one glyph."""
    canvas = Image.new("RGBA", (4 * GLYPH, 2 * GLYPH), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((GLYPH // 4, GLYPH // 4), text, font=font, embedded_color=True)
    box = canvas.getbbox()  # bounding box of the non-transparent pixels
    if box is None:
        return None
    width, height = box[2] - box[0], box[3] - box[1]
    if width > 1.25 * GLYPH or height > 1.25 * GLYPH:  # the font drew several glyphs side by side
        return None
    alpha = np.asarray(canvas.getchannel("A"))
    if (alpha > 0).sum() < 0.02 * GLYPH * GLYPH:  # (almost) blank
        return None
    side = max(GLYPH, width, height)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    drawing = canvas.crop(box)
    square.alpha_composite(drawing, ((side - width) // 2, (side - height) // 2))
    return square.convert("RGB").resize((CELL, CELL), Image.Resampling.LANCZOS)


def is_blank(picture: Image.Image) -> bool:
    """A picture with (almost) no variation in its pixels: nothing visible was drawn."""
    return float(np.asarray(picture, dtype=np.float32).std()) < 4.0


def write_sheets(pictures: list[Image.Image], out: Path) -> list[Path]:
    """Lay pictures out row by row on equally sized sheets; returns the sheet paths."""
    per_sheet = SHEET_CELLS * SHEET_CELLS
    paths = []
    for number in range(math.ceil(len(pictures) / per_sheet)):
        sheet = Image.new("RGB", (SHEET_CELLS * CELL, SHEET_CELLS * CELL), (255, 255, 255))
        for slot, picture in enumerate(pictures[number * per_sheet : (number + 1) * per_sheet]):
            row, column = divmod(slot, SHEET_CELLS)
            sheet.paste(picture, (column * CELL, row * CELL))
        path = out / f"sheet_{number:02d}.png"
        sheet.save(path, optimize=True)
        paths.append(path)
    return paths


def licence_text() -> str:
    """LICENSE.txt: what the files are, then Debian's copyright files for both sources."""
    return (
        "The pictures in sheet_*.png are rendered from Noto Color Emoji (Debian package\n"
        "fonts-noto-color-emoji), copyright 2013-2017 Google Inc. and Arjen Nienhuis, whose font\n"
        "files are licensed under the SIL Open Font License 1.1 (full text below). The OFL's\n"
        "conditions do not apply to documents created with the font, such as these pictures;\n"
        "the licence is included to credit the font and its authors.\n\n"
        "The names in emoji.tsv are the CLDR short names from Unicode's emoji-test.txt, version\n"
        "15.0 (Debian package unicode-data), covered by the Unicode license below. Modified:\n"
        "only fully-qualified emoji are kept, names are lower-cased and reformatted as\n"
        "index, code points and name.\n\n"
        f"==== {FONT_COPYRIGHT} (verbatim) ====\n\n"
        + FONT_COPYRIGHT.read_text(encoding="utf-8")
        + f"\n==== {UNICODE_COPYRIGHT} (verbatim) ====\n\n"
        + UNICODE_COPYRIGHT.read_text(encoding="utf-8")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    for needed, package in ((FONT_PATH, "fonts-noto-color-emoji"), (FONT_COPYRIGHT, "fonts-noto-color-emoji"),
                            (EMOJI_TEST_PATH, "unicode-data"), (UNICODE_COPYRIGHT, "unicode-data")):
        if not needed.exists():
            raise SystemExit(f"{needed} not found: run `apt-get install -y {package}` first")
    if not features.check("raqm"):
        raise SystemExit("this Pillow has no libraqm, so emoji sequences would not join; "
                         "install a Pillow wheel from PyPI (it bundles raqm)")
    font = ImageFont.truetype(str(FONT_PATH), FONT_SIZE, layout_engine=ImageFont.Layout.RAQM)

    kept, pictures, seen_names = [], [], set()
    skipped = {"two skin tones": 0, "not one glyph or blank": 0,
               "duplicate name": 0}
    for codes, name in read_emoji_test(EMOJI_TEST_PATH):
        if has_two_skin_tones(name):
            skipped["two skin tones"] += 1
            continue
        if name in seen_names:
            skipped["duplicate name"] += 1
            continue
        picture = render("".join(map(chr, codes)), font)
        if picture is None or is_blank(picture):
            skipped["not one glyph or blank"] += 1
            continue
        seen_names.add(name)
        kept.append((codes, name))
        pictures.append(picture)

    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("sheet_*.png"):
        old.unlink()
    sheets = write_sheets(pictures, args.out)
    lines = [
        "# Emoji rendered from Noto Color Emoji (fonts-noto-color-emoji, SIL OFL 1.1), "
        "names from Unicode emoji-test.txt (CLDR short names, lower-cased).",
        f"# {len(kept)} emoji, {CELL}x{CELL} cells, {SHEET_CELLS}x{SHEET_CELLS} cells per sheet, "
        "row by row. Rebuilt by build_emoji.py.",
        "# index\tcodepoints\tname",
    ]
    for index, (codes, name) in enumerate(kept):
        lines.append(f"{index}\t{' '.join(f'{code:04X}' for code in codes)}\t{name}")
    (args.out / "emoji.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (args.out / "LICENSE.txt").write_text(licence_text(), encoding="utf-8")
    print(f"kept {len(kept)} emoji on {len(sheets)} sheets in {args.out}; skipped: {skipped}")


if __name__ == "__main__":
    main()
