"""Which dVAE recipe keeps every attribute of a Shapes scene through a round trip?

    OMP_NUM_THREADS=1 python benchmarks/dvae_recipes.py score data/dvae_lesson.safetensors /tmp/dvae_study/*.safetensors
    OMP_NUM_THREADS=1 python benchmarks/dvae_recipes.py train grid16 --grid 16 --steps 1000   # what the CLI cannot say

A dVAE is a good tokenizer for the course only if ``decode(encode(image))`` still shows
the scene the caption describes: the right colour, shape and size of every object, the
relation between two objects, and no extra or missing object. So this benchmark does not
stop at PSNR: it round-trips held-out ShapesDataset scenes (the ``heldout`` split, whose
shape-colour pairs never occur in training, and the ``test`` split) through each
checkpoint and reads the results with the course scorer, :mod:`dalle_lesson.evaluate`.

Per checkpoint and split it reports

* per-attribute accuracy (colour, shape, size, relation, count) and the full match;
* shape accuracy by shape and by object size (small objects, a 7.7-pixel box at 32x32,
  are where a coarse grid of codes fails first), and what each shape was read as;
* PSNR of the round trip, and how much of the codebook the codes use;
* the cost the transformer pays for this tokenizer: codes per image (``grid**2``; the
  transformer's stream is 32 text tokens + that many image tokens, and sampling time grows
  with it), the parameter count and the training time from the checkpoint's header.

``train`` builds the candidates the ``dalle-lesson train dvae`` CLI cannot express (it has
no flag for ``n_blk_per_group``; the grid it sets with ``--grid-size``)
with the same pieces the CLI uses: ``DVAEConfig``, ``stages.dvae_stage`` and ``train.fit``.

The scorer is tuned for the Shapes renders at 32 px and reads 64 px too
(``benchmarks/results/scorer.json``: 100 % on clean renders at both sizes), so every miss
in a round trip is the dVAE's. Writes ``benchmarks/results/dvae_recipes.json``.

Two things to look for in the results. First, the round trip uses *hard* (argmax) codes,
as the transformer will, but the Gumbel-softmax trains the decoder on *soft* codes; a
decoder that learns to read the soft mixtures reconstructs well in training and badly
from argmax codes (PSNR of ``decode(encode(x))`` far below the training loss's). Training
on straight-through one-hot codes for the end of the run (``--hard-from``) closes that gap.
Second, a small star or cross at 32x32 spans about two 4x4-pixel cells of an 8x8 grid; on
a 16x16 grid (2x2 pixels a code) the large stars and crosses come back right.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from dalle_lesson import checkpoint, data, evaluate, stages
from dalle_lesson.dvae import DiscreteVAE, DVAEConfig, DVAESchedule, codebook_usage, load_dvae, psnr
from dalle_lesson.train import fit, seed_everything

RESULTS = Path(__file__).resolve().parent / "results" / "dvae_recipes.json"
TEXT_TOKENS = 32  # the tiny transformer's caption length: its stream is 32 + grid**2 tokens
ATTRIBUTES = ("colour", "shape", "size", "relation", "count", "full_match")


# --------------------------------------------------------------------------------------
# Training a candidate the CLI cannot express
# --------------------------------------------------------------------------------------


def candidate_config(args: argparse.Namespace) -> DVAEConfig:
    """The lesson preset with the study's changes: grid size (via group_count), width, codebook."""
    config = DVAEConfig.lesson()
    config.image_size = args.image_size
    config.group_count = DVAEConfig.group_count_for(args.image_size, args.grid)
    config.vocab_size, config.n_hid = args.vocab_size, args.n_hid
    config.n_blk_per_group, config.likelihood = args.blocks, args.likelihood
    config.__post_init__()
    return config


def train_candidate(args: argparse.Namespace) -> None:
    """Train one candidate exactly as ``dalle-lesson train dvae`` would, but with any DVAEConfig."""
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)  # before the model is built: the same seed, the same initial weights
    config = candidate_config(args)
    model = DiscreteVAE(config)
    schedule = DVAESchedule(beta_max=args.beta, beta_steps=args.beta_steps, tau_steps=args.tau_steps,
                            hard_from=args.hard_from)
    train = data.ShapesDataset(length=args.train_images, image_size=config.image_size, split="train")
    test = data.ShapesDataset(length=args.val_images, image_size=config.image_size, split="test")
    stage = stages.dvae_stage(model, stages.preload_images(train, args.train_images), args.steps, schedule,
                              validation_images=stages.preload_images(test, args.val_images))
    stage.save_dtype = torch.float16  # as the shipped checkpoint (--fp16): half the size, same PSNR
    recipe = stages.recipe("dvae", steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"train {args.name}: {config}, {parameters / 1e6:.2f}M parameters, {args.steps} steps of {args.batch_size}")
    out = Path(args.out_dir) / f"{args.name}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    log = fit(stage, recipe, out=out, device="cpu", log_path=out.with_suffix(".csv"), progress=False)
    print(f"saved {out}: {log[-1]}")


# --------------------------------------------------------------------------------------
# Scoring round trips
# --------------------------------------------------------------------------------------


def scenes(split: str, count: int, image_size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """``count`` scenes of one split as images [N, 3, S, S] in [0, 1] and their captions.

    Seed 1, as ``benchmarks/scorer.py``: the same held-out scenes, so its dVAE rows can be compared.
    """
    dataset = data.ShapesDataset(count, image_size, split=split, seed=seed)
    images, captions = zip(*(dataset[i] for i in range(count)))
    return torch.stack(images), list(captions)


@torch.no_grad()
def round_trip(model: DiscreteVAE, images: torch.Tensor, batch_size: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """``decode(encode(images))`` with hard (argmax) codes, as the transformer will use them; also the codes."""
    codes = torch.cat([model.encode(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
    decoded = torch.cat([model.decode(codes[i : i + batch_size]) for i in range(0, len(codes), batch_size)])
    return decoded, codes


def fraction(hits: int, total: int) -> float | None:
    return hits / total if total else None


def shape_breakdown(scores: list[evaluate.Score]) -> dict:
    """Shape accuracy by shape, by object size, by both, and what each shape was read as."""
    read_as = collections.defaultdict(collections.Counter)  # true shape -> what the scorer saw
    by = collections.defaultdict(lambda: [0, 0])  # (shape or "*", size or "*") -> [right, total]
    for result in scores:
        for obj in result.objects:
            found = "missing" if obj.found is None else obj.found.shape or "no_shape"
            read_as[obj.expected.shape][found] += 1
            for key in ((obj.expected.shape, obj.expected.size), (obj.expected.shape, "*"), ("*", obj.expected.size)):
                by[key][0] += obj.shape
                by[key][1] += 1
    shapes, sizes = [s for s in data.SHAPES if read_as[s]], list(data.SIZES)
    return {
        "shape_accuracy_small_objects": fraction(*by[("*", "small")]),
        "shape_accuracy_large_objects": fraction(*by[("*", "large")]),
        "shape_accuracy_by_shape": {s: fraction(*by[(s, "*")]) for s in shapes},
        "shape_accuracy_by_shape_and_size": {f"{size}_{s}": fraction(*by[(s, size)]) for s in shapes for size in sizes},
        "shape_read_as": {s: dict(read_as[s].most_common()) for s in shapes},
    }


def measure(model: DiscreteVAE, images: torch.Tensor, captions: list[str]) -> dict:
    """One split: round trip, then the scorer's verdict per attribute, PSNR and codebook use."""
    start = time.perf_counter()
    decoded, codes = round_trip(model, images)
    round_trip_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scores = evaluate.score_batch(decoded, captions)
    score_seconds = time.perf_counter() - start
    usage = codebook_usage(codes, model.config.vocab_size)
    return {
        **evaluate.summarize(scores),
        **shape_breakdown(scores),
        "psnr_db_mean": float(psnr(decoded, images).mean()),
        "codebook_fraction_used": usage["fraction_used"],
        "codebook_perplexity": usage["perplexity"],
        "round_trip_ms_per_image": 1000 * round_trip_seconds / len(images),
        "score_ms_per_image": 1000 * score_seconds / len(images),
    }


def describe(path: Path, model: DiscreteVAE) -> dict:
    """What a checkpoint costs: codes per image, parameters, and its training from the header."""
    header = checkpoint.read_metadata(path)
    config, recipe = model.config, header.get("recipe", {})
    seconds = header.get("train_seconds")
    return {
        "checkpoint": str(path),
        "config": vars(config),
        "grid_size": config.grid_size,
        "codes_per_image": config.grid_size**2,
        "transformer_stream_tokens": TEXT_TOKENS + config.grid_size**2,
        "parameters": sum(p.numel() for p in model.parameters()),
        "file_mb": path.stat().st_size / 1e6,
        "steps": header.get("step"),
        "batch_size": recipe.get("batch_size"),
        "lr": recipe.get("lr"),
        "schedule": header.get("schedule"),
        "train_seconds": seconds,
        "train_minutes": None if seconds is None else seconds / 60,
        "seconds_per_step": None if seconds is None or not header.get("step") else seconds / header["step"],
    }


@torch.no_grad()
def sampling_seconds(grid_size: int, vocab_size: int, batch_size: int = 8) -> float:
    """Seconds per image for the course's tiny transformer to draw one grid of codes (random weights).

    What a finer grid costs downstream: one forward pass per image token, each over a longer
    stream. Random weights take as long as trained ones.
    """
    from dalle_lesson.dalle import DALLE, DALLEConfig
    from dalle_lesson.sampling import generate

    torch.manual_seed(0)
    model = DALLE(DALLEConfig.tiny(image_size=grid_size, image_vocab_size=vocab_size)).eval()
    text = torch.randint(model.config.text_vocab_size, (batch_size, model.config.text_seq_len))
    generate(model, text[:1], seed=0)  # warm-up: the first call allocates
    start = time.perf_counter()
    generate(model, text, seed=0)
    return (time.perf_counter() - start) / batch_size


def score_checkpoints(args: argparse.Namespace) -> None:
    """Score every checkpoint on the same scenes, write the JSON, print the table."""
    torch.set_num_threads(args.threads)  # the scorer's tensors are tiny: one thread is fastest
    rendered = {}  # (split, image size) -> (images, captions), drawn once for all checkpoints
    models, sampled = {}, {}  # sampled: (grid, vocab) -> seconds per image, timed once
    if args.merge and args.out.is_file():  # keep the checkpoints scored before (one training run at a time)
        models = json.loads(args.out.read_text())["models"]
    for path in map(Path, args.checkpoints):
        name = path.name.removesuffix(".safetensors")
        model = load_dvae(path)
        size = model.config.image_size
        row = describe(path, model)
        if args.sampling:
            key = (model.config.grid_size, model.config.vocab_size)
            if key not in sampled:
                sampled[key] = sampling_seconds(*key)
            row["tiny_transformer_sampling_s_per_image"] = sampled[key]
        for split, count in (("heldout", args.heldout), ("test", args.test)):
            if count:
                if (split, size) not in rendered:
                    rendered[split, size] = scenes(split, count, size, args.seed)
                row[f"round_trip_{size}px_{split}"] = measure(model, *rendered[split, size])
        models[name] = row
        print_row(name, row, f"round_trip_{size}px_heldout", flush=True)
    write_results(args, models)
    print()
    print_table(models)
    print(f"wrote {args.out}")


def write_results(args: argparse.Namespace, models: dict) -> None:
    uname = platform.uname()
    results = {
        "benchmark": "dvae_recipes",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "uname": f"{uname.system} {uname.release} {uname.machine}", "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads()},
        "settings": {"heldout_scenes": args.heldout, "test_scenes": args.test, "scene_seed": args.seed,
                     "text_tokens": TEXT_TOKENS},
        "units": "accuracies are fractions in [0, 1] (colour/shape/size per object of the caption, relation per "
                 "two-object caption, count and full_match per image); psnr_db in decibels; codes_per_image = "
                 "grid_size**2 tokens; transformer_stream_tokens = text_tokens + codes_per_image; "
                 "tiny_transformer_sampling_s_per_image = wall seconds per image (batch 8, KV cache, one thread, "
                 "random weights); train_seconds and train_minutes are wall time from the checkpoint header; "
                 "file_mb in 10**6 bytes; *_ms_per_image in milliseconds",
        "models": models,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


COLUMNS = ("grid", "codes", "params", "steps", "min", "PSNR", "colour", "shape", "size", "relation", "count",
           "full", "small_shape")


def print_row(name: str, model: dict, key: str, flush: bool = False) -> None:
    row = model.get(key)
    if row is None:
        return
    percent = lambda value: f"{value:.1%}" if value is not None else "-"  # noqa: E731
    minutes = f"{model['train_minutes']:.1f}" if model["train_minutes"] is not None else "-"
    cells = [f"{model['grid_size']}x{model['grid_size']}", model["codes_per_image"],
             f"{model['parameters'] / 1e6:.2f}M", model["steps"] or "-", minutes, f"{row['psnr_db_mean']:.1f}",
             *(percent(row[f"{a}_accuracy"]) for a in ATTRIBUTES), percent(row["shape_accuracy_small_objects"])]
    print(f"{name:<24}{key.removeprefix('round_trip_'):<14}" + "".join(f"{str(c):>12}" for c in cells), flush=flush)


def print_table(models: dict) -> None:
    print(f"{'checkpoint':<24}{'scenes':<14}" + "".join(f"{c:>12}" for c in COLUMNS))
    for name, model in models.items():
        for key in [k for k in model if k.startswith("round_trip_")]:
            print_row(name, model, key)


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a candidate the CLI cannot express")
    train.add_argument("name", help="checkpoint name: writes OUT_DIR/NAME.safetensors")
    train.add_argument("--out-dir", default="/tmp/dvae_study")
    train.add_argument("--image-size", type=int, default=32)
    train.add_argument("--grid", type=int, default=8, help="side of the grid of codes (16 at 32 px: 2x2 px a code)")
    train.add_argument("--vocab-size", type=int, default=512)
    train.add_argument("--n-hid", type=int, default=32)
    train.add_argument("--blocks", type=int, default=1, help="residual blocks per group")
    train.add_argument("--likelihood", choices=["mse", "logit_laplace"], default="mse")
    train.add_argument("--beta", type=float, default=0.01, help="final KL weight")
    train.add_argument("--beta-steps", type=int, default=None)
    train.add_argument("--tau-steps", type=int, default=None)
    train.add_argument("--hard-from", type=float, default=1.0)
    train.add_argument("--steps", type=int, default=1000)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--train-images", type=int, default=20_000)
    train.add_argument("--val-images", type=int, default=500)
    train.add_argument("--threads", type=int, default=1)
    train.set_defaults(run=train_candidate)

    score = commands.add_parser("score", help="round-trip held-out scenes through checkpoints and score them")
    score.add_argument("checkpoints", nargs="+", help="dVAE checkpoints (.safetensors)")
    score.add_argument("--heldout", type=int, default=1000, help="heldout-split scenes per checkpoint")
    score.add_argument("--test", type=int, default=500, help="test-split scenes per checkpoint")
    score.add_argument("--seed", type=int, default=1, help="which scenes (1: the scorer benchmark's)")
    score.add_argument("--threads", type=int, default=1)
    score.add_argument("--out", type=Path, default=RESULTS)
    score.add_argument("--sampling", action="store_true",
                       help="also time the tiny transformer drawing each checkpoint's grid (batch 8)")
    score.add_argument("--merge", action="store_true", help="keep the other checkpoints already in --out")
    score.set_defaults(run=score_checkpoints)

    return parser


def main() -> None:
    args = build_parser().parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
