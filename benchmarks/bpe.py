"""How fast is dalle_lesson.bpe? Training time and encoding throughput on this machine.

    OMP_NUM_THREADS=1 python benchmarks/bpe.py          # writes benchmarks/results/bpe.json

Measures, in one run:
* training time for vocabularies of 4096 and 16384 on the course captions (shapes captions +
  emoji names) and on a 10 MB English-like text this script generates (deterministic);
* encoding throughput (captions/s) of ``BPETokenizer.from_clip()`` next to open_clip's own
  ``SimpleTokenizer`` on the same captions, first pass (empty word caches) and warm (median
  of repeats), with a check that both give the same ids.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import statistics
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

from dalle_lesson import bpe
from dalle_lesson.bpe import BPETokenizer, course_corpus

plain_ascii = bpe._is_plain_ascii

RESULTS = Path(__file__).resolve().parent / "results" / "bpe.json"


def generated_text(n_bytes: int, seed: int = 0) -> list[str]:
    """About ``n_bytes`` of text, one sentence per line: a Zipf-distributed lexicon of made-up
    words, capitals, punctuation, numbers, contractions, and a little Cyrillic, Greek and emoji."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "st", "er", "ing", "ion", "qu"]
    foreign = ["при", "вет", "мир", "κα", "λη", "μέ", "ρα"]
    lexicon = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 5))) for _ in range(150_000)})
    rng.shuffle(lexicon)
    lexicon += ["".join(rng.choice(foreign) for _ in range(rng.randint(2, 3))) for _ in range(500)]
    cumulative = list(itertools.accumulate(1 / (rank + 10) ** 1.1 for rank in range(len(lexicon))))
    extras = ["'s", "n't", "'ll", ",", ";", " -", " 1999", " 42", " 3.5", " 🙂", " (see above)", ' "quoted"']
    lines, size = [], 0
    while size < n_bytes:
        words = rng.choices(lexicon, cum_weights=cumulative, k=rng.randint(5, 25))
        words[0] = words[0].capitalize()
        line = " ".join(word + (rng.choice(extras) if rng.random() < 0.08 else "") for word in words) + rng.choice(".?!")
        lines.append(line)
        size += len(line.encode()) + 1
    return lines


def time_training(texts: list[str], vocab_size: int) -> dict:
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokenizer = BPETokenizer().train(texts, vocab_size)
    seconds = time.perf_counter() - start
    return {
        "vocab_size_asked": vocab_size,
        "vocab_size_reached": tokenizer.vocab_size,
        "merges": len(tokenizer.merges),
        "train_s": round(seconds, 2),
        "note": str(caught[0].message) if caught else "",
    }


def encode_throughput(captions: list[str], repeats: int) -> dict:
    from open_clip.tokenizer import SimpleTokenizer

    ours, theirs = BPETokenizer.from_clip(), SimpleTokenizer()
    assert all(ours.encode(c) == theirs.encode(c) for c in captions[:2000]), "from_clip() and open_clip disagree"
    ours, theirs = BPETokenizer.from_clip(), SimpleTokenizer()  # fresh, empty caches

    def rate(encode) -> float:
        start = time.perf_counter()
        for caption in captions:
            encode(caption)
        return len(captions) / (time.perf_counter() - start)

    result = {"captions": len(captions), "repeats": repeats}
    # First pass: every new word goes through BPE; the two alternate so load changes hit both.
    result["ours_first_pass_captions_per_s"] = round(rate(ours.encode))
    result["open_clip_first_pass_captions_per_s"] = round(rate(theirs.encode))
    ours_rates, theirs_rates = [], []
    for _ in range(repeats):
        ours_rates.append(rate(ours.encode))
        theirs_rates.append(rate(theirs.encode))
    result["ours_captions_per_s"] = round(statistics.median(ours_rates))
    result["open_clip_captions_per_s"] = round(statistics.median(theirs_rates))
    result["speedup_ours_over_open_clip"] = round(statistics.median(o / t for o, t in zip(ours_rates, theirs_rates)), 2)
    # Where the speed comes from: the same, but without skipping ftfy for plain ASCII captions.
    bpe._is_plain_ascii = lambda text: False
    try:
        slow_rates = [rate(ours.encode) for _ in range(repeats)]
    finally:
        bpe._is_plain_ascii = plain_ascii
    result["ours_without_ascii_shortcut_captions_per_s"] = round(statistics.median(slow_rates))
    return result


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-mb", type=float, default=10.0, help="size of the generated text")
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(1)

    corpora = {"course_captions": course_corpus()}
    corpora[f"generated_{args.text_mb:g}mb"] = generated_text(int(args.text_mb * 1_000_000))
    training = []
    for name, texts in corpora.items():
        for vocab_size in args.vocab_sizes:
            row = {"corpus": name, "texts": len(texts), "corpus_mb": round(sum(len(t.encode()) + 1 for t in texts) / 1e6, 2)}
            row |= time_training(texts, vocab_size)
            training.append(row)
            print(row, flush=True)

    rng = random.Random(0)
    captions = rng.sample(corpora["course_captions"], 6000) + rng.sample(corpora[f"generated_{args.text_mb:g}mb"], 4000)
    rng.shuffle(captions)
    encoding = encode_throughput(captions, args.repeats)

    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{cpu_name()}, {os.cpu_count()} cpus, {platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "training": training,
        "encoding": encoding,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    print(f"\ntraining (single run each)\n{'corpus':<20}{'MB':>7}{'vocab asked':>13}{'reached':>9}{'seconds':>9}")
    for row in training:
        print(f"{row['corpus']:<20}{row['corpus_mb']:>7}{row['vocab_size_asked']:>13}{row['vocab_size_reached']:>9}{row['train_s']:>9}")
    e = encoding
    print(f"\nencoding {e['captions']} captions (captions/s)   from_clip()   open_clip")
    print(f"first pass (empty caches)        {e['ours_first_pass_captions_per_s']:>11} {e['open_clip_first_pass_captions_per_s']:>11}")
    print(f"warm, median of {e['repeats']}               {e['ours_captions_per_s']:>11} {e['open_clip_captions_per_s']:>11}"
          f"   ({e['speedup_ours_over_open_clip']}x)")
    print(f"warm, without the ASCII shortcut  {e['ours_without_ascii_shortcut_captions_per_s']:>11}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
