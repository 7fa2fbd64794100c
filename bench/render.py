"""The report of one benchmark run: benchmarks.md with tables and PNG plots (matplotlib).

``render(data, docs_dir)`` reads only the run's JSON (bench/results/<date>.json), so a
report can be made again from a saved run (``bench/run --render FILE``).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

PREFIX = "benchmarks-"
SECTIONS = {
    "load": (
        "Load",
        "`Load(wait)` of the reference backend from an already-connected D-Bus client, "
        "against the physical limit (the same backend exec'ed bare until its first "
        "successful Health + LoadModel) and a raw scoped start (`systemd-run --scope`, same "
        "slice and `MemoryMax`), the three rotated round by round (`bench/load_overhead.py`). "
        "The run goes on past its minimum until the spread of the paired differences "
        "modeld - scope says a 5 ms difference is resolved (two-sided 5 % test, 80 % power, "
        "on the median), within a time budget. For backends that take 0.5 s and 3 s to load, "
        "modeld against the limit is in *Readiness policies side by side*.",
    ),
    "readiness": (
        "Readiness policies side by side",
        "Time from starting the backend to *ready to serve*, for a backend whose load takes "
        "0, 0.5 and 3 s (the reference backend's `load_delay` knob). LocalAI, Ollama and "
        "llama-swap are **re-creations of their documented polling policies, not their "
        "code**, applied to the same backend in the same run: LocalAI's Health attempts "
        "2 s apart then LoadModel; Ollama's status poll every 250 ms; llama-swap's 250 ms "
        "wait then a health check every 1 s (`bench/readiness.py`).",
    ),
    "swap": (
        "Swap inside a concurrency group",
        "`Load(b)` while `a` of the same concurrency group is loaded (modeld evicts `a`, then "
        "starts `b`) against the same by hand: `systemctl stop` of a raw scope, then a "
        "`systemd-run --scope` start until Health and LoadModel (`bench/eviction.py`, which "
        "also times the pure eviction decision and the reaction to a memory-pressure event).",
    ),
    "control_plane": (
        "Control plane",
        "D-Bus calls with 1, 16 and 64 models loaded, each interleaved with a `Peer.Ping` of "
        "modeld (the bus round trip plus modeld's event loop, no work of modeld's own) "
        "(`bench/control_plane.py`).",
    ),
    "footprint": (
        "Footprint",
        "modeld's RSS and CPU at idle with no model and with 64 loaded; its RSS and open fds "
        "along 1,000 load/unload cycles; its own CPU time per cycle (user + system from "
        "`/proc`, immune to wall-clock noise) against systemd's CPU time for the same cycles "
        "(`bench/control_plane.py`, `bench/cpu_per_cycle.py`).",
    ),
    "front_door": (
        "Front door",
        "OpenAI-compatible HTTP on `api.sock` against the same calls straight to the "
        "backend's socket, interleaved: by grpcio (what an application calling the backend "
        "directly would use) and by modeld's own HTTP/2 gRPC client (`modeld.rpc.http2`, what "
        "modeld itself calls backends with), so the second comparison is what HTTP and the "
        "routing cost (`bench/front_door.py`).",
    ),
    "faults": (
        "Faults",
        "Crash detection: `kill -9` of a ready backend until modeld's `ModelUnloaded` "
        "(`crashed`), against the kernel's exit notification of the same kill (a pidfd in the "
        "driver). Re-adoption: `systemctl restart modeld` and `kill -9` of modeld "
        "(`Restart=on-failure`, `RestartSec=1s`) with 1, 16 and 64 backends running, until "
        "modeld owns `org.modeld1` again (it does once every backend is re-adopted), against "
        "the same with none running (`bench/faults.py`). Memory pressure to first eviction "
        "is under *Swap* (`bench/eviction.py`).",
    ),
    "llama": (
        "A real engine: llama-cpp",
        "The llama-cpp backend on a GGUF model generated here (tests/ggufgen): `Load(wait)` "
        "against the same backend started raw, and tokens per second through the front door "
        "and by gRPC against llama-cpp-python in the driver's own process (`bench/llama.py`).",
    ),
}


def _number(value: float, sign: str = "") -> str:
    if abs(value) >= 1000:
        return f"{value:{sign},.0f}"
    if abs(value) >= 10:
        return f"{value:{sign}.1f}"
    return f"{value:{sign}.3g}"


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    text = _number(value) if isinstance(value, int | float) else str(value)
    return f"{text} {unit}".rstrip()


def _row(fig: dict[str, Any]) -> str:
    v, unit = fig["value"], fig["unit"]
    base = fig.get("baseline", {})
    base_text = "-"
    if base.get("name") == "target":
        base_text = f"target {_fmt(base['value'], unit)}"
    elif base:
        base_text = f"{base['name']}: {_fmt(base['median'], unit)}"
    diff = fig.get("diff")
    diff_text = _number(diff["median"], "+") if diff else "-"
    ratio = fig.get("ratio")
    cells = [
        fig["name"],
        _fmt(v["median"], unit),
        f"{_fmt(v['p25'])} - {_fmt(v['p75'])}",
        _fmt(v["p99"]),
        str(v["n"]),
        base_text,
        diff_text,
        f"**{ratio:.3f}**" if ratio is not None else "-",
        fig.get("target_text") or "-",
    ]
    return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"


TABLE_HEAD = (
    "| figure | median | p25 - p75 | p99 | n | baseline (median) | paired diff | ratio | target |\n"
    "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |"
)


def _save(fig: Figure, docs: Path, name: str) -> Path:
    path = docs / f"{PREFIX}{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _box(ax: Any, groups: dict[str, Sequence[float]], ylabel: str) -> None:
    labels = list(groups)
    ax.boxplot([groups[k] for k in labels], showfliers=True)
    ax.set_xticks(range(1, len(labels) + 1), labels)
    for i, k in enumerate(labels, start=1):
        ax.plot([i] * len(groups[k]), groups[k], ".", alpha=0.3, color="tab:blue")
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def plot_load(result: dict[str, Any], docs: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    samples = result["samples_ms"]
    _box(
        left,
        {"modeld": samples["modeld"], "scope": samples["scope"], "bare": samples["bare"]},
        "ms",
    )
    left.set_title("Load to Health + LoadModel (reference backend)")
    diffs = [m - s for m, s in zip(samples["modeld"], samples["scope"], strict=True)]
    medians, low, high = [], [], []
    for n in range(1, len(diffs) + 1):
        part = diffs[:n]
        mid = statistics.median(part)
        half = 1.96 * 1.2533 * _sigma(part) / n**0.5
        medians.append(mid)
        low.append(mid - half)
        high.append(mid + half)
    rounds = list(range(1, len(diffs) + 1))
    right.plot(rounds, medians, label="running median of modeld - scope")
    right.fill_between(rounds, low, high, alpha=0.2, label="~95 % interval of the median")
    right.axhline(0, color="black", lw=0.8)
    right.axhspan(-2.5, 2.5, color="tab:green", alpha=0.1, label="+-2.5 ms (5 ms wide)")
    right.set_xlabel("rounds")
    right.set_ylabel("ms")
    right.set_title("How many rounds resolve 5 ms")
    right.legend(fontsize=8)
    return _save(fig, docs, "load")


def _sigma(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    middle = statistics.median(values)
    return 1.4826 * statistics.median(abs(v - middle) for v in values)


def plot_readiness(result: dict[str, Any], docs: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    by_delay = result["samples_ms"]
    delays = sorted(by_delay, key=float)
    policies = list(next(iter(by_delay.values())))
    xs = [float(d) for d in delays]
    for policy in policies:
        meds = [statistics.median(by_delay[d][policy]) / 1000 for d in delays]
        lows = [m - _q(by_delay[d][policy], 0.25) / 1000 for m, d in zip(meds, delays, strict=True)]
        highs = [
            _q(by_delay[d][policy], 0.75) / 1000 - m for m, d in zip(meds, delays, strict=True)
        ]
        color = f"C{policies.index(policy)}"  # the same colour for a policy in both panels
        left.errorbar(
            xs, meds, yerr=[lows, highs], marker="o", capsize=3, label=policy, color=color
        )
    left.set_xlabel("backend load time (s)")
    left.set_ylabel("time to ready (s)")
    left.set_title("Time to ready (median, IQR)")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    width = 0.8 / max(1, len(policies) - 1)
    for i, policy in enumerate(policies[1:]):
        over = [
            statistics.median(
                [p - b for p, b in zip(by_delay[d][policy], by_delay[d]["limit"], strict=True)]
            )
            for d in delays
        ]
        right.bar(
            [j + i * width for j in range(len(delays))],
            over,
            width,
            label=policy,
            color=f"C{policies.index(policy)}",
        )
    right.set_xticks(
        [j + width * (len(policies) - 2) / 2 for j in range(len(delays))],
        [f"{float(d):g} s" for d in delays],
    )
    right.set_xlabel("backend load time")
    right.set_ylabel("ms above the physical limit (median of pairs)")
    right.set_title("Time lost to the readiness policy")
    right.legend(fontsize=8)
    right.grid(axis="y", alpha=0.3)
    return _save(fig, docs, "readiness")


def _q(values: Sequence[float], fraction: float) -> float:
    from stats import percentile

    return percentile(values, fraction)


def plot_swap(result: dict[str, Any], docs: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 4))
    samples = result["swap"]["samples_ms"]
    _box(ax, {"modeld swap": samples["modeld"], "stop + start by hand": samples["raw"]}, "ms")
    ax.set_title("Swap inside a concurrency group")
    return _save(fig, docs, "swap")


def plot_control_plane(result: dict[str, Any], docs: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    levels = sorted(result["latency_ms"], key=int)
    kinds = list(result["latency_ms"][levels[0]])
    xs = [int(level) for level in levels]
    for i, kind in enumerate(kinds):
        color = f"C{i}"
        p50 = [statistics.median(result["latency_ms"][lv][kind]) for lv in levels]
        p99 = [_q(result["latency_ms"][lv][kind], 0.99) for lv in levels]
        ax.plot(xs, p50, "o-", color=color, label=f"{kind} p50")
        ax.plot(xs, p99, "x--", color=color, alpha=0.7)
    ax.axhline(5.0, color="red", lw=0.8, ls=":", label="target p99 5 ms")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("models loaded")
    ax.set_ylabel("ms (solid p50, dashed p99)")
    ax.set_title("D-Bus control plane latency")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, docs, "control-plane")


def plot_footprint(cycles: dict[str, Any] | None, idle: dict[str, Any] | None, docs: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if cycles:
        fp = cycles["footprint"]
        left.plot(fp["cycles"], [k / 1024 for k in fp["rss_kib"]], "o-", label="RSS (MiB)")
        left.set_xlabel("load/unload cycles")
        left.set_ylabel("RSS (MiB)")
        twin = left.twinx()
        twin.plot(fp["cycles"], fp["fds"], "s--", color="tab:orange", label="open fds")
        twin.set_ylabel("open fds")
        left.set_title("modeld along the cycles")
        left.grid(alpha=0.3)
    if idle:
        windows = sorted(idle, key=int)
        labels = [f"{w} loaded" for w in windows]
        rss = [statistics.median(idle[w]["rss_mib"]) for w in windows]
        cpu = [statistics.median(idle[w]["cpu_percent"]) for w in windows]
        right.bar(labels, rss, color="tab:blue")
        right.axhline(50, color="red", ls=":", lw=0.8, label="target 50 MB")
        right.set_ylabel("RSS at idle (MiB)")
        twin = right.twinx()
        twin.plot(labels, cpu, "o", color="tab:orange", markersize=10)
        twin.set_ylabel("CPU at idle (% of a core), dots")
        right.set_title("modeld at idle")
        right.legend(fontsize=8, loc="lower right")
    return _save(fig, docs, "footprint")


def plot_front_door(result: dict[str, Any], docs: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, values in result["samples_ms"].items():
        ordered = sorted(values)
        left.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=kind)
    left.set_xscale("log")
    left.set_xlabel("ms")
    left.set_ylabel("fraction of requests")
    left.set_title("Short completion latency (CDF)")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    _box(right, result["stream_rates"], "tokens/s")
    right.set_title("Streamed tokens per second")
    return _save(fig, docs, "front-door")


def plot_llama(result: dict[str, Any], docs: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    _box(left, result["load"]["samples_ms"], "ms")
    left.set_title("Load(wait) vs raw start")
    samples = result["tokens_per_s"]["samples"]
    ways = list(samples)
    meds = [statistics.median(samples[w]) for w in ways]
    errs = [
        [m - _q(samples[w], 0.25) for m, w in zip(meds, ways, strict=True)],
        [_q(samples[w], 0.75) - m for m, w in zip(meds, ways, strict=True)],
    ]
    right.barh(ways, meds, xerr=errs, color="tab:blue")
    right.set_xlabel("tokens/s (median, IQR)")
    right.set_title("Token rate")
    return _save(fig, docs, "llama")


def plot_faults(result: dict[str, Any], docs: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    crash = result["crash_ms"]
    _box(left, {"modeld (ModelUnloaded)": crash["modeld"], "kernel (pidfd)": crash["pidfd"]}, "ms")
    left.set_title("kill -9 of a backend: detected after")
    readopt = result["readoption_ms"]
    levels = sorted(readopt, key=int)
    for how, label in (("restart", "systemctl restart"), ("kill", "kill -9 (+ RestartSec 1 s)")):
        meds = [statistics.median(readopt[lv][how]) for lv in levels]
        lows = [m - _q(readopt[lv][how], 0.25) for m, lv in zip(meds, levels, strict=True)]
        highs = [_q(readopt[lv][how], 0.75) - m for m, lv in zip(meds, levels, strict=True)]
        xs = [int(lv) for lv in levels]
        right.errorbar(xs, meds, yerr=[lows, highs], marker="o", capsize=3, label=label)
    right.set_xlabel("backends running")
    right.set_ylabel("ms until re-adopted (median, IQR)")
    right.set_title("modeld restart and re-adoption")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    return _save(fig, docs, "faults")


def _plots(data: dict[str, Any], docs: Path) -> dict[str, Path]:
    results = data["results"]
    plots: dict[str, Path] = {}
    if "load" in results:
        plots["load"] = plot_load(results["load"], docs)
    if "readiness" in results:
        plots["readiness"] = plot_readiness(results["readiness"], docs)
    if "swap" in results and "swap" in results["swap"]:
        plots["swap"] = plot_swap(results["swap"], docs)
    if "control_plane" in results:
        plots["control_plane"] = plot_control_plane(results["control_plane"], docs)
    if "cycles" in results or "control_plane" in results:
        idle = results.get("control_plane", {}).get("idle")
        plots["footprint"] = plot_footprint(results.get("cycles"), idle, docs)
    if "front_door" in results:
        plots["front_door"] = plot_front_door(results["front_door"], docs)
    if "faults" in results:
        plots["faults"] = plot_faults(results["faults"], docs)
    if "llama" in results and "skipped" not in results["llama"]:
        plots["llama"] = plot_llama(results["llama"], docs)
    return plots


def _machine(data: dict[str, Any]) -> list[str]:
    m = data["machine"]
    return [
        "| machine | |",
        "| --- | --- |",
        f"| CPU | {m['cpus']} cores, {m['cpu_model']} |",
        f"| memory | {m['memory_gib']} GiB |",
        f"| OS, kernel | {m['os']}, Linux {m['kernel']} |",
        f"| systemd | {m['systemd']} |",
        f"| cgroups | {m['cgroups']} |",
        f"| Python | {m['python']} |",
        f"| load average (1, 5, 15 min) | start {m['load_average_at_start']},"
        f" end {m.get('load_average_at_end', '-')} |",
        f"| commit | `{m['commit'][:12]}`{' (with local changes)' if m['dirty'] else ''} |",
        f"| run | {data['started']}, {data['mode']} profile, {data.get('duration_s', '-')} s |",
    ]


def headlines(figures: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The few rows a summary needs: each benchmark's main comparison (the readiness
    policies at the longest load, the slowest call at the most models loaded)."""
    picked: list[dict[str, Any]] = []
    readiness = [f for f in figures if f["benchmark"] == "readiness"]
    if readiness:
        longest = max(float(f["name"].split()[1]) for f in readiness)
        picked += [f for f in readiness if float(f["name"].split()[1]) == longest]
    control = [f for f in figures if f["benchmark"] == "control_plane"]
    if control:
        top = max(int(f["name"].rsplit(", ", 1)[1].split()[0]) for f in control)
        at_top = [f for f in control if f["name"].endswith(f", {top} loaded")]
        picked.append(max(at_top, key=lambda f: f["value"]["p99"]))
    readopt = [f for f in figures if f["benchmark"] == "faults" and " backends, " in f["name"]]
    if readopt:
        most = max(int(f["name"].split(" backends, ")[0].rsplit(" ", 1)[1]) for f in readopt)
        picked += [f for f in readopt if f", {most} backends, " in f["name"]]
    wanted = (
        "Load(wait) vs a raw scope",
        "swap in a concurrency group",
        "modeld RSS at idle",
        "modeld CPU at idle",
        "modeld CPU time per load + unload cycle",
        "kill -9 of a backend",
        "-token completion",
        "streamed tokens per second",
        "tokens per second, streamed, front door",
    )
    picked += [f for f in figures if any(w in f["name"] for w in wanted)]
    order = {id(f): i for i, f in enumerate(figures)}
    return sorted(picked, key=lambda f: order[id(f)])


def render(data: dict[str, Any], docs: Path) -> list[Path]:
    """Write ``docs/benchmarks.md`` and its PNGs from one run's data; the paths written."""
    docs.mkdir(parents=True, exist_ok=True)
    plots = _plots(data, docs)
    lines = ["# Benchmarks", ""]
    if data["mode"] != "full":
        lines += [
            f"> **{data['mode'].upper()} SMOKE RUN: a few rounds of each benchmark to check that "
            "the code works. These figures mean nothing; regenerate with `bench/run`.**",
            "",
        ]
    lines += [
        "Generated by `bench/run` (`python -m bench`) from "
        f"`bench/results/{data.get('result_file', '')}`; do not edit by hand. Every figure is the "
        "median of repeated, interleaved rounds, with its spread (interquartile range, p99, "
        "n) and a ratio to a baseline measured in the same run: the median of the paired "
        "ratios where rounds pair up, else the ratio of the medians, or the ratio to the "
        "issue's target where nothing can be measured as a baseline. Machines here are "
        "noisy: absolute times from different runs are not comparable, ratios and paired "
        "differences are.",
        "",
        *_machine(data),
        "",
    ]
    if data.get("errors"):
        lines += ["**Failed in this run:** " + ", ".join(sorted(data["errors"])), ""]
    top = headlines(data["figures"])
    if top:
        lines += ["## Headlines", "", TABLE_HEAD, *(_row(f) for f in top), ""]
    by_section: dict[str, list[dict[str, Any]]] = {}
    for fig in data["figures"]:
        by_section.setdefault(fig["benchmark"], []).append(fig)
    for key, (title, text) in SECTIONS.items():
        rows = by_section.get(key, [])
        plot = plots.get(key)
        if not rows and plot is None:
            continue
        lines += [f"## {title}", "", text, ""]
        if rows:
            lines += [TABLE_HEAD, *(_row(f) for f in rows), ""]
        if plot is not None:
            lines += [f"![{title}]({plot.name})", ""]
    skipped = {k: v["skipped"] for k, v in data["results"].items() if "skipped" in v}
    for name, why in skipped.items():
        lines += [f"*{name}: skipped ({why}).*", ""]
    lines += [
        "## Reproduce",
        "",
        "```sh",
        "scripts/setup          # once: venv, test extra (matplotlib), llama-cpp-python",
        "bench/run              # every benchmark, < 20 min on 2 cores; this file and its plots",
        "bench/run --quick      # a few rounds each, report under bench/results/quick-docs/",
        "bench/run --render bench/results/<run>.json   # the report again from a saved run",
        "```",
        "",
        "Durations of this run (s): "
        + ", ".join(f"{k} {v}" for k, v in data.get("durations_s", {}).items()),
        "",
    ]
    md = docs / "benchmarks.md"
    md.write_text("\n".join(lines))
    return [md, *plots.values()]
