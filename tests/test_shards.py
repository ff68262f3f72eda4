"""WebDataset shards (lesson 07): exact round trip, shares per process, bad data skipped and
named, no unpickling, dVAE codes computed once and checked, the same training as in memory."""

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import asdict

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from dalle_lesson import checkpoint
from dalle_lesson.cli import main
from dalle_lesson.data import ShapesDataset
from dalle_lesson.dvae import DiscreteVAE, DVAEConfig, load_dvae, save_dvae
from dalle_lesson.shards import (HEADER_KEY, dvae_facts, list_shards, npy_bytes, png_bytes, read_codes,
                                 read_images, shard_kind, shards_for_rank, write_shards)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def tiny_dvae(tmp_path_factory):
    """A random lesson-sized dVAE: 32x32 images -> 8x8 codes of 512."""
    torch.manual_seed(0)
    return save_dvae(DiscreteVAE(DVAEConfig.lesson()), tmp_path_factory.mktemp("dvae") / "dvae.safetensors")


@pytest.fixture(scope="module")
def shapes():
    return ShapesDataset(length=12, image_size=32)


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory, shapes):
    """12 shapes in shards of 5, 5 and 2."""
    out = tmp_path_factory.mktemp("images")
    write_shards(shapes, out, samples_per_shard=5, progress=False)
    return out


@pytest.fixture(scope="module")
def code_shards(tmp_path_factory, image_shards, tiny_dvae):
    out = tmp_path_factory.mktemp("codes") / "codes"
    main(["tokenize-images", "--shards", str(image_shards), "--dvae", str(tiny_dvae), "--out", str(out),
          "--device", "cpu", "--batch-size", "4"])
    return out


def write_tar(path, samples):
    """A shard of hand-made samples (bytes as they are), to plant bad data in."""
    with wds.TarWriter(str(path), encoder=False) as sink:
        for sample in samples:
            sink.write(sample)


# ---- writing and reading back ---------------------------------------------------------------


def test_images_and_captions_read_back_exactly(image_shards, shapes):
    files = list_shards(image_shards)
    assert [os.path.basename(f) for f in files] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    # the standard WebDataset layout, checked with Python's own tarfile: key.png + key.txt
    with tarfile.open(files[2]) as tar:
        assert tar.getnames() == ["000000010.png", "000000010.txt", "000000011.png", "000000011.txt"]
        assert tar.extractfile("000000011.txt").read().decode() == shapes[11][1]
        pixels = np.asarray(Image.open(tar.extractfile("000000011.png")))
    assert np.array_equal(pixels, (shapes[11][0] * 255).round().byte().permute(1, 2, 0).numpy())
    images, captions, keys = read_images(files)
    assert images.dtype == torch.uint8 and images.shape == (12, 3, 32, 32)
    assert torch.equal(images.float() / 255, torch.stack([shapes[i][0] for i in range(12)]))  # pixel-exact
    assert captions == [shapes[i][1] for i in range(12)]
    assert keys == [f"{i:09d}" for i in range(12)]
    assert shard_kind(files[0]) == "images"
    pattern = os.path.join(str(image_shards), "shard-{000000..000002}.tar")
    assert list_shards(pattern) == files
    with pytest.raises(FileNotFoundError, match="1 of the 4 shards .* do not exist"):
        list_shards(os.path.join(str(image_shards), "shard-{000000..000003}.tar"))


def test_each_process_gets_its_own_shards_and_together_all():
    shards = [f"s{i}" for i in range(7)]
    for world in (1, 2, 3, 7):
        shares = [shards_for_rank(shards, rank, world) for rank in range(world)]
        assert sorted(s for share in shares for s in share) == sorted(shards)  # cover all ...
        assert sum(len(share) for share in shares) == len(shards)  # ... each once
    with pytest.raises(ValueError, match="7 shard\\(s\\) for 8 processes: every process needs at least one"):
        shards_for_rank(shards, 0, 8)


def test_a_process_reads_only_its_shards(image_shards, monkeypatch):
    files = list_shards(image_shards)
    keys = [read_images(shards_for_rank(files, rank, 2))[2] for rank in range(2)]
    assert keys[0] == [f"{i:09d}" for i in (0, 1, 2, 3, 4, 10, 11)] and keys[1] == [f"{i:09d}" for i in range(5, 10)]


# ---- bad data: skipped, counted, named ------------------------------------------------------


def test_a_corrupt_sample_is_skipped_and_named_the_others_kept(tmp_path, shapes):
    good = [{"__key__": f"{i:09d}", "png": png_bytes(shapes[i][0]), "txt": shapes[i][1].encode()} for i in range(3)]
    truncated_png = png_bytes(shapes[3][0])[:60]
    write_tar(tmp_path / "shard-000000.tar", [
        good[0],
        {"__key__": "garbage", "png": b"\x89PNG\r\n\x1a\n this is not a picture", "txt": b"a red circle"},
        {"__key__": "cut", "png": truncated_png, "txt": b"a red circle"},
        good[1],
        {"__key__": "nocaption", "png": good[0]["png"]},
        {"__key__": "latin1", "png": good[0]["png"], "txt": "caf\xe9".encode("latin-1")},
        good[2],
    ])
    with pytest.warns(UserWarning, match="skipped some") as caught:
        images, captions, keys = read_images(tmp_path)
    assert keys == ["000000000", "000000001", "000000002"]
    assert torch.equal(images.float() / 255, torch.stack([shapes[i][0] for i in range(3)]))
    message = str(caught[0].message)
    assert "unreadable image: 2 (shard-000000.tar:garbage, shard-000000.tar:cut)" in message
    assert "missing caption: 1 (shard-000000.tar:nocaption)" in message
    assert "unreadable caption: 1 (shard-000000.tar:latin1)" in message


def test_a_damaged_shard_is_skipped_with_a_warning_not_a_crash(tmp_path, image_shards):
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar"):
        shutil.copy(image_shards / name, tmp_path / name)
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        cut = tar.getmember("000000002.png").offset_data + 10
    whole = (tmp_path / "shard-000000.tar").read_bytes()
    (tmp_path / "shard-000000.tar").write_bytes(whole[:cut])  # cut inside the third image
    (tmp_path / "shard-000001.tar").write_bytes(b"not a tar file at all " * 40)
    with pytest.warns(UserWarning) as caught:
        _, _, keys = read_images(tmp_path)
    message = "\n".join(str(w.message) for w in caught)
    assert re.search(r"damaged shard: 2 \(shard-000000.tar \(ReadError.*shard-000001.tar \(ReadError", message)
    assert keys[-2:] == ["000000010", "000000011"]  # the shard after the damaged ones is read whole
    assert keys[:-2] == ["000000000", "000000001"]  # the samples before the damage are kept


# ---- code shards ------------------------------------------------------------------------------


def test_tokenize_images_gives_the_dvae_codes_of_each_image(code_shards, shapes, tiny_dvae, capsys):
    codes, captions, keys = read_codes(code_shards, tiny_dvae)
    direct = load_dvae(tiny_dvae).encode(torch.stack([shapes[i][0] for i in range(12)]))  # computed here, apart
    assert codes.dtype == torch.int16 and codes.shape == (12, 8, 8)
    assert torch.equal(codes.long(), direct)
    assert captions == [shapes[i][1] for i in range(12)] and keys == [f"{i:09d}" for i in range(12)]
    files = list_shards(code_shards)
    assert len(files) == 3 and shard_kind(files[0]) == "codes"  # one code shard per image shard
    with tarfile.open(files[0]) as tar:
        header = json.loads(tar.extractfile(f"{HEADER_KEY}.json").read())
        first = np.load(io.BytesIO(tar.extractfile("000000000.npy").read()), allow_pickle=False)
    assert header["dvae_digest"] == dvae_facts(tiny_dvae)["dvae_digest"] and header["grid_size"] == 8
    assert first.dtype == np.int16 and np.array_equal(first, direct[0].numpy())


def test_shards_and_tokenize_images_refuse_to_overwrite(tmp_path, image_shards, tiny_dvae, capsys):
    out = tmp_path / "out"
    make = ["shards", "make", "--dataset", "shapes", "--image-size", "16", "--out", str(out)]
    main([*make, "--count", "6", "--samples-per-shard", "2"])
    assert "wrote 6 samples in 3 shards" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="3 shard\\(s\\) already exist .* add --force"):
        main([*make, "--count", "4"])
    main([*make, "--count", "4", "--samples-per-shard", "4", "--force"])
    assert [p.name for p in sorted(out.iterdir())] == ["shard-000000.tar"]  # no stale shard left behind
    codes = tmp_path / "codes"
    tokenize = ["tokenize-images", "--shards", str(image_shards), "--dvae", str(tiny_dvae), "--out", str(codes)]
    main(tokenize)
    printed = capsys.readouterr().out
    assert "encoded 12 images into 8x8 codes of 512" in printed and "--shards '" in printed
    with pytest.raises(SystemExit, match="already exist .* add --force"):
        main(tokenize)
    with pytest.raises(SystemExit, match="is where the image shards are"):  # --force would delete them
        main([*tokenize[:-1], str(image_shards), "--force"])


class Payload:
    """Unpickling this makes a folder: proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_codes_are_read_without_unpickling(tmp_path, tiny_dvae):
    facts = dvae_facts(tiny_dvae)
    marker = str(tmp_path / "the_pickle_ran")
    evil = io.BytesIO()
    np.save(evil, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    np.load(io.BytesIO(evil.getvalue()), allow_pickle=True)  # the payload is live ...
    assert os.path.isdir(marker)
    os.rmdir(marker)
    good = torch.randint(0, 512, (8, 8))
    write_tar(tmp_path / "shard-000000.tar", [
        {"__key__": HEADER_KEY, "json": json.dumps({"format": "dalle_lesson/codes/1", **facts}).encode()},
        {"__key__": "pickled", "npy": evil.getvalue(), "txt": b"a red circle"},
        {"__key__": "good", "npy": npy_bytes(good), "txt": b"a red circle"},
        {"__key__": "wrongshape", "npy": npy_bytes(torch.zeros(4, 4)), "txt": b"a red circle"},
        {"__key__": "outofrange", "npy": npy_bytes(torch.full((8, 8), 600)), "txt": b"a red circle"},
    ])
    with pytest.warns(UserWarning) as caught:
        codes, _, keys = read_codes(tmp_path, tiny_dvae)
    assert not os.path.exists(marker)  # ... but reading the shard never ran it
    assert keys == ["good"] and torch.equal(codes[0].long(), good)
    message = str(caught[0].message)
    assert "unreadable codes: 1 (shard-000000.tar:pickled)" in message
    assert "bad codes: 2" in message and "wrongshape" in message and "outofrange" in message


def test_codes_of_another_dvae_are_refused(tmp_path, code_shards, tiny_dvae):
    torch.manual_seed(1)
    finer = save_dvae(DiscreteVAE(DVAEConfig(**{**asdict(DVAEConfig.lesson()), "group_count": 2})),
                      tmp_path / "finer.safetensors")  # 16x16 grids
    with pytest.raises(SystemExit, match=r"8x8 grids of codes from the dVAE dvae.safetensors .* makes 16x16 grids: "
                                         r"encode the images again"):
        main(["train", "dalle", "--shards", str(code_shards), "--dvae", str(finer), "--steps", "1",
              "--out", str(tmp_path / "m.safetensors")])
    torch.manual_seed(2)
    same_grid = save_dvae(DiscreteVAE(DVAEConfig.lesson()), tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="was made by another dVAE: dvae.safetensors .* not other.safetensors"):
        read_codes(code_shards, same_grid)
    write_tar(tmp_path / "noheader.tar", [{"__key__": "a", "npy": npy_bytes(torch.zeros(8, 8)), "txt": b"x"}])
    with pytest.raises(ValueError, match="has no header saying which dVAE"):
        read_codes(tmp_path / "noheader.tar", tiny_dvae)


# ---- training from shards = training from the same codes in memory ----------------------------


def test_training_on_shards_matches_training_in_memory(tmp_path, image_shards, code_shards, tiny_dvae):
    """The existing path (shapes -> cached codes in memory), code shards, and image shards
    encoded on the fly: the same 12 examples in the same order, so bitwise the same run."""
    common = ["train", "dalle", "--steps", "3", "--batch-size", "4", "--log-every", "1", "--d-model", "32",
              "--layers", "2", "--heads", "2", "--dvae", str(tiny_dvae), "--cache-dir", str(tmp_path / "cache")]
    runs = {"memory": ["--dataset", "shapes", "--train-images", "12", "--val-images", "0"],
            "codes": ["--shards", str(code_shards)], "images": ["--shards", str(image_shards)]}
    for name, extra in runs.items():
        main([*common, *extra, "--out", str(tmp_path / f"{name}.safetensors")])
    weights = {name: checkpoint.load_resume_state(tmp_path / f"{name}.safetensors")["model"] for name in runs}
    losses = {name: [row["loss"] for row in csv.DictReader(open(tmp_path / f"{name}.csv"))] for name in runs}
    for name in ("codes", "images"):
        assert losses[name] == losses["memory"] and len(losses[name]) == 3
        assert all(torch.equal(weights[name][k], weights["memory"][k]) for k in weights["memory"])
    assert len(list((tmp_path / "cache" / "shard-codes").glob("*.tar"))) == 3  # the image shards, encoded once


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun is not installed")
def test_two_processes_agree_on_the_smallest_share(tmp_path, code_shards, tiny_dvae):
    """Shards of 5, 5 and 2: process 0 holds 7 examples, process 1 holds 5, so both use 5."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "dalle_lesson.cli", "train", "dalle",
         "--shards", str(code_shards), "--dvae", str(tiny_dvae), "--steps", "1", "--batch-size", "4",
         "--d-model", "32", "--layers", "2", "--heads", "2", "--threads", "1",
         "--out", str(tmp_path / "m.safetensors")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "5 training examples" in result.stdout
    assert "process 0 of 2 uses 5 of its 7 examples" in result.stderr
