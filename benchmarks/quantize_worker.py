"""Child-process entry point that runs one quantizer, so that its wall time and peak RSS are its own.

    python -m gptqlab.benchmarks.quantize_worker JOB.json RESULT.json

JOB holds a :class:`Job` as JSON. The libraries are imported before the clock starts; the timed region
goes from the unquantized model folder to a saved checkpoint and includes drawing the calibration
windows, for every tool alike. RESULT receives the seconds, the peak and starting RSS of this process,
the peak CUDA memory, for gptqlab the time at which each decoder block finished and where its time went
(the driver's :class:`~gptqlab.quantize.driver.BlockTiming` records, collected with a logging handler), and
for GPTQModel
a SHA-256 of the calibration tokens it was given and the seconds it took to draw them (gptqlab's
pipeline draws the same tokens from the same spec, nsamples, seqlen and seed; the parent checks that
the hashes agree).

The child starts in the parent's working directory, so relative paths in the calibration spec mean the
same for every tool; GPTQModel, which writes ./logs, runs in ``Job.scratch``. The parent sets
``GPTQMODEL_CPU_WORKERS``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

TOOLS = ("gptqlab", "gptqmodel")


@dataclass(frozen=True)
class Job:
    """One quantization: ``tool`` gptqlab (``method`` gptq or rtn) or gptqmodel (gptq); ``model`` is a
    model folder (not an embedded name); ``out`` must not exist; ``scratch`` is the working directory
    for GPTQModel."""

    tool: str
    method: str
    model: str
    out: str
    bits: int
    group_size: int
    act_order: bool
    damp_percent: float
    calib: str
    nsamples: int
    seqlen: int
    seed: int = 0
    device: str = "cpu"
    scratch: str = "."

    def __post_init__(self) -> None:
        if self.tool not in TOOLS:
            raise ValueError(f"tool must be one of {TOOLS}, got {self.tool!r}")
        if self.tool == "gptqmodel" and self.method != "gptq":
            raise ValueError("GPTQModel is run with method gptq only")


def calibration_ids(job: Job, tokenizer):
    """The calibration windows [nsamples, seqlen] that gptqlab's pipeline draws for this job."""
    from gptqlab.calib import load_calibration

    return load_calibration(job.calib, tokenizer, job.nsamples, job.seqlen, job.seed).input_ids


def tokens_sha256(ids) -> str:
    return hashlib.sha256(ids.contiguous().numpy().tobytes()).hexdigest()


class BlockTimings(logging.Handler):
    """Collects the driver's per-block :class:`~gptqlab.quantize.driver.BlockTiming` records."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.timings: list = []

    def emit(self, record: logging.LogRecord) -> None:
        timing = getattr(record, "block_timing", None)
        if timing is not None:
            self.timings.append(timing)

    def __enter__(self) -> BlockTimings:
        logger = logging.getLogger("gptqlab.driver")
        self._level, self._propagate = logger.level, logger.propagate
        logger.setLevel(logging.DEBUG)
        logger.propagate = False  # the records are for this handler, not for the console
        logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logger = logging.getLogger("gptqlab.driver")
        logger.removeHandler(self)
        logger.setLevel(self._level)
        logger.propagate = self._propagate


def import_everything(job: Job) -> None:
    """Import what either tool imports lazily on first use (transformers loads an architecture's config
    and modeling modules on demand), so that no tool's clock includes Python imports."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    import gptqlab.calib
    import gptqlab.quantize.driver
    import gptqlab.quantize.run  # noqa: F401

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(job.model))]
    if job.tool == "gptqmodel":
        import gptqmodel  # noqa: F401


def run_gptqlab(job: Job) -> dict:
    from gptqlab.quantize.options import QuantizeOptions
    from gptqlab.quantize.run import quantize

    opts = QuantizeOptions(
        model=job.model,
        out=job.out,
        bits=job.bits,
        group_size=job.group_size,
        act_order=job.act_order,
        method=job.method,
        calib=job.calib,
        nsamples=job.nsamples,
        seqlen=job.seqlen,
        device=job.device,
        seed=job.seed,
        damp_percent=job.damp_percent,
        progress=False,
    )
    wall0, start = time.time(), time.perf_counter()
    with BlockTimings() as handler:
        quantize(opts)
    seconds = time.perf_counter() - start
    timings = handler.timings
    done = [t.finished_at - wall0 for t in timings]
    return {
        "seconds": seconds,
        # before the first block: config, skeleton, embeddings, calibration, the first block's inputs
        "setup_seconds": done[0] - timings[0].total if timings else None,
        "block_seconds": done,
        "blocks": [asdict(t) for t in timings],
    }


def run_gptqmodel(job: Job) -> dict:
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer

    start = time.perf_counter()
    ids = calibration_ids(job, AutoTokenizer.from_pretrained(job.model))  # [nsamples, seqlen]
    calib_seconds = time.perf_counter() - start
    os.chdir(job.scratch)
    config = QuantizeConfig(
        bits=job.bits,
        group_size=job.group_size,
        desc_act=job.act_order,
        act_group_aware=False,  # GPTQModel's own group-aware reordering is not one of the compared settings
        damp_percent=job.damp_percent,
        sym=True,
        true_sequential=True,
        device=job.device,
    )
    # float32 like gptqlab on the CPU; GPTQModel's CPU default would be bfloat16
    dtype = torch.float32 if job.device == "cpu" else torch.float16
    model = GPTQModel.load(job.model, config, dtype=dtype)
    calibration = [{"input_ids": row[None], "attention_mask": torch.ones_like(row)[None]} for row in ids]
    model.quantize(calibration, batch_size=1)
    model.save(job.out)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "block_seconds": [], "calib_sha256": tokens_sha256(ids), "calib_seconds": calib_seconds}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m gptqlab.benchmarks.quantize_worker JOB.json RESULT.json", file=sys.stderr)
        return 2
    job = Job(**json.loads(Path(args[0]).read_text(encoding="utf-8")))
    import torch

    from gptqlab.benchmarks.common import max_rss_mb, rss_mb

    import_everything(job)
    start_rss = rss_mb()
    result = run_gptqlab(job) if job.tool == "gptqlab" else run_gptqmodel(job)
    result.update(job=asdict(job), peak_rss_mb=max_rss_mb(), start_rss_mb=start_rss)
    if torch.cuda.is_available():
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 1e6
    Path(args[1]).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
