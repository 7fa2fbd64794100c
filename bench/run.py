"""Every benchmark in one run: bench/results/<date>.json, then docs/benchmarks.md and its plots.

Each benchmark boots its own systemd sandbox, runs modeld from the repository's units and
measures against a baseline in the same run, interleaved (see each script's docstring and
bench/README.md). The full profile is sized to reproduce every figure in under 20 minutes
on a 2-core machine; ``--quick`` runs a few rounds of each to keep the code working (its
figures mean nothing, and its report says so and goes under bench/results/, not docs/).

Usage: bench/run [--quick] [--only NAME,...] [--results DIR] [--docs DIR]
       bench/run --render bench/results/<date>.json [--docs DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "service"))
sys.path.insert(0, str(BENCH))

import control_plane  # noqa: E402
import cpu_per_cycle  # noqa: E402
import eviction  # noqa: E402
import faults  # noqa: E402
import front_door  # noqa: E402
import llama  # noqa: E402
import load_overhead  # noqa: E402
import machine  # noqa: E402
import readiness  # noqa: E402
from stats import figure  # noqa: E402

SCHEMA = 1
RESOLVE_MS = 5.0


@dataclasses.dataclass(frozen=True)
class Profile:
    """Round counts of one run (the full one is sized for < 20 min on 2 cores)."""

    name: str
    load_rounds: int
    load_max_rounds: int
    load_budget_s: float
    readiness_rounds: int
    readiness_delays: tuple[float, ...]
    swap_rounds: int
    pressure: bool
    levels: tuple[int, ...]
    calls: int
    idle_s: float
    cycle_batches: int
    cycles_per_batch: int
    front_rounds: int
    stream_tokens: int
    stream_rounds: int
    clients: int
    crash_rounds: int
    readoption_levels: tuple[int, ...]
    readoption_rounds: int
    llama_preset: str
    llama_load_rounds: int
    llama_rounds: int
    llama_tokens: int


FULL = Profile(
    name="full",
    load_rounds=30,  # then on until a 5 ms difference is resolved, within the budget
    load_max_rounds=400,
    load_budget_s=200.0,
    readiness_rounds=6,
    readiness_delays=(0.0, 0.5, 3.0),
    swap_rounds=30,
    pressure=True,
    levels=(1, 16, 64),
    calls=500,
    idle_s=60.0,
    cycle_batches=25,
    cycles_per_batch=40,  # 1,000 cycles
    front_rounds=600,
    stream_tokens=10000,
    stream_rounds=15,
    clients=64,
    crash_rounds=20,
    readoption_levels=(1, 16, 64),
    readoption_rounds=4,
    llama_preset="large",
    llama_load_rounds=8,
    llama_rounds=5,
    llama_tokens=64,
)

QUICK = Profile(
    name="quick",
    load_rounds=3,
    load_max_rounds=3,
    load_budget_s=30.0,
    readiness_rounds=1,
    readiness_delays=(0.0,),
    swap_rounds=2,
    pressure=False,
    levels=(1, 3),
    calls=20,
    idle_s=1.0,
    cycle_batches=2,
    cycles_per_batch=3,
    front_rounds=30,
    stream_tokens=200,
    stream_rounds=2,
    clients=4,
    crash_rounds=2,
    readoption_levels=(1,),
    readoption_rounds=1,
    llama_preset="tiny",
    llama_load_rounds=1,
    llama_rounds=1,
    llama_tokens=8,
)


def _llama(p: Profile) -> dict[str, Any]:
    if importlib.util.find_spec("llama_cpp") is None:
        return {"skipped": "llama-cpp-python is not installed (scripts/setup installs it)"}
    return llama.run(p.llama_rounds, p.llama_load_rounds, p.llama_tokens, preset=p.llama_preset)


Step = tuple[Callable[[Profile], dict[str, Any]], Callable[[dict[str, Any]], list[dict[str, Any]]]]
STEPS: dict[str, Step] = {
    "load": (
        lambda p: load_overhead.run(
            p.load_rounds,
            max_rounds=p.load_max_rounds,
            resolve_ms=RESOLVE_MS,
            budget_s=p.load_budget_s,
        ),
        lambda r: [*load_overhead.figures(r), _resolution_figure(r)],
    ),
    "readiness": (
        lambda p: readiness.run(p.readiness_rounds, p.readiness_delays),
        readiness.figures,
    ),
    "swap": (lambda p: eviction.run(p.swap_rounds, pressure=p.pressure), eviction.figures),
    "control_plane": (
        lambda p: control_plane.run(p.levels, p.calls, p.idle_s),
        control_plane.figures,
    ),
    "cycles": (
        lambda p: cpu_per_cycle.run(p.cycle_batches, p.cycles_per_batch, 3),
        cpu_per_cycle.figures,
    ),
    "front_door": (
        lambda p: front_door.run(p.front_rounds, p.stream_tokens, p.stream_rounds, p.clients),
        front_door.figures,
    ),
    "faults": (
        lambda p: faults.run(p.crash_rounds, p.readoption_levels, p.readoption_rounds),
        faults.figures,
    ),
    "llama": (_llama, lambda r: [] if "skipped" in r else llama.figures(r)),
}


def _resolution_figure(result: dict[str, Any]) -> dict[str, Any]:
    res = result["resolution"]
    return figure(
        "load",
        f"rounds needed to resolve {res['difference_ms']:g} ms in modeld - scope "
        f"(robust sigma of the paired differences {res['sigma_paired_ms']} ms)",
        "rounds",
        [float(res["rounds_needed"])],
        baseline=[float(res["rounds_run"])],
        baseline_name="rounds run",
        target_text="resolved when the ratio is <= 1",
        digits=0,
    )


def run_all(profile: Profile, only: list[str]) -> dict[str, Any]:
    """Run the steps (all, or ``only``) in order; a failing step is recorded, not fatal."""
    started = datetime.datetime.now().astimezone()
    data: dict[str, Any] = {
        "schema": SCHEMA,
        "mode": profile.name,
        "started": started.isoformat(timespec="seconds"),
        "machine": machine.describe(),
        "profile": dataclasses.asdict(profile),
        "results": {},
        "durations_s": {},
        "errors": {},
        "figures": [],
    }
    t0 = time.monotonic()
    for name, (measure, figures) in STEPS.items():
        if only and name not in only:
            continue
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        start = time.monotonic()
        try:
            result = measure(profile)
            data["results"][name] = result
            data["figures"].extend(figures(result))
        except Exception:
            data["errors"][name] = traceback.format_exc()
            print(data["errors"][name], file=sys.stderr)
        data["durations_s"][name] = round(time.monotonic() - start, 1)
        print(f"bench: {name} took {data['durations_s'][name]} s", file=sys.stderr, flush=True)
    data["duration_s"] = round(time.monotonic() - t0, 1)
    data["machine"]["load_average_at_end"] = machine.load_average()
    return data


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: None instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few rounds each (smoke run)")
    parser.add_argument("--only", default="", help=f"comma-separated: {', '.join(STEPS)}")
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    parser.add_argument(
        "--docs",
        type=Path,
        help="where benchmarks.md and its plots go (default: docs/; with --quick or --only:"
        " quick-docs/ or partial-docs/ in the results directory)",
    )
    parser.add_argument("--render", type=Path, metavar="JSON", help="only render this result")
    args = parser.parse_args(argv)

    from render import render

    if args.render:
        data = json.loads(args.render.read_text())
        data.setdefault("result_file", args.render.name)
        args.quick = data["mode"] != "full"
        docs = args.docs or _default_docs(args, partial=args.render.stem.endswith("-partial"))
        for path in render(data, docs):
            print(path)
        return 0

    only = [name for name in args.only.split(",") if name]
    unknown = sorted(set(only) - set(STEPS))
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    profile = QUICK if args.quick else FULL
    data = _finite(run_all(profile, only))
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    suffix = ("-quick" if args.quick else "") + ("-partial" if only else "")
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"{stamp}{suffix}.json"
    data["result_file"] = out.name
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(out)
    docs = args.docs or _default_docs(args, partial=bool(only))
    for path in render(data, docs):
        print(path)
    if data["errors"]:
        print(f"bench: failed: {', '.join(data['errors'])}", file=sys.stderr)
        return 1
    return 0


def _default_docs(args: argparse.Namespace, *, partial: bool) -> Path:
    """docs/ for a full run of everything; a smoke or partial run's report never replaces
    it and goes under the results directory."""
    if args.quick:
        return Path(args.results) / "quick-docs"
    if partial:
        return Path(args.results) / "partial-docs"
    return REPO / "docs"


if __name__ == "__main__":
    raise SystemExit(main())
