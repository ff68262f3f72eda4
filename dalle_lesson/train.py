"""Training DALL·E's transformer (stage two): captions + dVAE codes -> next-token loss.

Stage one (the dVAE) is frozen, so each image is turned into its grid of codes **once**
(:func:`cached_codes`, stored on disk) and training only reads integers. Then
:func:`train_dalle` runs the paper's optimiser recipe:

* AdamW with betas (0.9, 0.96) and weight decay 4.5e-2, applied to the weight matrices
  of the linear layers (attention, MLP, head) only. Biases, LayerNorm gains and the
  embedding tables are not decayed: pulling a bias or a norm gain towards 0 changes
  what the layer computes rather than regularising it, and an embedding row gets a
  gradient only when its token occurs, so decay would shrink rare tokens' rows on
  every step they are absent. (The paper does not list its exclusions; this is the
  common GPT choice.)
* linear warm-up of the learning rate, then cosine decay to a tenth of it;
* gradient-norm clipping at 4;
* mixed precision by ``autocast`` when asked (bf16, or fp16 with a gradient scaler);
  the model keeps embeddings and logits in fp32 itself.

Checkpoints are written atomically (a temporary file, then ``os.replace``); a loss that
is not finite stops training before anything is saved, so the last good checkpoint stays.
The same code runs on CPU, one GPU, or many under ``torchrun`` (DistributedDataParallel:
each process draws its own batches; only rank 0 writes files).

Command line (see ``data/README.md`` for the exact recipe of the shipped checkpoint)::

    dalle-lesson train dalle --preset tiny --steps 3000 --out dalle_tiny.safetensors
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from dalle_lesson.dalle import DALLE, DALLEConfig, save_dalle

PRESETS = {"tiny": DALLEConfig.tiny, "paper": DALLEConfig.paper}


# --------------------------------------------------------------------------------------
# Images -> codes, once, cached on disk
# --------------------------------------------------------------------------------------


@torch.no_grad()
def encode_dataset(dvae, dataset, batch_size: int = 256, device="cpu", progress: bool = True):
    """Run the dVAE encoder over a whole dataset: (codes ShortTensor[N, h, w], captions list)."""
    codes, captions = [], []
    starts = range(0, len(dataset), batch_size)
    for start in tqdm(starts, desc="images -> codes", disable=not progress):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        images = torch.stack([image for image, _ in items]).to(device)
        codes.append(dvae.encode(images).to("cpu", torch.int16))  # 512 or 8192 codes fit in int16
        captions += [caption for _, caption in items]
    return torch.cat(codes), captions


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def default_cache_dir() -> Path:
    return Path(os.environ.get("DALLE_LESSON_CACHE", Path.home() / ".cache" / "dalle_lesson"))


def cached_codes(dataset, name: str, dvae_path: str | Path | None = None, cache_dir: str | Path | None = None,
                 device="cpu", progress: bool = True):
    """The codes and captions of ``dataset``, encoded with the dVAE once and then read from disk.

    ``name`` identifies the dataset (e.g. ``"shapes-train-20000-32"``); the cache file name
    also carries a digest of the dVAE file, so a new dVAE never reuses stale codes.
    Returns ``(codes ShortTensor[N, h, w], captions list[str])``.
    """
    from dalle_lesson.data import shipped_path
    from dalle_lesson.dvae import load_dvae

    dvae_file = Path(dvae_path) if dvae_path is not None else shipped_path("dvae_lesson.safetensors")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / f"codes-{name}-dvae{_file_digest(dvae_file)}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)  # tensors and strings only: no code runs
        return saved["codes"], saved["captions"]
    dvae = load_dvae(dvae_file, device=device)
    codes, captions = encode_dataset(dvae, dataset, device=device, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"codes": codes, "captions": captions}, tmp)
    os.replace(tmp, path)
    return codes, captions


def shapes_codes(split: str, length: int, image_size: int = 32, dvae_path=None, cache_dir=None, progress=True):
    """Codes + captions of ``ShapesDataset(length, image_size, split)`` (cached)."""
    from dalle_lesson.data import ShapesDataset

    dataset = ShapesDataset(length=length, image_size=image_size, split=split)
    return cached_codes(dataset, f"shapes-{split}-{length}-{image_size}", dvae_path, cache_dir, progress=progress)


# --------------------------------------------------------------------------------------
# The optimiser recipe
# --------------------------------------------------------------------------------------


@dataclass
class TrainSettings:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 4.5e-4  # the paper's peak learning rate
    warmup_steps: int = 200
    final_lr_fraction: float = 0.1  # cosine decay ends at lr * this
    weight_decay: float = 4.5e-2
    beta1: float = 0.9
    beta2: float = 0.96
    grad_clip: float = 4.0
    caption_dropout: float = 0.0  # fraction of captions replaced by all-padding (for guidance)
    amp: str = "none"  # "none", "bf16" or "fp16"
    log_every: int = 10
    eval_every: int = 250
    save_every: int = 250
    seed: int = 0


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay the linear layers' weight matrices, not biases, norms or embeddings."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if isinstance(module, nn.Linear) and name == "weight":
                decay.append(parameter)
            else:
                no_decay.append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(model, settings.weight_decay), lr=settings.lr,
                             betas=(settings.beta1, settings.beta2))


def learning_rate(step: int, settings: TrainSettings) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``lr * final_lr_fraction``."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    low = settings.lr * settings.final_lr_fraction
    return low + (settings.lr - low) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def autocast_context(device: torch.device, amp: str):
    if amp == "none":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: DALLE, text_ids: torch.Tensor, codes: torch.Tensor, batch_size: int = 128,
             amp: str = "none") -> dict[str, float]:
    """Mean loss, text loss and image loss (nats per token) over a whole set."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals = {"loss": 0.0, "text_loss": 0.0, "image_loss": 0.0}
    for start in range(0, len(codes), batch_size):
        text = text_ids[start : start + batch_size].to(device)
        image = codes[start : start + batch_size].to(device).long()
        with autocast_context(device, amp):
            losses = _unwrap(model).loss(text, image)
        for key in totals:
            totals[key] += losses[key].item() * len(image)
    model.train(was_training)
    return {key: value / len(codes) for key, value in totals.items()}


def _unwrap(model: nn.Module) -> DALLE:
    return model.module if hasattr(model, "module") else model


def _distributed() -> tuple[int, int]:
    """(rank, world size) under torchrun, (0, 1) otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def train_dalle(
    model: DALLE,
    text_ids: torch.Tensor,
    codes: torch.Tensor,
    settings: TrainSettings,
    checkpoint: str | Path | None = None,
    log_path: str | Path | None = None,
    validation: tuple[torch.Tensor, torch.Tensor] | None = None,
    pad_ids: torch.Tensor | None = None,
    save_dtype: torch.dtype = torch.float16,
    progress: bool = True,
) -> list[dict]:
    """Train ``model`` on (text_ids[N, T], codes[N, h, w]) pairs; return the log as a list of dicts.

    ``model`` may be wrapped in DistributedDataParallel (then every process calls this with
    the same data; each draws different batches). ``pad_ids`` (LongTensor[T], the empty
    caption) is needed for ``caption_dropout > 0``. The log (every ``log_every`` steps,
    plus validation losses every ``eval_every``) also goes to ``log_path`` as CSV.
    Stops early, keeping the last good checkpoint, if the loss stops being finite.
    """
    core = _unwrap(model)
    config = core.config
    device = next(model.parameters()).device
    rank, world = _distributed()
    if len(text_ids) != len(codes):
        raise ValueError(f"{len(text_ids)} captions but {len(codes)} images of codes")
    core.check_text(text_ids[:1])
    if codes.shape[1:] != (config.image_size, config.image_size):
        raise ValueError(f"codes must be [N, {config.image_size}, {config.image_size}] for this model, "
                         f"got {tuple(codes.shape)}: was the dVAE's grid size the model's image_size?")
    if settings.caption_dropout > 0 and pad_ids is None:
        raise ValueError("caption_dropout > 0 needs pad_ids, the token ids of an empty caption")
    optimizer = make_optimizer(core, settings)
    scaler = torch.amp.GradScaler(device.type, enabled=settings.amp == "fp16")
    generator = torch.Generator().manual_seed(settings.seed * 1000 + rank)
    tokens_per_step = settings.batch_size * config.seq_len * world
    log, fields = [], ["step", "loss", "text_loss", "image_loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s",
                       "val_loss", "val_text_loss", "val_image_loss"]
    log_file = None
    if log_path is not None and rank == 0:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "w", newline="")
        writer = csv.DictWriter(log_file, fieldnames=fields)
        writer.writeheader()
    model.train()
    start_time = last_time = time.perf_counter()
    bar = tqdm(range(settings.steps), desc="train dalle", disable=not progress or rank != 0)
    try:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, settings)
            picks = torch.randint(0, len(codes), (settings.batch_size,), generator=generator)
            text = text_ids[picks].clone()
            if settings.caption_dropout > 0:
                dropped = torch.rand(settings.batch_size, generator=generator) < settings.caption_dropout
                text[dropped] = pad_ids
            text, image = text.to(device), codes[picks].to(device).long()
            with autocast_context(device, settings.amp):
                losses = model(text, image, return_loss=True)  # through forward, so DDP's hooks run
            if not torch.isfinite(losses["loss"]):
                bar.write(f"step {step}: the loss is {losses['loss'].item()}; stopping. The last good "
                          f"checkpoint ({checkpoint}) is left as it was.")
                break
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"]).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            if settings.amp != "fp16" and not torch.isfinite(grad_norm):  # (fp16: the scaler skips such steps)
                bar.write(f"step {step}: the gradient norm is {grad_norm.item()}; stopping before the update. "
                          f"The last good checkpoint ({checkpoint}) is left as it was.")
                break
            scaler.step(optimizer)
            scaler.update()
            last = step + 1 == settings.steps
            if step % settings.log_every == 0 or last:
                now = time.perf_counter()
                steps_done = settings.log_every if step else 1
                row = {"step": step, **{k: round(v.item(), 5) for k, v in losses.items()},
                       "lr": learning_rate(step, settings), "grad_norm": round(grad_norm.item(), 4),
                       "tokens_per_s": round(tokens_per_step * steps_done / max(now - last_time, 1e-9), 1),
                       "elapsed_s": round(now - start_time, 2)}
                last_time = now
                if validation is not None and (step % settings.eval_every == 0 or last):
                    val = evaluate(core, *validation, amp=settings.amp)
                    row.update({f"val_{k}": round(v, 5) for k, v in val.items()})
                log.append(row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", image=f"{row['image_loss']:.3f}")
                if log_file is not None:
                    writer.writerow(row)
                    log_file.flush()
            if checkpoint is not None and rank == 0 and ((step + 1) % settings.save_every == 0 or last):
                save_dalle(core, checkpoint, dtype=save_dtype,
                           metadata={"step": step + 1, "loss": round(losses["loss"].item(), 5),
                                     "settings": asdict(settings)})
    finally:
        if log_file is not None:
            log_file.close()
    return log


# --------------------------------------------------------------------------------------
# Command line: dalle-lesson train dalle --preset tiny ...
# --------------------------------------------------------------------------------------


def _train_command(args: argparse.Namespace) -> None:
    from dalle_lesson.bpe import BPETokenizer, load_course_tokenizer, tokenize_batch
    from dalle_lesson.cli import make_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    else:
        device = torch.device(args.device)
    rank, _ = _distributed()
    torch.manual_seed(args.seed)

    overrides = {key: value for key, value in (("d_model", args.d_model), ("n_layers", args.layers),
                                                ("n_heads", args.heads)) if value}
    if args.attention:
        overrides["attention"] = args.attention
    config = PRESETS[args.preset](**overrides)
    tokenizer = BPETokenizer.load(args.tokenizer) if args.tokenizer else load_course_tokenizer()
    if tokenizer.vocab_size != config.text_vocab_size:
        config.text_vocab_size = tokenizer.vocab_size
    image_size = args.image_size or 32
    dataset = make_dataset(args.dataset, image_size, "train", args.folder, length=args.train_images)
    name = f"{args.dataset}-train-{len(dataset)}-{image_size}" if args.dataset != "folder" else \
        f"folder{hashlib.sha256(str(Path(args.folder).resolve()).encode()).hexdigest()[:8]}-{len(dataset)}-{image_size}"
    codes, captions = cached_codes(dataset, name, args.dvae, args.cache_dir, progress=rank == 0)
    if codes.shape[-1] != config.image_size:
        config.image_size = codes.shape[-1]  # the dVAE decides the grid
    text_ids = tokenize_batch(tokenizer, captions, config.text_seq_len)
    validation = None
    if args.dataset == "shapes" and args.val_images:
        val_codes, val_captions = shapes_codes("test", args.val_images, image_size, args.dvae, args.cache_dir,
                                               progress=rank == 0)
        validation = (tokenize_batch(tokenizer, val_captions, config.text_seq_len), val_codes)

    model = DALLE(config).to(device)
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
                             caption_dropout=args.caption_dropout, amp=args.amp, seed=args.seed,
                             save_every=args.save_every, eval_every=args.eval_every, log_every=args.log_every)
    if rank == 0:
        print(f"DALL·E preset {args.preset}: {_unwrap(model).num_parameters() / 1e6:.2f}M parameters, "
              f"layers {config.layer_kinds()}, {len(codes)} training pairs, stream {config.seq_len} tokens")
    pad_ids = tokenize_batch(tokenizer, [""], config.text_seq_len)[0]
    train_dalle(model, text_ids, codes, settings, checkpoint=args.out, log_path=args.log, validation=validation,
                pad_ids=pad_ids, save_dtype=torch.float16 if args.fp16 else torch.float32, progress=True)
    if distributed:
        torch.distributed.destroy_process_group()


def add_train_command(subparsers) -> None:
    """Add ``train dalle`` to the ``dalle-lesson`` command."""
    from dalle_lesson.cli import add_dataset_arguments

    defaults = TrainSettings()
    parser = subparsers.add_parser("dalle", help="train the DALL·E transformer on dVAE codes + captions")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--d-model", type=int, default=0, help="override the preset's width")
    parser.add_argument("--layers", type=int, default=0, help="override the preset's depth")
    parser.add_argument("--heads", type=int, default=0, help="override the preset's head count")
    parser.add_argument("--attention", choices=["dense", "sparse"], default=None,
                        help="same results; sparse computes only the row/column blocks (default: the preset's)")
    add_dataset_arguments(parser, image_size=32)
    parser.add_argument("--train-images", type=int, default=20_000)
    parser.add_argument("--val-images", type=int, default=1000, help="shapes test-split pairs for validation")
    parser.add_argument("--dvae", default=None, help="dVAE checkpoint (default: the shipped lesson dVAE)")
    parser.add_argument("--tokenizer", default=None, help="BPE file (default: the course tokenizer)")
    parser.add_argument("--cache-dir", default=None, help="where codes are cached (default ~/.cache/dalle_lesson)")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--warmup", type=int, default=defaults.warmup_steps)
    # (sampling lesson) 10% of captions become the empty caption by default, so the model also learns
    # p(image | no caption): classifier-free guidance (dalle_lesson.sampling) needs that unconditional half.
    parser.add_argument("--caption-dropout", type=float, default=0.1,
                        help="fraction of captions replaced by all-padding (for classifier-free guidance)")
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=defaults.log_every)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--save-every", type=int, default=defaults.save_every)
    parser.add_argument("--fp16", action="store_true", help="store the weights in float16 (half the size)")
    parser.add_argument("--out", default="dalle.safetensors")
    parser.add_argument("--log", default=None, help="write the loss log here (CSV)")
    parser.set_defaults(run=_train_command)
