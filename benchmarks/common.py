"""What every gptqlab benchmark shares: the environment a number was measured in, memory probes, list
options, timing, plain-text tables and JSON output.

Results are committed under ``benchmarks/results/<device>/`` where ``<device>`` is :func:`device_label`
(``cpu-2core``, ``h100`` ...). Every JSON file carries :func:`environment` under the key ``env``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from gptqlab.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"

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


def peak_bandwidth_gbs(device: torch.device) -> float | None:
    """The device's peak memory bandwidth in GB/s, or None when it is not in :data:`PEAK_BANDWIDTH_TBS`
    (always None for the CPU)."""
    if device.type != "cuda":
        return None
    name = device_name(device)
    for pattern, _, tbs in PEAK_BANDWIDTH_TBS:
        if re.search(pattern, name):
            return tbs * 1000
    return None


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


# ------------------------------------------------------------------------------------------------ memory


def _proc_status_kb(field: str) -> int | None:
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def rss_mb() -> float:
    """The resident set size of this process now, in MB (10⁶ bytes)."""
    kb = _proc_status_kb("VmRSS")
    if kb is None:  # not Linux: the peak is the best available figure
        return max_rss_mb()
    return kb * 1024 / 1e6


def max_rss_mb() -> float:
    """The largest resident set size this process has had, in MB.

    Linux: VmHWM, the peak of this process's own memory. ru_maxrss is not used there: it survives
    execve, so a child started by a large parent would report the parent's size at the fork.
    Elsewhere: ru_maxrss (KiB, or bytes on macOS)."""
    hwm = _proc_status_kb("VmHWM")
    if hwm is not None:
        return hwm * 1024 / 1e6
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 1e6 if platform.system() == "Darwin" else maxrss * 1024 / 1e6


class PeakMemory:
    """Peak memory that a region of code adds: ``with PeakMemory(device) as mem: ...; mem.peak_mb``.

    CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation at entry. CPU: the peak RSS minus the
    RSS at entry. On Linux the peak is reset at entry (``/proc/self/clear_refs``), so it is the region's
    own peak; elsewhere ru_maxrss cannot be reset and the figure is a lower bound (``exact`` is False).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.exact = True
        self.peak_mb = 0.0
        self._start = 0.0

    @property
    def kind(self) -> str:
        if self.device.type == "cuda":
            return "cuda max allocated"
        return "peak RSS growth" if self.exact else "peak RSS growth (lower bound)"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device) / 1e6
            return self
        try:
            Path("/proc/self/clear_refs").write_text("5")  # "5" resets the peak RSS (VmHWM) to the current RSS
        except OSError:
            self.exact = False
        self._start = rss_mb()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 1e6
        else:
            hwm = _proc_status_kb("VmHWM")
            peak = hwm * 1024 / 1e6 if self.exact and hwm is not None else max_rss_mb()
        self.peak_mb = max(0.0, peak - self._start)


# ------------------------------------------------------------------------------------------------ timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(call: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``call()`` over ``repeats`` runs after ``warmup`` untimed ones, synchronizing
    the device before and after each timed run."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


# ------------------------------------------------------------------------------------------------ options


def split_list(values: Sequence[str] | str | None) -> list[str]:
    """Items of a repeatable option whose values may also be comma lists: ['a,b', 'c'] → ['a', 'b', 'c']."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def parse_ints(text: str, flag: str, minimum: int = 1) -> list[int]:
    """'1,4,16' → [1, 4, 16]; raises ConfigError naming ``flag`` for anything else."""
    items = split_list(text)
    if not items:
        raise ConfigError(f"{flag} needs at least one integer, e.g. {flag} 1,4,16")
    values = []
    for item in items:
        if not re.fullmatch(r"-?\d+", item):
            raise ConfigError(f"{flag}: {item!r} is not an integer; give a comma list such as 1,4,16")
        value = int(item)
        if value < minimum:
            raise ConfigError(f"{flag}: {value} is below the minimum of {minimum}")
        values.append(value)
    return values


def set_threads(threads: int | None) -> None:
    """Set torch's CPU threads for this process (None keeps torch's default). On a CPU that other jobs
    share, one thread avoids the OpenMP barrier stalls that make small multi-threaded ops erratic."""
    if threads is not None:
        check_positive(threads, "--threads")
        torch.set_num_threads(threads)


def check_positive(value: int | float | None, flag: str) -> None:
    if value is not None and value <= 0:
        raise ConfigError(f"{flag} must be positive, got {value}")


# ------------------------------------------------------------------------------------------------ output


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


def folder_size_mb(folder: Path) -> float:
    """Size of the weights in a checkpoint folder: all ``*.safetensors`` and ``*.bin`` files, in MB."""
    files = [*folder.glob("*.safetensors"), *folder.glob("*.bin")]
    return sum(f.stat().st_size for f in files) / 1e6
