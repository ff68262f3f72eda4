"""The training engine: one loop behind every stage of the course.

A *stage* says what is special about one model (:class:`Stage`): the model, a loss
function, how to make a batch from example indices, and optionally a validation. A
*recipe* (:class:`Recipe`) holds the optimiser settings and the loop's numbers. The
engine, :func:`fit`, does everything else, the same way for the VAE of lesson 01 and for
the 12-billion-parameter transformer::

    stage = stages.dvae_stage(model, images)        # what to train
    log = fit(stage, Recipe(steps=3600, lr=2e-3), out="dvae.safetensors")

What one step does, in order:

1. draw the step's batch: ``batch_size`` example indices from a generator seeded by
   ``(seed, step)``; each process keeps its share, split again into ``grad_accum``
   micro-batches;
2. set the learning rate (linear warm-up, then cosine decay to ``final_lr_fraction``);
3. seed torch's RNG from ``(seed, step, rank)``, so noise in the loss (Gumbel samples,
   dropout) is a function of the step too: resuming needs only the step number;
4. forward + backward for each micro-batch (bf16 autocast on CUDA, fp32 on CPU);
5. clip the gradient norm; if the loss or the norm is not finite, stop *before* the
   update, so the weights on disk stay the last good ones;
6. AdamW step; every ``save_every`` steps a checkpoint (:mod:`dalle_lesson.checkpoint`)
   and the resume state beside it.

Under ``torchrun`` the model is wrapped in DistributedDataParallel (Gloo on CPU, NCCL on
CUDA), which averages gradients across processes; only rank 0 writes files. Because
each process takes its share of the *same* global batch, two processes give the same
weights as one process with the same ``batch_size`` (for a loss without random noise).

DDP keeps a whole copy of the weights, gradients and AdamW moments on every process (16
bytes per parameter: 197 GB for the 12-billion-parameter model). ``shard=True`` (``--shard``)
uses PyTorch's fully sharded data parallel instead (:func:`shard_model`): each process holds
1/world of each, and a block's weights are gathered only while that block runs. Its
checkpoints are sharded too (:func:`dalle_lesson.checkpoint.save_sharded`); the last one is
gathered into the usual safetensors file at the end of the run.
"""

from __future__ import annotations

import csv
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from dalle_lesson import checkpoint, plan


class TrainingDiverged(FloatingPointError):
    """The loss or the gradient norm stopped being finite; the message says what is on disk."""


# --------------------------------------------------------------------------------------
# What to train (Stage) and how (Recipe)
# --------------------------------------------------------------------------------------


@dataclass
class Recipe:
    """The optimiser recipe and the loop's numbers. Every stage has its own defaults."""

    steps: int = 1000
    batch_size: int = 32  # examples per step, over all processes and accumulation steps
    lr: float = 1e-3  # peak learning rate, reached after the warm-up
    warmup_steps: int = 0
    final_lr_fraction: float = 0.1  # the cosine decay ends at lr * this
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 0.0  # clip the gradient norm to this; 0 = no clipping
    grad_accum: int = 1  # split each step's batch into this many micro-batches (same result, less memory)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # validate every this many steps; 0 = only at the end
    save_every: int = 500
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU), "fp32" or "bf16"

    def check(self) -> None:
        """Refuse numbers that would make a run do nothing or fail later."""
        for name in ("steps", "batch_size", "grad_accum", "log_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "warmup_steps", "weight_decay", "grad_clip", "eval_every"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        if self.lr == 0:
            raise ValueError("lr must be > 0")
        if not 0 <= self.final_lr_fraction <= 1 or not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("final-lr-fraction must lie in [0, 1] and the betas in [0, 1)")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must lie in 0 .. 2**32 - 1, got {self.seed}")


@dataclass
class Stage:
    """What is special about training one model; the engine does the rest.

    ``loss(model, batch, step)`` returns a dict of scalar tensors with a ``"loss"`` key
    (the other entries are logged). ``batch(indices)`` turns a LongTensor of example
    indices into one batch (tensors, or a tuple / dict of them, on the CPU; the engine
    moves them to the device). ``validate(model)``, if given, returns a dict of floats.
    """

    model: nn.Module
    loss: Callable[[nn.Module, Any, int], dict[str, torch.Tensor]]
    batch: Callable[[torch.Tensor], Any]
    num_examples: int
    validate: Callable[[nn.Module], dict[str, float]] | None = None
    save_dtype: torch.dtype = torch.float32  # how checkpoints store floating weights
    decay_only_matrices: bool = False  # weight decay on nn.Linear weights only (the transformer's recipe)
    metadata: dict = field(default_factory=dict)  # extra facts for the checkpoint header (data, ...)


# --------------------------------------------------------------------------------------
# The pieces of a step
# --------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed torch and Python's ``random``. Call it *before* building a model: the initial
    weights are drawn from these generators, so the same seed gives the same model."""
    random.seed(seed)
    torch.manual_seed(seed)


def learning_rate(step: int, recipe: Recipe) -> float:
    """Linear warm-up over ``warmup_steps``, then half a cosine down to ``lr * final_lr_fraction``.

    >>> r = Recipe(steps=100, lr=1.0, warmup_steps=10, final_lr_fraction=0.1)
    >>> learning_rate(0, r), learning_rate(9, r), round(learning_rate(99, r), 3)
    (0.1, 1.0, 0.1)
    """
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - 1 - recipe.warmup_steps)
    low = recipe.lr * recipe.final_lr_fraction
    return low + (recipe.lr - low) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def parameter_groups(model: nn.Module, weight_decay: float, decay_only_matrices: bool) -> list[dict]:
    """AdamW groups. With ``decay_only_matrices``, decay nn.Linear weights but not biases,
    norm gains or embeddings: pulling a norm gain towards 0 changes what a layer computes, and
    an embedding row would shrink on every step its token is absent."""
    if not decay_only_matrices:
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            is_matrix = isinstance(module, nn.Linear) and name == "weight"
            (decay if is_matrix else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def step_indices(step: int, recipe: Recipe, num_examples: int) -> torch.Tensor:
    """The example indices of one step's whole batch: a function of (seed, step) alone."""
    generator = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
    return torch.randint(num_examples, (recipe.batch_size,), generator=generator)


def to_device(batch, device: torch.device):
    """Move a tensor, or a tuple / list / dict of them, to ``device``."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def pick_device(device: str = "auto") -> torch.device:
    """``"auto"``: the process's GPU under torchrun, else the first GPU, else the CPU."""
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this machine has no CUDA GPU that PyTorch can use; use --device cpu")
    return device


def start_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group when started by torchrun; (rank, world size), (0, 1) alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if "MASTER_ADDR" not in os.environ or "RANK" not in os.environ:
        raise ValueError(f"WORLD_SIZE={world} but no RANK / MASTER_ADDR: start many processes with "
                           f"`torchrun --nproc_per_node {world} ...`, or unset WORLD_SIZE")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


class _LossOf(nn.Module):
    """``forward`` = the stage's loss. DistributedDataParallel averages gradients only for
    work done inside a wrapped module's ``forward``, so the loss must run in one."""

    def __init__(self, model: nn.Module, loss: Callable):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch, step: int):
        return self.loss(self.model, batch, step)


def _mean_over_processes(values: dict[str, float], world: int) -> dict[str, float]:
    if world == 1:
        return values
    packed = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(packed)
    return dict(zip(values, (packed / world).tolist()))


def _all_finite(model: nn.Module, sharded: bool = False) -> bool:
    """Are all weights finite? Sharded: each process checks its slices, then they vote."""
    local = [p.to_local() if sharded else p for p in model.parameters()]
    finite = all(bool(torch.isfinite(p).all()) for p in local)
    if sharded:
        vote = torch.tensor(float(finite))
        dist.all_reduce(vote, op=dist.ReduceOp.MIN)
        finite = bool(vote.item())
    return finite


def wants_sharding(model: nn.Module, device: torch.device, world: int) -> bool:
    """The automatic choice (``shard=None``): shard on many CUDA processes when a full copy of
    the training state would fill more than half a GPU (the rule is :func:`dalle_lesson.plan.wants_sharding`)."""
    if world == 1 or device.type != "cuda":
        return False
    parameters = sum(p.numel() for p in model.parameters())
    return plan.wants_sharding(parameters, torch.cuda.get_device_properties(device).total_memory)


def shard_model(wrapped: nn.Module, model: nn.Module, bf16: bool) -> None:
    """Fully sharded data parallel (FSDP, ``torch.distributed.fsdp.fully_shard``), in place.

    One FSDP unit per transformer block: its weights are all-gathered just before the block
    runs and freed after, so only a block or two is ever whole on a process. Everything else
    (the embeddings, the final LayerNorm, the head) forms the root unit around ``wrapped``.
    With ``bf16`` the blocks compute in bfloat16 from fp32 master weights and reduce their
    gradients in fp32; the root unit stays fp32, as the paper keeps embeddings and logits.
    A model without ``blocks`` (the dVAE) is one unit.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    in_blocks = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for block in getattr(model, "blocks", []):
        fully_shard(block, mp_policy=in_blocks)
    fully_shard(wrapped)


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


def fit(
    stage: Stage,
    recipe: Recipe,
    out: str | Path | None = None,
    resume: bool = False,
    device: str = "auto",
    log_path: str | Path | None = None,
    stop_at: int | None = None,
    progress: bool = True,
    shard: bool | None = False,
) -> list[dict]:
    """Train ``stage.model`` with ``recipe``; return the log (one dict every ``log_every`` steps).

    ``out``: the checkpoint path, written every ``save_every`` steps and at the end, with
    the resume state beside it. ``resume=True`` continues the run saved at ``out`` from its
    last checkpoint: same recipe, same batches, same noise, so the weights end bitwise
    equal to an uninterrupted run (on CPU). ``stop_at`` ends the run after that step as if
    interrupted (a checkpoint is written; resume later). ``log_path``: a CSV of the log.
    Ctrl-C saves the last finished step, then stops. ``shard``: True = FSDP under torchrun
    (see the module docstring), False = DDP, None = decide by size (:func:`wants_sharding`).
    """
    device = pick_device(device)
    rank, world = start_distributed(device)
    model = stage.model.to(device)
    sharded = world > 1 and (wants_sharding(model, device, world) if shard is None else shard)
    if resume and out is not None and checkpoint.sharded_dir(out).exists():  # a sharded run resumes sharded
        if world == 1:
            raise ValueError(f"{checkpoint.sharded_dir(out)} is a sharded run: resume it under torchrun with "
                             "--shard (any number of processes), or gather it first (dalle-lesson gather)")
        sharded = True
    start_step, seconds_before, log = 0, 0.0, []
    if resume:
        if out is None:
            raise ValueError("resume=True needs the checkpoint path out=...")
        if sharded:  # the weights are read after sharding, below
            saved = checkpoint.read_sharded_header(out)
        else:
            saved = checkpoint.load_resume_state(out)
            model.load_state_dict(saved["model"])
        recipe = Recipe(**saved["recipe"])  # the saved run's recipe wins
        start_step, seconds_before, log = saved["step"], saved["seconds"], saved["log"]
    recipe.check()
    if recipe.batch_size % (world * recipe.grad_accum):
        raise ValueError(f"batch-size {recipe.batch_size} must divide evenly over {world} processes x "
                         f"{recipe.grad_accum} accumulation steps")
    if stage.num_examples < 1:
        raise ValueError("the stage has no training examples")
    bf16 = recipe.precision == "bf16" or (recipe.precision == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    wrapped = _LossOf(model, stage.loss)
    if sharded:  # before the optimiser: fully_shard replaces the parameters by their slices
        shard_model(wrapped, model, bf16)
    elif world > 1:  # buffers (masks) are the same everywhere: no need to broadcast them
        wrapped = nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    optimizer = torch.optim.AdamW(parameter_groups(model, recipe.weight_decay, stage.decay_only_matrices),
                                  lr=recipe.lr, betas=(recipe.beta1, recipe.beta2))
    if resume and sharded:
        checkpoint.load_sharded(out, model, optimizer)
    elif resume:
        optimizer.load_state_dict(saved["optimizer"])
    last_step = min(recipe.steps, stop_at) if stop_at is not None else recipe.steps
    saved_step = start_step if resume else None

    def save(step: int) -> None:
        nonlocal saved_step
        if out is None or (rank != 0 and not sharded):
            return
        if not _all_finite(model, sharded):
            raise TrainingDiverged(f"the weights are not finite after step {step}; not saved. "
                                   + _on_disk(out, saved_step))
        seconds = seconds_before + time.perf_counter() - started
        if sharded:  # every process writes its slices; the last step is also gathered into `out`
            header = {"kind": model.kind, "config": asdict(model.config), "step": step, "recipe": asdict(recipe),
                      "seconds": seconds, "train_seconds": round(seconds, 1), "log": log, **stage.metadata}
            checkpoint.save_sharded(out, model, optimizer, header)
            if rank == 0 and step == last_step:
                checkpoint.gather_sharded(out, out, type(model), dtype=stage.save_dtype)
            if log_path is not None and rank == 0:
                write_csv_log(log_path, log)
            saved_step = step
            return
        checkpoint.save(model, out, dtype=stage.save_dtype, step=step, recipe=asdict(recipe),
                        train_seconds=round(seconds, 1), log=log, **stage.metadata)
        checkpoint.save_resume_state(out, {
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(), "recipe": asdict(recipe), "step": step,
            "seconds": seconds, "log": log})
        if log_path is not None:
            write_csv_log(log_path, log)
        saved_step = step

    model.train()
    started = time.perf_counter()
    bar = tqdm(range(start_step, last_step), desc=f"train {model.kind}", disable=not progress or rank != 0,
               initial=start_step, total=recipe.steps, mininterval=1.0)
    completed = start_step  # steps whose update has been applied
    try:
        for step in bar:
            lr = learning_rate(step, recipe)
            for group in optimizer.param_groups:
                group["lr"] = lr
            torch.manual_seed(recipe.seed * 1_000_003 + step * 1009 + rank)  # this step's noise
            mine = step_indices(step, recipe, stage.num_examples)[rank::world]
            terms = {}
            for micro, indices in enumerate(mine.chunk(recipe.grad_accum)):
                batch = to_device(stage.batch(indices), device)
                sync = world == 1 or micro == recipe.grad_accum - 1  # average gradients on the last one only
                if sharded:
                    wrapped.set_requires_gradient_sync(sync)
                with (nullcontext() if sync or sharded else wrapped.no_sync()), autocast():
                    losses = wrapped(batch, step)
                (losses["loss"] / recipe.grad_accum).backward()
                for name, value in losses.items():
                    terms[name] = terms.get(name, 0.0) + value.detach().float().item() / recipe.grad_accum
            clip = recipe.grad_clip if recipe.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            grad_norm = float(grad_norm.full_tensor() if sharded else grad_norm)  # sharded: a norm over all slices
            terms = _mean_over_processes(terms, world)
            if not (math.isfinite(terms["loss"]) and math.isfinite(grad_norm)):
                raise TrainingDiverged(f"step {step + 1}: the loss is {terms['loss']:.4g} and the gradient norm "
                                       f"{grad_norm:.4g}; stopped before updating. " + _on_disk(out, saved_step)
                                       + " Try a smaller --lr.")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            completed = done = step + 1
            if done % recipe.log_every == 0 or done == last_step:
                row = {"step": done, **{k: round(v, 6) for k, v in terms.items()}, "lr": lr,
                       "grad_norm": round(grad_norm, 4),
                       "seconds": round(seconds_before + time.perf_counter() - started, 2)}
                validate_now = recipe.eval_every and done % recipe.eval_every == 0 or done == recipe.steps
                if stage.validate is not None and validate_now:
                    model.eval()
                    if sharded:  # validation calls the model outside the root's forward: gather the root by hand
                        wrapped.unshard()
                    with torch.no_grad(), autocast():
                        row.update({f"val_{k}": round(float(v), 6) for k, v in stage.validate(model).items()})
                    if sharded:
                        wrapped.reshard()
                    model.train()
                log.append(row)
                bar.set_postfix(loss=f"{terms['loss']:.4g}", refresh=False)
            if done % recipe.save_every == 0 or done == last_step:
                save(done)
    except KeyboardInterrupt:  # (a sharded save needs every process; Ctrl-C under torchrun stops them all)
        if rank == 0 and not sharded and out is not None and completed > (saved_step or 0):
            save(completed)
            bar.write(f"interrupted: saved step {completed} to {out}; continue with --resume")
        raise
    finally:
        bar.close()
        if log_path is not None and rank == 0 and log:
            write_csv_log(log_path, log)
        model.eval()
    return log


def _on_disk(out, saved_step) -> str:
    if out is None:
        return "Nothing was being saved."
    if saved_step is None:
        return f"{out} was not touched by this run." if Path(out).exists() else f"No checkpoint was written to {out} yet."
    return f"The last good checkpoint, {out} (step {saved_step}), is intact."


def write_csv_log(path: str | Path, log: list[dict]) -> None:
    """The log as a CSV file, rewritten whole (and atomically): its columns are every key seen."""
    columns = list(dict.fromkeys(key for row in log for key in row))

    def write(temporary):
        with open(temporary, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(log)

    checkpoint.atomic_write(path, write)


def summary(log: list[dict], out: str | Path | None) -> str:
    """One line for the end of a run: where it saved, steps, final losses, time."""
    if not log:
        return "no steps were run"
    last = log[-1]
    validated = [row for row in log if any(key.startswith("val_") for key in row)]
    parts = [f"step {last['step']}", f"train loss {last['loss']:.4g}"]
    if validated:
        parts += [f"validation {key[4:]} {value:.4g}" for key, value in validated[-1].items() if key.startswith("val_")]
    parts.append(f"{last['seconds'] / 60:.1f} min")
    where = f"saved {out}: " if out is not None else ""
    return where + ", ".join(parts)

