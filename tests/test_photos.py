"""The real photos shipped in data/photos/ (lesson 07's 256x256 dVAE round trip)."""

from __future__ import annotations

import re

import pytest
import torch

from dalle_lesson.data import load_image, shipped_path

PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png"]


@pytest.mark.parametrize("name", PHOTOS)
def test_photo_loads_as_a_256px_rgb_image_in_unit_range(name):
    image = load_image(shipped_path(f"photos/{name}"), 256)
    assert image.shape == (3, 256, 256)
    assert image.dtype == torch.float32
    assert torch.isfinite(image).all()
    assert 0.0 <= image.min() and image.max() <= 1.0


@pytest.mark.parametrize("name", PHOTOS)
def test_photo_is_a_real_picture_not_blank(name):
    image = load_image(shipped_path(f"photos/{name}"), 256)
    # Every channel varies: a blank or flat picture has a standard deviation near 0, these
    # photos have 0.12 (the cat) to 0.32 (measured). 0.05 is about 13 grey levels out of 255.
    assert (image.std(dim=(1, 2)) > 0.05).all(), image.std(dim=(1, 2))
    # Colour, not grey stored as RGB: the channels differ somewhere.
    assert (image[0] - image[2]).abs().mean() > 0.02
    # Detail at all scales, not a smooth gradient: neighbouring pixels differ.
    assert (image[:, :, 1:] - image[:, :, :-1]).abs().mean() > 0.01
    # Most of the 256 levels of a channel are in use (a photo, not a few flat colours).
    levels = torch.unique((image[1] * 255).round()).numel()
    assert levels > 100, levels


def test_photos_are_distinct():
    images = [load_image(shipped_path(f"photos/{name}"), 256) for name in PHOTOS]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert (images[i] - images[j]).abs().mean() > 0.05


def test_licence_names_each_photo_and_its_terms():
    text = shipped_path("photos/LICENSE.txt").read_text()
    assert re.search(r"scikit-image \d+\.\d+\.\d+", text)
    for name in PHOTOS:
        assert f"==== {name}: from skimage/data/{name}" in text
    assert "released into the public domain" in text  # the astronaut (NASA)
    assert text.count("CC0 by the photographer") == 2  # the cat and the coffee cup
    assert (shipped_path("photos/build_photos.py")).exists()
