"""Shared benchmark plumbing: the machine's description and result files (JSON + markdown)."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.machine import describe_machine as machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


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
