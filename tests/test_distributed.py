"""gptqlab.quantize.distributed: the chunk tree's exactness, owner assignment, and 2- and 3-rank gloo runs on
localhost (Hessian reduction, result broadcast, gather/scatter of inputs, a dead and a hung rank).

The multi-rank tests start this file as a script once per rank, with the environment torchrun would set
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, a free MASTER_PORT); each rank saves what it saw and
the test compares it with a single-process computation. Every process uses one thread: on this CPU, MKL's
X^T X takes a different summation order with two threads than with one (see test_matmul_threads_note).
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from gptqlab.errors import ConfigError, GptqlabError
from gptqlab.quant import QuantConfig, QuantResult, gptq
from gptqlab.quantize.distributed import (
    Distributed,
    PairwiseSum,
    RankFailure,
    RemoteError,
    assign_owners,
    chunk_ranges,
    cover,
    rank_chunks,
    rank_samples,
    root_level,
)
from gptqlab.quantize.distributed.tree import Node

# -- the chunk tree ------------------------------------------------------------------------------------------


def tree_sum(partials: list[torch.Tensor]) -> torch.Tensor:
    """The canonical sum, transcribed from its definition in gptqlab/quantize/distributed/tree.py."""

    def node(k: int, j: int) -> torch.Tensor:
        if k == 0:
            return partials[j].clone()
        left = node(k - 1, 2 * j)
        if (2 * j + 1) << (k - 1) >= len(partials):
            return left
        return left + node(k - 1, 2 * j + 1)

    return node(root_level(len(partials)), 0)


def partials(C: int, seed: int = 0, K: int = 8) -> list[torch.Tensor]:
    """C float32 [K, K] tensors whose magnitudes span six orders, so that the grouping of a sum shows in
    its bits."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(K, K, generator=g) * 10 ** torch.randint(-3, 3, (1,), generator=g).item() for _ in range(C)]


def streamed(parts: list[torch.Tensor], lo: int, hi: int, C: int) -> PairwiseSum:
    s = PairwiseSum(C, start=lo)
    for c in range(lo, hi):
        s.add_leaf(c, parts[c].clone(), 10 + c)
    return s


def combined(parts: list[torch.Tensor], bounds: list[int]) -> Node:
    """The sum as the owner combines it when ranks own chunks [bounds[i], bounds[i+1])."""
    C = len(parts)
    total = PairwiseSum(C)
    for lo, hi in itertools.pairwise(bounds):
        for node in streamed(parts, lo, hi, C).nodes:
            total.push(node)
    return total.total()


def compositions(C: int):
    """Every split of chunks 0 .. C-1 into contiguous non-empty ranges, as boundary lists."""
    for mask in range(1 << (C - 1)):
        yield [0, *(i + 1 for i in range(C - 1) if mask >> i & 1), C]


@pytest.mark.parametrize("C", [1, 2, 3, 5, 8, 13, 16, 31])
def test_streaming_sum_is_the_tree_definition(C):
    parts = partials(C, seed=C)
    root = streamed(parts, 0, C, C).total()
    assert torch.equal(root.value, tree_sum(parts))
    assert root.tokens == sum(10 + c for c in range(C))
    assert root.level == root_level(C)


def test_every_split_into_ranks_gives_the_same_bits():
    checked = 0
    for C in range(1, 11):
        parts = partials(C, seed=100 + C)
        reference = tree_sum(parts)
        splits = list(compositions(C))
        # torch's rank_chunks splits too, including ranks that own nothing (more ranks than chunks).
        splits += [[rank_chunks(C, W, r).start for r in range(W)] + [C] for W in range(1, C + 4)]
        for bounds in splits:
            root = combined(parts, bounds)
            assert torch.equal(root.value, reference), (C, bounds)
            assert root.tokens == sum(10 + c for c in range(C))
            checked += 1
    assert checked == sum(2 ** (C - 1) + C + 3 for C in range(1, 11))


def test_a_different_order_is_not_bit_equal():
    """The exactness tests can fail: summing the same partials left to right changes the bits (and only
    the bits: the values agree to float32 rounding)."""
    for C in (5, 13, 16):
        parts = partials(C, seed=7 + C, K=16)
        sequential = parts[0].clone()
        for p in parts[1:]:
            sequential += p
        tree = tree_sum(parts)
        assert not torch.equal(sequential, tree)
        torch.testing.assert_close(sequential, tree, rtol=1e-5, atol=1e-4)


def test_cover_is_what_a_rank_holds():
    for C in range(1, 34):
        for lo in range(C + 1):
            for hi in range(lo, C + 1):
                held = [(n.level, n.index) for n in streamed([torch.zeros(1)] * C, lo, hi, C).nodes]
                nodes = cover(lo, hi, C)
                assert held == nodes, (C, lo, hi)
                assert len(nodes) <= 2 * max(1, root_level(C))
    # Dyadic ranges send one node each: 16 chunks on 4 ranks.
    assert [cover(rank_chunks(16, 4, r).start, rank_chunks(16, 4, r).stop, 16) for r in range(4)] == [
        [(2, 0)],
        [(2, 1)],
        [(2, 2)],
        [(2, 3)],
    ]
    assert cover(5, 13, 13) == [(0, 5), (1, 3), (3, 1)]


def test_pairwise_sum_rejects_gaps_and_incomplete_sums():
    s = PairwiseSum(4)
    s.add_leaf(0, torch.ones(1), 1)
    with pytest.raises(ValueError, match="starts at chunk 1, got one at 2"):
        s.add_leaf(2, torch.ones(1), 1)
    with pytest.raises(ValueError, match="incomplete"):
        s.total()
    with pytest.raises(ValueError, match="at least one chunk"):
        PairwiseSum(0)


def test_chunks_and_rank_ranges():
    assert chunk_ranges(10, 4) == [range(0, 4), range(4, 8), range(8, 10)]
    for C in range(0, 20):
        for W in range(1, 7):
            parts = [rank_chunks(C, W, r) for r in range(W)]
            assert [c for p in parts for c in p] == list(range(C))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError):
        rank_chunks(4, 2, 2)
    # Samples: 10 samples in chunks of 4 ([0, 4), [4, 8), [8, 10)) on 2 ranks: chunk 0, then chunks 1 and 2.
    assert [rank_samples(10, 4, 2, r) for r in range(2)] == [range(0, 4), range(4, 10)]
    assert [rank_samples(10, 4, 4, r) for r in range(4)] == [range(0, 0), range(0, 4), range(4, 8), range(8, 10)]
    for n, size, W in itertools.product(range(1, 12), range(1, 5), range(1, 6)):
        parts = [rank_samples(n, size, W, r) for r in range(W)]
        assert [i for p in parts for i in p] == list(range(n))


def test_assign_owners_balances_cost_deterministically():
    # LLaMA-7B's stages (N, K): q/k/v, o, gate/up, down.
    qkv = [(4096, 4096)] * 3
    assert assign_owners(qkv, 1) == [0, 0, 0]
    assert assign_owners(qkv, 2) == [0, 1, 0]
    assert assign_owners(qkv, 4) == [0, 1, 2]
    assert assign_owners([(4096, 4096)], 2) == [0]
    # down_proj (K = 11008) costs more than gate and up together: it gets a rank of its own.
    mixed = [(11008, 4096), (11008, 4096), (4096, 11008)]
    assert assign_owners(mixed, 2) == [1, 1, 0]


# -- one process ---------------------------------------------------------------------------------------------


def chunk_inputs(c: int, K: int) -> torch.Tensor:
    """Chunk c's inputs of a Linear with K inputs: [2, 16, K] (two samples of 16 tokens), channels with
    magnitudes from 0.01 to 100."""
    g = torch.Generator().manual_seed(1000 * K + c)
    return torch.randn(2, 16, K, generator=g) * torch.logspace(-2, 2, K)


def one_thread(fn):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def single_hessian(K: int, C: int) -> torch.Tensor:
    acc = Distributed.single().hessian(K, C)
    for c in range(C):
        acc.add(chunk_inputs(c, K))
    return acc.reduce(0, "single")


def test_single_process_hessian():
    K, C = 24, 7
    H = one_thread(lambda: single_hessian(K, C))
    X = torch.cat([chunk_inputs(c, K).reshape(-1, K) for c in range(C)]).double()  # [T, K]
    torch.testing.assert_close(H.double(), 2 / X.shape[0] * X.T @ X, rtol=1e-5, atol=1e-3)
    xs = [chunk_inputs(c, K).reshape(-1, K) for c in range(C)]
    parts = one_thread(lambda: [x.T @ x for x in xs])
    assert torch.equal(H, tree_sum(parts) * (2 / X.shape[0]))


def test_a_chunk_in_parts_is_summed_in_order():
    """Chunk 0 comes in two forward batches (ends_chunk=False, then True), chunk 1 whole: the leaf of chunk 0
    is X_aᵀX_a + X_bᵀX_b in that order, and the tree adds the two leaves."""
    a, b, c = (chunk_inputs(i, 8).reshape(-1, 8) for i in range(3))

    def run():
        acc = Distributed.single().hessian(8, 2)
        acc.add(a, ends_chunk=False)
        acc.add(b)
        acc.add(c)
        P0 = a.T @ a
        P0.addmm_(b.T, b)
        return acc.reduce(0), (P0 + c.T @ c) * (2 / (len(a) + len(b) + len(c)))

    H, expected = one_thread(run)
    assert torch.equal(H, expected)


def test_hessian_sum_misuse():
    acc = Distributed.single().hessian(4, 2)
    acc.add(torch.ones(3, 4))
    with pytest.raises(ValueError, match="only those before 1 were added"):
        acc.reduce(0)
    acc.add(torch.ones(3, 4))
    with pytest.raises(ValueError, match="all already added"):
        acc.add(torch.ones(3, 4))


def test_without_torchrun_nothing_is_started():
    ctx = Distributed.from_env("cpu", env={})
    assert (ctx.rank, ctx.world, ctx.is_writer, ctx.is_distributed) == (0, 1, True, False)
    assert not dist.is_initialized()
    assert ctx.my_chunks(5) == range(5)
    assert (ctx.my_samples(10, 4), ctx.sample_counts(10, 4)) == (range(10), [10])
    assert ctx.owners([(8, 8), (8, 16)]) == [0, 0]
    t = [torch.arange(3), torch.ones(2, 2)]
    assert ctx.gather_inputs(t) == t
    assert ctx.scatter_inputs(t, [2]) == t
    res = QuantResult(torch.zeros(2, 2), torch.ones(2, 1), torch.zeros(2, 1), torch.zeros(2), torch.zeros(2, 2))
    assert ctx.solve_on(0, lambda: res) is res
    assert ctx.broadcast_result(res, 0) is res
    ctx.agree("anything", "settings")
    with pytest.raises(GptqlabError, match="bad layer"):
        ctx.solve_on(0, lambda: (_ for _ in ()).throw(GptqlabError("bad layer")))
    ctx.close()
    assert Distributed.from_env("cpu", env={"RANK": "0", "WORLD_SIZE": "1"}).world == 1
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "0"}, "RANK and WORLD_SIZE must be set together"),
        ({"WORLD_SIZE": "2"}, "RANK and WORLD_SIZE must be set together"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is not within 0 .. WORLD_SIZE-1 = 1"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK=x is not an integer"),
    ],
)
def test_inconsistent_environment_is_one_line(env, message):
    with pytest.raises(ConfigError, match=message):
        Distributed.from_env("cpu", env=env)
    assert not dist.is_initialized()


def test_timeout_must_be_positive():
    with pytest.raises(ConfigError, match="must be positive"):
        Distributed.from_env("cpu", timeout=0, env={})
    with pytest.raises(ConfigError, match="must be positive"):
        Distributed.from_env("cpu", start_timeout=-1, env={})


def test_matmul_threads_note():
    """Why every process here uses one thread: with [1024, 64] inputs, MKL splits the T reduction of
    X^T X across threads, so the partial's bits depend on the thread count. A run is reproducible for a
    fixed number of threads per process (torchrun sets OMP_NUM_THREADS=1 per rank)."""
    x = torch.randn(1024, 64, generator=torch.Generator().manual_seed(0))
    one = one_thread(lambda: x.T @ x)
    torch.testing.assert_close(one, x.T @ x, rtol=1e-5, atol=1e-3)
    assert torch.equal(one, one_thread(lambda: x.T @ x))


# -- several ranks -------------------------------------------------------------------------------------------

C = 7  # chunks: ranks own [0, 3), [3, 7) with 2 ranks, [0, 2), [2, 4), [4, 7) with 3 (covers that are not dyadic)
SHAPES = [(40, 48), (32, 32), (48, 32)]  # (N, K) of three Linears
QCFG = QuantConfig(bits=4, group_size=16)


def weight(i: int) -> torch.Tensor:
    N, K = SHAPES[i]
    return torch.randn(N, K, generator=torch.Generator().manual_seed(i))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, world: int, out: Path, timeout: float = 20.0):
    """Start ``world`` ranks of ``scenario`` with torchrun's environment; returns their Popen handles."""
    port = free_port()
    procs = []
    for r in range(world):
        env = dict(
            os.environ,
            RANK=str(r),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(r),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, scenario, str(out), str(timeout)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


def finish(procs, limit: float = 90.0, ranks: list[int] | None = None) -> list[tuple[int, str]]:
    """(exit code, output) of the given ranks (default: all) once they exit; the other ranks are killed."""
    deadline = time.monotonic() + limit
    results = []
    try:
        for r in range(len(procs)) if ranks is None else ranks:
            out, _ = procs[r].communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((procs[r].returncode, out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_agree_with_one_process(tmp_path, world):
    results = finish(launch("agree", world, tmp_path))
    assert [rc for rc, _ in results] == [0] * world, results
    seen = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    owners = assign_owners(SHAPES, world)
    assert all(s["owners"] == owners for s in seen)
    assert len(set(owners)) == min(world, len(SHAPES))

    for i, (_N, K) in enumerate(SHAPES):
        # The Hessian: on the owner, bit-equal to one process's; nowhere else.
        H = one_thread(lambda K=K: single_hessian(K, C))
        for r, s in enumerate(seen):
            if r == owners[i]:
                assert torch.equal(s["H"][i], H), (world, i)
            else:
                assert s["H"][i] is None
        # The result: every rank holds the single-process solve, bit for bit.
        expected = result_fields(one_thread(lambda i=i, H=H: gptq(weight(i), H, QCFG)))
        for s in seen:
            assert_same_result(s["result"][i], expected)
            assert tuple(s["solved_by"][i]) == (owners[i], True)  # the owner, with the seconds it took
    shared = one_thread(lambda: single_hessian(16, C))
    for r, s in enumerate(seen):
        if r in (0, world - 1):
            assert torch.equal(s["shared_H"], shared)
        else:
            assert s["shared_H"] is None
        assert_same_result(
            s["stored"],
            {
                "codes": torch.tensor([[0, 100, 200], [300, 400, 500]], dtype=torch.int32),
                "scales": torch.ones(2, 1),
                "zeros": torch.full((2, 1), 8, dtype=torch.int32),
                "g_idx": torch.zeros(3, dtype=torch.int32),
                "Q": None,
                "loss": None,
                "damp_percent": 0.05,
            },
        )

    # Inputs: rank 0 gathers every sample in order; scatter hands each rank its own again.
    samples = [chunk_inputs(c, 8)[j] for c in range(C) for j in range(2)]
    assert len(seen[0]["gathered"]) == 2 * C
    assert all(torch.equal(a, b) for a, b in zip(seen[0]["gathered"], samples, strict=True))
    assert all(s["gathered"] is None for s in seen[1:])
    for r, s in enumerate(seen):
        mine = [chunk_inputs(c, 8)[j] for c in rank_chunks(C, world, r) for j in range(2)]
        assert len(s["scattered"]) == len(mine) > 0
        assert all(torch.equal(a, b) for a, b in zip(s["scattered"], mine, strict=True))
        assert s["broadcast"] == [("torch.float16", [[0.0] * 3] * 2), ("torch.bool", [True, False, True, True])]
        # The owner's bad-input error reaches every rank as a one-line GptqlabError; the group survives it.
        assert s["owner_error"] == "GptqlabError: layer blocks.0.bad: the weights contain NaN or Inf"
        assert s["bug"] == (
            "ZeroDivisionError: division by zero"
            if r == 1
            else "RemoteError: rank 1 failed while solving blocks.0.bug: ZeroDivisionError: division by zero"
        )
        assert s["mismatch"] == (
            "ConfigError: rank 1 was started with other settings than rank 0; start every rank with the same command"
        )


def assert_same_result(got: dict, expected: dict) -> None:
    for field, want in expected.items():
        if isinstance(want, torch.Tensor):
            assert got[field].dtype == want.dtype, field
            assert torch.equal(got[field], want), field
        else:
            assert got[field] == want, field


@pytest.mark.parametrize("dead", [1, 0])
def test_a_rank_that_dies_is_named(tmp_path, dead):
    """The survivor is the owner that waits for the dead rank's partial sums (dead=1), or a rank that sends
    its partial sums to a dead owner and then waits for the owner's result (dead=0)."""
    t0 = time.monotonic()
    results = finish(launch(f"die{dead}", 2, tmp_path))
    survivor = 1 - dead
    assert results[dead][0] == 3
    assert results[survivor][0] == 0, results[survivor][1]
    message = (tmp_path / f"rank{survivor}.txt").read_text()
    assert message.startswith(f"RankFailure: rank {dead} stopped while "), message
    assert message.endswith(": its connection closed (the process exited)"), message
    assert "\n" not in message
    assert time.monotonic() - t0 < 60


def test_a_rank_that_hangs_is_named_after_the_timeout(tmp_path):
    results = finish(launch("hang", 2, tmp_path, timeout=3.0), limit=60, ranks=[0])
    assert results[0][0] == 0, results[0][1]
    message = (tmp_path / "rank0.txt").read_text()
    assert message == (
        "RankFailure: rank 1 stopped while sharing the result of blocks.0.q (owner rank 1): no answer within 3 s"
    )
    seconds = float((tmp_path / "rank0.seconds").read_text())
    assert 2.5 < seconds < 15, seconds


# -- what each rank runs (this file as a script) ---------------------------------------------------------------


def _scenario_agree(ctx: Distributed, out: Path) -> None:
    owners = ctx.owners(SHAPES)
    saved: dict = {"owners": owners, "H": [], "result": []}
    mine = ctx.my_chunks(C)
    names = [f"blocks.0.linear{i}" for i in range(len(SHAPES))]
    for i, (_N, K) in enumerate(SHAPES):
        acc = ctx.hessian(K, C)
        for c in mine:
            acc.add(chunk_inputs(c, K))
        saved["H"].append(acc.reduce(owners[i], names[i]))
    solves = [lambda i=i: gptq(weight(i), saved["H"][i], QCFG) for i in range(len(SHAPES))]
    solved = ctx.solve_stage(owners, solves, names)
    saved["result"] = [result_fields(s.result) for s in solved]
    saved["solved_by"] = [(s.rank, s.seconds > 0) for s in solved]
    # One Hessian for two owners (Linears that share their input), the last rank combining it.
    acc = ctx.hessian(16, C)
    for c in mine:
        acc.add(chunk_inputs(c, 16))
    saved["shared_H"] = acc.reduce([ctx.world - 1, 0], "blocks.0.shared")
    # A result read back from a checkpoint: int32 codes beyond a byte, no Q, no loss.
    stored = QuantResult(
        torch.arange(6, dtype=torch.int32).view(2, 3) * 100,
        torch.ones(2, 1),
        torch.full((2, 1), 8, dtype=torch.int32),
        torch.zeros(3, dtype=torch.int32),
        None,
        None,
        0.05,
    )
    saved["stored"] = result_fields(ctx.broadcast_result(stored if ctx.rank == 1 else None, 1, "blocks.0.stored"))

    my_samples = [chunk_inputs(i // 2, 8)[i % 2] for i in ctx.my_samples(2 * C, 2)]
    saved["gathered"] = ctx.gather_inputs(my_samples)
    counts = ctx.sample_counts(2 * C, 2)
    saved["scattered"] = ctx.scatter_inputs(saved["gathered"], counts)
    sent = [torch.zeros(2, 3, dtype=torch.float16), torch.tensor([True, False, True, True])]
    got = ctx.broadcast_tensors(sent if ctx.rank == 0 else None)
    saved["broadcast"] = [(str(t.dtype), t.tolist()) for t in got]

    def bad():
        raise GptqlabError("layer blocks.0.bad: the weights contain NaN or Inf")

    def bug():
        raise ZeroDivisionError("division by zero")

    try:  # the first failure in stage order is raised everywhere, after the whole exchange
        ctx.solve_stage(
            [0, ctx.world - 1, 1], [lambda: stored, bad, bug], ["blocks.0.ok", "blocks.0.bad", "blocks.0.bug"]
        )
    except GptqlabError as exc:
        saved["owner_error"] = f"{type(exc).__name__}: {exc}"
    try:
        ctx.solve_on(1, bug, "blocks.0.bug")
    except (ZeroDivisionError, RemoteError) as exc:
        saved["bug"] = f"{type(exc).__name__}: {exc}"
    try:
        ctx.agree("settings B" if ctx.rank == 1 else "settings A", "settings")
    except ConfigError as exc:
        saved["mismatch"] = f"{type(exc).__name__}: {exc}"
    ctx.agree("same", "settings")
    torch.save(saved, out / f"rank{ctx.rank}.pt")


def result_fields(res: QuantResult) -> dict:
    return {f: getattr(res, f) for f in ("codes", "scales", "zeros", "g_idx", "Q", "loss", "damp_percent")}


def _scenario_die(ctx: Distributed, out: Path, dead: int) -> None:
    acc = ctx.hessian(8, C)
    for c in ctx.my_chunks(C):
        acc.add(chunk_inputs(c, 8))
    if ctx.rank == dead:
        os._exit(3)

    def reduce_and_solve():
        H = acc.reduce(0, "blocks.0.q")
        ctx.solve_on(0, lambda: gptq(weight(0), H, QCFG), "blocks.0.q")

    _report_failure(reduce_and_solve, out)


def _scenario_hang(ctx: Distributed, out: Path) -> None:
    if ctx.rank == 1:
        time.sleep(60)  # the owner of blocks.0.q never answers
        return
    _report_failure(lambda: ctx.solve_on(1, lambda: None, "blocks.0.q"), out)


def _report_failure(fn, out: Path) -> None:
    t0 = time.monotonic()
    try:
        fn()
    except RankFailure as exc:
        (out / f"rank{dist.get_rank()}.txt").write_text(f"{type(exc).__name__}: {exc}")
        (out / f"rank{dist.get_rank()}.seconds").write_text(str(time.monotonic() - t0))
        os._exit(0)  # a clean exit: the process group's shutdown would wait for the dead peer


def _rank_main(scenario: str, out: str, timeout: str) -> None:
    torch.set_num_threads(1)
    ctx = Distributed.from_env("cpu", timeout=float(timeout), start_timeout=120)
    assert ctx.world > 1 and dist.is_initialized()
    scenarios = {
        "agree": _scenario_agree,
        "die0": lambda ctx, out: _scenario_die(ctx, out, 0),
        "die1": lambda ctx, out: _scenario_die(ctx, out, 1),
        "hang": _scenario_hang,
    }
    scenarios[scenario](ctx, Path(out))
    ctx.close()


if __name__ == "__main__":
    _rank_main(*sys.argv[1:])
