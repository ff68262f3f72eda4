"""Data at scale (lesson 07): WebDataset tar shards of images, and of the dVAE's codes.

The paper trains on 250 million image-caption pairs. No file system likes 500 million small
files, so the data lives in *shards*: plain tar files of a few thousand samples each, read
from start to end (fast on disks and object stores alike). A sample is a few files that
share a *key*; WebDataset (the ``webdataset`` package) groups them back together::

    shard-000000.tar
        000000000.png    the image, lossless 8-bit RGB
        000000000.txt    its caption, UTF-8
        000000001.png
        000000001.txt
        ...

The pipeline of the lesson, as commands::

    dalle-lesson shards make --dataset shapes --count 20000 --out shards/
    dalle-lesson tokenize-images --shards shards/ --out codes/    # the dVAE runs once per image
    dalle-lesson train dalle --shards codes/                      # or torchrun ... --shards codes/

and as functions::

    write_shards(ShapesDataset(length=20_000, image_size=32), "shards/")
    tokenize_shards("shards/", "codes/")                  # code shards: .npy int16 + .txt
    codes, captions = load_rank_codes("codes/")           # this process's share, in memory

Two rules keep untrusted shards harmless. Nothing in a shard is ever unpickled (no
``torch.load``, no ``pickle``, no ``allow_pickle``): images are decoded by Pillow, captions
as UTF-8 text, codes by ``numpy.load(..., allow_pickle=False)``, the header as JSON. And a
bad sample never stops a run: it is skipped, counted, and named in one warning, like a bad
file in :class:`dalle_lesson.data.ImageFolderDataset`.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import warnings
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import braceexpand
import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from dalle_lesson import checkpoint, data

SHARD_NAME = "shard-%06d.tar"  # the names this module writes: shard-000000.tar, shard-000001.tar, ...
HEADER_KEY = "__header__"  # a code shard's first member, __header__.json, says which dVAE made it
CODES_FORMAT = "dalle_lesson/codes/1"
# Image files a shard may hold, and the one Pillow decoder each may use (fewer decoders
# tried on untrusted bytes, fewer surprises).
IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
# Why a sample or a shard can be left out, in the order the warning lists them.
SKIP_REASONS = ("damaged shard", "unreadable image", "image too large", "unreadable codes", "bad codes",
                "missing caption", "unreadable caption", "no image or codes")


# --------------------------------------------------------------------------------------
# Finding the shards, and each process's share
# --------------------------------------------------------------------------------------


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url  # webdataset opens these; we cannot stat them


def list_shards(source) -> list[str]:
    """The shard files of ``source``: a folder, a brace pattern, a glob, or a list of those.

        list_shards("shards/")                                # every .tar in the folder, sorted
        list_shards("shards/shard-{000000..000009}.tar")      # ten shards, in this order

    Every local file must exist (a missing shard is an error, not a smaller data set).
    """
    if isinstance(source, (list, tuple)):
        return [shard for item in source for shard in list_shards(item)]
    source = str(source)
    if os.path.isdir(source):
        found = sorted(p for suffix in ("tar", "tgz", "tar.gz") for p in glob.glob(os.path.join(source, f"*.{suffix}")))
        if not found:
            raise FileNotFoundError(f"no .tar shards in the folder {source}; "
                                    "write some with `dalle-lesson shards make`")
        return found
    shards = []
    for name in braceexpand.braceexpand(source):
        is_glob = not _is_remote(name) and any(c in name for c in "*?[")
        shards += sorted(glob.glob(name)) if is_glob else [name]
    missing = [s for s in shards if not _is_remote(s) and not os.path.isfile(s)]
    if missing or not shards:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise FileNotFoundError(f"{len(missing)} of the {len(shards)} shards of {source} do not exist ({shown}); "
                                "give a folder of .tar files or a pattern like dir/shard-{000000..000009}.tar"
                                if shards else f"no shard matches {source}")
    return shards


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process: from torch.distributed once it is started, else from
    the variables torchrun sets (RANK, WORLD_SIZE), else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def shards_for_rank(shards: list[str], rank: int, world: int) -> list[str]:
    """The shards process ``rank`` of ``world`` reads: every ``world``-th, starting at ``rank``.

    >>> shards_for_rank(["a", "b", "c", "d", "e"], rank=1, world=2)
    ['b', 'd']

    The shares are disjoint and together cover every shard, so no process needs to read
    (or even open) another's files.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0 .. {world - 1}")
    if len(shards) < world:
        raise ValueError(f"{len(shards)} shard(s) for {world} processes: every process needs at least one "
                         "shard of its own. Write more, smaller shards (shards make --samples-per-shard), "
                         "or start fewer processes")
    return shards[rank::world]


def smallest_over_ranks(count: int) -> int:
    """The smallest ``count`` over all processes (``count`` itself in a single process).

    The engine draws one global batch of indices in ``range(stage.num_examples)`` and gives
    each process every ``world``-th of them; with data local to each process, every index
    must exist on every process, so all use the smallest process's count.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return count
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([count], dtype=torch.int64, device=device)  # NCCL reduces CUDA tensors only
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())


# --------------------------------------------------------------------------------------
# Writing image shards
# --------------------------------------------------------------------------------------


@dataclass
class ShardSummary:
    """What a writer wrote: ``samples`` in ``files``, ``bytes`` in all."""

    samples: int
    files: list[str]
    bytes: int

    @property
    def pattern(self) -> str:
        """The files as one brace pattern, for ``--shards``: ``out/shard-{000000..000003}.tar``."""
        if len(self.files) == 1:
            return self.files[0]
        first, last = (re.search(r"(\d+)\.tar$", f) for f in (self.files[0], self.files[-1]))
        if not (first and last):
            return str(Path(self.files[0]).parent)
        return f"{self.files[0][:first.start(1)]}{{{first.group(1)}..{last.group(1)}}}.tar"

    def __str__(self) -> str:
        return (f"{self.samples} samples in {len(self.files)} shards, {self.bytes / 1e6:.2f} MB "
                f"({self.bytes / max(1, self.samples):.0f} bytes per sample): {self.pattern}")


def _shard_pattern(out) -> str:
    """``out`` as a ShardWriter pattern: a folder gets ``shard-%06d.tar``; a pattern stays."""
    out = str(out)
    return out if "%" in out else os.path.join(out, SHARD_NAME)


def _clear_old_shards(pattern: str, force: bool) -> None:
    """Refuse to write over existing shards, or with ``force`` delete them first (so no stale
    shard of an earlier, longer run is left to be read with the new ones)."""
    old = sorted(glob.glob(re.sub(r"%0?\d*d", "*", pattern)))
    if old and not force:
        raise ValueError(f"{len(old)} shard(s) already exist ({old[0]}, ...); add --force to replace them, "
                         "or choose another --out folder")
    for path in old:
        os.remove(path)


def png_bytes(image: torch.Tensor) -> bytes:
    """A FloatTensor[3, H, W] in [0, 1] (or uint8) as PNG bytes: lossless 8-bit RGB."""
    if image.is_floating_point():
        image = (image * 255).round().clamp(0, 255).to(torch.uint8)  # as preload_images does
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy(), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(dataset, out, samples_per_shard: int = 1000, count: int | None = None, force: bool = False,
                 progress: bool = True) -> ShardSummary:
    """Write the first ``count`` (image, caption) items of ``dataset`` as WebDataset shards.

        >>> s = write_shards(ShapesDataset(length=10, image_size=32), "shards/", samples_per_shard=4)
        >>> len(s.files), s.pattern           # doctest: +SKIP
        (3, 'shards/shard-{000000..000002}.tar')

    ``out`` is a folder (files ``shard-000000.tar``, ...) or a pattern like
    ``"out/part-%04d.tar"``. Sample ``i`` is ``{i:09d}.png`` (the image as 8-bit RGB PNG:
    lossless, so it reads back pixel for pixel; deeper images are rounded to 8 bits) and
    ``{i:09d}.txt`` (the caption, UTF-8). Existing shards are refused unless ``force``.
    """
    count = len(dataset) if count is None else min(count, len(dataset))
    if count < 1:
        raise ValueError("the dataset has no samples to write")
    pattern = _shard_pattern(out)
    _clear_old_shards(pattern, force)
    Path(pattern).parent.mkdir(parents=True, exist_ok=True)
    files = []
    # encoder=False: we hand over bytes, so nothing is pickled by accident; mtime=0: the same
    # data gives byte-identical shards.
    with wds.ShardWriter(pattern, maxcount=samples_per_shard, verbose=0, post=files.append,
                         encoder=False, mtime=0) as sink:
        for index in tqdm(range(count), desc="writing shards", disable=not progress, mininterval=1.0):
            image, caption = dataset[index]
            sink.write({"__key__": f"{index:09d}", "png": png_bytes(image), "txt": caption.encode("utf-8")})
    return ShardSummary(count, files, sum(os.path.getsize(f) for f in files))


# --------------------------------------------------------------------------------------
# Reading shards, safely
# --------------------------------------------------------------------------------------


def raw_samples(shards: list[str], on_damage=None) -> Iterator[dict]:
    """The samples of some shards as webdataset gives them, undecoded: one dict of bytes each,
    ``{"__key__": "000000007", "__url__": shard, "png": b"...", "txt": b"..."}``.

    These are the two steps of ``webdataset.WebDataset`` that matter here: a tar file is a
    stream of files (``tar_file_expander``), and consecutive files with the same key are
    one sample (``group_by_keys``). We leave out its shard shuffling and its splitting by
    process (we split ourselves, :func:`shards_for_rank`) and its decoders (some unpickle).
    A damaged shard raises, or with ``on_damage(shard, error)`` is reported and left,
    and reading goes on with the next shard.
    """
    current = {"shard": None}

    def opened():  # each shard as an open stream, closed as soon as it has been read to its end
        for shard in shards:
            with closing(wds.gopen(shard, "rb")) as stream:  # a local file, or pipe:/http:// (webdataset's opener)
                current["shard"] = shard
                yield {"url": shard, "stream": stream}

    def handler(error: Exception) -> bool:  # webdataset's error handler: True = go on
        if on_damage is None:
            raise error
        on_damage(current["shard"], error)
        return True

    return group_by_keys(tar_file_expander(opened(), handler=handler), handler=handler)


class _Skip(Exception):
    """Raised while decoding a sample: the sample is left out for this reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_image(raw: bytes, extension: str, image_size: int | None = None) -> torch.Tensor:
    """Image bytes as a uint8 tensor [3, H, W] (Pillow only; transparency onto white).

    With ``image_size`` the image is resized and centre-cropped to that square, as
    :func:`dalle_lesson.data.load_image` does for files. Raises _Skip for bad bytes.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # a bomb is refused, not decoded
            image = Image.open(io.BytesIO(raw), formats=[IMAGE_FORMATS[extension]])
            image.load()  # decode now: broken data fails here, inside the try
        image = data.to_rgb_on_white(ImageOps.exif_transpose(image))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # over Image.MAX_IMAGE_PIXELS
        raise _Skip("image too large") from None
    except Exception:  # untrusted bytes can fail in many ways (OSError, SyntaxError, zlib...): skip them all
        raise _Skip("unreadable image") from None
    if image_size is not None and image.size != (image_size, image_size):
        image = ImageOps.fit(image, (image_size, image_size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def decode_codes(raw: bytes) -> torch.Tensor:
    """``.npy`` bytes as a ShortTensor [h, w], never unpickling (``allow_pickle=False``)."""
    try:
        array = np.load(io.BytesIO(raw), allow_pickle=False)  # an object array raises ValueError here
    except Exception:
        raise _Skip("unreadable codes") from None
    if array.ndim != 2 or array.dtype.kind not in "iu" or (array.size and array.min() < 0):
        raise _Skip("bad codes")
    if array.size and array.max() > np.iinfo(np.int16).max:  # checked before the cast, which would wrap
        raise _Skip("bad codes")
    return torch.from_numpy(array.astype(np.int16))


def decode_caption(raw: bytes | None) -> str:
    """``.txt`` bytes as a caption (UTF-8, stripped); _Skip if missing, empty or not UTF-8."""
    if raw is None:
        raise _Skip("missing caption")
    try:
        caption = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise _Skip("unreadable caption") from None
    if not caption:
        raise _Skip("missing caption")
    return caption


class ShardReader:
    """Read WebDataset shards sample by sample, decoded safely; bad ones skipped and counted.

        reader = ShardReader("images")
        for key, image, caption in reader.samples(list_shards("shards/")):
            ...                       # image: uint8 [3, S, S]; caption: str
        reader.warn_skipped()         # one warning: how many were skipped, why, and which

    ``kind`` is ``"images"`` (.png / .jpg / .webp + .txt) or ``"codes"`` (.npy + .txt, from
    :func:`tokenize_shards`). A damaged shard (truncated, not a tar) is skipped from the
    point of damage on; the samples before it are kept. Each shard's ``__header__.json``,
    if it has one, lands in :attr:`headers`; ``check_header(shard, header)`` may refuse it.
    """

    def __init__(self, kind: str, image_size: int | None = None, check_header=None):
        if kind not in ("images", "codes"):
            raise ValueError(f"kind must be 'images' or 'codes', got {kind!r}")
        self.kind, self.image_size, self.check_header = kind, image_size, check_header
        self.skipped: dict[str, list[str]] = {reason: [] for reason in SKIP_REASONS}
        self.headers: dict[str, dict] = {}
        self.count = 0  # samples handed out

    @property
    def skip_counts(self) -> dict[str, int]:
        """How many were skipped, for each reason that occurred."""
        return {reason: len(names) for reason, names in self.skipped.items() if names}

    def _damaged(self, shard: str, error: Exception) -> None:
        """Note a damaged shard once (webdataset may report it twice: the member, then the stream)."""
        name = os.path.basename(shard)
        message = str(error.args[0]).split(" @ ")[0] if error.args else ""
        if not any(entry.startswith(name + " ") for entry in self.skipped["damaged shard"]):
            self.skipped["damaged shard"].append(f"{name} ({type(error).__name__}: {message})")

    def samples(self, shards: list[str]) -> Iterator[tuple[str, torch.Tensor, str]]:
        """Yield ``(key, image or codes, caption)`` for every good sample of ``shards``, in order."""
        for sample in raw_samples(shards, on_damage=self._damaged):
            shard, key = sample["__url__"], sample["__key__"]
            if key == HEADER_KEY:
                self._read_header(shard, sample.get("json"))
                continue
            if self.kind == "codes" and self.check_header is not None and shard not in self.headers:
                self.check_header(shard, None)
            try:
                yield key, self._decode(sample), decode_caption(sample.get("txt"))
                self.count += 1
            except _Skip as skip:
                self.skipped[skip.reason].append(f"{os.path.basename(shard)}:{key}")

    def _read_header(self, shard: str, raw: bytes | None) -> None:
        try:
            header = json.loads(raw.decode("utf-8"))
        except Exception:  # no .json, not UTF-8, not JSON
            header = {}
        self.headers[shard] = header
        if self.check_header is not None:
            self.check_header(shard, header)

    def _decode(self, sample: dict) -> torch.Tensor:
        if self.kind == "codes":
            if "npy" not in sample:
                raise _Skip("no image or codes")
            return decode_codes(sample["npy"])
        extension = next((e for e in IMAGE_FORMATS if e in sample), None)
        if extension is None:
            raise _Skip("no image or codes")
        return decode_image(sample[extension], extension, self.image_size)

    def warn_skipped(self) -> None:
        """One warning naming what was skipped (the first few of each reason); none if nothing was."""
        lines = []
        for reason, names in self.skipped.items():
            if names:
                shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
                lines.append(f"  {reason}: {len(names)} ({shown})")
        if lines:
            warnings.warn(f"read {self.count} samples and skipped some:\n" + "\n".join(lines)
                          + "\n(a damaged shard keeps the samples before the damage)", stacklevel=2)


def read_images(shards, image_size: int | None = None) -> tuple[torch.Tensor, list[str], list[str]]:
    """Every good sample of some image shards, in memory: (uint8 [N, 3, S, S], captions, keys).

    For small sets (the lesson, tests). Training at scale keeps only codes in memory
    (see :func:`load_rank_codes`).
    """
    reader = ShardReader("images", image_size=image_size)
    keys, images, captions = _unzip(reader.samples(list_shards(shards)))
    reader.warn_skipped()
    if not images:
        raise ValueError(f"no readable samples in {shards}; skipped: {reader.skip_counts}")
    sizes = {tuple(image.shape) for image in images}
    if len(sizes) > 1:
        raise ValueError(f"the images have different sizes {sorted(sizes)}; pass image_size=... to resize them")
    return torch.stack(images), captions, keys


def _unzip(samples) -> tuple[list, list, list]:
    keys, values, captions = [], [], []
    for key, value, caption in samples:
        keys.append(key), values.append(value), captions.append(caption)
    return keys, values, captions


def shard_kind(shard: str) -> str:
    """``"codes"`` or ``"images"``: what the first sample of ``shard`` holds."""
    try:
        first = next(iter(raw_samples([shard])))
    except StopIteration:
        raise ValueError(f"{shard} holds no samples") from None
    except Exception as error:
        raise ValueError(f"cannot read the shard {shard}: {error}") from None
    if first["__key__"] == HEADER_KEY or "npy" in first:
        return "codes"
    if any(extension in first for extension in IMAGE_FORMATS):
        return "images"
    files = sorted(k for k in first if not k.startswith("__"))
    raise ValueError(f"{shard}: its first sample ({first['__key__']}) has the files {files}; expected an image "
                     "(.png, .jpg, .webp) + .txt (image shards) or .npy + .txt (code shards)")


# --------------------------------------------------------------------------------------
# Code shards: every image through the dVAE once
# --------------------------------------------------------------------------------------


def dvae_facts(dvae_path=None) -> dict:
    """What a code shard's header records about the dVAE that made it (read from the file's
    metadata, without loading the weights)::

        {"dvae": "dvae_lesson.safetensors", "dvae_digest": "3fa2...", "grid_size": 16,
         "vocab_size": 512, "image_size": 32}
    """
    from dalle_lesson.dvae import DVAEConfig
    from dalle_lesson.checkpoint import file_digest  # the digest cached_codes names its files by

    path = Path(dvae_path) if dvae_path is not None else data.shipped_path("dvae_lesson.safetensors")
    if not path.is_file():
        raise FileNotFoundError(f"--dvae {path}: no such file")
    config = DVAEConfig(**checkpoint.read_metadata(path)["config"])
    return {"dvae": path.name, "dvae_digest": file_digest(path), "grid_size": config.grid_size,
            "vocab_size": config.vocab_size, "image_size": config.image_size}


def npy_bytes(codes: torch.Tensor) -> bytes:
    """A grid of codes as ``.npy`` bytes, int16 (8192 codes fit; half the bytes of int32)."""
    buffer = io.BytesIO()
    np.save(buffer, codes.to(torch.int16).numpy(), allow_pickle=False)
    return buffer.getvalue()


def _batches(samples, size: int):
    batch = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def encode_shard(dvae, facts: dict, reader: ShardReader, shard: str, out: str | Path, batch_size: int = 64,
                 device="cpu") -> int:
    """Encode the images of one image shard into one code shard at ``out``; returns the count.

    The code shard starts with ``__header__.json`` (``facts``, from :func:`dvae_facts`, and
    the source shard's name), then per sample ``{key}.npy`` (int16 [h, w]) and ``{key}.txt``.
    Written to a temporary file and renamed, so a crash never leaves half a shard.
    """
    count = 0

    def write(temporary):
        nonlocal count
        with wds.TarWriter(temporary, encoder=False, mtime=0) as sink:
            header = {"format": CODES_FORMAT, **facts, "source": os.path.basename(shard)}
            sink.write({"__key__": HEADER_KEY, "json": json.dumps(header).encode("utf-8")})
            for batch in _batches(reader.samples([shard]), batch_size):
                keys, images, captions = zip(*batch)
                images = torch.stack(images).to(device).float() / 255  # as the in-memory path does
                codes = dvae.encode(images).to("cpu", torch.int16)
                for key, grid, caption in zip(keys, codes, captions):
                    sink.write({"__key__": key, "npy": npy_bytes(grid), "txt": caption.encode("utf-8")})
                count += len(keys)

    checkpoint.atomic_write(out, write)
    return count


def tokenize_shards(source, out, dvae_path=None, batch_size: int = 64, device="cpu", force: bool = False,
                    progress: bool = True) -> ShardSummary:
    """Image shards -> code shards, one for one: ``out/shard-000000.tar`` from the first, ...

        >>> tokenize_shards("shards/", "codes/", dvae_path="dvae.safetensors")  # doctest: +SKIP

    Each image goes through ``DiscreteVAE.encode`` once (on ``device``); images of another
    size are first resized to the dVAE's. Training then never runs the encoder again, and
    keeps 2 bytes per code in memory: 2 KiB per image at the paper's 32 x 32 grid, where
    its 256 x 256 pixels are 196,608 bytes. (On disk the saving is smaller: tar gives every
    file a 512-byte header and pads it to 512 bytes, so a sample of the paper's codes and
    a caption takes about 4 KB, while a compressed image takes tens of KB.)
    """
    from dalle_lesson.dvae import load_dvae

    shards = list_shards(source)
    pattern = _shard_pattern(out)
    folder = os.path.dirname(pattern) or "."
    if os.path.isdir(folder) and any(os.path.samefile(folder, os.path.dirname(s) or ".")
                                     for s in shards if not _is_remote(s)):
        raise ValueError(f"--out {out} is where the image shards are; write the code shards to another folder")
    _clear_old_shards(pattern, force)
    facts = dvae_facts(dvae_path)
    dvae = load_dvae(dvae_path, device=device)
    reader = ShardReader("images", image_size=facts["image_size"])
    files, total = [], 0
    bar = tqdm(shards, desc="images -> codes", unit="shard", disable=not progress)
    for index, shard in enumerate(bar):
        files.append(pattern % index)
        total += encode_shard(dvae, facts, reader, shard, files[-1], batch_size, device)
        bar.set_postfix(images=total, refresh=False)
    reader.warn_skipped()
    if total == 0:
        raise ValueError(f"no readable images in {source}; skipped: {reader.skip_counts}")
    return ShardSummary(total, files, sum(os.path.getsize(f) for f in files))


def _header_checker(facts: dict, dvae_path):
    """``check_header`` for code shards: refuse codes that another dVAE made."""
    redo = (f"encode the images again with this dVAE (dalle-lesson tokenize-images --dvae {dvae_path or '<it>'} "
            "...), or train with --dvae set to the dVAE that made them")

    def check(shard: str, header: dict | None) -> None:
        name = os.path.basename(shard)
        if not header or header.get("format") != CODES_FORMAT:
            raise ValueError(f"the shard {name} has no header saying which dVAE made its codes (__header__.json): "
                             "code shards come from `dalle-lesson tokenize-images`; image shards can be given to "
                             "`train dalle --shards` as they are")
        theirs, ours = header.get("grid_size"), facts["grid_size"]
        if theirs != ours:
            raise ValueError(f"the code shard {name} holds {theirs}x{theirs} grids of codes from the dVAE "
                             f"{header.get('dvae')} (digest {header.get('dvae_digest')}), but the dVAE "
                             f"{facts['dvae']} (digest {facts['dvae_digest']}) makes {ours}x{ours} grids: {redo}")
        if header.get("dvae_digest") != facts["dvae_digest"] or header.get("vocab_size") != facts["vocab_size"]:
            raise ValueError(f"the code shard {name} was made by another dVAE: {header.get('dvae')} (digest "
                             f"{header.get('dvae_digest')}), not {facts['dvae']} (digest {facts['dvae_digest']}); "
                             f"its codes would decode to the wrong images: {redo}")

    return check


def read_codes(shards, dvae_path=None, progress: bool = False) -> tuple[torch.Tensor, list[str], list[str]]:
    """Every good sample of some code shards: (ShortTensor[N, h, w], captions, keys).

    Every shard's header must name the dVAE at ``dvae_path`` (default: the shipped one),
    by digest and grid size; codes of another shape or outside the vocabulary are skipped.
    """
    codes, captions, keys, reader = _read_codes(list_shards(shards), dvae_path, progress)
    if not len(codes):
        raise ValueError(f"no readable samples in the code shards {shards}; skipped: {reader.skip_counts}")
    return codes, captions, keys


def _read_codes(shards: list[str], dvae_path, progress: bool):
    facts = dvae_facts(dvae_path)
    grid, vocab = facts["grid_size"], facts["vocab_size"]
    reader = ShardReader("codes", check_header=_header_checker(facts, dvae_path))
    keys, codes, captions = [], [], []
    for key, grid_codes, caption in tqdm(reader.samples(shards), desc="reading codes", unit=" samples",
                                         disable=not progress, mininterval=1.0):
        if tuple(grid_codes.shape) != (grid, grid) or grid_codes.max() >= vocab:
            reader.skipped["bad codes"].append(key)
            continue
        keys.append(key), codes.append(grid_codes), captions.append(caption)
    reader.warn_skipped()
    stacked = torch.stack(codes) if codes else torch.empty((0, grid, grid), dtype=torch.int16)
    return stacked, captions, keys, reader


# --------------------------------------------------------------------------------------
# Training from shards: each process keeps its own share in memory
# --------------------------------------------------------------------------------------


def _shard_fingerprint(shard: str) -> str:
    """Which file, which size, when modified: a new or changed shard gets a new cache entry."""
    if _is_remote(shard):
        what = shard
    else:
        stat = os.stat(shard)
        what = f"{os.path.realpath(shard)}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return hashlib.sha256(what.encode()).hexdigest()[:16]


def cached_code_shards(shards: list[str], dvae_path=None, cache_dir=None, device="cpu", batch_size: int = 64,
                       progress: bool = True) -> list[str]:
    """The code shard of each image shard, encoded once into ``cache_dir`` and then reused.

    The cache entry's name carries the image shard's fingerprint and the dVAE's digest, as
    :func:`dalle_lesson.stages.cached_codes` does, so neither stale images nor a new dVAE
    ever reuse old codes.
    """
    from dalle_lesson.dvae import load_dvae
    from dalle_lesson.stages import default_cache_dir

    facts = dvae_facts(dvae_path)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    names = [f"{Path(s).name.split('.')[0]}-{_shard_fingerprint(s)}-dvae{facts['dvae_digest']}.tar" for s in shards]
    cached = [folder / "shard-codes" / name for name in names]
    todo = [(shard, path) for shard, path in zip(shards, cached) if not path.is_file()]
    if todo:
        dvae = load_dvae(dvae_path, device=device)
        reader = ShardReader("images", image_size=facts["image_size"])
        for shard, path in tqdm(todo, desc="images -> codes", unit="shard", disable=not progress):
            encode_shard(dvae, facts, reader, shard, path, batch_size, device)
        reader.warn_skipped()
    elif progress:
        print(f"reusing the codes of {len(shards)} image shard(s) cached in {folder / 'shard-codes'}")
    return [str(path) for path in cached]


def load_rank_codes(source, dvae_path=None, cache_dir=None, device="cpu", progress: bool = True):
    """This process's share of a shard set, in memory: ``(codes ShortTensor[N, h, w], captions)``.

    ``source`` holds code shards (:func:`tokenize_shards`) or image shards (then each is
    encoded once, into the cache: :func:`cached_code_shards`); which, the first shard says.
    Process ``rank`` of ``world`` reads only ``shards_for_rank(shards, rank, world)``.

    Why in memory: a 32 x 32 grid of int16 codes is 2 KiB, so the paper's 250 million
    images are 512 GB of codes in all, and over its 1024 GPUs 0.5 GB per process (plus the
    token ids of the captions, 256 x int64 = 2 KiB per image). That fits in any training
    machine's RAM, and it keeps the engine simple: batches are indices into tensors, a
    pure function of (seed, step), so resuming is exact. (Pixels would not fit: 196 KB
    per image at 256 x 256, a hundred times more; that is why images become codes first.)

    The engine draws one global batch of indices below ``stage.num_examples`` and hands
    every process its ``[rank::world]`` slice; each process looks those indices up in its
    *own* data. So every process must offer the same count: each keeps its first
    :func:`smallest_over_ranks` examples (make shards of equal size, a multiple of the
    number of processes, and nothing is dropped).
    """
    shards = list_shards(source)
    rank, world = process_rank()
    mine = shards_for_rank(shards, rank, world)
    if shard_kind(shards[0]) == "images":
        mine = cached_code_shards(mine, dvae_path, cache_dir, device, progress=progress)
    codes, captions, _, reader = _read_codes(mine, dvae_path, progress)
    count = smallest_over_ranks(len(codes))  # every process calls it, also one with nothing to read
    if count == 0:
        raise ValueError(f"a process has no readable samples (process {rank} of {world} read {len(codes)} from "
                         f"{len(mine)} shard(s); skipped here: {reader.skip_counts})")
    if count < len(codes):
        warnings.warn(f"process {rank} of {world} uses {count} of its {len(codes)} examples, as many as the "
                      "process with the fewest; give every process the same number of samples to use them all",
                      stacklevel=2)
    return codes[:count], captions[:count]
