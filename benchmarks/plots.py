"""PNG charts of ``gptqlab bench peers`` results (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

from gptqlab.errors import ConfigError

TOOL_ORDER = ("gptqlab-gptq", "gptqmodel", "gptqlab-rtn")
COLORS = {"gptqlab-gptq": "#1f77b4", "gptqmodel": "#ff7f0e", "gptqlab-rtn": "#7f7f7f"}


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise ConfigError("--plot needs matplotlib: pip install 'gptqlab[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grouped_bars(ax, groups: list[str], series: dict[str, list[float | None]], colors: dict[str, str]) -> None:
    """Bars for each series side by side within each group; a None value leaves a gap."""
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        present = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None]
        ax.bar([x for x, _ in present], [v for _, v in present], width, label=name, color=colors.get(name))
    ax.set_xticks(range(len(groups)), groups)


def plot_peers(result: dict, folder: Path) -> list[Path]:
    """peers_ppl.png (perplexity by setting and tool, fp16 dashed) and peers_cost.png (quantize time and
    peak RSS) when the result has perplexity rows, domain.png when it has a domain table, and
    peers_speed.png (median time and peak RSS on the random models) when it has speed rows. Returns the
    files written."""
    from gptqlab.benchmarks.bench_peers import short, tool_of

    plt = _pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    rows = result["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    settings = list(dict.fromkeys(r["setting"] for r in rows if r["tool"] != "fp16"))
    tools = [t for t in TOOL_ORDER if any(tool_of(r) == t for r in rows)]
    keyed = {(r["model"], r["setting"], tool_of(r), r["dataset"]): r for r in rows}
    written = _plot_speed(plt, result.get("speed") or [], folder)
    if not rows:
        return written

    fig, axes = plt.subplots(len(models), len(datasets), figsize=(5 * len(datasets), 3.6 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, dataset in enumerate(datasets):
            ax = axes[i][j]
            series = {
                t: [keyed[(model, s, t, dataset)]["ppl"] if (model, s, t, dataset) in keyed else None for s in settings]
                for t in tools
            }
            _grouped_bars(ax, settings, series, COLORS)
            base = keyed.get((model, "fp16", "fp16", dataset))
            if base:
                ax.axhline(base["ppl"], color="black", linestyle="--", linewidth=1, label="fp16")
                values = [v for vs in series.values() for v in vs if v is not None]
                ax.set_ylim(base["ppl"] * 0.97, max([base["ppl"], *values]) * 1.03)
            ax.set_title(f"{model} — {short(dataset)}")
            ax.set_ylabel("perplexity (lower is better)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    written.append(folder / "peers_ppl.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(len(models), 2, figsize=(10, 3.6 * len(models)), squeeze=False)
    cost = (("quantize_seconds", "quantize wall time (s)"), ("peak_rss_mb", "peak RSS (MB)"))
    for i, model in enumerate(models):
        for j, (key, label) in enumerate(cost):
            series = {t: [(keyed.get((model, s, t, datasets[0])) or {}).get(key) for s in settings] for t in tools}
            _grouped_bars(axes[i][j], settings, series, COLORS)
            axes[i][j].set_title(model)
            axes[i][j].set_ylabel(label)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    written.append(folder / "peers_cost.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    domain = result.get("domain") or []
    if domain:
        dmodels = list(dict.fromkeys(r["model"] for r in domain))
        calibs = list(dict.fromkeys(r["calib_label"] for r in domain))
        dkeyed = {(r["model"], r["calib_label"], r["dataset"]): r["ppl"] for r in domain}
        fig, axes = plt.subplots(1, len(dmodels), figsize=(5 * len(dmodels), 3.6), squeeze=False)
        palette = ["#2ca02c", "#d62728", "#9467bd", "#000000"]
        for i, model in enumerate(dmodels):
            series = {c: [dkeyed.get((model, c, d)) for d in datasets] for c in calibs}
            _grouped_bars(axes[0][i], [short(d) for d in datasets], series, dict(zip(calibs, palette, strict=False)))
            values = [v for vs in series.values() for v in vs if v is not None]
            axes[0][i].set_ylim(min(values) * 0.97, max(values) * 1.03)
            axes[0][i].set_title(f"{model}: calibration domain (gptqlab GPTQ)")
            axes[0][i].set_ylabel("perplexity on held-out split")
        axes[0][0].legend(fontsize=8, title="calibrated on")
        fig.tight_layout()
        written.append(folder / "domain.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def _plot_speed(plt, speed: list[dict], folder: Path) -> list[Path]:
    if not speed:
        return []
    models = list(dict.fromkeys(r["model"] for r in speed))
    tools = [t for t in TOOL_ORDER if any(r["tool"] == t for r in speed)]
    keyed = {(r["model"], r["tool"]): r for r in speed}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), squeeze=False)
    for j, (key, label) in enumerate((("seconds", "median quantize wall time (s)"), ("peak_rss_mb", "peak RSS (MB)"))):
        series = {t: [(keyed.get((m, t)) or {}).get(key) for m in models] for t in tools}
        _grouped_bars(axes[0][j], models, series, COLORS)
        axes[0][j].set_ylabel(label)
        axes[0][j].set_title("random 2-layer LLaMA (time and memory only)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = folder / "peers_speed.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]
