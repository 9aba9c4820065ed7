#!/usr/bin/env python3
"""A public-domain corpus that is not wikitext, written from nothing: documents of sentences drawn
from a small probabilistic grammar over a Zipf-distributed invented vocabulary. Deterministic for a
seed (Python's `random`, stdlib only). Its word frequencies have a known long tail, which is what
model collapse eats first, so it is a controlled corpus to run the lab on:

    python3 scripts/make_synthetic_corpus.py --out /tmp/synthetic.txt --mb 3
    collapse-lab run --preset lab --data /tmp/synthetic.txt --generations 3

Documents are separated by a blank line (what `--data FILE` splits on); one sentence per line.
"""
import argparse
import random

ONSETS = ["b", "br", "c", "ch", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "pl", "r",
          "s", "sh", "st", "t", "th", "tr", "v", "w", "z"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io"]
CODAS = ["", "", "n", "r", "s", "l", "m", "nd", "st", "th"]


def invent(rng, n, syllables):
    """n distinct invented words of 1..syllables syllables."""
    seen, words = set(), []
    while len(words) < n:
        w = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
                    for _ in range(rng.randint(1, syllables)))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


class Zipf:
    """Draws from a list with probability proportional to 1 / rank^s."""

    def __init__(self, rng, items, s):
        self.rng, self.items = rng, items
        weights = [1.0 / (r + 1) ** s for r in range(len(items))]
        total, acc = sum(weights), 0.0
        self.cdf = []
        for w in weights:
            acc += w / total
            self.cdf.append(acc)

    def __call__(self):
        u, lo, hi = self.rng.random(), 0, len(self.cdf) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if self.cdf[mid] < u:
                lo = mid + 1
            else:
                hi = mid
        return self.items[lo]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--mb", type=float, default=3.0, help="approximate size in megabytes")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    nouns = Zipf(rng, invent(rng, 6000, 3), 1.05)
    verbs = Zipf(rng, invent(rng, 1500, 2), 1.1)
    adjs = Zipf(rng, invent(rng, 1200, 2), 1.1)
    names = Zipf(rng, [w.capitalize() for w in invent(rng, 800, 3)], 1.0)
    dets = Zipf(rng, ["the", "a", "this", "every", "no", "some", "that"], 1.2)
    preps = Zipf(rng, ["of", "in", "on", "with", "from", "under", "near", "after"], 1.1)
    conj = Zipf(rng, ["and", "but", "so", "while", "because"], 1.3)

    def np(depth=0):
        words = [dets()]
        if rng.random() < 0.4:
            words.append(adjs())
        words.append(nouns())
        if depth < 2 and rng.random() < 0.25:
            words += [preps()] + np(depth + 1)
        return words

    def clause():
        subject = [names()] if rng.random() < 0.3 else np()
        words = subject + [verbs()]
        if rng.random() < 0.8:
            words += np()
        if rng.random() < 0.3:
            words += [preps()] + np()
        return words

    def sentence():
        words = clause()
        if rng.random() < 0.3:
            words += [","] + [conj()] + clause()
        words[0] = words[0][0].upper() + words[0][1:]
        return " ".join(words) + " ."

    target, size = int(a.mb * 1e6), 0
    with open(a.out, "w", encoding="utf-8") as f:
        while size < target:
            title = "= " + " ".join(names() for _ in range(rng.randint(1, 3))) + " ="
            lines = [title] + [sentence() for _ in range(rng.randint(5, 40))]
            text = "\n".join(lines) + "\n\n"
            f.write(text)
            size += len(text.encode())


if __name__ == "__main__":
    main()
