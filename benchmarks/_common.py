"""Shared benchmark plumbing: the machine's description and result files (JSON + markdown)."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        mem_gib = round(pages / 2**30, 1)
    except (ValueError, OSError):
        pass
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "gpu": gpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": commit,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_results(name: str, rows: list[dict[str, object]], extra: dict[str, object]) -> Path:
    """Write ``results/<name>.json`` and ``results/<name>.md`` (a table naming the machine)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = machine()
    payload = {"benchmark": name, "machine": info, "results": rows, **extra}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = [
        f"# {name}",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB RAM"
        + (f", GPU {info['gpu']}" if info["gpu"] else ", no GPU")
        + f"; Python {info['python']}; commit {info['commit']}; {info['when']}",
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
