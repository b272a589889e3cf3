"""Machine-readable benchmark results: each script prints one `BENCH {json}` line per measurement
beside its table, and benchmarks/gpu_rows.py (behind gpu.sh) collects them into one JSON file.

A line is printed as soon as its measurement exists, so a process stopped at its time limit
still leaves what it had measured (e.g. a compile time without the step time).
"""

from __future__ import annotations

import json

PREFIX = "BENCH "


def emit(**fields) -> None:
    print(PREFIX + json.dumps(fields, sort_keys=True), flush=True)


def parse(line: str) -> dict | None:
    """The fields of a BENCH line, else None."""
    return json.loads(line[len(PREFIX) :]) if line.startswith(PREFIX) else None


def missing_module(*names: str) -> str | None:
    """The first of `names` that cannot be imported (a peer that is not installed), else None."""
    import importlib.util

    return next((name for name in names if importlib.util.find_spec(name) is None), None)


def skip_peer(bench: str, preset: str, missing: str) -> None:
    print(f"peer skipped: {missing} is not installed")
    emit(bench=bench, preset=preset, side="peer", skipped=f"{missing} not installed")
