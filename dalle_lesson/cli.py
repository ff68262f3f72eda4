"""The ``dalle-lesson`` command: every parser of the course lives in this file.

    dalle-lesson generate "a red circle" --out grid.png         # the whole pipeline
    dalle-lesson data-grid --dataset shapes --out shapes.png    # look at a dataset
    dalle-lesson train dvae --steps 3600 --out dvae.safetensors # train one stage
    dalle-lesson train dvae --out dvae.safetensors --resume     # ... and continue it

Every ``train`` stage takes the same core flags (``--preset --steps --batch-size --lr
--seed --device --out --save-every --resume`` and the rest of the recipe) and runs through
one engine, :func:`dalle_lesson.train.fit`; under ``torchrun`` it trains on many processes.
Nonsense is refused before any work starts, and a run ends with one summary line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from dalle_lesson import checkpoint, data, stages
from dalle_lesson.pipeline import SAMPLING_DEFAULTS
from dalle_lesson.train import Recipe, TrainingDiverged, fit, seed_everything, summary


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default, and descriptions keep their line breaks."""


def _parser(commands, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    return commands.add_parser(name, help=help, description=description or help, formatter_class=_Formatter)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--steps 0`` is refused, not silently a no-op)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def optional_number(kind):
    """argparse type: a number of ``kind``, or ``none`` (the option switched off)."""
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def seed_int(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must lie in 0 .. 2**32 - 1, got {value}")
    return value


def add_dataset_arguments(parser: argparse.ArgumentParser, image_size: int) -> None:
    """The options every command that reads images shares."""
    parser.add_argument("--dataset", default="shapes", choices=["shapes", "emoji", "folder"])
    parser.add_argument("--folder", help="with --dataset folder: images with same-named .txt captions")
    parser.add_argument("--image-size", type=positive_int, default=image_size,
                        help="image side in pixels (0 = the preset's)" if image_size == 0 else "image side in pixels")


def check_output_path(out: str, force: bool = False, resume: bool = False) -> Path:
    """Refuse an ``--out`` that cannot be written, before any work starts."""
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file name, e.g. {path / 'model.safetensors'}")
    folder = path.parent if str(path.parent) else Path(".")
    existing = next((p for p in [folder, *folder.parents] if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: cannot write in {existing}; choose another folder")
    exists = path.exists() or checkpoint.sharded_dir(path).exists()  # a sharded run may not be gathered yet
    if exists and not (force or resume):
        raise ValueError(f"--out {out} exists; add --resume to continue its run or --force to replace it")
    if resume and not exists:
        raise ValueError(f"--resume: there is no checkpoint at {out} to continue")
    return path


# --------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------


def _generate(args: argparse.Namespace) -> None:
    from dalle_lesson.pipeline import Pipeline

    out = check_output_path(args.out, force=True)
    if not out.suffix:
        out = out.with_suffix(".png")
        print(f"--out has no extension; writing {out}")
    check_output_path(str(out), force=True)
    out.parent.mkdir(parents=True, exist_ok=True)  # before sampling, so the images are never lost
    pipeline = Pipeline.load(model_path=args.model, dvae_path=args.dvae, tokenizer_path=args.tokenizer,
                             clip_path=args.clip)
    result = pipeline(args.caption, num_images=args.num_images, candidates=args.candidates, seed=args.seed,
                      progress=True, **sampling_options(args))
    result.save_grid(out)
    reranked = f", CLIP's best of {args.candidates}" if args.candidates else ""
    print(f"wrote {args.num_images} images for {args.caption!r}{reranked} to {out}")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """--temperature, --top-k, --top-p, --guidance. The defaults are the best measured settings
    (SAMPLING_DEFAULTS); "none" switches one off."""
    parser.add_argument("--temperature", type=float, default=SAMPLING_DEFAULTS["temperature"],
                        help="> 0; 1 = the model's distribution")
    parser.add_argument("--top-k", type=optional_number(int), default=SAMPLING_DEFAULTS["top_k"],
                        help="keep only the k most likely codes each step; none or 0 = every code")
    parser.add_argument("--top-p", type=optional_number(float), default=None,
                        help="keep the most likely codes holding this mass")
    parser.add_argument("--guidance", type=optional_number(float), default=SAMPLING_DEFAULTS["guidance_scale"],
                        help="classifier-free guidance scale (e.g. 3); none = plain sampling")


def sampling_options(args: argparse.Namespace) -> dict:
    """The options of :func:`dalle_lesson.sampling.generate` that :func:`add_sampling_arguments` read."""
    return {"temperature": args.temperature, "top_k": args.top_k or None, "top_p": args.top_p,
            "guidance_scale": args.guidance}


def _add_generate(commands) -> None:
    parser = _parser(commands, "generate", "caption -> BPE -> transformer sampling -> dVAE decode -> an image grid",
                     "Draw images for a caption with the shipped checkpoints (or your own) and save a captioned grid.")
    parser.add_argument("caption", help='the caption, e.g. "a small red circle above a big blue square"')
    parser.add_argument("--num-images", type=positive_int, default=8, help="how many images to keep")
    parser.add_argument("--candidates", type=positive_int, default=None,
                        help="draw this many and keep the --num-images that the course CLIP scores best")
    parser.add_argument("--out", default="grid.png", help="where to save the grid (PNG)")
    add_sampling_arguments(parser)
    parser.add_argument("--seed", type=seed_int, default=0)
    parser.add_argument("--model", default=None, help="a DALL·E checkpoint (default: the shipped tiny model)")
    parser.add_argument("--dvae", default=None, help="a dVAE checkpoint (default: the shipped lesson dVAE)")
    parser.add_argument("--tokenizer", default=None, help="a BPE merges file (default: the course tokenizer)")
    parser.add_argument("--clip", default=None, help="a CLIP checkpoint for --candidates (default: the shipped one)")
    parser.set_defaults(run=_generate)


# --------------------------------------------------------------------------------------
# data-grid
# --------------------------------------------------------------------------------------


def _data_grid(args: argparse.Namespace) -> None:
    from dalle_lesson.viz import save_grid

    check_output_path(args.out, force=True)
    dataset = stages.make_dataset(args.dataset, args.image_size, args.split, args.folder)
    count = min(args.count, len(dataset))
    picks = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))[:count].tolist()
    images, captions = zip(*(dataset[i] for i in picks))
    save_grid(list(images), args.out, list(captions), ncols=min(count, 6))
    print(f"wrote {count} {args.dataset} images with their captions to {args.out}")


def _add_data_grid(commands) -> None:
    parser = _parser(commands, "data-grid", "save a captioned grid of dataset images")
    add_dataset_arguments(parser, image_size=64)
    parser.add_argument("--split", default="train", choices=["train", "test", "heldout"])
    parser.add_argument("--count", type=positive_int, default=12)
    parser.add_argument("--seed", type=seed_int, default=0)
    parser.add_argument("--out", default="data_grid.png")
    parser.set_defaults(run=_data_grid)


# --------------------------------------------------------------------------------------
# train <stage>: the core flags, then each stage's own
# --------------------------------------------------------------------------------------


def add_core_arguments(parser: argparse.ArgumentParser, stage: str, presets: list[str], out: str) -> None:
    """The flags every trained stage shares; defaults are the stage's recipe (``stages.RECIPES``)."""
    recipe = stages.RECIPES[stage]
    parser.add_argument("--preset", choices=presets, default=presets[0], help="the model's sizes")
    parser.add_argument("--steps", type=positive_int, default=recipe.steps, help="optimiser steps")
    parser.add_argument("--batch-size", type=positive_int, default=recipe.batch_size,
                        help="examples per step, over all processes")
    parser.add_argument("--lr", type=float, default=recipe.lr, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=recipe.warmup_steps, help="linear warm-up steps")
    parser.add_argument("--final-lr-fraction", type=float, default=recipe.final_lr_fraction,
                        help="the cosine decay ends at lr times this")
    parser.add_argument("--weight-decay", type=float, default=recipe.weight_decay)
    parser.add_argument("--grad-clip", type=float, default=recipe.grad_clip, help="gradient-norm clip; 0 = none")
    parser.add_argument("--grad-accum", type=positive_int, default=recipe.grad_accum,
                        help="micro-batches per step (same result, less memory)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=recipe.precision,
                        help="auto: bf16 autocast on CUDA, fp32 on CPU")
    parser.add_argument("--seed", type=seed_int, default=recipe.seed)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=out, help="the checkpoint to write (resume state goes beside it)")
    parser.add_argument("--save-every", type=positive_int, default=recipe.save_every)
    parser.add_argument("--log-every", type=positive_int, default=recipe.log_every)
    parser.add_argument("--eval-every", type=int, default=recipe.eval_every, help="0 = validate at the end only")
    parser.add_argument("--log", default=None, help="the CSV log (default: beside --out, .csv)")
    parser.add_argument("--resume", action="store_true", help="continue the run saved at --out")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument("--stop-at", type=positive_int, default=None,
                        help="stop after this step as if interrupted (continue later with --resume)")
    parser.add_argument("--fp16", action="store_true", help="store the weights in float16 (half the size)")
    parser.add_argument("--shard", action=argparse.BooleanOptionalAction, default=None,
                        help="under torchrun: shard weights, gradients and AdamW moments over the processes (FSDP) "
                             "instead of a full copy on each (DDP); default: shard when a copy would fill over "
                             "half a GPU. Checkpoints are then sharded too (<out>.dcp/), gathered into --out at the end")


def recipe_from(args: argparse.Namespace) -> Recipe:
    return Recipe(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
                  final_lr_fraction=args.final_lr_fraction, weight_decay=args.weight_decay,
                  beta1=stages.RECIPES[args.stage].beta1, beta2=stages.RECIPES[args.stage].beta2,
                  grad_clip=args.grad_clip, grad_accum=args.grad_accum, seed=args.seed, log_every=args.log_every,
                  eval_every=args.eval_every, save_every=args.save_every, precision=args.precision)


def _train(args: argparse.Namespace) -> None:
    """Check everything, seed, build the stage, then hand it to the engine."""
    check_output_path(args.out, force=args.force, resume=args.resume)
    recipe = recipe_from(args)
    if args.resume:  # the saved run's recipe wins: same schedule, same batches
        sharded = checkpoint.sharded_dir(args.out).exists()
        saved = checkpoint.read_sharded_header(args.out) if sharded else checkpoint.load_resume_state(args.out)
        recipe = Recipe(**saved["recipe"])
    recipe.check()
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(recipe.seed)  # before the model is built: the same seed, the same initial weights
    stage = args.build(args, recipe)
    if args.fp16:
        stage.save_dtype = torch.float16
    parameters = sum(p.numel() for p in stage.model.parameters())
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"train {args.stage}: {parameters / 1e6:.2f}M parameters, {stage.num_examples} training examples, "
              f"{recipe.steps} steps of {recipe.batch_size}")
    log_path = args.log or str(Path(args.out).with_suffix(".csv"))
    log = fit(stage, recipe, out=args.out, resume=args.resume, device=args.device, log_path=log_path,
              stop_at=args.stop_at, shard=args.shard)
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary(log, args.out))


def _build_vae(args, recipe):
    from dalle_lesson.vae import VAE, Autoencoder, VAEConfig

    config = VAEConfig(image_size=args.image_size, latent_dim=args.latent_dim, width=args.width,
                       pixel_sigma=args.pixel_sigma)
    model = (Autoencoder if args.autoencoder else VAE)(config)
    images = stages.preload_images(stages.make_dataset(args.dataset, args.image_size, "train", args.folder,
                                                       length=args.train_images), args.train_images)
    validation = _shapes_validation(args, args.image_size)
    return stages.vae_stage(model, images, kl_weight=args.kl_weight, validation_images=validation)


def _shapes_validation(args, image_size: int):
    """Test-split shapes images for validation (only when training on shapes)."""
    if args.dataset != "shapes" or not args.val_images:
        return None
    return stages.preload_images(stages.make_dataset("shapes", image_size, "test", length=args.val_images),
                                 args.val_images)


def _build_dvae(args, recipe):
    from dalle_lesson.dvae import PRESETS, DiscreteVAE, DVAEConfig, DVAESchedule

    config = PRESETS[args.preset]()
    for name in ("image_size", "vocab_size", "n_hid", "likelihood"):
        if getattr(args, name):
            setattr(config, name, getattr(args, name))
    if args.grid_size:
        config.group_count = DVAEConfig.group_count_for(config.image_size, args.grid_size)
    config.__post_init__()
    schedule = DVAESchedule(tau_end=args.tau_end, tau_steps=args.tau_steps, beta_max=args.beta,
                            beta_steps=args.beta_steps, hard_from=args.hard_from)
    images = stages.preload_images(stages.make_dataset(args.dataset, config.image_size, "train", args.folder,
                                                       length=args.train_images), args.train_images)
    validation = _shapes_validation(args, config.image_size)
    return stages.dvae_stage(DiscreteVAE(config), images, recipe.steps, schedule, validation_images=validation)


def _build_vqvae(args, recipe):
    from dalle_lesson.dvae import DVAEConfig
    from dalle_lesson.vqvae import VQVAE

    model = VQVAE(DVAEConfig.lesson(), embedding_dim=args.embedding_dim)
    size = model.config.image_size
    images = stages.preload_images(stages.make_dataset(args.dataset, size, "train", args.folder,
                                                       length=args.train_images), args.train_images)
    return stages.vqvae_stage(model, images, validation_images=_shapes_validation(args, size))


def dalle_config(args: argparse.Namespace):
    """The ``--preset`` DALLEConfig with the ``--d-model --layers --heads --attention`` that were
    given (0 / None = the preset's); also returns those overrides."""
    from dalle_lesson.dalle import DALLEConfig

    overrides = {key: value for key, value in (("d_model", args.d_model), ("n_layers", args.layers),
                                                ("n_heads", args.heads), ("attention", args.attention)) if value}
    return {"tiny": DALLEConfig.tiny, "paper": DALLEConfig.paper}[args.preset](**overrides), overrides


def _build_dalle(args, recipe):
    from dalle_lesson.bpe import BPETokenizer, load_course_tokenizer, tokenize_batch
    from dalle_lesson.dalle import DALLE

    config, _ = dalle_config(args)
    tokenizer = BPETokenizer.load(args.tokenizer) if args.tokenizer else load_course_tokenizer()
    config.text_vocab_size = tokenizer.vocab_size
    progress = int(os.environ.get("RANK", "0")) == 0
    if args.shards:  # lesson 07: each process keeps its own share of the shards in memory
        codes, captions = _shard_codes(args, progress)
    else:
        dataset = stages.make_dataset(args.dataset, args.image_size, "train", args.folder, length=args.train_images)
        name = stages.codes_cache_name(dataset, f"{args.dataset}-train")
        codes, captions = stages.cached_codes(dataset, name, args.dvae, args.cache_dir, progress=progress)
    config.image_size = codes.shape[-1]  # the dVAE decides the grid
    text_ids = tokenize_batch(tokenizer, captions, config.text_seq_len)
    validation = None
    if args.dataset == "shapes" and args.val_images and not args.shards:
        val_codes, val_captions = stages.shapes_codes("test", args.val_images, args.image_size, args.dvae,
                                                      args.cache_dir, progress=progress)
        validation = (tokenize_batch(tokenizer, val_captions, config.text_seq_len), val_codes)
    pad_ids = tokenize_batch(tokenizer, [""], config.text_seq_len)[0]
    return stages.dalle_stage(DALLE(config), text_ids, codes, pad_ids, args.caption_dropout, validation)


def _shard_codes(args, progress: bool):
    """``--shards``: this process's codes and captions (image shards are encoded once, then cached)."""
    from dalle_lesson.shards import load_rank_codes
    from dalle_lesson.train import pick_device, start_distributed

    device = pick_device(args.device)
    start_distributed(device)  # join the process group now: the processes must agree on one example count
    return load_rank_codes(args.shards, args.dvae, args.cache_dir, device=device, progress=progress)


def _add_train(commands) -> None:
    parser = _parser(commands, "train", "train one stage of the pipeline")
    stage_parsers = parser.add_subparsers(dest="stage", required=True)

    vae = _parser(stage_parsers, "vae", "lesson 01: a VAE (or a plain autoencoder) on images")
    add_core_arguments(vae, "vae", ["lesson"], "vae.safetensors")
    add_dataset_arguments(vae, image_size=32)
    vae.add_argument("--autoencoder", action="store_true", help="a plain autoencoder instead of a VAE")
    vae.add_argument("--latent-dim", type=positive_int, default=16)
    vae.add_argument("--width", type=positive_int, default=32, help="channels of the first conv layer")
    vae.add_argument("--pixel-sigma", type=float, default=0.1, help="std of the Gaussian likelihood")
    vae.add_argument("--kl-weight", type=float, default=1.0, help="beta; 1 = the true ELBO")
    vae.add_argument("--train-images", type=positive_int, default=20_000, help="images loaded once, then batched")
    vae.add_argument("--val-images", type=int, default=256, help="test-split shapes images for validation")
    vae.set_defaults(run=_train, build=_build_vae)

    dvae = _parser(stage_parsers, "dvae", "lesson 02: the discrete VAE (images -> grids of tokens)")
    add_core_arguments(dvae, "dvae", ["lesson", "paper"], "dvae.safetensors")
    add_dataset_arguments(dvae, image_size=0)
    dvae.add_argument("--vocab-size", type=int, default=0, help="override the preset's codebook size")
    dvae.add_argument("--n-hid", type=int, default=0, help="override the preset's width")
    dvae.add_argument("--grid-size", type=int, default=0,
                      help="side of the code grid (image size / a power of two); 0 = the preset's")
    dvae.add_argument("--likelihood", choices=["logit_laplace", "mse"], default=None,
                      help="override the preset's likelihood (lesson: mse, paper: logit_laplace)")
    dvae.add_argument("--beta", type=float, default=0.01, help="final KL weight")
    dvae.add_argument("--beta-steps", type=int, default=None, help="raise beta over this many steps (default: steps/7)")
    dvae.add_argument("--tau-end", type=float, default=1 / 16, help="final Gumbel-softmax temperature")
    dvae.add_argument("--tau-steps", type=int, default=None, help="anneal tau over this many steps (default: 2/3)")
    dvae.add_argument("--hard-from", type=float, default=1.0, help="straight-through one-hot codes after this fraction")
    dvae.add_argument("--train-images", type=positive_int, default=20_000)
    dvae.add_argument("--val-images", type=int, default=500, help="test-split shapes images for validation")
    dvae.set_defaults(run=_train, build=_build_dvae)

    vqvae = _parser(stage_parsers, "vqvae", "lesson 02: the VQ-VAE (the dVAE's networks and a codebook)")
    add_core_arguments(vqvae, "vqvae", ["lesson"], "vqvae.safetensors")
    add_dataset_arguments(vqvae, image_size=32)
    vqvae.add_argument("--embedding-dim", type=positive_int, default=32)
    vqvae.add_argument("--train-images", type=positive_int, default=20_000)
    vqvae.add_argument("--val-images", type=int, default=500, help="test-split shapes images for validation")
    vqvae.set_defaults(run=_train, build=_build_vqvae)

    dalle = _parser(stage_parsers, "dalle", "lesson 04: the DALL·E transformer on captions + dVAE codes")
    add_core_arguments(dalle, "dalle", ["tiny", "paper"], "dalle.safetensors")
    add_dataset_arguments(dalle, image_size=32)
    dalle.add_argument("--d-model", type=int, default=0, help="override the preset's width")
    dalle.add_argument("--layers", type=int, default=0, help="override the preset's depth")
    dalle.add_argument("--heads", type=int, default=0, help="override the preset's head count")
    dalle.add_argument("--attention", choices=["dense", "sparse"], default=None,
                       help="same results; sparse computes only the row/column blocks (default: the preset's)")
    dalle.add_argument("--train-images", type=positive_int, default=20_000)
    dalle.add_argument("--val-images", type=int, default=1000, help="test-split shapes pairs for validation")
    dalle.add_argument("--dvae", default=None, help="dVAE checkpoint (default: the shipped lesson dVAE)")
    dalle.add_argument("--tokenizer", default=None, help="BPE file (default: the course tokenizer)")
    dalle.add_argument("--cache-dir", default=None, help="where codes are cached (default ~/.cache/dalle_lesson)")
    dalle.add_argument("--shards", default=None, metavar="PATTERN",
                       help="train on WebDataset shards instead of --dataset: a folder or "
                            "dir/shard-{000000..000009}.tar of images (shards make) or of codes (tokenize-images); "
                            "each process reads its own shards; no validation")
    dalle.add_argument("--caption-dropout", type=float, default=0.1,
                       help="fraction of captions replaced by the empty caption (for classifier-free guidance)")
    dalle.set_defaults(run=_train, build=_build_dalle)

    _add_train_clip(stage_parsers)
    _add_train_unclip(stage_parsers)

    bpe = _parser(stage_parsers, "bpe", "lesson 03: a byte-level BPE tokenizer (its merges file)")
    bpe.add_argument("--vocab-size", type=positive_int, default=1024, help="512 byte symbols + merges")
    bpe.add_argument("--corpus", default="course", choices=["course", "shapes"],
                     help="course = shapes captions + emoji names; shapes = shapes captions only")
    bpe.add_argument("--text", help="train on this UTF-8 text file instead (one text per line)")
    bpe.add_argument("--out", required=True, help="the merges file to write")
    bpe.add_argument("--force", action="store_true", help="replace an existing --out (the shipped one too)")
    bpe.set_defaults(run=_train_bpe)


# ---- train clip (lesson 06) ---------------------------------------------------------------


def _add_train_clip(stage_parsers) -> None:
    """``train clip``: the course's small CLIP (lesson 06)."""
    clip = _parser(stage_parsers, "clip", "lesson 06: a small CLIP (open_clip's model and loss) on captioned images")
    add_core_arguments(clip, "clip", ["lesson"], "clip.safetensors")
    add_dataset_arguments(clip, image_size=32)
    clip.add_argument("--emoji", action="store_true", help="with --dataset shapes: mix in the emoji and their names")
    clip.add_argument("--hard-negatives", action=argparse.BooleanOptionalAction, default=True,
                      help="pair every shapes scene with a copy that differs in one attribute, in the same batch")
    clip.add_argument("--swap-weights", type=float, nargs=4, default=[1.0, 2.0, 1.0, 8.0],
                      metavar=("COLOUR", "SHAPE", "SIZE", "RELATION"),
                      help="how often a twin differs in each attribute (relations only where there are two objects)")
    clip.add_argument("--train-images", type=positive_int, default=40_000, help="shapes images (scenes + twins)")
    clip.add_argument("--val-images", type=int, default=1000, help="test-split shapes images for validation")
    for flag, what in (("--embed-dim", "the shared embedding"), ("--patch-size", "image patches (pixels)"),
                       ("--vision-width", "the image transformer"),
                       ("--vision-layers", "image transformer layers"), ("--text-width", "the text transformer"),
                       ("--text-layers", "text transformer layers")):
        clip.add_argument(flag, type=int, default=0, help=f"override the preset's size of {what}")
    clip.set_defaults(run=_train, build=_build_clip)


def _build_clip(args, recipe):
    from dalle_lesson import clip

    names = ("embed_dim", "patch_size", "vision_width", "vision_layers", "text_width", "text_layers")
    config = clip.CLIPConfig.lesson(image_size=args.image_size,
                                    **{name: getattr(args, name) for name in names if getattr(args, name)})
    if args.text_width and not args.text_width % 32:
        config.text_heads = args.text_width // 32  # heads of 32, as in the preset
    config.__post_init__()
    if args.emoji and args.dataset != "shapes":
        raise ValueError("--emoji mixes the emoji into --dataset shapes; to train on emoji alone use --dataset emoji")
    pairs = args.hard_negatives and args.dataset != "folder"  # examples 2k, 2k + 1: a scene and its twin
    if args.dataset == "shapes" and pairs:
        part = clip.hard_negative_pairs(max(1, args.train_images // 2), config.image_size, "train",
                                        weights=args.swap_weights)
        images, captions, keys = part.images, part.captions, part.keys
    elif args.dataset == "shapes":
        dataset = stages.make_dataset("shapes", config.image_size, "train", length=args.train_images)
        images = stages.preload_images(dataset, len(dataset))
        captions = [dataset.caption(i) for i in range(len(dataset))]
        keys = [clip.scene_key(dataset.scene(i)) for i in range(len(dataset))]
    elif args.dataset == "emoji":
        part = clip.emoji_pairs(config.image_size)
        images, captions, keys = part.images, part.captions, part.keys
    else:
        dataset = stages.make_dataset("folder", config.image_size, "train", args.folder)
        images = stages.preload_images(dataset, len(dataset))
        captions = keys = [caption for _, caption in dataset.items]
    if args.emoji:  # after an even number of shapes examples, so pairs stay pairs
        emoji = clip.emoji_pairs(config.image_size)
        images, captions, keys = torch.cat([images, emoji.images]), captions + emoji.captions, keys + emoji.keys
    validation = None
    if args.dataset == "shapes" and args.val_images >= 2:
        # every kind of difference about equally often: relations exist only in two-object scenes
        validation = clip.hard_negative_pairs(args.val_images // 2, config.image_size, "test", weights=(1, 1, 1, 3))
    return stages.clip_stage(clip.CourseCLIP(config), images, captions, validation, keys=keys, pairs=pairs)


# ---- train decoder / prior (lesson 08) ------------------------------------------------------


def _add_train_unclip(stage_parsers) -> None:
    """``train decoder`` and ``train prior``: DALL·E 2's two stages at course size (lesson 08)."""
    helps = {"decoder": "lesson 08: unCLIP's decoder, a CLIP image vector -> dVAE codes of its picture",
             "prior": "lesson 08: unCLIP's prior, a caption's CLIP vector -> its picture's CLIP vector"}
    for stage, help in helps.items():
        parser = _parser(stage_parsers, stage, help)
        add_core_arguments(parser, stage, ["lesson"], f"unclip_{stage}.safetensors")
        add_dataset_arguments(parser, image_size=32)
        parser.add_argument("--clip", default=None, help="CLIP checkpoint; none: the shipped lesson CLIP")
        parser.add_argument("--dvae", default=None, help="dVAE checkpoint; none: the shipped lesson dVAE")
        parser.add_argument("--train-images", type=positive_int, default=20_000)
        parser.add_argument("--val-images", type=int, default=300, help="test-split shapes pictures for validation")
        parser.add_argument("--width", type=positive_int, default=128 if stage == "decoder" else 512,
                            help="channels of the decoder's convolutions / width of the prior's MLP")
        if stage == "decoder":
            parser.add_argument("--centre", action=argparse.BooleanOptionalAction, default=True,
                                help="learn the codes of each picture moved to the middle (unclip.centred); "
                                     "--no-centre for photos, whose background is not one colour")
        parser.set_defaults(run=_train, build=_build_unclip)


def _build_unclip(args, recipe):
    from dalle_lesson import unclip
    from dalle_lesson.clip import SHIPPED, embed, load_clip
    from dalle_lesson.dvae import load_dvae

    clip_file = Path(args.clip) if args.clip else data.shipped_path(SHIPPED)
    dvae_file = Path(args.dvae) if args.dvae else data.shipped_path("dvae_lesson.safetensors")
    clip_model, dvae = load_clip(clip_file), load_dvae(dvae_file)
    dataset = stages.make_dataset(args.dataset, args.image_size, "train", args.folder, length=args.train_images)
    images, captions = stages.preload_pairs(dataset, len(dataset))
    image_vectors, text_vectors = embed(clip_model, images, captions)
    metadata = {"clip": checkpoint.file_digest(clip_file), "dvae": checkpoint.file_digest(dvae_file),
                "data": f"{args.dataset}-train-{len(images)}-{args.image_size}"}
    validation = None
    if args.dataset == "shapes" and args.val_images > 0:
        test_images, test_captions = stages.preload_pairs(
            stages.make_dataset("shapes", args.image_size, "test", length=args.val_images), args.val_images)
        test_image_vectors, test_text_vectors = embed(clip_model, test_images, test_captions)
        validation = ((dvae, test_image_vectors, test_captions) if args.stage == "decoder"
                      else (test_text_vectors, test_image_vectors))
    embed_dim = image_vectors.shape[1]
    if args.stage == "decoder":
        codes = unclip.decoder_targets(dvae, images, centre=args.centre)
        metadata["centred"] = args.centre
        config = unclip.DecoderConfig(embed_dim=embed_dim, grid_size=dvae.config.grid_size,
                                      vocab_size=dvae.config.vocab_size, width=args.width)
        return stages.unclip_decoder_stage(unclip.EmbeddingDecoder(config), image_vectors, codes, validation,
                                           metadata)
    config = unclip.PriorConfig(embed_dim=embed_dim, width=args.width)
    return stages.unclip_prior_stage(unclip.EmbeddingPrior(config), text_vectors, image_vectors, validation,
                                     metadata)


def _train_bpe(args: argparse.Namespace) -> None:
    from dalle_lesson.bpe import BPETokenizer, course_corpus

    check_output_path(args.out, force=args.force)
    if args.text:
        if not Path(args.text).is_file():
            raise ValueError(f"--text {args.text}: no such file (give a UTF-8 text file, one text per line)")
        texts = Path(args.text).read_text(encoding="utf-8", errors="replace").splitlines()
    else:
        texts = course_corpus(include_emoji=args.corpus == "course")
    tokenizer = BPETokenizer().train(texts, args.vocab_size)
    tokenizer.save(args.out)
    print(f"trained {tokenizer!r} on {len(texts)} texts, wrote {args.out}")


# ---- gather: a sharded run -> one safetensors file -------------------------------------


def _gather(args: argparse.Namespace) -> None:
    from dalle_lesson.clip import CourseCLIP
    from dalle_lesson.dalle import DALLE
    from dalle_lesson.dvae import DiscreteVAE
    from dalle_lesson.vae import VAE, Autoencoder
    from dalle_lesson.vqvae import VQVAE

    out = args.out or args.checkpoint
    if Path(out).exists() and not args.force:
        raise ValueError(f"--out {out} exists; add --force to replace it")
    header = checkpoint.read_sharded_header(args.checkpoint)
    checkpoint.gather_sharded(args.checkpoint, out, (DALLE, DiscreteVAE, VQVAE, VAE, Autoencoder, CourseCLIP),
                              dtype=torch.float16 if args.fp16 else torch.float32)
    print(f"gathered step {header['step']} of {checkpoint.sharded_dir(args.checkpoint)} into {out}")


def _add_gather(commands) -> None:
    parser = _parser(commands, "gather", "join a sharded (--shard) run's latest checkpoint into one safetensors file",
                     "Reads <checkpoint>.dcp/ in one process, without GPUs, and writes an ordinary checkpoint\n"
                     "that generate, the notebooks and load_dalle() read.")
    parser.add_argument("checkpoint", help="the --out of the sharded run (its shards are in <checkpoint>.dcp/)")
    parser.add_argument("--out", default=None, help="where to write (default: the checkpoint path itself)")
    parser.add_argument("--fp16", action="store_true", help="store the weights in float16 (half the size)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.set_defaults(run=_gather)


# ---- shards make, tokenize-images: data at scale (lesson 07) -------------------------------


def _shards_make(args: argparse.Namespace) -> None:
    from dalle_lesson.shards import write_shards

    length = args.count or 10_000  # shapes are made on the fly: as many as asked
    dataset = stages.make_dataset(args.dataset, args.image_size, args.split, args.folder, length=length)
    written = write_shards(dataset, args.out, samples_per_shard=args.samples_per_shard, count=args.count,
                           force=args.force)
    print(f"wrote {written}")


def _add_shards(commands) -> None:
    parser = _parser(commands, "shards", "WebDataset tar shards of image + caption (lesson 07)")
    actions = parser.add_subparsers(dest="shards_command", required=True)
    make = _parser(actions, "make", "write a dataset as WebDataset shards: per sample a PNG image and a .txt caption",
                   "Writes OUT/shard-000000.tar, OUT/shard-000001.tar, ... (lossless PNG, UTF-8 captions);\n"
                   "train on them with `train dalle --shards OUT`, or encode them once with tokenize-images.")
    add_dataset_arguments(make, image_size=32)
    make.add_argument("--split", default="train", choices=["train", "test", "heldout"], help="with --dataset shapes")
    make.add_argument("--count", type=positive_int, default=None,
                      help="how many samples (default: the whole dataset; shapes: 10000)")
    make.add_argument("--samples-per-shard", type=positive_int, default=1000)
    make.add_argument("--out", required=True, help="the folder to write the shards into")
    make.add_argument("--force", action="store_true", help="replace the shards already in --out")
    make.set_defaults(run=_shards_make)


def _tokenize_images(args: argparse.Namespace) -> None:
    from dalle_lesson.shards import dvae_facts, tokenize_shards
    from dalle_lesson.train import pick_device

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("tokenize-images runs in one process (on a GPU if there is one); under torchrun, "
                         "`train dalle --shards <image shards>` encodes each process's shards itself")
    facts = dvae_facts(args.dvae)
    written = tokenize_shards(args.shards, args.out, dvae_path=args.dvae, batch_size=args.batch_size,
                              device=pick_device(args.device), force=args.force)
    grid = facts["grid_size"]
    print(f"encoded {written.samples} images into {grid}x{grid} codes of {facts['vocab_size']} with "
          f"{facts['dvae']} (digest {facts['dvae_digest']}): {written}")
    print(f"train on them with: dalle-lesson train dalle --shards '{written.pattern}'"
          + (f" --dvae {args.dvae}" if args.dvae else ""))


def _add_tokenize_images(commands) -> None:
    parser = _parser(commands, "tokenize-images", "encode image shards with the dVAE once, into code shards",
                     "Reads image shards (shards make, or any WebDataset of .png/.jpg + .txt), runs every image\n"
                     "through the dVAE once and writes one code shard per image shard: per sample its codes\n"
                     "(.npy, int16) and caption (.txt), after a header naming the dVAE (digest, grid size).")
    parser.add_argument("--shards", required=True, metavar="PATTERN",
                        help="a folder of .tar shards, or a pattern like dir/shard-{000000..000009}.tar")
    parser.add_argument("--dvae", default=None, help="the dVAE checkpoint (default: the shipped lesson dVAE)")
    parser.add_argument("--out", required=True, help="the folder to write the code shards into")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per dVAE call")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--force", action="store_true", help="replace the shards already in --out")
    parser.set_defaults(run=_tokenize_images)


# ---- plan: will a configuration fit, and how long will a step take (lesson 07) ----------


def _plan(args: argparse.Namespace) -> None:
    from dalle_lesson import plan

    sizes = {"d_model": args.d_model, "n_layers": args.layers, "n_heads": args.heads}
    for flag, value in zip(("--d-model", "--layers", "--heads"), sizes.values()):
        if value < 0:
            raise ValueError(f"{flag} must be >= 1 (0 = the preset's), got {value}")
    config, overrides = dalle_config(args)
    name = args.preset + "".join(f", {key}={value}" for key, value in overrides.items())
    print(plan.report(config, gpus=args.gpus, shard=args.shard, checkpointing=args.checkpointing, batch=args.batch,
                      gpu_memory_gb=args.gpu_memory_gb, precision=args.precision,
                      attention_kernel=args.attention_kernel, flops_per_gpu=args.flops_per_gpu, mfu=args.mfu,
                      name=name))


def _add_plan(commands) -> None:
    parser = _parser(commands, "plan", "lesson 07: parameters, memory per GPU, FLOPs and time per step",
                     "Arithmetic from the configuration, no model built: parameters layer by layer, the memory\n"
                     "per GPU for each --gpus count (DDP, or FSDP with --shard) and whether it fits, FLOPs and\n"
                     "time per step. The paper trained with a global batch of 1024 images on 1024 16 GB V100s,\n"
                     "a micro-batch of 1 per GPU:\n"
                     "    dalle-lesson plan --preset paper --gpus 1 8 64 1024 --shard")
    parser.add_argument("--preset", choices=["tiny", "paper"], default="paper", help="the model's sizes")
    parser.add_argument("--d-model", type=int, default=0, help="override the preset's width")
    parser.add_argument("--layers", type=int, default=0, help="override the preset's depth")
    parser.add_argument("--heads", type=int, default=0, help="override the preset's head count")
    parser.add_argument("--attention", choices=["dense", "sparse"], default=None,
                        help="override the preset's attention (paper: sparse row/column blocks)")
    parser.add_argument("--gpus", type=positive_int, nargs="+", default=[1, 8, 64, 1024],
                        help="GPU counts to plan for, one row each")
    parser.add_argument("--shard", action="store_true",
                        help="FSDP: weights, gradients and AdamW moments divided over the GPUs (default: DDP, "
                             "a full copy on each)")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="activation checkpointing (default: the preset's: on for paper, off for tiny)")
    parser.add_argument("--batch", type=positive_int, default=1,
                        help="micro-batch per GPU (the paper: 1, i.e. 1024 images over 1024 GPUs)")
    parser.add_argument("--gpu-memory-gb", type=float, nargs="+", default=[80, 16],
                        help="memory of one GPU in GiB, one 'fits' column each (80: A100/H100; 16: the paper's V100s)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                        help="bf16: autocast compute with fp32 master weights; fp32: everything in fp32")
    parser.add_argument("--attention-kernel", choices=["fused", "math"], default="fused",
                        help="dense attention's SDPA kernel: fused (flash / memory-efficient, what PyTorch picks) "
                             "or math (keeps the n x n probabilities per head)")
    parser.add_argument("--flops-per-gpu", type=float, default=125e12,
                        help="peak FLOP/s of one GPU (V100 fp16 tensor cores, the paper's: 125e12; A100 bf16: 312e12)")
    parser.add_argument("--mfu", type=float, default=0.4, help="the fraction of that peak a training step sustains")
    parser.set_defaults(run=_plan)


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dalle-lesson", description="DALL·E, built step by step.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_generate(commands)
    _add_data_grid(commands)
    _add_train(commands)
    _add_shards(commands)
    _add_tokenize_images(commands)
    _add_gather(commands)
    _add_plan(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, TrainingDiverged) as error:
        name = " ".join(filter(None, [args.command, getattr(args, "stage", None)]))
        raise SystemExit(f"dalle-lesson {name}: {error}") from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main(sys.argv[1:])
