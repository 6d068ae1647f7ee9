"""What every gptqlab benchmark shares: memory probes, options, timing and folder sizes. The environment a
number was measured in, tables and JSON output come from :mod:`gptqlab.cli.report` (re-exported here).

Results are committed under ``benchmarks/results/<device>/`` where ``<device>`` is :func:`device_label`
(``cpu-2core``, ``h100`` ...). Every JSON file carries :func:`environment` under the key ``env``.
"""

from __future__ import annotations

import platform
import re
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gptqlab.cli.report import (
    PEAK_BANDWIDTH_TBS,
    device_label,
    device_name,
    env_line,
    environment,
    fmt,
    split_list,
    table,
    usable_cores,
    write_json,
)
from gptqlab.errors import ConfigError

# The environment, table and JSON helpers are gptqlab.cli.report's, re-exported for the benchmarks.
__all__ = [
    "PEAK_BANDWIDTH_TBS",
    "REPO_ROOT",
    "RESULTS_DIR",
    "check_positive",
    "device_label",
    "device_name",
    "env_line",
    "environment",
    "fmt",
    "folder_size_mb",
    "max_rss_mb",
    "median_seconds",
    "parse_ints",
    "peak_bandwidth_gbs",
    "rss_mb",
    "set_threads",
    "split_list",
    "synchronize",
    "table",
    "usable_cores",
    "write_json",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"


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


def folder_size_mb(folder: Path) -> float:
    """Size of the weights in a checkpoint folder: all ``*.safetensors`` and ``*.bin`` files, in MB."""
    files = [*folder.glob("*.safetensors"), *folder.glob("*.bin")]
    return sum(f.stat().st_size for f in files) / 1e6
