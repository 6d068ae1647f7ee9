"""``gptqlab eval ppl`` and ``gptqlab bench latency|kernels|peers`` run end to end on the tiny random
models, and the numbers they print and write are the ones they claim to be.

A random model predicts close to uniformly, so its perplexity is near the vocabulary size (512) whatever
its weights; quantization moves it by a little, in either direction. These tests therefore check the
plumbing (what is scored, what is compared, what is written), not quantization quality, which
tests/quant asserts directly.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from testkit import run_cli

ENV_KEYS = {"date", "git_commit", "device", "torch", "transformers"}
EVAL_FIELDS = {"model", "dataset", "seqlen", "tokens", "chars", "ppl", "bits_per_char"}
PEERS_FIELDS = {
    "tool",
    "method",
    "model",
    "bits",
    "group_size",
    "act_order",
    "dataset",
    "ppl",
    "bits_per_char",
    "quantize_seconds",
    "peak_rss_mb",
    "size_mb",
}


def read_json(path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def quantized_llama(tiny_models, tmp_path_factory):
    """The tiny LLaMA quantized by the CLI: GPTQ, 3-bit, group size 64."""
    out = tmp_path_factory.mktemp("q") / "llama-w3g64"
    small = ["--bits", "3", "--group-size", "64", "--nsamples", "8", "--seqlen", "64", "-q"]
    assert run_cli(["quantize", tiny_models["llama"], out, *small]) == 0
    return out


def test_eval_ppl_fp16_and_quantized(tiny_models, quantized_llama, tmp_path):
    import gptqlab
    from gptqlab.calib import load_eval_text
    from gptqlab.evaluate import perplexity

    fp16_json, q_json = tmp_path / "fp16.json", tmp_path / "q.json"
    common = ["--seqlen", "64", "--max-chars", "1500", "--head", "-q"]
    both = "peoples-daily-heldout,reviews-heldout"
    assert run_cli(["eval", "ppl", tiny_models["llama"], "-d", both, *common, "--json", fp16_json]) == 0
    assert run_cli(["eval", "ppl", quantized_llama, "-d", "peoples-daily-heldout", *common, "--json", q_json]) == 0

    fp16 = read_json(fp16_json)
    assert isinstance(fp16, list) and [r["dataset"] for r in fp16] == ["peoples-daily-heldout", "reviews-heldout"]
    quant = read_json(q_json)
    assert isinstance(quant, dict)  # one dataset: one object
    for r in [*fp16, quant]:
        assert EVAL_FIELDS <= set(r) and ENV_KEYS <= set(r["env"])
        assert math.isfinite(r["ppl"]) and 1 < r["ppl"] < 1000, r
        assert r["chars"] == 1500 and r["seqlen"] == 64 and r["tokens"] > 100
        assert r["bits_per_char"] == pytest.approx(r["nll_sum"] / math.log(2) / r["chars"])
        assert r["ppl"] == pytest.approx(math.exp(r["nll_sum"] / r["tokens"]))
    # same text, same windows: the quantized model scores about as well, never clearly better
    assert quant["tokens"] == fp16[0]["tokens"]
    assert quant["ppl"] != fp16[0]["ppl"] and quant["ppl"] > 0.99 * fp16[0]["ppl"]
    # the command scores exactly what gptqlab.load + perplexity give
    _, text = load_eval_text("peoples-daily-heldout")
    model = gptqlab.load(str(quantized_llama), device="cpu", dtype=torch.float32)
    tokenizer = gptqlab.load_tokenizer(str(quantized_llama))
    direct = perplexity(model, tokenizer, text[:1500], seqlen=64, progress=False)
    assert quant["ppl"] == pytest.approx(direct.ppl, rel=1e-6)


def test_eval_ppl_tied_bloom_checkpoint(tiny_models, tmp_path, capsys):
    """BLOOM ties lm_head to the input embedding; its quantized checkpoint stores no lm_head.weight."""
    out = tmp_path / "bloom-rtn"
    small = ["--method", "rtn", "--group-size", "64", "--nsamples", "4", "--seqlen", "32", "-q"]
    assert run_cli(["quantize", tiny_models["bloom"], out, *small]) == 0
    assert run_cli(["eval", "ppl", out, "--seqlen", "64", "--max-chars", "500", "-q"]) == 0
    assert "peoples-daily-heldout" in capsys.readouterr().out


def test_bench_latency_side_by_side(tiny_models, quantized_llama, tmp_path, capsys):
    path = tmp_path / "latency.json"
    argv = ["bench", "latency", quantized_llama, "--compare", tiny_models["llama"], "--batch-sizes", "1,2"]
    assert run_cli([*argv, "--prompt-len", "8", "--gen-len", "3", "--repeats", "2", "--json", path]) == 0
    result = read_json(path)
    assert ENV_KEYS <= set(result["env"])
    rows = result["rows"]
    roles = ["baseline", "baseline-bf16", "model", "model-bf16"]
    if importlib.util.find_spec("gptqmodel") is not None:
        roles.append("gptqmodel")  # the same checkpoint through GPTQModel, alternated in the same runs
    assert [(r["role"], r["batch_size"]) for r in rows] == [(role, b) for b in (1, 2) for role in roles]
    for r in rows:
        assert r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0 and r["peak_mem_mb"] >= 0
        assert r["tokens_per_s"] == pytest.approx(r["batch_size"] * 1e3 / r["decode_ms_per_token"])
    by = {(r["role"], r["batch_size"]): r for r in rows}
    for b in (1, 2):
        assert by[("baseline", b)]["backend"] == "dense (torch nn.Linear, float32)"
        assert by[("baseline-bf16", b)]["backend"] == "dense (torch nn.Linear, bfloat16)"
        for role in ("model", "model-bf16"):
            r = by[(role, b)]
            assert "14 QuantLinear, 3-bit" in r["backend"]
            assert r["decode_speedup"] == pytest.approx(
                by[("baseline", b)]["decode_ms_per_token"] / r["decode_ms_per_token"]
            )
            for other in roles[1:]:
                if other not in ("model", "model-bf16"):
                    want = by[(other, b)]["decode_ms_per_token"] / r["decode_ms_per_token"]
                    assert r[f"decode_vs_{other}"] == pytest.approx(want)
            assert r["weights_mb"] < by[("baseline", b)]["weights_mb"]  # packed 3-bit layers beside fp32 ones
            assert r["layers"]["quantized_layers_mb"] < 0.35 * r["layers"]["bf16_mb"]  # 3 bits + scales vs 16
    out = capsys.readouterr().out
    assert "decode ms/tok" in out and ("x GPTQModel" in out) == ("gptqmodel" in roles)


def test_bench_kernels_cpu_reports_missing_gpu_numbers(tmp_path, capsys):
    path = tmp_path / "kernels.json"
    argv = ["bench", "kernels", "--shapes", "128x96", "--bits", "4,3", "--batches", "1,4", "--group-size", "32"]
    assert run_cli([*argv, "--repeats", "2", "--device", "cpu", "--json", path]) == 0
    result = read_json(path)
    assert result["gpu_numbers_missing"] is True and result["peak_bandwidth_gbs"] is None
    rows = result["rows"]
    assert [(b, m) for b, m in dict.fromkeys((r["bits"], r["M"]) for r in rows)] == [(4, 1), (4, 4), (3, 1), (3, 4)]
    for bits, m in ((4, 1), (4, 4), (3, 1), (3, 4)):
        point = {r["kernel"]: r for r in rows if (r["bits"], r["M"]) == (bits, m)}
        assert {"dense-fp32", "dense-bf16", "gptqlab"} <= set(point)  # gptqlab's CPU path beside dense matmuls
        fp32, bf16 = point["dense-fp32"], point["dense-bf16"]
        for r in point.values():
            assert (r["K"], r["N"], r["backend"], r["group_size"]) == (128, 96, "cpu", 32)
            assert r["us"] > 0 and r["tflops"] == pytest.approx(2 * m * 128 * 96 / r["us"] / 1e6)
            assert r["vs_fp32"] == pytest.approx(fp32["us"] / r["us"])  # speedup over dense fp32, same run
            assert r["vs_bf16"] == pytest.approx(bf16["us"] / r["us"])
        assert fp32["rel_err"] == 0.0 and 0 < point["gptqlab"]["rel_err"] < 0.01  # bf16-scale rounding only
    out = capsys.readouterr().out
    assert "GPU numbers are missing" in out and "unknown" in out


def test_kernel_shapes_are_the_real_layers_shrunk_on_cpu():
    from gptqlab.benchmarks.bench_kernels import parse_shapes

    full = parse_shapes(["qwen2-7b"], 1)
    assert [(k, n) for _, _, k, n in full] == [(3584, 3584), (3584, 512), (3584, 18944), (18944, 3584)]
    shrunk = parse_shapes(["llama-7b,2048x64"], 8)
    assert [(k, n) for _, _, k, n in shrunk] == [(512, 512), (512, 1376), (1376, 512), (2048, 64)]


@pytest.mark.slow
def test_bench_peers_tiny(tiny_models, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, plots = tmp_path / "peers.json", tmp_path / "plots"
    from gptqlab.calib import builtin_texts

    # A small calibration file: drawing windows tokenizes the whole source, which for the built-in corpora
    # takes seconds in every quantizer's process. The domain table gets the same source, so it reuses the
    # gptqlab GPTQ run instead of starting another quantizer.
    (tmp_path / "news.txt").write_text("\n".join(builtin_texts("peoples-daily")[:200]), encoding="utf-8")
    small = "--settings w3g64 --nsamples 8 --seqlen 32 --eval-seqlen 64 --max-chars 2000 --domain-group-size 64 -q"
    calib = ["--calib", "txt:news.txt", "--domain-calib", "news=txt:news.txt"]
    argv = ["bench", "peers", "--models", tiny_models["llama"], *small.split(), *calib]
    assert run_cli([*argv, "--json", path, "--plot", plots]) == 0
    result = read_json(path)
    assert ENV_KEYS <= set(result["env"])
    rows = result["rows"]
    assert all(PEERS_FIELDS <= set(r) for r in rows)
    by = {(r["tool"], r["method"], r["dataset"]): r for r in rows}
    assert len(rows) == len(by) == 8  # (fp16, gptqlab gptq, gptqlab rtn, GPTQModel) x 2 held-out texts
    quantized = [r for r in rows if r["tool"] != "fp16"]
    assert len({r["calib_sha256"] for r in quantized}) == 1  # every quantizer saw the same tokens
    assert all(r["quantize_seconds"] > 0 and r["peak_rss_mb"] > 100 and r["size_mb"] > 0 for r in quantized)
    for dataset in ("peoples-daily-heldout", "reviews-heldout"):
        fp16 = by[("fp16", "none", dataset)]
        assert fp16["quantize_seconds"] is None and fp16["bits"] == 16
        for tool, method in (("gptqlab", "gptq"), ("gptqlab", "rtn"), ("gptqmodel", "gptq")):
            r = by[(tool, method, dataset)]
            assert (r["bits"], r["group_size"], r["act_order"]) == (3, 64, False)
            assert r["tokens"] == fp16["tokens"] and r["ppl"] != fp16["ppl"]
            assert 0.9 * fp16["ppl"] < r["ppl"] < 1.1 * fp16["ppl"]
            assert r["size_mb"] < fp16["size_mb"]
    # each target's verdict follows from the rows
    for t in result["targets"]:
        if t["target"] == "ppl <= GPTQModel (0.5% tie)":
            ours = by[("gptqlab", "gptq", t["dataset"])]["ppl"]
            theirs = by[("gptqmodel", "gptq", t["dataset"])]["ppl"]
            assert (t["gptqlab"], t["gptqmodel"]) == (ours, theirs)
            assert t["status"] == ("PASS" if ours <= 1.005 * theirs else "MISS")
        elif t["target"] == "rise over fp16 <= RTN rise / 2":
            fp16 = by[("fp16", "none", t["dataset"])]["ppl"]
            rise = by[("gptqlab", "gptq", t["dataset"])]["ppl"] - fp16
            rtn_rise = by[("gptqlab", "rtn", t["dataset"])]["ppl"] - fp16
            assert t["gptqlab_rise"] == pytest.approx(rise) and t["rtn_rise"] == pytest.approx(rtn_rise)
            assert t["status"] == ("PASS" if rise <= 0.5 * rtn_rise else "MISS")
        else:
            assert t["target"] == "quantize time <= 0.5x GPTQModel"
            ratio = t["gptqlab_seconds"] / t["gptqmodel_seconds"]
            assert t["status"] == ("PASS" if ratio <= 0.5 else "MISS")
    assert len(result["targets"]) == 2 + 2 + 1  # two texts for the quality targets, one time target
    domain = result["domain"]
    assert [r["calib_label"] for r in domain] == ["news", "news", "(fp16)", "(fp16)"]
    assert all(math.isfinite(r["ppl"]) for r in domain)
    news = [r for r in domain if r["calib_label"] == "news"]  # the same run as the gptqlab GPTQ rows
    assert [r["ppl"] for r in news] == [by[("gptqlab", "gptq", r["dataset"])]["ppl"] for r in news]
    assert len(result["runs"]) == 3
    assert sorted(p.name for p in plots.iterdir()) == ["domain.png", "peers_cost.png", "peers_ppl.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots.iterdir())
    out = capsys.readouterr().out
    assert "calibration domain" in out
    printed = out.split("\ntargets\n", 1)[1].splitlines()
    for t in result["targets"]:  # one printed line per target, with the verdict the JSON holds
        assert sum(line.startswith(f"{t['status']}  {t['target']}: ") for line in printed) >= 1
    for name in {t["target"] for t in result["targets"]}:  # and a summary line per target
        group = [t for t in result["targets"] if t["target"] == name]
        passed = sum(t["status"] == "PASS" for t in group)
        summary = f"{'PASS' if passed == len(group) else 'MISS'}  {name}: {passed}/{len(group)} pass"
        assert summary in printed


BAD_INPUTS = [
    ("unknown dataset", lambda m, t: ["eval", "ppl", m, "-d", "no-such-text"], "unknown evaluation text"),
    ("seqlen beyond context", lambda m, t: ["eval", "ppl", m, "--seqlen", "300"], "context of 256"),
    ("max chars not positive", lambda m, t: ["eval", "ppl", m, "--max-chars", "0"], "--max-chars must be positive"),
    ("batch sizes not integers", lambda m, t: ["bench", "latency", m, "--batch-sizes", "1,x"], "not an integer"),
    ("bad kernel shape", lambda m, t: ["bench", "kernels", "--shapes", "100x7"], "multiple of 32"),
    ("unknown model shapes", lambda m, t: ["bench", "kernels", "--shapes", "gpt-5"], "unknown shape"),
    ("bad setting", lambda m, t: ["bench", "peers", "--models", m, "--settings", "w4"], "cannot read 'w4'"),
    ("unknown tool", lambda m, t: ["bench", "peers", "--models", m, "--tools", "awq"], "unknown tool 'awq'"),
    ("missing model", lambda m, t: ["eval", "ppl", t / "nothing"], "does not exist"),
]


@pytest.mark.parametrize(("what", "argv", "message"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line(tiny_models, tmp_path, capsys, what, argv, message):
    code = run_cli(argv(tiny_models["llama"], tmp_path))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("gptqlab: error:") and "\n" not in err and "Traceback" not in err
    assert message in err


def quantize_options(argv: list[str]):
    """The QuantizeOptions that ``gptqlab quantize ARGV`` would run with (parsed, not run)."""
    import typer

    from gptqlab.cli import app
    from gptqlab.cli.quantize import options_from

    command = typer.main.get_command(app).commands["quantize"]
    return options_from(command.make_context("quantize", list(argv)).params)


def test_quantize_flags_are_the_options_fields():
    from dataclasses import fields

    from gptqlab.quantize.options import QuantizeOptions

    assert quantize_options(["m", "o"]).__dict__ == QuantizeOptions(model="m", out="o").__dict__  # same defaults
    argv = "m o --bits 3 --group-size 64 --act-order --static-groups --no-sym --method rtn --calib reviews "
    argv += "--nsamples 8 --seqlen 32 --device cpu --seed 5 --format gptq_v2 --damp-percent 0.1 "
    argv += "--no-true-sequential --mse --dtype bfloat16 --max-shard-size 1GB --overwrite --trust-remote-code -q "
    argv += "--no-resume --batch-size 4 --dist-timeout 60 --cpu-compute float32"
    got = quantize_options(argv.split())
    want = QuantizeOptions(
        "m",
        "o",
        3,
        64,
        True,
        True,
        False,
        "rtn",
        "reviews",
        8,
        32,
        "cpu",
        5,
        "gptq_v2",
        0.1,
        False,
        True,
        "bfloat16",
        "1GB",
        True,
        True,
        False,
        False,
        4,
        60.0,
        "float32",
    )
    assert got.__dict__ == want.__dict__
    assert len([f for f in fields(QuantizeOptions) if f.init]) == 26  # a new field needs a flag above too


def test_quantize_help_explains_every_option(capsys, monkeypatch):
    from gptqlab.quant.pack import SUPPORTED_BITS
    from gptqlab.quantize.driver import METHODS as DRIVER_METHODS
    from gptqlab.quantize.options import METHODS

    monkeypatch.setenv("COLUMNS", "250")  # one line per option
    assert run_cli(["quantize", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps lines; compare words
    for flag in (
        "--bits",
        "--group-size",
        "--act-order",
        "--static-groups",
        "--sym",
        "--method",
        "--calib",
        "--nsamples",
        "--seqlen",
        "--device",
        "--seed",
        "--format",
        "--damp-percent",
        "--true-sequential",
        "--mse",
        "--dtype",
        "--max-shard-size",
        "--overwrite",
        "--trust-remote-code",
        "--quiet",
        "--resume",
    ):
        assert flag in out
    assert "Default: min(2048, the model's context)" in out  # not eaten as rich markup
    bits = ", ".join(map(str, SUPPORTED_BITS[:-1])) + f" or {SUPPORTED_BITS[-1]}"
    assert f"Code width in bits: {bits}." in out
    assert METHODS == DRIVER_METHODS


def test_checkpoint_dtype_defaults_to_the_models_own():
    from types import SimpleNamespace

    from gptqlab.errors import ConfigError
    from gptqlab.quantize.options import QuantizeOptions

    opts = QuantizeOptions("m", "o")
    assert opts.checkpoint_dtype(SimpleNamespace(dtype="bfloat16")) == "bfloat16"  # Qwen2's config
    assert opts.checkpoint_dtype(SimpleNamespace(torch_dtype="torch.float16")) == "float16"
    assert opts.checkpoint_dtype(SimpleNamespace(dtype="float32")) == "float16"
    assert QuantizeOptions("m", "o", dtype="bfloat16").checkpoint_dtype(SimpleNamespace(dtype="float16")) == "bfloat16"
    with pytest.raises(ConfigError, match="--dtype must be float16 or bfloat16"):
        QuantizeOptions("m", "o", dtype="float32")
