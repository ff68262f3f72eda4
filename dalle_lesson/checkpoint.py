"""One checkpoint format for every model of the course.

A checkpoint is a safetensors file: the weights, plus a header of JSON metadata that says
what the file is::

    {"format": "dalle_lesson/2", "kind": "dvae", "config": {...}, "step": 3600, ...}

safetensors holds only tensors and strings, so loading a file never runs code from it
(a pickle can). Every model class of the course names its ``kind`` and its
``config_class``; that is all :func:`load` needs to rebuild it::

    save(model, "dvae.safetensors", dtype=torch.float16, step=3600)
    model = load("dvae.safetensors", DiscreteVAE)      # checks kind and sizes first

Three promises:

* **Atomic writes.** A file is written to a fresh temporary name in the target's folder,
  then renamed over the target (``os.replace``): a reader sees the old file or the new
  one, never half of one, and two writers never mix (each has its own temporary file).
* **The right kind.** Loading a dVAE file where a DALL·E model is wanted fails in one
  line that says what the file is.
* **Sizes before memory.** The model is first built on the ``meta`` device (no memory),
  and its tensor shapes are compared with the file's; a small file whose config claims
  a huge model is refused before anything is allocated.

The training engine's resume state (optimiser, step, ...) is a second file beside the
checkpoint, written by :func:`save_resume_state` and read with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

FORMAT = "dalle_lesson/2"

# How each kind of checkpoint is named in messages.
KIND_NAMES = {
    "autoencoder": "autoencoder",
    "vae": "VAE",
    "dvae": "dVAE",
    "vqvae": "VQ-VAE",
    "dalle": "DALL·E",
    "clip": "CLIP",
    "unclip_decoder": "unCLIP decoder",
    "unclip_prior": "unCLIP prior",
}


def kind_name(kind: str) -> str:
    """``kind_name("dvae") == "dVAE"``: how a kind of checkpoint is called in messages."""
    return KIND_NAMES.get(kind, repr(kind))


# --------------------------------------------------------------------------------------
# Writing, atomically
# --------------------------------------------------------------------------------------


def atomic_write(path: str | Path, write) -> Path:
    """Call ``write(temporary_path)``, then rename the temporary file to ``path``.

    The temporary file gets a unique name in ``path``'s own folder (a rename is atomic only
    within one file system). If ``write`` fails, or the process dies before the rename,
    ``path`` is untouched and the temporary file is removed (or left as ``.name.*.tmp``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp made it private; give it the usual permissions
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def file_digest(path: str | Path) -> str:
    """The first 12 hex digits of a file's SHA-256: records which file a model was made from."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def save(model: nn.Module, path: str | Path, dtype: torch.dtype = torch.float32, **metadata) -> Path:
    """Write ``model``'s weights (floating tensors as ``dtype``) and what it is to ``path``.

    ``model`` must have ``kind`` and ``config`` attributes (every course model does).
    Extra keyword arguments (``step=...``, ``recipe=...``) go into the header as JSON.
    """
    from safetensors.torch import save_file

    tensors = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu")
        tensors[name] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()
    header = {"format": FORMAT, "kind": model.kind, "config": asdict(model.config), **metadata}
    encoded = {key: json.dumps(value) for key, value in header.items()}
    return atomic_write(path, lambda temporary: save_file(tensors, temporary, metadata=encoded))


# --------------------------------------------------------------------------------------
# Reading: metadata first, then sizes, then weights
# --------------------------------------------------------------------------------------


def _open(path: Path):
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a safetensors checkpoint ({error})") from None


def read_metadata(path: str | Path) -> dict:
    """The header of a checkpoint, JSON values decoded: kind, config, step, recipe, ...

    Reads only the header, never the weights.
    """
    path = Path(path)
    with _open(path) as f:
        raw = f.metadata() or {}
    if raw.get("format") != json.dumps(FORMAT):
        raise ValueError(f"{path} is not a dalle_lesson checkpoint of format {FORMAT} (its header: "
                         f"{dict(list(raw.items())[:3])}); re-save it with this version of the course")
    return {key: json.loads(value) for key, value in raw.items()}


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the file, from the header alone."""
    with _open(Path(path)) as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def _pick_class(path: Path, kind: str, classes: tuple[type, ...]) -> type:
    for cls in classes:
        if cls.kind == kind:
            return cls
    wanted = " or ".join(kind_name(cls.kind) for cls in classes)
    raise ValueError(f"{path} is a {kind_name(kind)} checkpoint; this wants a {wanted} one")


def _build_config(path: Path, cls: type, values: dict):
    try:
        return cls.config_class(**values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: its config does not describe a valid {kind_name(cls.kind)} ({error})") from None


def check_shapes(path: str | Path, model: nn.Module) -> None:
    """Raise ``ValueError`` unless the file holds exactly the tensors ``model`` has, at its shapes."""
    found = tensor_shapes(path)
    wanted = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    missing = sorted(set(wanted) - set(found))
    extra = sorted(set(found) - set(wanted))
    wrong = [name for name in sorted(set(wanted) & set(found)) if wanted[name] != found[name]]
    if missing or extra or wrong:
        details = [f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else "",
                   "; ".join(f"{n}: file {found[n]}, config {wanted[n]}" for n in wrong[:3])]
        raise ValueError(f"{path}: the tensors do not match the config in its header "
                         f"({', '.join(d for d in details if d)}); the file is damaged or was edited")


def load(path: str | Path, classes: type | tuple[type, ...], device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model saved at ``path``; ``classes`` are the model classes acceptable here.

    Returns the model in fp32, in eval mode, on ``device``. Example::

        model = load("dvae.safetensors", DiscreteVAE)
        model = load("vae.safetensors", (VAE, Autoencoder))   # either kind
    """
    from safetensors.torch import load_file

    path = Path(path)
    classes = classes if isinstance(classes, tuple) else (classes,)
    if not path.is_file():
        raise FileNotFoundError(f"no {' or '.join(kind_name(c.kind) for c in classes)} checkpoint at {path}")
    metadata = read_metadata(path)
    cls = _pick_class(path, metadata.get("kind"), classes)
    config = _build_config(path, cls, metadata.get("config") or {})
    with torch.device("meta"):  # sizes only: nothing is allocated
        skeleton = cls(config)
    check_shapes(path, skeleton)
    with torch.random.fork_rng(devices=[]):  # the initial weights are overwritten: leave the caller's RNG alone
        model = cls(config)
    state = {name: (t.float() if t.is_floating_point() else t) for name, t in load_file(str(path)).items()}
    model.load_state_dict(state)
    return model.to(device).eval()


# --------------------------------------------------------------------------------------
# Resume state: what training needs besides the weights
# --------------------------------------------------------------------------------------


def resume_path(path: str | Path) -> Path:
    """Where the resume state of the checkpoint at ``path`` lives: ``x.safetensors.resume.pt``."""
    path = Path(path)
    return path.with_name(path.name + ".resume.pt")


def save_resume_state(path: str | Path, state: dict) -> Path:
    """Write ``state`` (tensors, numbers, strings, lists and dicts only) atomically beside ``path``."""
    return atomic_write(resume_path(path), lambda temporary: torch.save(state, temporary))


def load_resume_state(path: str | Path) -> dict:
    """Read the resume state beside ``path``; ``weights_only=True``, so no code from it runs."""
    where = resume_path(path)
    if not where.is_file():
        raise FileNotFoundError(f"nothing to resume: {where} does not exist (start without --resume)")
    return torch.load(where, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------------
# Sharded checkpoints (FSDP): every process writes its own slice
# --------------------------------------------------------------------------------------
#
# A model sharded over many GPUs never exists whole on one of them, so it is saved the
# way it lives: torch.distributed.checkpoint (DCP) has each process write the slices of the
# weights and AdamW moments it holds, plus one index of who holds what. The layout:
#
#     dalle.safetensors.dcp/
#         step-000250/            .metadata + one __<rank>_0.distcp file per process
#         step-000250/course.json kind, config, step, recipe, log (what the safetensors header holds)
#         latest                  "step-000250", replaced atomically once that step is complete
#
# A run killed while saving leaves ``latest`` pointing at the previous, complete step.
# DCP can load into any number of processes (it reshards on load), and
# :func:`gather_sharded` turns a step into one ordinary safetensors checkpoint for sampling.


def sharded_dir(path: str | Path) -> Path:
    """Where the sharded checkpoint of ``path`` lives: ``x.safetensors.dcp/``."""
    path = Path(path)
    return path.with_name(path.name + ".dcp")


def _latest_step_dir(path: str | Path) -> Path:
    root = sharded_dir(path)
    pointer = root / "latest"
    if not pointer.is_file():
        raise FileNotFoundError(f"nothing to resume: {root} holds no complete sharded checkpoint (start without --resume)")
    return root / pointer.read_text().strip()


def read_sharded_header(path: str | Path) -> dict:
    """The JSON facts (kind, config, step, recipe, log, ...) of the latest sharded step of ``path``."""
    return json.loads((_latest_step_dir(path) / "course.json").read_text())


def save_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, header: dict) -> Path:
    """Every process calls this: write its slices of ``model`` and ``optimizer`` for ``header["step"]``.

    ``model`` is the module whose parameters are sharded (DTensors after ``fully_shard``).
    Rank 0 writes ``course.json`` and then, only once every slice is on disk, moves the
    ``latest`` pointer and removes older steps.
    """
    import shutil

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = sharded_dir(path)
    step_dir = root / f"step-{header['step']:06d}"
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=step_dir)  # all ranks, then a barrier
    if dist.get_rank() == 0:
        (step_dir / "course.json").write_text(json.dumps({"format": FORMAT, **header}))
        atomic_write(root / "latest", lambda temporary: Path(temporary).write_text(step_dir.name))
        for old in root.glob("step-*"):
            if old != step_dir:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return step_dir


def load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Every process calls this: fill its slices of ``model`` and ``optimizer`` from the latest
    sharded step of ``path`` (any number of processes; DCP reshards); return the header."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    step_dir = _latest_step_dir(path)
    model_state, optimizer_state = get_state_dict(model, optimizer)  # the structure to fill, in place
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=step_dir)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return read_sharded_header(path)


def gather_sharded(path: str | Path, out: str | Path, classes: type | tuple[type, ...],
                   dtype: torch.dtype = torch.float32) -> Path:
    """Join the latest sharded step of ``path`` into one safetensors checkpoint at ``out``.

    Runs in one process, no GPU: the model is built on the ``meta`` device for its shapes,
    then only the weights (not the AdamW moments) are read into CPU tensors of those shapes.
    The result loads with :func:`load` like any other checkpoint.
    """
    import torch.distributed.checkpoint as dcp

    header = read_sharded_header(path)
    classes = classes if isinstance(classes, tuple) else (classes,)
    cls = _pick_class(sharded_dir(path), header.get("kind"), classes)
    config = _build_config(sharded_dir(path), cls, header.get("config") or {})
    with torch.device("meta"):
        skeleton = cls(config)
    weights = {name: torch.empty(t.shape, dtype=t.dtype) for name, t in skeleton.state_dict().items()}
    state = {"model": weights}
    dcp.load(state, checkpoint_id=_latest_step_dir(path), no_dist=True)
    skeleton.load_state_dict(state["model"], assign=True)  # the skeleton now holds the real tensors
    facts = {key: value for key, value in header.items() if key not in ("format", "kind", "config")}
    return save(skeleton, out, dtype=dtype, **facts)
