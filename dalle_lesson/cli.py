"""The ``dalle-lesson`` command.

    dalle-lesson data-grid --dataset shapes --out shapes.png   # look at a dataset
    dalle-lesson train dvae --preset lesson ...                 # train one stage
    dalle-lesson generate "a red circle" --out grid.png         # the whole pipeline

Each stage's training command lives next to the code it trains; this file only wires the
sub-commands together.
"""

from __future__ import annotations

import argparse
import sys


def make_dataset(name: str, image_size: int, split: str = "train", folder: str | None = None, length: int = 10_000):
    from dalle_lesson import data

    if name == "shapes":
        return data.ShapesDataset(length=length, image_size=image_size, split=split)
    if name == "emoji":
        return data.EmojiDataset(image_size=image_size)
    if name == "folder":
        if not folder:
            raise SystemExit("--dataset folder needs --folder PATH (images with same-named .txt captions)")
        return data.ImageFolderDataset(folder, image_size=image_size)
    raise SystemExit(f"unknown dataset {name!r}: choose shapes, emoji or folder")


def add_dataset_arguments(parser: argparse.ArgumentParser, image_size: int = 64) -> None:
    """The options every command that reads images shares."""
    parser.add_argument("--dataset", default="shapes", choices=["shapes", "emoji", "folder"])
    parser.add_argument("--folder", help="with --dataset folder: images with same-named .txt captions")
    parser.add_argument("--image-size", type=int, default=image_size)


# ---- data-grid -----------------------------------------------------------------------


def _data_grid(args: argparse.Namespace) -> None:
    import torch

    from dalle_lesson.viz import save_grid

    dataset = make_dataset(args.dataset, args.image_size, args.split, args.folder)
    count = min(args.count, len(dataset))
    picks = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))[:count].tolist()
    images, captions = zip(*(dataset[i] for i in picks))
    save_grid(list(images), args.out, list(captions), ncols=min(count, 6))
    print(f"wrote {count} {args.dataset} images with their captions to {args.out}")


def _add_data_grid(commands) -> None:
    parser = commands.add_parser("data-grid", help="save a captioned grid of dataset images")
    add_dataset_arguments(parser)
    parser.add_argument("--split", default="train", choices=["train", "test", "heldout"])
    parser.add_argument("--count", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="data_grid.png")
    parser.set_defaults(run=_data_grid)


# ---- train and generate ---------------------------------------------------------------


def _add_train(commands) -> None:
    """``train <stage>``: each stage's module adds its own parser next to the code it trains."""
    from dalle_lesson import bpe, dvae, train, vae, vqvae

    parser = commands.add_parser("train", help="train one stage of the pipeline")
    stages = parser.add_subparsers(dest="stage", required=True)
    vae.add_train_command(stages)  # lesson 01
    dvae.add_train_command(stages)  # lesson 02
    vqvae.add_train_command(stages)  # lesson 02, for comparison
    bpe.add_train_command(stages)  # lesson 03
    train.add_train_command(stages)  # lesson 04: ``train dalle``


# ---- main ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from dalle_lesson.sampling import add_generate_command

    parser = argparse.ArgumentParser(prog="dalle-lesson", description="DALL·E, built step by step.")
    commands = parser.add_subparsers(dest="command", required=True)
    add_generate_command(commands)
    _add_data_grid(commands)
    _add_train(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
