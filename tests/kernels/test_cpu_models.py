"""Whole models on the CPU int4 path: ``gptqlab.load(device="cpu")`` against the same checkpoint on the
torch reference (``backend="torch"``, the exact dequantized weight).

Stated tolerances: logits within 1 % of the reference (relative Frobenius norm; measured 0.3-0.6 % with
float32 activations, 0.50-0.53 % with the CPU default, bfloat16), and greedy decoding of the embedded
models at 4 bits equal to the reference's for the first :data:`GREEDY_EQUAL` new tokens, with either
activation type. Greedy decoding turns a 0.3 % logit difference into a different token at a near tie, so
the number is per checkpoint: measured on these checkpoints (16 x 128 calibration tokens, float16 layer
inputs), tiny-zh-llama's first 16 tokens agree, then a near tie flips; tiny-zh-bloom's 32 all agree.
"""

import pytest
import torch
from testkit import run_cli

import gptqlab
from gptqlab.kernels import cpu
from gptqlab.qlinear import QuantLinear

pytestmark = pytest.mark.skipif(not cpu.kernel_available(), reason="this torch has no CPU int4 kernel")
PROMPT = "中华人民共和国国务院总理今天在北京会见了来访的代表团，双方就经济合作"
FAST = ["--nsamples", "16", "--seqlen", "128", "-q"]
GREEDY_EQUAL = {"tiny-zh-llama": 16, "tiny-zh-bloom": 32}
NEW_TOKENS = 32


def _greedy_prefix(fast, ref, ids) -> int:
    """How many of NEW_TOKENS greedy tokens the fast path shares with the reference before they differ."""
    got = fast.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)[0, -NEW_TOKENS:]
    want = ref.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)[0, -NEW_TOKENS:]
    differ = (got != want).nonzero()
    return int(differ[0, 0]) if len(differ) else NEW_TOKENS


def _pair(path, dtype=None):
    """(model on the CPU kernel with activations in ``dtype``, the same checkpoint on the torch reference)."""
    fast = gptqlab.load(str(path), device="cpu", dtype=dtype)
    ref = gptqlab.load(str(path), device="cpu", backend="torch")
    assert ref.dtype == torch.float32  # the exact reference: float32 activations by default
    layers = [m for m in fast.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.cpu_group is not None for m in layers)  # every layer on the fast path
    assert all(m.cpu_group is None for m in ref.modules() if isinstance(m, QuantLinear))
    return fast, ref


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def embedded_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded-cpu")
    ckpts = {
        "tiny-zh-llama": root / "llama-w4g128-act",
        "tiny-zh-bloom": root / "bloom-w4g128",
    }
    extra = {"tiny-zh-llama": ["--act-order"], "tiny-zh-bloom": []}
    for name, out in ckpts.items():
        assert run_cli(["quantize", name, out, *FAST, *extra[name]]) == 0
    return ckpts


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-zh-llama", "tiny-zh-bloom"])
def test_embedded_models_match_the_reference(embedded_ckpts, name):
    path = embedded_ckpts[name]
    fast, ref = _pair(path, torch.float32)
    ids = gptqlab.load_tokenizer(str(path))(PROMPT, return_tensors="pt").input_ids  # [1, T]
    with torch.no_grad():
        assert _rel_err(fast(ids).logits, ref(ids).logits) < 1e-2
    assert _greedy_prefix(fast, ref, ids) >= GREEDY_EQUAL[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-zh-llama", "tiny-zh-bloom"])
def test_bf16_default_stays_close_to_the_reference(embedded_ckpts, name):
    path = embedded_ckpts[name]
    fast, ref = _pair(path)
    assert fast.dtype == torch.bfloat16  # the CPU default on the int4 kernel
    ids = gptqlab.load_tokenizer(str(path))(PROMPT, return_tensors="pt").input_ids  # [1, T]
    with torch.no_grad():
        err = _rel_err(fast(ids).logits, ref(ids).logits)
    same = _greedy_prefix(fast, ref, ids)
    print(f"{name}: bf16 default, logits {err:.2%} from the reference, first {same} greedy tokens equal")
    assert err < 1e-2
    assert same >= GREEDY_EQUAL[name]


KINDS = {
    "v1-act-order": ["--act-order"],
    "v2-asym": ["--format", "gptq_v2", "--no-sym"],
    "8bit": ["--bits", "8"],
    "3bit": ["--bits", "3"],
    "2bit-g32": ["--bits", "2", "--group-size", "32"],
    "g-1": ["--group-size", "-1"],
}


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "kind"), [*(("llama", k) for k in KINDS), ("bloom", "v2-asym")])
def test_every_checkpoint_kind_runs_on_the_fast_path(tiny_models, tmp_path, arch, kind):
    out = tmp_path / kind
    assert run_cli(["quantize", tiny_models[arch], out, "--nsamples", "8", "--seqlen", "64", "-q", *KINDS[kind]]) == 0
    fast, ref = _pair(out)
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _rel_err(fast(ids).logits, ref(ids).logits) < 1e-2


def test_load_sets_the_thread_count(embedded_ckpts, monkeypatch):
    from gptqlab import loader
    from gptqlab.errors import GptqlabError

    before = torch.get_num_threads()
    try:
        loader.load(str(embedded_ckpts["tiny-zh-bloom"]), device="cpu", threads=2)
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(loader.os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
        assert loader.default_cpu_threads() == loader.CPU_THREADS == 1
        loader.load(str(embedded_ckpts["tiny-zh-bloom"]), device="cpu")
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(loader.os, "sched_getaffinity", lambda _: set(range(16)), raising=False)
        assert loader.default_cpu_threads() is None  # torch's default is kept on larger machines
        assert loader.default_cpu_threads(loader.SMALL_MODEL_PARAMS) is None
        assert loader.default_cpu_threads(loader.SMALL_MODEL_PARAMS - 1) == 1  # ... except for small models
        torch.set_num_threads(2)
        loader.load(str(embedded_ckpts["tiny-zh-bloom"]), device="cpu")  # 5.2 M parameters
        assert torch.get_num_threads() == 1
        with pytest.raises(GptqlabError, match="threads must be at least 1"):
            loader.load(str(embedded_ckpts["tiny-zh-bloom"]), device="cpu", threads=0)
    finally:
        torch.set_num_threads(before)
