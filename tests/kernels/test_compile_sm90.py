"""The kernels compile for an H100 (sm_90) without register spills, checked on a machine without a GPU.

The interpreter tests check what the kernels compute, not that the GPU compiler accepts them or how
much it needs. sm90_compile.py (run here in a subprocess, see its docstring) lowers every code path of
both kernels to a cubin with the ptxas in triton's wheel. A spill shows up as a nonzero stack frame; a
layout change that spilled thousands of bytes is how the 1-D scale rows in gemv.py came about. The
selected configs are also compiled by test_kernel_static.py; ``test_every_autotune_config`` (slow, about
3 minutes on 2 cores) compiles every config of both autotune lists at 2, 4 and 8 bits.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# triton is only found here, not imported: the other kernel tests need TRITON_INTERPRET=1 set before
# the first import of triton in this process.
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

SCRIPT = Path(__file__).with_name("sm90_compile.py")
H100_SHARED_BYTES = 227 * 1024  # opt-in shared memory per block on sm_90


def _compile(*args: str) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=1800)
    assert run.returncode == 0, run.stderr[-4000:]
    return {r["case"]: r for r in map(json.loads, run.stdout.splitlines())}


@pytest.fixture(scope="module")
def compiled() -> dict:
    return _compile()


def test_every_case_compiles(compiled):
    assert len(compiled) == 11


def test_no_register_spills(compiled):
    # fp32 activations work but are not tuned: their tf32x3 dots (three MMAs of split operands) spill
    spills = {name: r["stack_bytes"] for name, r in compiled.items() if r["stack_bytes"]}
    assert {name for name in spills if "fp32" not in name} == set()
    assert "gemv-4bit-fp32" in spills


def test_shared_memory_fits_an_h100(compiled):
    assert max(r["shared_bytes"] for r in compiled.values()) <= H100_SHARED_BYTES


def test_tensor_cores_everywhere_and_wgmma_for_the_gemm(compiled):
    assert all(r["mma"] for r in compiled.values())
    assert all(r["wgmma"] for name, r in compiled.items() if name.startswith("gemm"))


def test_fp16_paths_use_the_packed_inline_asm_and_others_do_not(compiled):
    assert {name for name, r in compiled.items() if r["inline_asm_dequant"]} == {
        name for name in compiled if "fp16" in name
    }


@pytest.mark.slow
def test_every_autotune_config_compiles_without_spills():
    everything = _compile("--all")
    assert len(everything) > 30
    assert {name: r["stack_bytes"] for name, r in everything.items() if r["stack_bytes"]} == {}
    assert max(r["shared_bytes"] for r in everything.values()) <= H100_SHARED_BYTES
