"""Benchmark entry point: `python bench/run.py SUITE [--json FILE] [--n N]`.

Each suite prints a table and writes JSON whose top-level `figures` object holds flat numeric
keys. Suites build their own lab namespaces (root needed) and clean them up.

    kernel       event ingest, dump, commit, cache bytes/flow   (issue: kernel bridge)
    replication  two daemons on a sync link vs the real conntrackd
    accounting   what flow accounting costs event ingest (on vs off)
    compare      conntrackd-py vs conntrackd side by side: throughput, commit, resync,
                 latency, CPU, RSS, wire, loss, TCP life cycles; ratio_* figures
    hostile      cost per hostile input on the sync link (sans I/O: no root, no namespace)
    ipfix        the IPFIX export's cost against ulogd2 (bench/suite_ipfix.py, once present)

The suites share the lab's helpers (lab.bench: daemon pairs, pinning, CPU probes, kernel
load; lab.measure: the replication measurements), never each other.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

Suite = Callable[[argparse.Namespace], dict[str, float]]


def _suites() -> dict[str, Suite]:
    import suite_accounting
    import suite_kernel
    suites: dict[str, Suite] = {"kernel": suite_kernel.run, "accounting": suite_accounting.run}
    import suite_compare
    import suite_replication
    suites["replication"] = suite_replication.run
    suites["compare"] = suite_compare.run
    import suite_hostile
    suites["hostile"] = suite_hostile.run
    if (Path(__file__).resolve().parent / "suite_ipfix.py").exists():
        # the accounting helper's IPFIX suite (issue 17): listed once its file exists
        suites["ipfix"] = importlib.import_module("suite_ipfix").run
    return suites


def main() -> int:
    suites = _suites()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("suite", choices=sorted(suites))
    p.add_argument("--json", metavar="FILE", help="write the figures here")
    p.add_argument("--n", type=int, default=100_000, help="flows per measurement")
    p.add_argument("--cache-n", type=int, default=1_000_000, help="flows for the memory figure")
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args()
    t0 = time.time()
    figures = suites[args.suite](args)
    print()
    print(f"{'figure':<36} value")
    print("-" * 52)
    for k, v in figures.items():
        print(f"{k:<36} {v:,.3f}" if isinstance(v, float) else f"{k:<36} {v:,}")
    doc: dict[str, Any] = {
        "suite": args.suite,
        "figures": figures,
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                    "python": platform.python_version()},
        "n": args.n,
        "seconds": round(time.time() - t0, 1),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
