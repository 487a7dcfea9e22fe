"""Benchmark: dedup_batch.cluster.DBSCAN against sklearn.cluster.DBSCAN, same data, same run.

One command: ``python benchmarks/bench_cluster.py [--quick]``. Each side runs in its own
subprocess (time and peak RSS measured there); every scikit-learn subprocess runs under an
address-space limit (RLIMIT_AS, 12 GiB by default) so that a case that does not fit fails
cleanly instead of OOM-killing a shared machine. Printed: seconds, peak RSS, the ratios, and
whether labels (numbering included) are identical.

Data: 256-d unit vectors in near-duplicate groups (a group centre plus small noise), the group
centres drawn with a decaying spectrum as real image embeddings have (variance of the k-th
principal direction ~ k^-1.2), eps 0.6 euclidean (min_samples=1, the pipeline's setting).
The heavy-repetition case repeats one vector 20,000 times among 50,000 rows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

D = 256
EPS = 0.6
SK_LIMIT = 12 << 30


def make_data(n: int, repeat: int = 0, seed: int = 0) -> np.ndarray:
    """(n, 256) float32 unit vectors: groups of ~4 near-duplicates around decaying-spectrum
    centres; ``repeat`` rows replaced by one vector (placeholder images)."""
    rng = np.random.default_rng(seed)
    n_groups = max(1, n // 4)
    scale = (np.arange(1, D + 1) ** -0.6).astype(np.float32)
    X = np.empty((n, D), np.float32)
    group = rng.integers(0, n_groups, n)
    step = 100_000
    centres = rng.standard_normal((n_groups, D), dtype=np.float32) * scale
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    for s in range(0, n, step):
        g = group[s : s + step]
        x = centres[g] + 0.25 / np.sqrt(D) * rng.standard_normal((len(g), D), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        X[s : s + step] = x
    if repeat:
        X[rng.choice(n, repeat, replace=False)] = X[0]
    return X


def child(side: str, n: int, repeat: int, out: str) -> None:
    """Run one side and write {seconds, peak_rss, n_clusters} + labels to ``out``."""
    if side == "sklearn":
        resource.setrlimit(resource.RLIMIT_AS, (SK_LIMIT, SK_LIMIT))
    X = make_data(n, repeat)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if side == "sklearn":
        from sklearn.cluster import DBSCAN
    else:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
        from dedup_batch.cluster import DBSCAN
    t = time.perf_counter()
    labels = DBSCAN(eps=EPS, min_samples=1, n_jobs=None).fit(X).labels_
    secs = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    np.save(out + ".npy", labels)
    with open(out, "w") as f:
        json.dump(
            {
                "seconds": secs,
                "peak_rss": peak,
                "data_rss": base * 1024,
                "n_clusters": int(labels.max()) + 1,
            },
            f,
        )


def run_side(side: str, n: int, repeat: int, timeout: float) -> dict | None:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        cmd = [sys.executable, __file__, "--child", side, str(n), str(repeat), out]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if p.returncode != 0 or not os.path.exists(out):
            last = (p.stderr.strip().splitlines() or ["?"])[-1]
            return {"error": f"failed ({last[:80]})"}
        with open(out) as f:
            r = json.load(f)
        r["labels"] = np.load(out + ".npy")
        return r


def fmt(r: dict | None) -> str:
    if r is None:
        return "skipped"
    if "error" in r:
        return r["error"]
    return f"{r['seconds']:8.1f} s {r['peak_rss'] / 2**30:6.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20k and heavy repetition only")
    ap.add_argument(
        "--case",
        action="append",
        metavar="N[:REPEATS]",
        help="run only this case (repeatable), e.g. --case 1000000 or --case 50000:20000; "
        "sklearn runs too where it fits",
    )
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        side, n, repeat, out = a.child
        child(side, int(n), int(repeat), out)
        return
    cases = [(20_000, 0, True), (50_000, 20_000, True)]
    if not a.quick:
        cases += [
            (50_000, 0, True),
            (100_000, 0, True),
            (100_000, 40_000, False),
            (1_000_000, 0, False),
        ]
    if a.case:
        picked = [tuple(int(x) for x in [*c.split(":"), "0"][:2]) for c in a.case]
        cases = [(n, r, n <= 100_000 and not r > 20_000) for n, r in picked]
    print(f"DBSCAN eps={EPS} min_samples=1, {D}-d float32, {os.cpu_count()} cores")
    print(f"{'case':>24} | {'sklearn':>20} | {'dedup_batch':>20} | speed  | memory | same labels")
    for n, repeat, with_sk in cases:
        name = f"{n:,} rows" + (f", {repeat:,} repeats" if repeat else "")
        sk = run_side("sklearn", n, repeat, 3600) if with_sk else None
        ours = run_side("ours", n, repeat, 3600)
        ok = sk and "error" not in sk and ours and "error" not in ours
        speed = f"{sk['seconds'] / ours['seconds']:5.1f}x" if ok else "   - "
        mem = f"{sk['peak_rss'] / ours['peak_rss']:5.1f}x" if ok else "   - "
        same = np.array_equal(sk["labels"], ours["labels"]) if ok else "-"
        print(
            f"{name:>24} | {fmt(sk):>20} | {fmt(ours):>20} | {speed} | {mem} | {same}", flush=True
        )


if __name__ == "__main__":
    main()
