"""Loading and running a quantized checkpoint imports nothing of the quantizer, the calibration code or the
benchmarks, and ``gptqlab eval`` imports no benchmarks. Each check runs in a fresh interpreter, so what other
tests imported cannot hide or cause an import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from testkit import run_cli

FORBIDDEN_ON_LOAD = ("gptqlab.quantize", "gptqlab.calib", "gptqlab.benchmarks")


def imported_after(code: str) -> list[str]:
    """The gptqlab modules in sys.modules after running ``code`` in a new interpreter."""
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(m for m in sys.modules if m.startswith('gptqlab'))))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def loaded_modules(tiny_models, tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("imports") / "llama-w4"
    small = ["--group-size", "64", "--nsamples", "4", "--seqlen", "32", "-q", "--act-order"]
    assert run_cli(["quantize", tiny_models["llama"], out, *small]) == 0
    code = (
        "import torch, gptqlab\n"
        f"model = gptqlab.load({str(out)!r}, device='cpu')\n"
        "from gptqlab.qlinear import QuantLinear\n"
        "assert any(isinstance(m, QuantLinear) for m in model.modules())\n"
        "with torch.inference_mode():\n"
        "    model(torch.tensor([[0, 5, 9, 14]]))\n"
    )
    return imported_after(code)


def test_loading_and_running_imports_no_quantizer(loaded_modules):
    assert "gptqlab.loader" in loaded_modules and "gptqlab.qlinear" in loaded_modules  # the probe loaded
    assert [m for m in loaded_modules if m.startswith(FORBIDDEN_ON_LOAD)] == []


def test_loading_imports_no_gptq_solver(loaded_modules):
    """Loading needs gptqlab.quant's config, result type and packing, never its solvers."""
    assert "gptqlab.quant.pack" in loaded_modules  # the probe did import gptqlab.quant
    assert "gptqlab.quant.gptq_solve" not in loaded_modules
    assert "gptqlab.quant.round_to_nearest" not in loaded_modules


def test_quant_exports_the_solver_functions():
    import gptqlab.quant
    from gptqlab.quant import gptq, rtn

    assert callable(gptq) and callable(rtn) and gptq.__name__ == "gptq" and rtn.__name__ == "rtn"
    assert gptqlab.quant.gptq is gptq
    with pytest.raises(AttributeError):
        gptqlab.quant.no_such_name  # noqa: B018


def test_eval_imports_no_benchmarks(tmp_path):
    code = (
        "from gptqlab.cli import main\n"
        "try:\n"
        "    main(['eval', 'ppl', 'tiny-zh-llama', '--seqlen', '64', '--max-chars', '300', '-q'])\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
    )
    modules = imported_after(code)
    assert "gptqlab.evaluate" in modules
    assert [m for m in modules if m.startswith("gptqlab.benchmarks")] == []


def test_cli_help_imports_no_torch():
    code = "import sys\nfrom gptqlab.cli import app\nassert 'torch' not in sys.modules, 'torch imported'\n"
    assert "gptqlab.cli.quantize" in imported_after(code)
