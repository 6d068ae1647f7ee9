"""``gptqlab bench peers``: gptqlab GPTQ against gptqlab RTN, GPTQModel and the unquantized model.

Every quantizer gets the same model folder, the same calibration tokens (gptqlab's ``load_calibration``
with one spec, nsamples, seqlen and seed; the JSON records a SHA-256 of them per run) and the same
settings (bits, group size, act-order, damp_percent; symmetric, true-sequential). Each runs in its own
child process (:mod:`gptqlab.benchmarks.quantize_worker`), so wall time and peak RSS are per method.
Every checkpoint, GPTQModel's included, is loaded with :func:`gptqlab.load` and scored by
:func:`gptqlab.evaluate.score` on the same held-out texts.

A model named ``random-llama-H`` (H = 2048 or 4096: a 2-layer LLaMA of that hidden size, intermediate
size 11008·H/4096, random weights, built in the work folder) is for time and memory only: gptqlab GPTQ
and GPTQModel quantize it ``speed_repeats`` times each, alternating, on ``speed_nsamples`` x ``speed_seqlen``
tokens with the first setting; the speed table reports the medians. Random weights say nothing about
quality, so these models get no perplexity rows.

A second table shows the calibration domain effect: gptqlab GPTQ calibrated on news (peoples-daily),
reviews and a 50/50 mix (or the ``LABEL=SPEC`` sources given), evaluated on both held-out splits.

Targets, checked and printed in the same run, per model, setting and evaluation text:

1. gptqlab GPTQ perplexity ≤ GPTQModel's (within 0.5 % counts as a tie).
2. gptqlab GPTQ's perplexity rise over fp16 ≤ half of RTN's.
3. gptqlab GPTQ's quantize wall time ≤ 0.5 × GPTQModel's (per model and setting; for a random-llama model
   the median over the alternating repeats).
4. On a random-llama model, gptqlab's peak RSS ≤ GPTQModel's (medians).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gptqlab.benchmarks.common import (
    check_positive,
    env_line,
    environment,
    folder_size_mb,
    set_threads,
    table,
    write_json,
)
from gptqlab.benchmarks.quantize_worker import Job
from gptqlab.calib import load_calibration
from gptqlab.errors import ConfigError, GptqlabError
from gptqlab.evaluate import check_context, eval_texts, load_and_score, model_label
from gptqlab.resolve import resolve_device

DEFAULT_MODELS = ("tiny-zh-llama", "tiny-zh-bloom", "random-llama-2048")
SPEED_MODEL = re.compile(r"random-llama-(2048|4096)")
DEFAULT_SETTINGS = ("w4g128", "w4g128-act", "w3g128", "w8g128")
DEFAULT_DATASETS = ("peoples-daily-heldout", "reviews-heldout")
TOOLS = {"gptqlab-gptq": ("gptqlab", "gptq"), "gptqlab-rtn": ("gptqlab", "rtn"), "gptqmodel": ("gptqmodel", "gptq")}
DEFAULT_DOMAIN_CALIBS = ("news=peoples-daily", "reviews=reviews", "mix 50/50=peoples-daily:0.5,reviews:0.5")
TIE = 0.005  # target 1: within 0.5 % of GPTQModel's perplexity counts as a tie
NOISE = 0.001  # target 2: an RTN rise below 0.1 % of the fp16 perplexity is flagged as noise


@dataclass(frozen=True)
class Setting:
    """Bits, group size and act-order, named like ``w4g128`` or ``w4g128-act``."""

    bits: int
    group_size: int
    act_order: bool

    @classmethod
    def parse(cls, text: str) -> Setting:
        m = re.fullmatch(r"w(\d)g(-1|\d+)(-act)?", text.strip())
        if not m:
            raise ConfigError(f"--settings: cannot read {text!r}; use wBITSgGROUP[-act], e.g. w4g128 or w4g128-act")
        bits, group_size = int(m.group(1)), int(m.group(2))
        if bits not in (2, 3, 4, 8) or group_size == 0:
            raise ConfigError(f"--settings: {text}: bits must be 2, 3, 4 or 8 and the group size -1 or positive")
        return cls(bits, group_size, m.group(3) is not None)

    @property
    def name(self) -> str:
        return f"w{self.bits}g{self.group_size}{'-act' if self.act_order else ''}"


@dataclass
class PeersOptions:
    """Everything ``gptqlab bench peers`` takes; CLI flags map one to one onto these fields."""

    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    settings: list[str] = field(default_factory=lambda: list(DEFAULT_SETTINGS))
    tools: list[str] = field(default_factory=lambda: list(TOOLS))
    datasets: list[str] = field(default_factory=lambda: list(DEFAULT_DATASETS))
    calib: str = "peoples-daily"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    damp_percent: float = 0.01
    eval_seqlen: int = 512
    max_chars: int | None = 40_000
    batch_size: int = 8
    domain: bool = True
    domain_calibs: list[str] = field(default_factory=lambda: list(DEFAULT_DOMAIN_CALIBS))
    domain_bits: int = 3
    domain_group_size: int = 128
    speed_nsamples: int = 16
    speed_seqlen: int = 256
    speed_repeats: int = 2
    device: str = "cpu"
    threads: int | None = None
    work_dir: str | None = None
    json_path: str | None = None
    plot_dir: str | None = None
    progress: bool = True
    parsed: list[Setting] = field(init=False)
    domain_sources: list[tuple[str, str]] = field(init=False)

    def __post_init__(self) -> None:
        self.parsed = [Setting.parse(s) for s in self.settings]
        self.domain_sources = []
        for item in self.domain_calibs:
            label, sep, spec = item.partition("=")
            if not sep or not label.strip() or not spec.strip():
                raise ConfigError(f"--domain-calib: {item!r} is not LABEL=SPEC, e.g. 'news=peoples-daily'")
            self.domain_sources.append((label.strip(), spec.strip()))
        if not self.models or not self.parsed or not self.tools or not self.datasets:
            raise ConfigError("--models, --settings, --tools and --datasets each need at least one value")
        unknown = [t for t in self.tools if t not in TOOLS]
        if unknown:
            raise ConfigError(f"--tools: unknown tool {unknown[0]!r}; choose from {', '.join(TOOLS)}")
        for flag, value in (
            ("--nsamples", self.nsamples),
            ("--seqlen", self.seqlen),
            ("--eval-seqlen", self.eval_seqlen),
            ("--max-chars", self.max_chars),
            ("--batch-size", self.batch_size),
            ("--threads", self.threads),
            ("--speed-nsamples", self.speed_nsamples),
            ("--speed-seqlen", self.speed_seqlen),
            ("--speed-repeats", self.speed_repeats),
        ):
            check_positive(value, flag)
        if not 0 < self.damp_percent < 1:
            raise ConfigError(f"--damp must be in (0, 1), got {self.damp_percent}")
        if self.domain_bits not in (2, 3, 4, 8):
            raise ConfigError(f"--domain-bits must be 2, 3, 4 or 8, got {self.domain_bits}")


class Runner:
    """Runs quantizer children and evaluations, each once per distinct job or checkpoint."""

    def __init__(self, opts: PeersOptions, work: Path, texts: list[tuple[str, str]]):
        self.opts = opts
        self.work = work
        self.texts = texts
        self.runs: dict[str, dict] = {}
        self.scores: dict[str, list[dict]] = {}
        self.calibrations: dict[tuple[str, str], tuple[str, float]] = {}
        self.step = 0

    def calibration(
        self, model_dir: Path, calib: str, nsamples: int | None = None, seqlen: int | None = None
    ) -> tuple[str, float]:
        """SHA-256 of the calibration tokens every quantizer of ``model_dir`` gets for ``calib``, and the
        seconds it takes to draw them; gptqlab's pipeline draws exactly these (same function, arguments
        and seed), GPTQModel's child draws them too and reports its hash, which must agree."""
        from transformers import AutoTokenizer

        from gptqlab.benchmarks.quantize_worker import tokens_sha256

        nsamples, seqlen = nsamples or self.opts.nsamples, seqlen or self.opts.seqlen
        key = (str(model_dir), calib, nsamples, seqlen)
        if key not in self.calibrations:
            start = time.perf_counter()
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            ids = load_calibration(calib, tokenizer, nsamples, seqlen, self.opts.seed)
            self.calibrations[key] = (tokens_sha256(ids.input_ids), time.perf_counter() - start)
        return self.calibrations[key]

    def quantize(
        self,
        model_dir: Path,
        label: str,
        tool: str,
        setting: Setting,
        calib: str,
        nsamples: int | None = None,
        seqlen: int | None = None,
        repeat: int | None = None,
    ) -> dict:
        """Run one quantizer in a child process (once per distinct job); returns its result dict.
        nsamples, seqlen: instead of the options'; repeat: a run number, to run the same job again."""
        name, method = TOOLS[tool]
        nsamples, seqlen = nsamples or self.opts.nsamples, seqlen or self.opts.seqlen
        slug = re.sub(r"[^a-z0-9]+", "-", calib.lower()).strip("-")
        out = self.work / f"{label}.{tool}.{setting.name}.{slug}{'' if repeat is None else f'.run{repeat}'}"
        if str(out) in self.runs:
            return self.runs[str(out)]
        job = Job(
            tool=name,
            method=method,
            model=str(model_dir),
            out=str(out),
            bits=setting.bits,
            group_size=setting.group_size,
            act_order=setting.act_order,
            damp_percent=self.opts.damp_percent,
            calib=calib,
            nsamples=nsamples,
            seqlen=seqlen,
            seed=self.opts.seed,
            device=self.opts.device,
            scratch=str(self.work),
        )
        job_file, result_file, log_file = (out.with_name(out.name + e) for e in (".job.json", ".result.json", ".log"))
        job_file.write_text(json.dumps(asdict(job)), encoding="utf-8")
        env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "TQDM_DISABLE": "1"}
        if self.opts.threads is not None:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.opts.threads)
        command = [sys.executable, "-m", "gptqlab.benchmarks.quantize_worker", str(job_file), str(result_file)]
        with log_file.open("w", encoding="utf-8") as log:
            done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            tail = [line.strip() for line in log_file.read_text(encoding="utf-8", errors="replace").splitlines()]
            last = " | ".join([line for line in tail if line][-2:])[-400:]
            raise GptqlabError(f"{tool} failed on {label} {setting.name} (exit {done.returncode}): {last}")
        result = json.loads(result_file.read_text(encoding="utf-8"))
        sha, seconds = self.calibration(model_dir, calib, nsamples, seqlen)
        if result.setdefault("calib_sha256", sha) != sha:
            raise GptqlabError(f"{tool} was given other calibration tokens than gptqlab for {label} ({calib})")
        result.setdefault("calib_seconds", seconds)
        result.update(tool=tool, model=label, setting=setting.name, out=str(out), size_mb=folder_size_mb(out))
        result.update(repeat=repeat, nsamples=nsamples, seqlen=seqlen)
        self.runs[str(out)] = result
        self.step += 1
        print(
            f"[{self.step}] {label} {tool} {setting.name} calib={calib}: {result['seconds']:.1f} s, "
            f"peak RSS {result['peak_rss_mb']:.0f} MB, {result['size_mb']:.2f} MB",
            flush=True,
        )
        return result

    def evaluate(self, path: Path, label: str) -> list[dict]:
        """Scores of one checkpoint (or the unquantized model) on every evaluation text."""
        if str(path) not in self.scores:
            self.scores[str(path)] = load_and_score(
                str(path),
                self.texts,
                self.opts.eval_seqlen,
                None,
                resolve_device(self.opts.device),
                self.opts.batch_size,
                self.opts.progress,
                label,
            )
        return self.scores[str(path)]


def _row(score: dict, tool: str, method: str, setting: Setting | None, run: dict | None, size_mb: float) -> dict:
    return {
        "tool": tool,
        "method": method,
        "model": score["model"],
        "setting": setting.name if setting else "fp16",
        "bits": setting.bits if setting else 16,
        "group_size": setting.group_size if setting else None,
        "act_order": setting.act_order if setting else False,
        "dataset": score["dataset"],
        "ppl": score["ppl"],
        "bits_per_char": score["bits_per_char"],
        "tokens": score["tokens"],
        "chars": score["chars"],
        "quantize_seconds": run["seconds"] if run else None,
        "peak_rss_mb": run["peak_rss_mb"] if run else None,
        "size_mb": size_mb,
        "calib_sha256": run["calib_sha256"] if run else None,
    }


def tool_of(row: dict) -> str:
    """'fp16', 'gptqlab-gptq', 'gptqlab-rtn' or 'gptqmodel'."""
    return row["tool"] if row["tool"] in ("fp16", "gptqmodel") else f"gptqlab-{row['method']}"


def check_targets(rows: list[dict]) -> list[dict]:
    """The three targets of the module docstring, one entry per model, setting (and text for 1 and 2)."""
    index = {(r["model"], r["setting"], tool_of(r), r["dataset"]): r for r in rows}
    fp16 = {(r["model"], r["dataset"]): r for r in rows if r["tool"] == "fp16"}
    out = []
    combos = list(dict.fromkeys((r["model"], r["setting"]) for r in rows if r["tool"] != "fp16"))  # run order
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    for model, setting in combos:
        for dataset in datasets:
            ours = index.get((model, setting, "gptqlab-gptq", dataset))
            theirs = index.get((model, setting, "gptqmodel", dataset))
            rtn = index.get((model, setting, "gptqlab-rtn", dataset))
            base = fp16.get((model, dataset))
            if ours and theirs:
                rel = ours["ppl"] / theirs["ppl"] - 1
                out.append(
                    {
                        "target": "ppl <= GPTQModel (0.5% tie)",
                        "model": model,
                        "setting": setting,
                        "dataset": dataset,
                        "gptqlab": ours["ppl"],
                        "gptqmodel": theirs["ppl"],
                        "detail": f"gptqlab {ours['ppl']:.3f} vs GPTQModel {theirs['ppl']:.3f} ({100 * rel:+.2f}%)",
                        "status": "PASS" if rel <= TIE else "MISS",
                    }
                )
            if ours and rtn and base:
                rise, rtn_rise = ours["ppl"] - base["ppl"], rtn["ppl"] - base["ppl"]
                noise = " (RTN rise within noise)" if abs(rtn_rise) < NOISE * base["ppl"] else ""
                out.append(
                    {
                        "target": "rise over fp16 <= RTN rise / 2",
                        "model": model,
                        "setting": setting,
                        "dataset": dataset,
                        "gptqlab_rise": rise,
                        "rtn_rise": rtn_rise,
                        "detail": f"fp16 {base['ppl']:.3f}: gptqlab {rise:+.3f} vs RTN {rtn_rise:+.3f}{noise}",
                        "status": "PASS" if rise <= 0.5 * rtn_rise else "MISS",
                    }
                )
        ours = index.get((model, setting, "gptqlab-gptq", datasets[0]))
        theirs = index.get((model, setting, "gptqmodel", datasets[0]))
        if ours and theirs:
            ratio = ours["quantize_seconds"] / theirs["quantize_seconds"]
            out.append(
                {
                    "target": "quantize time <= 0.5x GPTQModel",
                    "model": model,
                    "setting": setting,
                    "dataset": None,
                    "gptqlab_seconds": ours["quantize_seconds"],
                    "gptqmodel_seconds": theirs["quantize_seconds"],
                    "detail": f"gptqlab {ours['quantize_seconds']:.1f} s vs GPTQModel "
                    f"{theirs['quantize_seconds']:.1f} s ({ratio:.2f}x)",
                    "status": "PASS" if ratio <= 0.5 else "MISS",
                }
            )
    return out


def speed_summary(speed: list[dict]) -> tuple[list[dict], list[dict]]:
    """(one row per random-llama model and tool with median seconds and peak RSS, targets 3 and 4)."""
    from statistics import median

    summary, targets = [], []
    for model in dict.fromkeys(r["model"] for r in speed):
        med = {}
        for tool in dict.fromkeys(r["tool"] for r in speed if r["model"] == model):
            runs = [r for r in speed if r["model"] == model and r["tool"] == tool]
            med[tool] = {
                "model": model,
                "tool": tool,
                "setting": runs[0]["setting"],
                "tokens": f"{runs[0]['nsamples']}x{runs[0]['seqlen']}",
                "runs": len(runs),
                "seconds": median(r["seconds"] for r in runs),
                "seconds_each": [r["seconds"] for r in runs],
                "peak_rss_mb": median(r["peak_rss_mb"] for r in runs),
                "start_rss_mb": median(r["start_rss_mb"] for r in runs),
            }
            summary.append(med[tool])
        ours, theirs = med.get("gptqlab-gptq"), med.get("gptqmodel")
        if ours and theirs:
            ratio = ours["seconds"] / theirs["seconds"]
            rss = ours["peak_rss_mb"] / theirs["peak_rss_mb"]
            common = {"model": model, "setting": ours["setting"], "dataset": None}
            targets.append(
                {
                    "target": "quantize time <= 0.5x GPTQModel",
                    **common,
                    "gptqlab_seconds": ours["seconds"],
                    "gptqmodel_seconds": theirs["seconds"],
                    "detail": f"median of {ours['runs']} alternating runs, {ours['tokens']} tokens: gptqlab "
                    f"{ours['seconds']:.1f} s vs GPTQModel {theirs['seconds']:.1f} s ({ratio:.2f}x)",
                    "status": "PASS" if ratio <= 0.5 else "MISS",
                }
            )
            targets.append(
                {
                    "target": "peak RSS <= GPTQModel",
                    **common,
                    "gptqlab_peak_rss_mb": ours["peak_rss_mb"],
                    "gptqmodel_peak_rss_mb": theirs["peak_rss_mb"],
                    "detail": f"gptqlab {ours['peak_rss_mb']:.0f} MB vs GPTQModel {theirs['peak_rss_mb']:.0f} MB "
                    f"({rss:.2f}x)",
                    "status": "PASS" if rss <= 1 else "MISS",
                }
            )
    return summary, targets


def speed_table(summary: list[dict]) -> str:
    return table(
        ["model", "setting", "tool", "tokens", "runs", "median s", "each s", "peak RSS MB"],
        [
            [
                r["model"],
                r["setting"],
                r["tool"],
                r["tokens"],
                r["runs"],
                r["seconds"],
                " ".join(f"{x:.1f}" for x in r["seconds_each"]),
                r["peak_rss_mb"],
            ]
            for r in summary
        ],
    )


def write_speed_model(folder: Path, name: str) -> Path:
    """Build ``random-llama-H`` (2 layers, hidden H) in ``folder`` once; returns its folder."""
    from gptqlab.benchmarks.quantize_7b_layers import INTERMEDIATE, write_random_llama

    hidden = int(SPEED_MODEL.fullmatch(name).group(1))
    out = folder / name
    if not (out / "config.json").is_file():
        write_random_llama(out, 2, hidden=hidden, intermediate=INTERMEDIATE * hidden // 4096, heads=hidden // 128)
    return out


def short(dataset: str) -> str:
    return dataset.removesuffix("-heldout")


def peers_table(rows: list[dict]) -> str:
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    keyed = {(r["model"], r["setting"], tool_of(r), r["dataset"]): r for r in rows}
    lines = list(dict.fromkeys((r["model"], r["setting"], tool_of(r)) for r in rows))
    headers = ["model", "setting", "tool"]
    for d in datasets:
        headers += [f"ppl {short(d)}", f"bpc {short(d)}"]
    headers += ["quant s", "peak RSS MB", "size MB"]
    body = []
    for model, setting, tool in lines:
        first = keyed[(model, setting, tool, datasets[0])]
        cells = [model, setting, tool]
        for d in datasets:
            r = keyed.get((model, setting, tool, d))
            cells += [r["ppl"] if r else None, r["bits_per_char"] if r else None]
        body.append([*cells, first["quantize_seconds"], first["peak_rss_mb"], first["size_mb"]])
    return table(headers, body)


def domain_table(domain: list[dict]) -> str:
    datasets = list(dict.fromkeys(r["dataset"] for r in domain))
    keyed = {(r["model"], r["calib_label"], r["dataset"]): r for r in domain}
    lines = list(dict.fromkeys((r["model"], r["calib_label"], r["setting"]) for r in domain))
    headers = ["model", "calibrated on", "setting"]
    for d in datasets:
        headers += [f"ppl {short(d)}", f"bpc {short(d)}"]
    body = []
    for model, calib, setting in lines:
        cells = [model, calib, setting]
        for d in datasets:
            r = keyed[(model, calib, d)]
            cells += [r["ppl"], r["bits_per_char"]]
        body.append(cells)
    return table(headers, body)


def targets_report(targets: list[dict]) -> str:
    lines = [f"{t['status']}  {t['target']}: {t['model']} {t['setting']}" for t in targets]
    lines = [
        f"{line}{' ' + short(t['dataset']) if t['dataset'] else ''} — {t['detail']}"
        for line, t in zip(lines, targets, strict=True)
    ]
    for name in dict.fromkeys(t["target"] for t in targets):
        group = [t for t in targets if t["target"] == name]
        passed = sum(t["status"] == "PASS" for t in group)
        lines.append(f"{'PASS' if passed == len(group) else 'MISS'}  {name}: {passed}/{len(group)} pass")
    return "\n".join(lines)


def run(opts: PeersOptions) -> dict:
    """Run the comparison and the domain table, print them with the targets, write JSON and plots."""
    from gptqlab.resolve import resolve_model_dir

    dev = resolve_device(opts.device)
    set_threads(opts.threads)  # the children get OMP_NUM_THREADS
    texts = eval_texts(opts.datasets, opts.max_chars)
    speed_models = [m for m in opts.models if SPEED_MODEL.fullmatch(m)]
    models = [(model_label(m), resolve_model_dir(m).resolve()) for m in opts.models if m not in speed_models]
    for _, model_dir in models:
        check_context(str(model_dir), max(opts.seqlen, opts.eval_seqlen))
    env = environment(dev)
    print(env_line(env))
    print(
        f"calibration {opts.calib}: {opts.nsamples} x {opts.seqlen} tokens, seed {opts.seed}, "
        f"damp {opts.damp_percent}; "
        f"evaluation: windows of {opts.eval_seqlen} tokens on the first {opts.max_chars or 'all'} characters of "
        f"{', '.join(d for d, _ in texts)}"
    )
    started = time.perf_counter()
    work = Path(opts.work_dir or tempfile.mkdtemp(prefix="gptqlab-peers-")).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    runner = Runner(opts, work, texts)
    rows: list[dict] = []
    domain: list[dict] = []
    speed: list[dict] = []
    try:
        speed_tools = [t for t in ("gptqlab-gptq", "gptqmodel") if t in opts.tools]
        for name in speed_models:
            print(f"{name}: building a random 2-layer model (time and memory only)", flush=True)
            model_dir = write_speed_model(work, name)
            for repeat in range(opts.speed_repeats):
                for tool in speed_tools if repeat % 2 == 0 else speed_tools[::-1]:
                    speed.append(
                        runner.quantize(
                            model_dir,
                            name,
                            tool,
                            opts.parsed[0],
                            opts.calib,
                            opts.speed_nsamples,
                            opts.speed_seqlen,
                            repeat,
                        )
                    )
        for label, model_dir in models:
            for score in runner.evaluate(model_dir, label):
                rows.append(_row(score, "fp16", "none", None, None, folder_size_mb(model_dir)))
            for setting in opts.parsed:
                for tool in opts.tools:
                    result = runner.quantize(model_dir, label, tool, setting, opts.calib)
                    name, method = TOOLS[tool]
                    for score in runner.evaluate(Path(result["out"]), label):
                        rows.append(_row(score, name, method, setting, result, result["size_mb"]))
            if opts.domain:
                setting = Setting(opts.domain_bits, opts.domain_group_size, False)
                for calib_label, calib in opts.domain_sources:
                    result = runner.quantize(model_dir, label, "gptqlab-gptq", setting, calib)
                    for score in runner.evaluate(Path(result["out"]), label):
                        domain.append(
                            {
                                "model": label,
                                "calib": calib,
                                "calib_label": calib_label,
                                "setting": setting.name,
                                "bits": setting.bits,
                                "group_size": setting.group_size,
                                "dataset": score["dataset"],
                                "ppl": score["ppl"],
                                "bits_per_char": score["bits_per_char"],
                            }
                        )
                domain += [{**r, "calib": None, "calib_label": "(fp16)", "setting": "fp16"} for r in _fp16(rows, label)]
    finally:
        if opts.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    speed_rows, speed_targets = speed_summary(speed)
    targets = check_targets(rows) + speed_targets
    if rows:
        print(
            "\nquantizers (same calibration tokens and settings; every checkpoint scored by gptqlab.load + perplexity)"
        )
        print(peers_table(rows))
    if speed_rows:
        print("\ntime and memory on random models (alternating runs; medians)")
        print(speed_table(speed_rows))
    if domain:
        print("\ncalibration domain (gptqlab GPTQ)")
        print(domain_table(domain))
    print("\ntargets")
    print(targets_report(targets))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    options = {
        k: v
        for k, v in asdict(opts).items()
        if k not in ("parsed", "domain_sources", "json_path", "plot_dir", "progress")
    }
    result = {
        "env": env,
        "options": options,
        "rows": rows,
        "domain": domain,
        "speed": speed_rows,
        "targets": targets,
        "runs": list(runner.runs.values()),
    }
    if opts.json_path is not None:
        print(f"wrote {write_json(opts.json_path, result)}")
    if opts.plot_dir is not None:
        from gptqlab.benchmarks.plots import plot_peers

        for path in plot_peers(result, Path(opts.plot_dir)):
            print(f"wrote {path}")
    return result


def _fp16(rows: list[dict], label: str) -> list[dict]:
    keep = ("model", "dataset", "ppl", "bits_per_char", "bits", "group_size")
    return [{k: r[k] for k in keep} for r in rows if r["tool"] == "fp16" and r["model"] == label]
