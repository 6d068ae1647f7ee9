"""How commands report a result: the environment it was measured in, plain-text tables and JSON files.

``gptqlab eval`` and the benchmarks (``gptqlab.benchmarks.common`` re-exports these) print
:func:`env_line` above a :func:`table` and store :func:`environment` under the key ``env`` of every JSON
result, so a number always says where, when and with what it was measured.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

import torch

from gptqlab.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]

# Peak DRAM/HBM bandwidth in TB/s from the vendors' data sheets, matched against torch's device name in
# this order (H200 before H20, the PCIe and NVL H100 before the SXM one).
PEAK_BANDWIDTH_TBS: tuple[tuple[str, str, float], ...] = (
    (r"\bH200\b", "h200", 4.8),
    (r"\bH20\b", "h20", 4.0),
    (r"\bH100\b.*\bNVL\b", "h100-nvl", 3.9),
    (r"\bH100\b.*\bPCIe\b", "h100-pcie", 2.0),
    (r"\bH100\b", "h100", 3.35),  # SXM5, HBM3
    (r"\bH800\b", "h800", 3.35),
    (r"\bA100\b.*80GB", "a100-80gb", 2.039),
    (r"\bA100\b", "a100", 1.555),
    (r"\bL40S\b", "l40s", 0.864),
    (r"\bRTX 4090\b", "rtx4090", 1.008),
)


def device_name(device: torch.device) -> str:
    """The GPU's name as torch reports it, or the CPU model from /proc/cpuinfo (else platform)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def device_label(device: torch.device) -> str:
    """The results folder name: ``h100``, ``h200`` ... for known GPUs, a slug of other GPU names, and
    ``cpu-<n>core`` for the CPU, n being the usable cores."""
    if device.type != "cuda":
        return f"cpu-{usable_cores()}core"
    name = device_name(device)
    for pattern, label, _ in PEAK_BANDWIDTH_TBS:
        if re.search(pattern, name):
            return label
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def environment(device: torch.device) -> dict:
    """Where and with what a result was measured: date, git commit (and whether tracked files differ
    from it), device, library versions and thread count."""
    import transformers

    from gptqlab import __version__

    status = _git("status", "--porcelain", "--untracked-files=no")
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "device": device_label(device),
        "device_name": device_name(device),
        "cpu_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "gptqlab": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def env_line(env: dict) -> str:
    """One line for the top of a printed table."""
    commit = (env["git_commit"] or "unknown")[:10] + ("+dirty" if env["git_dirty"] else "")
    return (
        f"{env['date'][:10]} | {env['device']} ({env['device_name']}, {env['torch_threads']} threads) | "
        f"torch {env['torch']} | transformers {env['transformers']} | gptqlab {env['gptqlab']} @ {commit}"
    )


def split_list(values: Sequence[str] | str | None) -> list[str]:
    """Items of a repeatable option whose values may also be comma lists: ['a,b', 'c'] → ['a', 'b', 'c']."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def fmt(value: object, digits: int = 3) -> str:
    """A table cell: floats with ``digits`` significant decimals (at least), None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        padded = [v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True))]
        return "  ".join(padded)

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in cells)])


def write_json(path: str | Path, obj: object) -> Path:
    """Write ``obj`` as indented UTF-8 JSON, creating the folder; returns the path."""
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path
