"""Shared benchmark plumbing: the machine's description and result files (JSON + markdown)."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.machine import describe_machine as machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def speed_probe() -> float:
    """Seconds for a fixed single-threaded workload (a 5M-step Python loop). This VM's speed
    drifts by 20-40% between hours (seen on the same commit), so absolute figures from two
    runs compare only alongside their probes; ratios within one run need none."""
    started = time.perf_counter()
    total = 0
    for i in range(5_000_000):
        total += i
    return round(time.perf_counter() - started, 3)


_PROBE_AT_START = speed_probe()  # benchmarks import this module first: the run's start


def peak_rss_mib() -> float:
    """This process's own peak RSS. VmHWM, not ru_maxrss: a forked child inherits the
    parent's ru_maxrss, which would credit the parent's peak to the child."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_results(name: str, rows: list[dict[str, object]], extra: dict[str, object]) -> Path:
    """Write ``results/<name>.json`` and ``results/<name>.md`` (a table naming the machine)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = machine()
    probes = {"start": _PROBE_AT_START, "end": speed_probe()}
    payload = {
        "benchmark": name,
        "machine": info,
        "speed_probe_s": probes,
        "results": rows,
        **extra,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = [
        f"# {name}",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB RAM"
        + (f", GPU {info['gpu']}" if info["gpu"] else ", no GPU")
        + f"; Python {info['python']}; commit {info['commit']}; {info['when']}",
        "",
        f"Speed probe (5M-step Python loop; lower is faster): {probes['start']} s at the start,"
        f" {probes['end']} s at the end",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            cells.append(
                f"{v:,.3f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)
            )
        lines.append("| " + " | ".join(cells) + " |")
    for key, value in extra.items():
        lines += ["", f"**{key}**: {value}"]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    return RESULTS / f"{name}.md"
