"""DALL·E 2's ideas at course size, each measured with the course scorer (lesson 08).

Everything here runs in the shipped course CLIP's shared space (``dalle_lesson.unclip``):

* **retrieval**: for pictures of the training-distribution "test" split and of the held-out
  split, recall@1 and recall@5 caption -> picture and picture -> caption (a hit is an item
  of the same scene: same objects, colours, sizes and relation, ``clip.scene_key``);
* **round trip**: a picture's CLIP vector through the shipped decoder, read by the scorer
  against the picture's caption (how much of a caption the vector keeps and the decoder
  can draw back);
* **caption -> picture**: for ``composition.py``'s seeded captions, unCLIP with its prior,
  unCLIP fed the caption's own vector (no prior), and the shipped transformer's first
  sample (N = 1, the pipeline's default sampling): full match, per-attribute rates and
  seconds per picture;
* **text-diff edits**: single-object test pictures, turned by ``unclip.text_diff`` from
  their caption toward the caption with another colour (or another shape); for each amount,
  how often the decoded picture reads as the *edited* caption and how often still as the
  original;
* **interpolation**: pairs of single-object pictures, five frames along the great circle
  between their vectors (``unclip.slerp``); how often each frame reads as A, as B.

    python benchmarks/unclip.py            # about 3 minutes on one thread
    python benchmarks/unclip.py --quick    # a smoke test of a few seconds

Writes benchmarks/results/unclip.json and prints tables.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

# Run as a script, so benchmarks/ is on the path: the caption choice and the rates of composition.py.
from composition import ATTRIBUTES, SPLITS, one_picture_rates, rate, report_header, split_captions, write_report

from dalle_lesson import data, evaluate, stages, unclip
from dalle_lesson.clip import embed, scene_key
from dalle_lesson.pipeline import SAMPLING_DEFAULTS, Pipeline

RESULTS = Path(__file__).parent / "results" / "unclip.json"
AMOUNTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7)
FRAMES = (0.0, 0.25, 0.5, 0.75, 1.0)


def pictures(split: str, count: int, seed: int):
    """``count`` seeded pictures of a split (uint8), their captions and their scenes."""
    dataset = data.ShapesDataset(length=count, image_size=32, split=split, seed=seed)
    scenes = [dataset.scene(i) for i in range(count)]
    return (*stages.preload_pairs(dataset, count), scenes)


def retrieval(image_vectors, text_vectors, keys) -> dict:
    out = {}
    for name, queries, items in (("caption_to_picture", text_vectors, image_vectors),
                                 ("picture_to_caption", image_vectors, text_vectors)):
        _, indices = unclip.retrieve(queries, items, k=5)
        out[name] = {"recall@1": round(unclip.recall_at_k(indices[:, :1], keys, keys), 4),
                     "recall@5": round(unclip.recall_at_k(indices, keys, keys), 4)}
    return out


def caption_to_picture(model: unclip.UnCLIP, pipeline: Pipeline, captions: list[str], seed: int) -> dict:
    """unCLIP with and without its prior, and the transformer's first sample, for the same captions."""
    out = {}
    for name, use_prior in (("unclip_prior", True), ("unclip_caption_vector", False)):
        start = time.perf_counter()
        images = model(captions, use_prior=use_prior)
        out[name] = {**one_picture_rates(images, captions), "s_per_image": round((time.perf_counter() - start) / len(captions), 4)}
    start, images = time.perf_counter(), []
    for i, caption in enumerate(captions):
        images.append(pipeline(caption, num_images=1, seed=seed * 100_003 + i, **SAMPLING_DEFAULTS).images[0])
    seconds = (time.perf_counter() - start) / len(captions)
    out["transformer_n1"] = {**one_picture_rates(torch.stack(images), captions), "s_per_image": round(seconds, 4)}
    return out


def edited(scene: data.Scene, attribute: str) -> data.Scene:
    """The one-object scene with the next colour (or shape) in the course's list."""
    obj = scene.objects[0]
    choices = list(data.COLOURS) if attribute == "colour" else list(data.SHAPES)
    new = choices[(choices.index(getattr(obj, attribute)) + 1) % len(choices)]
    return replace(scene, objects=(replace(obj, **{attribute: new}),))


def text_diff_edits(model: unclip.UnCLIP, scenes: list[data.Scene], image_vectors: torch.Tensor) -> dict:
    """For each amount, how often the edited picture reads as the new caption and as the old."""
    sources = [data.canonical_caption(s) for s in scenes]
    out = {}
    for attribute in ("colour", "shape"):
        targets = [data.canonical_caption(edited(s, attribute)) for s in scenes]
        source_vectors, target_vectors = (model.clip.encode_text(c) for c in (sources, targets))
        rows = []
        for amount in AMOUNTS:
            images = model.decode(unclip.text_diff(image_vectors, source_vectors, target_vectors, amount))
            rows.append({"amount": amount,
                         "reads_as_target": rate([bool(s.full_match) for s in evaluate.score_batch(images, targets)]),
                         "reads_as_source": rate([bool(s.full_match) for s in evaluate.score_batch(images, sources)])})
        out[attribute] = rows
    return out


def interpolations(model: unclip.UnCLIP, image_vectors: torch.Tensor, captions: list[str]) -> list[dict]:
    """Pairs (0, 1), (2, 3), ...: how often each frame along the great circle reads as A and as B."""
    half = len(captions) // 2
    a, b = image_vectors[0:2 * half:2], image_vectors[1:2 * half:2]
    captions_a, captions_b = captions[0:2 * half:2], captions[1:2 * half:2]
    rows = []
    for t in FRAMES:
        images = model.decode(unclip.slerp(a, b, t))
        rows.append({"t": t, "reads_as_a": rate([bool(s.full_match) for s in evaluate.score_batch(images, captions_a)]),
                     "reads_as_b": rate([bool(s.full_match) for s in evaluate.score_batch(images, captions_b)])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pictures", type=int, default=500, help="pictures per split for retrieval and round trips")
    parser.add_argument("--captions", type=int, default=100, help="captions per split for caption -> picture")
    parser.add_argument("--edits", type=int, default=200, help="single-object test pictures to edit and interpolate")
    parser.add_argument("--seed", type=int, default=7, help="the caption seed (composition.py's default)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a few pictures and captions")
    parser.add_argument("--out", default=None, help=f"default: {RESULTS} (/tmp/unclip_quick.json with --quick)")
    args = parser.parse_args()
    if args.quick:
        args.pictures, args.captions, args.edits = 20, 3, 6
    out = Path(args.out or ("/tmp/unclip_quick.json" if args.quick else RESULTS))
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, pipeline = unclip.UnCLIP.load(), Pipeline.load()
    results = {}
    with torch.no_grad():
        for label, split in SPLITS:
            images, captions, scenes = pictures(split, args.pictures, args.seed)
            image_vectors, text_vectors = embed(model.clip, images, captions)
            keys = [scene_key(s) for s in scenes]
            results[label] = {
                "retrieval": retrieval(image_vectors, text_vectors, keys),
                "round_trip": one_picture_rates(model.decode(image_vectors), captions),
                "caption_to_picture": caption_to_picture(
                    model, pipeline, [c for _, c in split_captions(split, args.captions, args.seed)], args.seed),
            }
            print(f"{label}: done ({time.perf_counter() - started:.0f} s)", flush=True)
        singles = []
        for scene in pictures("test", 20 * args.edits, args.seed + 1)[2]:  # one-object scenes of the test split
            if len(scene.objects) == 1 and len(singles) < args.edits:
                singles.append(scene)
        single_vectors = model.clip.encode_images(torch.stack([data.pil_to_tensor(data.render_scene(s, 32))
                                                               for s in singles]))
        edits = text_diff_edits(model, singles, single_vectors)
        frames = interpolations(model, single_vectors, [data.canonical_caption(s) for s in singles])
    report = {
        **report_header("unclip", args.threads),
        "settings": {"pictures_per_split": args.pictures, "captions_per_split": args.captions,
                     "edited_pictures": len(singles), "seed": args.seed, "quick": args.quick,
                     "transformer_sampling": SAMPLING_DEFAULTS,
                     "checkpoints": {name: "shipped" for name in ("clip", "unclip_decoder", "unclip_prior", "dvae",
                                                                  "dalle", "tokenizer")}},
        "units": "recall@k: fraction of queries with an item of the same scene among the k nearest; rates: fraction "
                 "of pictures the course scorer reads fully right (full_match) or right in one attribute, with 95% "
                 "Wilson intervals; s_per_image: seconds of one thread per picture",
        "results": results,
        "text_diff": edits,
        "interpolation": frames,
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    write_report(report, out, tables(report))


def tables(report: dict) -> str:
    pct = lambda entry: "-" if entry["rate"] is None else f"{entry['rate']:.0%}"  # noqa: E731
    lines = ["| pictures | caption -> picture R@1 / R@5 | picture -> caption R@1 / R@5 | decoder round trip |",
             "| --- | --- | --- | --- |"]
    for label, r in report["results"].items():
        t2i, i2t = r["retrieval"]["caption_to_picture"], r["retrieval"]["picture_to_caption"]
        lines.append(f"| {label} | {t2i['recall@1']:.0%} / {t2i['recall@5']:.0%} | "
                     f"{i2t['recall@1']:.0%} / {i2t['recall@5']:.0%} | {pct(r['round_trip']['full_match'])} |")
    names = {"unclip_prior": "unCLIP (prior)", "unclip_caption_vector": "unCLIP (caption vector, no prior)",
             "transformer_n1": "transformer, N = 1"}
    lines += ["", "| captions | method | full match [95% CI] | " + " | ".join(ATTRIBUTES) + " | s / image |",
              "|" + " --- |" * (4 + len(ATTRIBUTES))]
    for label, r in report["results"].items():
        for method, s in r["caption_to_picture"].items():
            full = s["full_match"]
            lines.append(f"| {label} (n={s['captions']}) | {names[method]} | {pct(full)} "
                         f"[{full['ci95'][0]:.0%}, {full['ci95'][1]:.0%}] | "
                         + " | ".join(pct(s[a]) for a in ATTRIBUTES) + f" | {s['s_per_image']:.3f} |")
    lines += ["", "| edit | " + " | ".join(f"{a:g}" for a in AMOUNTS) + " |", "|" + " --- |" * (1 + len(AMOUNTS))]
    for attribute, rows in report["text_diff"].items():
        lines.append(f"| {attribute}: reads as new | " + " | ".join(pct(r["reads_as_target"]) for r in rows) + " |")
        lines.append(f"| {attribute}: reads as old | " + " | ".join(pct(r["reads_as_source"]) for r in rows) + " |")
    lines += ["", "| slerp t | " + " | ".join(f"{r['t']:g}" for r in report["interpolation"]) + " |",
              "|" + " --- |" * (1 + len(FRAMES)),
              "| reads as A | " + " | ".join(pct(r["reads_as_a"]) for r in report["interpolation"]) + " |",
              "| reads as B | " + " | ".join(pct(r["reads_as_b"]) for r in report["interpolation"]) + " |"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
