"""Run every benchmark, one after another: ``python benchmarks/run_all.py [--quick]``.

Each benchmark measures its baseline in the same run (scikit-learn's DBSCAN, a sequential pandas
read loop, the notebook's one-delete-per-object loop) and prints ratios and peak memory. Run on
an otherwise idle machine: the ratios are only as steady as the machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: script -> (full-size arguments, --quick arguments)
BENCHMARKS = {
    "bench_cluster.py": ([], ["--quick"]),
    "bench_load.py": ([], ["--rows", "50000", "--shards", "8"]),
    "bench_delete.py": ([], ["--dups", "5000"]),
    "bench_embed.py": ([], ["--quick"]),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes)")
    parser.add_argument("only", nargs="*", help="run only these scripts (e.g. bench_load.py)")
    args = parser.parse_args()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
    }
    failed = []
    for script, (full, quick) in BENCHMARKS.items():
        if args.only and script not in args.only:
            continue
        cmd = [sys.executable, str(HERE / script), *(quick if args.quick else full)]
        print(f"\n=== {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd, env=env).returncode != 0:
            failed.append(script)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
