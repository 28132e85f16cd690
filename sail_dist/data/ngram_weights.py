"""`sail-data balance`: n-gram-level linguistic balancing of a JSONL corpus (SAIL-VL2 report, sec. 3.2.2).

The report resamples multi-task pre-training data so that over-represented phrasings of the responses (templated
answers such as "The image shows a ...") do not dominate what the model learns to say. This tool turns that idea
into per-record sampling weights that the loader honours (`data.sources[i].record_weights`):

  f_g    corpus frequency of response n-gram g (word n-grams of each assistant turn, lower-cased; a turn shorter
         than n words counts as one gram of all its words)
  s_r    geometric mean of f_g over the n-gram occurrences of record r: exp(mean_g log f_g)
  w_r    s_r ** -alpha, scaled to mean 1 over the valid records

A record made of unique phrasing has s_r = 1; a record whose response repeats a phrasing k times across the corpus
has s_r about k, so with alpha = 1 the k copies together weigh about one record (full flattening) and with the
default alpha = 0.5 about sqrt(k) (the phrase-level counterpart of data.size_temperature = 2).

Streaming in fixed memory (three passes over the file, nothing per record is kept):
  * f_g comes from a count-min sketch (depth d x width w int64 counters, independent hash rows): an estimate that
    never undercounts and, with probability >= 1 - exp(-d), overcounts by at most e / w * N (N = n-gram
    occurrences in the corpus); defaults d = 4, w = 2**20 (32 MiB): within 2.6e-6 * N with probability 0.98.
  * the top phrasings come from a Misra-Gries summary of K candidates (every n-gram with a share above 1 / K is in
    it), counted exactly in the second pass, with and without the weights.
  * distinct-n-gram ratio = distinct n-grams / n-gram occurrences expected in the first B draws of a pass of the
    loader's mix over the source, plain (before) and weighted (after), at the same budget B (default: the weights'
    effective sample size (sum w)^2 / sum w^2; at B = one whole pass a weighted mix can only repeat records, so
    its ratio cannot beat the corpus's). SourceMix (sail_dist/data/records.py) draws a pass by systematic sampling:
    record r (weights of mean 1) is held floor(w_r) or floor(w_r) + 1 times in the shuffled pass, each copy
    outside the first B draws with probability about q = 1 - B / rows; an n-gram is present unless every record
    holding it is absent (records taken as independent); occurrences are B / rows * sum_r w_r L_r. The n-grams
    are counted through the first sketch row used as a hashed presence table: collisions make both figures low
    by about distinct / (2 w) (0.5 % at 10k distinct n-grams per 1M cells).

Output: a text file with one weight per line of the JSONL (blank lines get 0, never read), '#' header lines.
Lines that are not valid records are reported with file:line and the loader's reason, and get weight 1 (the
loader then counts or raises them under data.on_bad_sample).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import zlib
from dataclasses import dataclass, field

import numpy as np

from sail_dist.data.records import BadSample, decode_line, parse_record

_WORD = re.compile(r"\w+")
# n-gram hashes (and records) buffered before they are added to the sketch: bounds the buffer, whatever the corpus
_FLUSH, _FLUSH_RECORDS = 1 << 18, 1024
_PRIME = np.uint64(0x9E3779B97F4A7C15)


def response_ngrams(turn_texts: list[str], n: int) -> list[tuple[str, ...]]:
    """Word n-grams of each assistant turn (lower-cased \\w+ words); a turn shorter than n words is one gram."""
    out: list[tuple[str, ...]] = []
    for text in turn_texts:
        words = _WORD.findall(text.lower())
        if len(words) >= n:
            out += [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        elif words:
            out.append(tuple(words))
    return out


def _gram_hashes(grams: list[tuple[str, ...]]) -> np.ndarray:
    """Stable 64-bit hash per gram (crc32 of each word, combined as a polynomial; the same in every process)."""
    h = np.zeros(len(grams), dtype=np.uint64)
    for j, g in enumerate(grams):
        x = len(g)
        for word in g:
            x = (x * 0x100000001B3 + zlib.crc32(word.encode())) & 0xFFFFFFFFFFFFFFFF
        h[j] = x
    return h * _PRIME


class CountMinSketch:
    """depth x width int64 counters; `add` and `query` take arrays of 64-bit item hashes."""

    def __init__(self, depth: int, width: int, seed: int = 0x5A11):
        if width & (width - 1) or width < 2:
            raise ValueError(f"sketch width must be a power of two, got {width}")
        self.depth, self.width, self.shift = depth, width, np.uint64(64 - int(math.log2(width)))
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 2 ** 63, size=depth, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
        self.b = rng.integers(0, 2 ** 63, size=depth, dtype=np.uint64)
        self.table = np.zeros((depth, width), dtype=np.int64)

    @property
    def nbytes(self) -> int:
        return self.table.nbytes

    def rows(self, h: np.ndarray) -> np.ndarray:
        """[depth, len(h)] column of each item in each row (multiply-shift hashing)."""
        with np.errstate(over="ignore"):
            return ((h[None, :] * self.a[:, None] + self.b[:, None]) >> self.shift).astype(np.int64)

    def add(self, h: np.ndarray) -> None:
        for j, cols in enumerate(self.rows(h)):
            np.add.at(self.table[j], cols, 1)

    def query(self, h: np.ndarray) -> np.ndarray:
        cols = self.rows(h)
        return self.table[np.arange(self.depth)[:, None], cols].min(0)


class MisraGries:
    """At most k counters; every item with frequency > N / (k + 1) survives (counts are lower bounds)."""

    def __init__(self, k: int):
        self.k, self.counts = k, {}

    def add(self, item) -> None:
        c = self.counts
        if item in c:
            c[item] += 1
        elif len(c) < self.k:
            c[item] = 1
        else:  # decrement all: amortised O(1), as each decrement pays for an earlier increment
            for key in list(c):
                c[key] -= 1
                if not c[key]:
                    del c[key]


@dataclass
class BalanceReport:
    path: str
    out: str
    n: int
    alpha: float
    records: int  # valid records
    lines: int  # lines of the file
    bad: list[str] = field(default_factory=list)  # "file:line: reason ..." of every line that is not a record
    ngrams: int = 0  # n-gram occurrences in the responses
    budget: int = 0  # draws the distinct ratios are measured over
    distinct_before: float = 0.0  # expected distinct n-grams / occurrences in `budget` draws of the plain mix
    distinct_after: float = 0.0  # the same for the mix with the weights
    top_before: list[tuple[str, float]] = field(default_factory=list)  # (phrasing, share of n-gram occurrences)
    top_after: list[tuple[str, float]] = field(default_factory=list)  # expected share under the weights
    weight_min: float = 0.0
    weight_max: float = 0.0
    sketch_bytes: int = 0  # count-min table + presence tables: fixed by depth and width
    candidates: int = 0  # Misra-Gries candidates kept (<= --candidates)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _records(path: str):
    """(lineno, record texts of assistant turns or None for a blank line, BadSample or None)."""
    root = os.path.dirname(os.path.abspath(path))
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                yield lineno, None, None
                continue
            where = f"{path}:{lineno}"
            try:
                rec = parse_record(decode_line(raw, where), where, f"balance:{lineno}", root)
            except BadSample as e:
                yield lineno, None, e
                continue
            yield lineno, [t.text for t in rec.turns if t.role == "assistant"], None


def _weights(path: str):
    """The weights file's values, one per JSONL line, streamed."""
    with open(path) as f:
        for line in f:
            if not line.startswith("#"):
                yield float(line)


def balance(path: str, out: str, n: int = 3, alpha: float = 0.5, width: int = 1 << 20, depth: int = 4,
            top: int = 10, candidates: int = 4096, budget: int = 0, log=None) -> BalanceReport:
    """Count response n-grams of `path`, write per-line sampling weights to `out`, return the statistics."""
    if n < 1 or alpha < 0 or depth < 1 or candidates < 1:
        raise ValueError(f"need n >= 1, alpha >= 0, depth >= 1, candidates >= 1 (got n={n}, alpha={alpha}, "
                         f"depth={depth}, candidates={candidates})")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such JSONL file")
    cms = CountMinSketch(depth, width)
    mg = MisraGries(candidates)
    rep = BalanceReport(path=path, out=out, n=n, alpha=alpha, records=0, lines=0)

    # pass 1: frequencies (sketch) and heavy-hitter candidates
    pending: list[np.ndarray] = []
    n_pending = 0
    for lineno, texts, bad in _records(path):
        rep.lines = lineno
        if bad is not None:
            rep.bad.append(bad.message())
            if log is not None and len(rep.bad) <= 20:
                log(bad.message())
            continue
        if texts is None:
            continue
        rep.records += 1
        grams = response_ngrams(texts, n)
        rep.ngrams += len(grams)
        for g in grams:
            mg.add(g)
        pending.append(_gram_hashes(grams))
        n_pending += len(grams)
        if n_pending >= _FLUSH or len(pending) >= _FLUSH_RECORDS:
            cms.add(np.concatenate(pending))
            pending, n_pending = [], 0
    if pending:
        cms.add(np.concatenate(pending))
    if rep.records == 0:
        raise ValueError(f"{path}: no valid records ({len(rep.bad)} bad lines; first: "
                         f"{rep.bad[0] if rep.bad else 'the file is empty'})")

    # pass 2: weights; exact candidate counts
    cand = {g: [0, 0.0] for g in mg.counts}  # gram -> [count, weighted count]
    mg = None
    raw_sum, weighted_ngrams = 0.0, 0.0
    tmp = out + ".tmp"
    wmin, wmax = math.inf, 0.0
    with open(tmp, "w") as f:
        for lineno, texts, bad in _records(path):
            if bad is not None:
                f.write("1\n")
                continue
            if texts is None:
                f.write("0\n")
                continue
            grams = response_ngrams(texts, n)
            if grams:
                h = _gram_hashes(grams)
                w = math.exp(-alpha * float(np.log(cms.query(h).astype(np.float64)).mean()))
            else:
                w = 1.0
            for g in grams:
                c = cand.get(g)
                if c is not None:
                    c[0] += 1
                    c[1] += w
            raw_sum += w
            weighted_ngrams += w * len(grams)
            wmin, wmax = min(wmin, w), max(wmax, w)
            f.write(f"r{w!r}\n")  # "r": a record's raw weight, scaled below
    scale = rep.records / raw_sum  # mean 1 over the valid records
    with open(tmp) as src, open(out, "w") as dst:
        dst.write(f"# sail-data balance: weights for {os.path.abspath(path)} ({rep.lines} lines; n={n} "
                  f"alpha={alpha}; w = (geometric mean n-gram frequency)^-alpha, mean 1 over valid records)\n")
        for line in src:  # blank (0) and bad (1) lines keep their value
            dst.write(f"{float(line[1:]) * scale:.6g}\n" if line.startswith("r") else line)
    os.remove(tmp)
    rep.weight_min, rep.weight_max = wmin * scale, wmax * scale

    # pass 3: expected distinct n-grams in the first B draws of a pass of the mix, plain and weighted, from the
    # weights as written (what the loader reads)
    rows = rep.records + len(rep.bad)  # the source's rows: one pass of the mix draws this many
    w_sum = w_sq = 0.0
    for w in _weights(out):
        w_sum, w_sq = w_sum + w, w_sq + w * w
    B = budget or max(1, min(rows, int(round(w_sum ** 2 / w_sq))))  # Kish effective sample size
    rep.budget = B
    q = 1.0 - min(B, rows) / rows  # a row held c times in the shuffled pass is outside the first B draws w.p. ~q^c
    absent = {"before": np.zeros(width), "after": np.zeros(width)}  # sum over records of log P(record not drawn)
    never = {k: np.zeros(width, dtype=bool) for k in absent}  # a record of the cell is drawn for certain
    rep.sketch_bytes = cms.nbytes + sum(a.nbytes for a in absent.values()) + sum(a.nbytes for a in never.values())
    occurrences = {"before": 0.0, "after": 0.0}
    for (_, texts, bad), w in zip(_records(path), _weights(out)):
        if texts is None or bad is not None:
            continue
        grams = response_ngrams(texts, n)
        if not grams:
            continue
        cells = np.unique(cms.rows(_gram_hashes(grams))[0])
        for key, wr in (("before", 1.0), ("after", w)):
            # systematic sampling: the record is held floor(w) or floor(w) + 1 times (the latter w.p. frac(w))
            lo = math.floor(wr)
            p_absent = (1 - (wr - lo)) * q ** lo + (wr - lo) * q ** (lo + 1)
            if p_absent <= 0.0:
                never[key][cells] = True
            else:
                absent[key][cells] += math.log(p_absent)
            occurrences[key] += B / rows * wr * len(grams)
    for key in absent:
        present = np.where(never[key], 1.0, -np.expm1(absent[key]))
        setattr(rep, f"distinct_{key}", float(present.sum()) / max(occurrences[key], 1e-30))
    rep.candidates = len(cand)
    by_count = sorted(cand.items(), key=lambda kv: (-kv[1][0], kv[0]))[:top]
    by_weight = sorted(cand.items(), key=lambda kv: (-kv[1][1], kv[0]))[:top]
    rep.top_before = [(" ".join(g), c / max(rep.ngrams, 1)) for g, (c, _) in by_count]
    rep.top_after = [(" ".join(g), cw / max(weighted_ngrams, 1e-30)) for g, (_, cw) in by_weight]
    return rep


def main(argv: list[str] | None = None) -> int:
    """`sail-data balance IN.jsonl [--out W] [--n 3] [--alpha 0.5] ...`: write per-record sampling weights."""
    ap = argparse.ArgumentParser(prog="sail-data balance", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("jsonl", help="conversation records, one JSON object per line (as in data.sources)")
    ap.add_argument("--out", default="", help="weights file (default: <jsonl>.weights); use it as "
                    "data.sources[i].record_weights")
    ap.add_argument("--n", type=int, default=3, help="n-gram order (words)")
    ap.add_argument("--alpha", type=float, default=0.5, help="w = (geometric mean n-gram frequency)^-alpha; "
                    "0 = uniform, 1 = full flattening")
    ap.add_argument("--width", type=int, default=1 << 20, help="count-min sketch width (a power of two)")
    ap.add_argument("--depth", type=int, default=4, help="count-min sketch depth (hash rows)")
    ap.add_argument("--top", type=int, default=10, help="phrasings to print")
    ap.add_argument("--candidates", type=int, default=4096, help="Misra-Gries heavy-hitter candidates")
    ap.add_argument("--budget", type=int, default=0, help="draws the distinct-n-gram ratios are measured over "
                    "(default: the weights' effective sample size (sum w)^2 / sum w^2)")
    args = ap.parse_args(argv)
    out = args.out or args.jsonl + ".weights"
    try:
        rep = balance(args.jsonl, out, args.n, args.alpha, args.width, args.depth, args.top, args.candidates,
                      args.budget, log=lambda m: print(m, file=sys.stderr))
    except (ValueError, FileNotFoundError) as e:
        print(f"sail-data balance: {e}", file=sys.stderr)
        return 2
    if len(rep.bad) > 20:
        print(f"... and {len(rep.bad) - 20} more bad lines", file=sys.stderr)
    print(f"{rep.path}: {rep.records} records, {len(rep.bad)} bad lines, {rep.ngrams} response {rep.n}-grams; "
          f"weights in [{rep.weight_min:.4g}, {rep.weight_max:.4g}] -> {rep.out}")
    print(f"distinct-{rep.n}-gram ratio (distinct / occurrences, expected in {rep.budget} draws of the mix): before "
          f"{rep.distinct_before:.4f} | after (with the weights) {rep.distinct_after:.4f}")
    width = max([len(g) for g, _ in rep.top_before + rep.top_after] + [10])
    print(f"\n{'top phrasings before':<{width}}  share   | {'after (expected under the weights)':<{width}}  share")
    for (g0, s0), (g1, s1) in zip(rep.top_before, rep.top_after):
        print(f"{g0:<{width}}  {s0:.4f}  | {g1:<{width}}  {s1:.4f}")
    summary = {k: v for k, v in rep.as_dict().items() if k != "bad"}
    summary["bad_lines"] = len(rep.bad)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
