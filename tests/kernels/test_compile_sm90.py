"""The kernels compile for an H100 (sm_90) without register spills, checked on a machine without a GPU.

The interpreter tests check what the kernels compute, not that the GPU compiler accepts them or how
much it needs. sm90_compile.py (run here in a subprocess, see its docstring) lowers each kernel path to
a cubin with the ptxas in triton's wheel. A spill shows up as a nonzero stack frame; a layout change
that spilled thousands of bytes is how the 1-D scale rows in gemv.py came about.
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


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return {r["case"]: r for r in map(json.loads, run.stdout.splitlines())}


def test_every_case_compiles(compiled):
    assert len(compiled) == 12


def test_no_register_spills(compiled):
    if any(r["stack_bytes"] is None for r in compiled.values()):
        pytest.skip("cuobjdump not found")
    assert {name: r["stack_bytes"] for name, r in compiled.items() if r["stack_bytes"]} == {}


def test_shared_memory_fits_an_h100(compiled):
    assert max(r["shared_bytes"] for r in compiled.values()) <= H100_SHARED_BYTES


def test_gemm_uses_hopper_tensor_cores(compiled):
    assert all(r["wgmma"] for name, r in compiled.items() if name.startswith("gemm"))
