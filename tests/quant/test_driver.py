"""The layer-wise driver: batches, shared Hessians, early-stopped stage passes, resume across batches,
timing records, and memory: what it keeps per Linear."""

from __future__ import annotations

import logging

import pytest
import torch

from gptqlab.quant import QuantConfig
from gptqlab.quantize.driver import batch_size_for, quantize_model

CFG = QuantConfig(bits=4, group_size=64)


def _model(tiny_models, arch="llama"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()


def _ids(n=5, seqlen=32):
    return torch.randint(3, 200, (n, seqlen), generator=torch.Generator().manual_seed(1))


def _collect(tiny_models, arch="llama", **kw):
    done = {}
    outputs = {}

    def on_block(i, _block, results, outs):
        done[i] = results
        outputs[i] = [x.clone() for x in outs]

    model = _model(tiny_models, arch)
    reports = quantize_model(model, _ids(), CFG, progress=False, on_block=on_block, **kw)
    return model, reports, done, outputs


def test_hessian_is_one_matrix_product_per_batch():
    from gptqlab.quantize.distributed import Distributed

    x = torch.randn(3, 10, 16)
    acc = Distributed.single().hessian(16, 2)
    acc.add(x[:2])
    acc.add(x[2:])
    flat = x.reshape(-1, 16).double()
    assert torch.allclose(acc.reduce(0).double(), 2 * flat.T @ flat / 30, rtol=1e-5, atol=1e-6)


def test_batch_size_follows_the_budget_and_never_the_machine(tiny_models):
    model = _model(tiny_models)
    assert batch_size_for(model, 32, 5) == 5  # a tiny model: all samples in one batch
    assert batch_size_for(model, 32, 5, batch_bytes=1) == 1
    per_sample = 4 * (32 * (6 * 64 + 3 * model.config.intermediate_size) + 2 * 4 * 32 * 32)
    if model.config.hidden_size == 64 and model.config.num_attention_heads == 4:
        assert batch_size_for(model, 32, 5, batch_bytes=2 * per_sample) == 2


@pytest.mark.parametrize("arch", ["llama", "bloom"])
def test_batches_give_the_same_result_as_single_samples(tiny_models, arch):
    """Batching changes float rounding in the forward pass, so after the first stage a few codes near a
    rounding boundary flip, and GPTQ's feedback carries each flip on (on these random models 89–100 % of a
    later Linear's codes agree); the first stage must be identical and the total loss the same."""
    _, reports_one, done_one, _ = _collect(tiny_models, arch, batch_bytes=1)  # one sample per batch
    _, reports_all, done_all, _ = _collect(tiny_models, arch)  # all five together
    assert [r.name for r in reports_one] == [r.name for r in reports_all]
    assert sum(r.loss for r in reports_one) == pytest.approx(sum(r.loss for r in reports_all), rel=0.01)
    assert reports_one[0].loss == pytest.approx(reports_all[0].loss, rel=1e-4)  # same inputs, same Hessian
    assert torch.equal(
        done_one[0][reports_one[0].name.split(".", 3)[3]].result.codes,
        done_all[0][reports_all[0].name.split(".", 3)[3]].result.codes,
    )


def test_resume_across_uneven_batches_is_bit_identical(tiny_models):
    """Five samples in batches of two (2, 2, 1): resuming at block 1 repeats the same batches."""
    model = _model(tiny_models)
    budget = 4 * (32 * (6 * model.config.hidden_size + 3 * model.config.intermediate_size))
    budget += 4 * 2 * model.config.num_attention_heads * 32 * 32
    budget *= 2  # two samples per batch
    assert batch_size_for(model, 32, 5, budget) == 2
    _, _, done, outputs = _collect(tiny_models, batch_bytes=budget)
    resumed = {}
    quantize_model(
        _model(tiny_models),
        _ids(),
        CFG,
        progress=False,
        start=1,
        inputs=outputs[0],
        batch_bytes=budget,
        on_block=lambda i, _b, results, _o: resumed.setdefault(i, results),
    )
    assert set(resumed) == {1}
    for n, q in resumed[1].items():
        assert torch.equal(q.result.codes, done[1][n].result.codes), n
        assert torch.equal(q.result.scales, done[1][n].result.scales), n


def test_sinks_get_host_results_without_dequantized_copies(tiny_models):
    model, _, done, outputs = _collect(tiny_models)
    for linears in done.values():
        for q in linears.values():
            assert q.result.Q is None
            assert q.result.codes.dtype == torch.uint8 and q.result.codes.device.type == "cpu"
    assert all(x.shape == (1, 32, model.config.hidden_size) for x in outputs[0])


def test_stage_passes_stop_after_the_stage(tiny_models):
    """Collecting q/k/v's Hessian must not run the MLP: count down_proj calls per block."""
    model = _model(tiny_models)
    calls = []
    for block in model.model.layers:
        block.mlp.down_proj.register_forward_hook(lambda *_: calls.append(1))
    quantize_model(model, _ids(), CFG, progress=False)
    # per block: the gate/up pass stops before down_proj, so down_proj runs in its own pass and the output
    # pass only (one batch each); without stops it would run in all five passes
    assert len(calls) == 2 * len(model.model.layers)


def test_each_block_logs_its_timing(tiny_models, caplog):
    with caplog.at_level(logging.DEBUG, logger="gptqlab.driver"):
        _collect(tiny_models)
    timings = [r.block_timing for r in caplog.records if hasattr(r, "block_timing")]
    assert [t.block for t in timings] == [0, 1]
    for t in timings:
        assert t.total >= t.solve > 0 and t.forward > 0 and t.batch_size == 5


def test_bfloat16_products_keep_float32_hessians():
    """Under the CPU's bfloat16 autocast the Linear computes in bfloat16, but its Hessian is the float32
    product of the inputs it read."""
    from gptqlab.quantize.distributed import Distributed
    from gptqlab.quantize.driver import _StageHessians

    lin = torch.nn.Linear(64, 32)
    hooks = _StageHessians({"l": lin}, Distributed.single("cpu"), num_chunks=1, stop=False)
    handle = lin.register_forward_hook(hooks.hook("l"))
    x = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    handle.remove()
    assert y.dtype == torch.bfloat16
    H = hooks.reduce(["l"], [0], "p")["l"]
    flat = x.reshape(-1, 64).double()
    assert H.dtype == torch.float32
    # float32 accuracy; a bfloat16 product would be off by about 2⁻⁹ relative
    assert torch.allclose(H.double(), 2 * flat.T @ flat / 64, rtol=1e-5, atol=1e-5)


def test_bfloat16_forward_passes_change_little(tiny_models):
    """compute_dtype=bfloat16 (the CPU default where it is fast) against float32 products: the same weights
    are solved (float32), from Hessians of slightly different inputs."""
    from gptqlab.quantize.driver import cpu_compute_dtype

    assert cpu_compute_dtype("float32") == torch.float32 and cpu_compute_dtype("bfloat16") == torch.bfloat16
    _, fp32, done32, _ = _collect(tiny_models)
    _, bf16, done16, _ = _collect(tiny_models, compute_dtype=torch.bfloat16)
    loss32, loss16 = sum(r.loss for r in fp32), sum(r.loss for r in bf16)
    assert abs(loss16 / loss32 - 1) < 0.02, (loss16, loss32)  # the layer-wise objective hardly moves ...
    differ = [not torch.equal(done16[i][n].result.codes, done32[i][n].result.codes) for i in done32 for n in done32[i]]
    assert any(differ)  # ... though the products did run in bfloat16


@pytest.mark.parametrize("arch", ["llama", "bloom"])
def test_parameters_outside_the_blocks_are_released_and_ties_kept(tiny_models, arch):
    from gptqlab.arch import arch_for
    from gptqlab.modelfiles import release

    model = _model(tiny_models, arch)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    blocks = arch_for(model).blocks
    release(model, skip=blocks)
    for name, p in model.named_parameters(remove_duplicate=False):
        assert (p.device.type == "meta") != name.startswith(blocks + "."), name
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    assert tied == (arch == "bloom")


def test_many_batches_share_a_bounded_number_of_hessian_chunks(tiny_models, monkeypatch):
    """With more forward batches than MAX_CHUNKS, consecutive batches form one chunk: the tree gets at most
    MAX_CHUNKS leaves per Hessian, holds at most ceil(log2 C) + 1 partial sums, and the result barely moves
    (the batches of a chunk are summed in order instead of pairwise)."""
    from gptqlab.quantize import driver
    from gptqlab.quantize.distributed.tree import PairwiseSum

    _, reference, _, _ = _collect(tiny_models, batch_size=1)  # 5 one-sample chunks
    leaves, held = [], []
    add_leaf = PairwiseSum.add_leaf

    def counting(self, chunk, value, tokens):
        leaves.append(chunk)
        add_leaf(self, chunk, value, tokens)
        held.append(len(self.stack))

    monkeypatch.setattr(PairwiseSum, "add_leaf", counting)
    monkeypatch.setattr(driver, "MAX_CHUNKS", 2)
    _, capped, _, _ = _collect(tiny_models, batch_size=1)  # 5 batches → chunks of 3 and 2 samples
    hessians = len(leaves) // 2
    assert leaves == [0, 1] * hessians and max(held) <= 2
    assert hessians == 2 * 4  # 2 blocks x (q/k/v, o, gate/up, down)
    for a, b in zip(reference, capped, strict=True):
        assert b.loss == pytest.approx(a.loss, rel=1e-4), a.name
