"""Rebuild the real photos in data/photos/ from scikit-image's sample images.

What it makes (read with ``dalle_lesson.data.load_image(shipped_path("photos/NAME.png"), 256)``):

* ``astronaut.png``, ``chelsea.png``, ``coffee.png``: 256x256 RGB photos, each scikit-image
  sample image centre-cropped to a square and shrunk with a Lanczos filter.
* ``LICENSE.txt``: each photo's licence statement, quoted from the docstring of its loader
  function in the wheel's ``skimage/data/_fetchers.py`` (``inspect.cleandoc``: indentation
  removed, words untouched), followed by the wheel's own ``LICENSE.txt``, verbatim.

Only photos that scikit-image marks public domain or CC0 are used: the astronaut (NASA,
"released into the public domain"), Chelsea the cat (CC0, Stefan van der Walt) and the
coffee cup (CC0, Rachel Michetti).

The photos come from the scikit-image 0.26.0 wheel, which carries them in ``skimage/data/``.
scikit-image is *not* a dependency of the course: this script only opens the wheel as a zip
file. The source PNGs are checked against the SHA-256 sums in the wheel's own
``skimage/data/_registry.py`` and against the sums written below. To rebuild (from the
repository root; about a second)::

    pip download scikit-image==0.26.0 --no-deps -d /tmp/ski
    python data/photos/build_photos.py /tmp/ski/scikit_image-0.26.0-*.whl
    python data/photos/build_photos.py WHEEL --out DIR   # or somewhere else

Any platform's 0.26.0 wheel holds the same image files. The same source files give the same
pixels; another Pillow or zlib may compress the PNGs to other bytes (made with Pillow 13.0.0).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import io
import re
import zipfile
from pathlib import Path

from PIL import Image, ImageOps

SIZE = 256
SKIMAGE_VERSION = "0.26.0"
# photo name -> (file in the wheel, loader function whose docstring states the licence, SHA-256)
PHOTOS = {
    "astronaut": ("skimage/data/astronaut.png", "astronaut",
                  "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5"),
    "chelsea": ("skimage/data/chelsea.png", "chelsea",
                "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb"),
    "coffee": ("skimage/data/coffee.png", "coffee",
               "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7"),
}
FETCHERS = "skimage/data/_fetchers.py"
REGISTRY = "skimage/data/_registry.py"
WHEEL_LICENSE = f"scikit_image-{SKIMAGE_VERSION}.dist-info/LICENSE.txt"
WHEEL_METADATA = f"scikit_image-{SKIMAGE_VERSION}.dist-info/METADATA"


def docstrings(source: str) -> dict[str, str]:
    """Top-level function name -> its docstring, cleaned of indentation only."""
    return {node.name: inspect.cleandoc(ast.get_docstring(node, clean=False) or "")
            for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)}


def square(image: Image.Image, size: int = SIZE) -> Image.Image:
    """Centre-crop to the largest square, then shrink to ``size`` with a Lanczos filter."""
    return ImageOps.fit(image.convert("RGB"), (size, size), Image.LANCZOS, centering=(0.5, 0.5))


def build(wheel: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        version = re.search(r"^Version: (.+)$", archive.read(WHEEL_METADATA).decode(), re.M).group(1)
        if version != SKIMAGE_VERSION:
            raise SystemExit(f"{wheel} is scikit-image {version}, expected {SKIMAGE_VERSION}")
        registry = archive.read(REGISTRY).decode()
        notes = docstrings(archive.read(FETCHERS).decode())
        licence = [
            f"The photos in this folder are sample images shipped in the scikit-image {SKIMAGE_VERSION}",
            "wheel (skimage/data/), centre-cropped to a square and resized to 256x256 by",
            "build_photos.py. Only photos that scikit-image marks public domain or CC0 are used.",
            f"Each statement below is the docstring of the photo's loader function in {FETCHERS}",
            "of that wheel, quoted verbatim (only its indentation removed).",
            "",
        ]
        for name, (member, function, sha256) in PHOTOS.items():
            raw = archive.read(member)
            digest = hashlib.sha256(raw).hexdigest()
            if digest != sha256 or f'"{member.removeprefix("skimage/")}": "{sha256}"' not in registry:
                raise SystemExit(f"{member}: SHA-256 {digest} is not the expected {sha256}")
            with Image.open(io.BytesIO(raw)) as image:
                source_size = image.size
                square(image).save(out / f"{name}.png", optimize=True)
            licence += [
                f"==== {name}.png: from {member} ({source_size[0]}x{source_size[1]}, sha256 {sha256}),",
                f"     statement: the docstring of skimage.data.{function}() in {FETCHERS} ====",
                "", notes[function], "",
            ]
        licence += [f"==== {WHEEL_LICENSE} (the licence of the scikit-image package, verbatim) ====", ""]
        licence.append(archive.read(WHEEL_LICENSE).decode().rstrip("\n"))
    (out / "LICENSE.txt").write_text("\n".join(licence) + "\n")
    for name in PHOTOS:
        print(f"{out / (name + '.png')}: {(out / (name + '.png')).stat().st_size / 1024:.0f} KB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path, help=f"a scikit-image {SKIMAGE_VERSION} wheel (pip download ...)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    build(args.wheel, args.out)


if __name__ == "__main__":
    main()
