"""Who does what under ``torchrun``: the chunks each rank runs, the Hessian reduction to the rank that owns a
Linear, the broadcast of its GPTQ result, and the inputs gathered to rank 0, which alone writes files.

Without torchrun (no ``RANK`` / ``WORLD_SIZE`` in the environment) :meth:`Distributed.from_env` returns a
single-process context whose operations are local and communicate nothing; it never starts a process group.
Importing this module starts nothing either.

Every transfer is point to point (``isend`` / ``irecv``) between two named ranks, in the same order on every
rank, so that a failure names the rank at the other end: a rank that exits closes its connections and its
peers stop at once with :class:`RankFailure`; a rank that hangs is reported when the process group's timeout
expires. (On NCCL, errors surface through NCCL's watchdog, which aborts the process after the timeout.)

Typical use in the layer-wise driver::

    ctx = Distributed.from_env(device)
    mine = ctx.my_chunks(C)                                 # this rank's chunks, run through each block
    samples = ctx.my_samples(nsamples, chunk_size)          # ... and their samples, for capturing inputs
    owners = ctx.owners([(lin.out_features, lin.in_features) for lin in stage])
    acc = ctx.hessian(K, C)                                 # per Linear; acc.add(x) once per own chunk
    H = acc.reduce(owners[i], name)                         # [K, K] on the owner(s), None elsewhere
    results = ctx.solve_stage(owners, solves, names)        # each rank runs its own solves; all get all
    everything = ctx.gather_inputs(my_outputs)              # rank 0: all samples in order; others: None
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from gptqlab.errors import ConfigError, GptqlabError, printable
from gptqlab.quant import QuantResult
from gptqlab.quantize.distributed.tree import Node, PairwiseSum, cover, rank_chunks, rank_samples
from gptqlab.quantize.options import DEFAULT_DIST_TIMEOUT

DEFAULT_TIMEOUT = DEFAULT_DIST_TIMEOUT  # seconds a rank waits for another

# Tensors travel as bytes with a header of (dtype code, ndim, shape); the codes index this tuple.
_DTYPES = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)
_MAX_DIMS = 6
_HEADER = 2 + _MAX_DIMS

# Result status sent before a QuantResult: the owner solved it, or raised one of these.
_OK, _USER_ERROR, _OTHER_ERROR = 0, 1, 2


class RankFailure(RuntimeError):
    """Another rank died or stopped answering. ``rank`` is the rank at the other end of the transfer that
    failed, ``what`` what was being transferred. When one rank dies, the ranks waiting on it name it; ranks
    waiting on those ranks then name them in turn, so the first RankFailure in the logs names the cause.

    Not a :class:`GptqlabError`: the input is fine, so the finished blocks stay resumable."""

    def __init__(self, rank: int, what: str, reason: str):
        self.rank = rank
        self.what = what
        super().__init__(f"rank {rank} stopped while {what}: {reason}")


class RemoteError(RuntimeError):
    """The owner of a Linear raised an exception that is not a GptqlabError (a bug) while solving it."""


def assign_owners(shapes: Sequence[tuple[int, int]], world: int) -> list[int]:
    """The rank that solves each Linear of a stage, given their shapes (out_features N, in_features K).

    Balances the GPTQ cost, about K³ (inverting H) + N·K² (the column updates): the costliest Linear goes
    first to the least loaded rank, ties to the lower index and rank, so every rank computes the same list.
    """
    cost = [k * k * (k + n) for n, k in shapes]
    load = [0] * world
    owner = [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: (-cost[i], i)):
        owner[i] = min(range(world), key=lambda r: (load[r], r))
        load[owner[i]] += cost[i]
    return owner


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={printable(value)} is not an integer") from None


def _reason(exc: BaseException, timeout: float) -> str:
    text = str(exc)
    if "timed out" in text.lower() or "timeout" in text.lower():
        return f"no answer within {timeout:g} s"
    if any(s in text for s in ("Connection reset", "Connection closed", "closed by peer", "Broken pipe", "EOF")):
        return "its connection closed (the process exited)"
    first = printable(text.strip().splitlines()[0] if text.strip() else type(exc).__name__)
    return first[:160]


class Distributed:
    """The ranks of one run. Build it with :meth:`from_env` (or :meth:`single` for one process).

    rank, world: this process's rank and the number of ranks (1 without torchrun).
    device: where this rank computes (under NCCL cuda:LOCAL_RANK) and where results arrive.
    timeout: seconds a transfer waits for the rank at the other end before failing.
    """

    def __init__(self, rank: int, world: int, device: torch.device, timeout: float, owns_group: bool = False):
        self.rank = rank
        self.world = world
        self.device = device
        self.timeout = timeout
        self._owns_group = owns_group
        # gloo moves CPU tensors, NCCL CUDA tensors.
        self._comm_device = device if world > 1 and device.type == "cuda" else torch.device("cpu")

    # -- construction ------------------------------------------------------------------------------------

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> Distributed:
        """One process: every operation is local."""
        return cls(0, 1, torch.device(device), DEFAULT_TIMEOUT)

    @classmethod
    def from_env(
        cls,
        device: str | torch.device = "cpu",
        timeout: float = DEFAULT_TIMEOUT,
        env: Mapping[str, str] | None = None,
        start_timeout: float = DEFAULT_TIMEOUT,
    ) -> Distributed:
        """The context that torchrun's environment describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
        MASTER_PORT), starting the process group: gloo for a CPU ``device``, NCCL for CUDA, where each rank
        uses cuda:LOCAL_RANK. Without RANK and WORLD_SIZE, or with WORLD_SIZE=1: :meth:`single`.

        timeout: seconds a transfer waits for the rank at the other end; start_timeout: seconds the start
        waits for every rank to join (also the backend's own timeout).
        Raises ConfigError for an inconsistent environment and GptqlabError when the group cannot start."""
        env = os.environ if env is None else env
        device = torch.device(device)
        for value in (timeout, start_timeout):
            if value <= 0:
                raise ConfigError(f"the distributed timeouts must be positive, got {value:g} s")
        rank, world = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
        if rank is None and world is None:
            return cls.single(device)
        if rank is None or world is None:
            raise ConfigError("RANK and WORLD_SIZE must be set together; start distributed runs with torchrun")
        if not 0 <= rank < world:
            raise ConfigError(f"RANK={rank} is not within 0 .. WORLD_SIZE-1 = {world - 1}")
        if world == 1:
            return cls.single(device)
        if device.type == "cuda":
            device = torch.device("cuda", _env_int(env, "LOCAL_RANK") or 0)
            torch.cuda.set_device(device)
            backend = "nccl"
        elif device.type == "cpu":
            backend = "gloo"
        else:
            raise ConfigError(f"distributed runs use cpu (gloo) or cuda (NCCL) devices, not {device.type}")
        if dist.is_initialized():
            if (dist.get_rank(), dist.get_world_size()) != (rank, world):
                raise ConfigError(
                    f"torch.distributed is already running as rank {dist.get_rank()} of {dist.get_world_size()}, "
                    f"but the environment says rank {rank} of {world}"
                )
            return cls(rank, world, device, timeout)
        try:
            dist.init_process_group(
                backend,
                rank=rank,
                world_size=world,
                timeout=timedelta(seconds=start_timeout),
                device_id=device if backend == "nccl" else None,
            )
        except (RuntimeError, ValueError) as exc:
            raise GptqlabError(
                f"cannot start torch.distributed as rank {rank} of {world}: {_reason(exc, start_timeout)}"
            ) from exc
        return cls(rank, world, device, timeout, owns_group=True)

    def close(self) -> None:
        """End the process group if :meth:`from_env` started it."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_group = False

    def __enter__(self) -> Distributed:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- who does what -----------------------------------------------------------------------------------

    @property
    def is_distributed(self) -> bool:
        return self.world > 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 alone writes the progress folder and the checkpoint."""
        return self.rank == 0

    def my_chunks(self, num_chunks: int) -> range:
        """The contiguous chunks this rank runs through each block (see :func:`rank_chunks`)."""
        return rank_chunks(num_chunks, self.world, self.rank)

    def my_samples(self, nsamples: int, chunk_size: int) -> range:
        """The calibration samples this rank runs: those of its chunks of ``chunk_size`` samples."""
        return rank_samples(nsamples, chunk_size, self.world, self.rank)

    def sample_counts(self, nsamples: int, chunk_size: int) -> list[int]:
        """How many samples each rank runs (the ``counts`` of :meth:`scatter_inputs` for per-sample lists)."""
        return [len(rank_samples(nsamples, chunk_size, self.world, r)) for r in range(self.world)]

    def owners(self, shapes: Sequence[tuple[int, int]]) -> list[int]:
        """The rank that solves each Linear of a stage; shapes are (out_features, in_features)."""
        return assign_owners(shapes, self.world)

    def hessian(self, K: int, num_chunks: int) -> HessianSum:
        """A Hessian accumulator for one Linear with K inputs, over ``num_chunks`` chunks in all."""
        return HessianSum(self, K, num_chunks)

    # -- transport ---------------------------------------------------------------------------------------

    def _post(self, op, tensor: torch.Tensor, peer: int, what: str):
        try:
            return op(tensor, peer), peer, tensor
        except RuntimeError as exc:
            raise RankFailure(peer, what, _reason(exc, self.timeout)) from None

    def _wait(self, pending: list, what: str) -> None:
        for work, peer, _tensor in pending:  # the tensor stays referenced until its transfer is done
            try:
                work.wait(timedelta(seconds=self.timeout))
            except RuntimeError as exc:
                raise RankFailure(peer, what, _reason(exc, self.timeout)) from None

    def _send_tensors(self, tensors: Sequence[torch.Tensor], dst: int, what: str) -> None:
        """Send a list of tensors (any of the dtypes above, at most 6 dimensions) to ``dst``."""
        header = torch.zeros(1 + _HEADER * len(tensors), dtype=torch.int64)
        header[0] = len(tensors)
        for i, t in enumerate(tensors):
            if t.dim() > _MAX_DIMS:
                raise ValueError(f"cannot send a tensor of {t.dim()} dimensions (at most {_MAX_DIMS})")
            row = header[1 + _HEADER * i : 1 + _HEADER * (i + 1)]
            row[0] = _DTYPES.index(t.dtype)
            row[1] = t.dim()
            row[2 : 2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
        count = header[:1].clone()
        self._wait([self._post(dist.isend, count.to(self._comm_device), dst, what)], what)
        pending = [self._post(dist.isend, header[1:].to(self._comm_device), dst, what)] if tensors else []
        for t in tensors:
            if t.numel():
                data = t.detach().to(self._comm_device).contiguous().reshape(-1).view(torch.uint8)
                pending.append(self._post(dist.isend, data, dst, what))
        self._wait(pending, what)

    def _recv_tensors(self, src: int, what: str) -> list[torch.Tensor]:
        count = torch.zeros(1, dtype=torch.int64, device=self._comm_device)
        self._wait([self._post(dist.irecv, count, src, what)], what)
        n = int(count)
        if n == 0:
            return []
        header = torch.zeros(_HEADER * n, dtype=torch.int64, device=self._comm_device)
        self._wait([self._post(dist.irecv, header, src, what)], what)
        rows = header.cpu().view(n, _HEADER).tolist()
        out, pending = [], []
        for code, ndim, *dims in rows:
            dtype, shape = _DTYPES[code], dims[:ndim]
            t = torch.empty(shape, dtype=dtype, device=self._comm_device)
            if t.numel():
                pending.append(self._post(dist.irecv, t.reshape(-1).view(torch.uint8), src, what))
            out.append(t)
        self._wait(pending, what)
        return out

    # -- operations --------------------------------------------------------------------------------------

    def broadcast_tensors(self, tensors: Sequence[torch.Tensor] | None, src: int = 0, what: str = "") -> list:
        """``src``'s tensors on every rank (on the communication device: CPU under gloo). Others pass None."""
        what = what or f"receiving tensors from rank {src}"
        if self.rank == src:
            tensors = list(tensors or [])
            for r in range(self.world):
                if r != src:
                    self._send_tensors(tensors, r, what)
            return tensors
        return self._recv_tensors(src, what)

    def gather_inputs(self, mine: Sequence[torch.Tensor], what: str = "gathering block outputs") -> list | None:
        """Rank 0 gets every rank's tensors, concatenated in rank order (so in sample order when each rank
        passes its chunks' tensors in order); the others get None. One process: ``mine`` as a list."""
        if self.rank != 0:
            self._send_tensors(list(mine), 0, what)
            return None
        out = list(mine)
        for r in range(1, self.world):
            out.extend(self._recv_tensors(r, what))
        return out

    def scatter_inputs(
        self, everything: Sequence[torch.Tensor] | None, counts: Sequence[int], what: str = "scattering block inputs"
    ) -> list[torch.Tensor]:
        """The inverse of :meth:`gather_inputs`: rank 0 holds every tensor (e.g. the block inputs read back
        from the progress folder on resume), rank r receives the next counts[r] of them. Others pass None."""
        if len(counts) != self.world:
            raise ValueError(f"need one count per rank ({self.world}), got {len(counts)}")
        if self.rank != 0:
            return self._recv_tensors(0, what)
        everything = list(everything or [])
        if sum(counts) != len(everything):
            raise ValueError(f"counts add up to {sum(counts)}, but rank 0 holds {len(everything)} tensors")
        start = counts[0]
        for r in range(1, self.world):
            self._send_tensors(everything[start : start + counts[r]], r, what)
            start += counts[r]
        return everything[: counts[0]]

    def agree(self, text: str, what: str) -> None:
        """Check that every rank passes the same ``text`` (e.g. the run record, with the calibration hash);
        raises ConfigError naming the first rank that differs from rank 0, on every rank."""
        digest = torch.frombuffer(bytearray(hashlib.sha256(text.encode()).digest()), dtype=torch.uint8)
        gathered = self.gather_inputs([digest], what=f"comparing {what}")
        verdict = torch.tensor([-1], dtype=torch.int64)
        if gathered is not None:
            for r, d in enumerate(gathered):
                if not torch.equal(d.cpu(), digest):
                    verdict[0] = r
                    break
        (verdict,) = self.broadcast_tensors([verdict], 0, what=f"comparing {what}")
        if int(verdict) >= 0:
            raise ConfigError(
                f"rank {int(verdict)} was started with other {what} than rank 0; start every rank with the same command"
            )

    def broadcast_result(self, result: QuantResult | None, owner: int, name: str = "") -> QuantResult:
        """The owner's QuantResult on every rank, bit for bit, on this rank's device. Others pass None."""
        if self.world == 1:
            return result
        return self._share_result(Solved(result, 0.0, owner) if self.rank == owner else None, owner, name).result

    def solve_stage(
        self, owners: Sequence[int], solves: Sequence[Callable[[], QuantResult]], names: Sequence[str] = ()
    ) -> list[Solved]:
        """Solve the Linears of a stage in parallel: each rank runs the ``solves`` it owns (``owners[i]``
        runs ``solves[i]``, the others never call it), then every rank receives every result, bit for bit,
        with the seconds its solve took on its owner.

        If a solve raises, the stage still completes its exchange, then every rank raises for the first
        failed Linear in stage order: its owner re-raises the exception, the other ranks raise GptqlabError
        with the same message (RemoteError when the exception is not a GptqlabError, i.e. a bug), so the
        run stops everywhere with the same line.
        """
        names = list(names) or [f"Linear {i}" for i in range(len(solves))]
        if not len(owners) == len(solves) == len(names):
            raise ValueError(f"need one owner and one name per solve, got {len(owners)}, {len(solves)}, {len(names)}")
        outcomes: list = [None] * len(solves)
        for i, (owner, solve) in enumerate(zip(owners, solves, strict=True)):
            if owner == self.rank:
                start = time.perf_counter()
                try:
                    outcomes[i] = Solved(solve(), time.perf_counter() - start, owner)
                except Exception as exc:
                    if self.world == 1:
                        raise
                    outcomes[i] = exc
        if self.world > 1:
            outcomes = [self._share_result(o, owner, n) for o, owner, n in zip(outcomes, owners, names, strict=True)]
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome
        return outcomes

    def solve_on(self, owner: int, solve: Callable[[], QuantResult], name: str = "") -> QuantResult:
        """:meth:`solve_stage` for a single Linear; returns its QuantResult."""
        return self.solve_stage([owner], [solve], [name or "a Linear"])[0].result

    def _share_result(self, outcome: Solved | Exception | None, owner: int, name: str) -> Solved | Exception:
        """The owner's outcome (a Solved or the exception its solve raised) on every rank."""
        what = f"sharing the result of {name} (owner rank {owner})"
        if self.rank == owner:
            self.broadcast_tensors(_outcome_tensors(outcome), owner, what)
            return outcome
        meta, *rest = self.broadcast_tensors(None, owner, what)
        status, codes_dtype, loss, damp, no_loss, no_damp, no_q, seconds = meta.tolist()
        if status != _OK:
            message = bytes(rest[0].cpu().tolist()).decode()
            if status == _USER_ERROR:
                return GptqlabError(message)
            return RemoteError(f"rank {owner} failed while solving {name}: {message}")
        codes, scales, zeros, g_idx, *Q = (t.to(self.device) for t in rest)
        result = QuantResult(
            codes.to(_DTYPES[int(codes_dtype)]),
            scales,
            zeros,
            g_idx,
            None if no_q else Q[0],
            None if no_loss else loss,
            None if no_damp else damp,
        )
        return Solved(result, seconds, owner)


@dataclass
class Solved:
    """One Linear's outcome in :meth:`Distributed.solve_stage`: its QuantResult (the same bits on every
    rank), the seconds the solve took on its owner, and the owner's rank."""

    result: QuantResult
    seconds: float
    rank: int


def _outcome_tensors(outcome: Solved | Exception) -> list[torch.Tensor]:
    """A solve's outcome (or the owner's exception) as tensors: a float64 meta row first."""
    if isinstance(outcome, Exception):
        error = outcome
        status = _USER_ERROR if isinstance(error, GptqlabError) else _OTHER_ERROR
        text = str(error) if status == _USER_ERROR else f"{type(error).__name__}: {error}"
        meta = torch.tensor([status, 0, 0, 0, 1, 1, 1, 0], dtype=torch.float64)
        return [meta, torch.tensor(list(text.encode()), dtype=torch.uint8)]
    r = outcome.result
    codes = r.codes
    # Codes are < 2**bits <= 256: send them as bytes (a quarter of int32's traffic), restore the dtype after.
    if codes.numel() and int(codes.min()) >= 0 and int(codes.max()) < 256:
        codes = codes.to(torch.uint8)
    meta = torch.tensor(
        [
            _OK,
            _DTYPES.index(r.codes.dtype),
            0.0 if r.loss is None else r.loss,
            0.0 if r.damp_percent is None else r.damp_percent,
            r.loss is None,
            r.damp_percent is None,
            r.Q is None,
            outcome.seconds,
        ],
        dtype=torch.float64,
    )
    return [meta, codes, r.scales, r.zeros, r.g_idx, *([] if r.Q is None else [r.Q])]


class HessianSum:
    """H = 2/T Σ_c X_cᵀ X_c for one Linear, summed over the chunk tree, so that its bits do not depend on the
    number of ranks (see :mod:`gptqlab.quantize.distributed.tree`).

    Each rank calls :meth:`add` for the chunks it owns, in chunk order, with each chunk's inputs (whole, or in
    parts); then every rank calls :meth:`reduce` with the same owner, in the same order for every Linear. Cost
    per chunk: one [K, T_c] × [T_c, K] matmul and one K×K addition; memory: up to log2(C) + 1 K×K float32
    buffers.
    Transfer: each rank sends its cover (one K×K node when its chunks form a dyadic range, at most
    2·log2 C) to the owner.
    """

    def __init__(self, ctx: Distributed, K: int, num_chunks: int):
        self.ctx = ctx
        self.K = K
        self.num_chunks = num_chunks
        self.mine = ctx.my_chunks(num_chunks)
        self.tree = PairwiseSum(num_chunks, start=self.mine.start)
        self._open: tuple[torch.Tensor, int] | None = None  # the current chunk's partial sum and its tokens

    def add(self, x: torch.Tensor, ends_chunk: bool = True) -> None:
        """Add inputs x [..., K] of the next own chunk (any float dtype; the product is taken in float32). A
        chunk may come in several parts, one forward batch each: parts before the last pass ``ends_chunk=False``
        and are summed in order into the chunk's partial sum, which enters the tree with the last part."""
        if self.tree.next >= self.mine.stop:
            raise ValueError(f"this rank owns chunks {self.mine.start} .. {self.mine.stop - 1}, all already added")
        x = x.reshape(-1, self.K).float()  # [T, K]
        if self._open is None:
            self._open = (x.T @ x, x.shape[0])
        else:
            self._open[0].addmm_(x.T, x)
            self._open = (self._open[0], self._open[1] + x.shape[0])
        if ends_chunk:
            self.tree.add_leaf(self.tree.next, *self._open)
            self._open = None

    def reduce(self, owners: int | Sequence[int], name: str = "") -> torch.Tensor | None:
        """H [K, K] float32 on each rank in ``owners`` (on its device), None on the other ranks.

        Collective: every rank calls it with the same owners, after adding all its chunks; the sum is
        consumed. The first owner combines the covers; it then sends H to the other owners, e.g. the
        owners of q, k and v, which share their input and so their Hessian.
        """
        owners = [owners] if isinstance(owners, int) else list(dict.fromkeys(owners))
        if self.tree.next != self.mine.stop:
            raise ValueError(
                f"Hessian of {name or 'a Linear'}: chunks {self.mine.start} .. {self.mine.stop - 1} belong to this "
                f"rank, but only those before {self.tree.next} were added"
            )
        ctx, mine, first = self.ctx, self.tree.nodes, owners[0]
        self.tree = None
        what = f"reducing the Hessian of {name or 'a Linear'} to rank {first}"
        if ctx.rank != first:
            if mine:
                tokens = torch.tensor([n.tokens for n in mine], dtype=torch.int64)
                ctx._send_tensors([tokens, *(n.value for n in mine)], first, what)
            if ctx.rank in owners:
                (H,) = ctx._recv_tensors(first, f"receiving the Hessian of {name or 'a Linear'} from rank {first}")
                return H.to(ctx.device)
            return None
        total = PairwiseSum(self.num_chunks)
        for r in range(ctx.world):
            chunks = rank_chunks(self.num_chunks, ctx.world, r)
            if r == ctx.rank:
                nodes = mine
            elif len(chunks):
                # Rank r sends exactly its cover, so the positions of its nodes are known here.
                tokens, *values = ctx._recv_tensors(r, what)
                positions = cover(chunks.start, chunks.stop, self.num_chunks)
                if len(values) != len(positions):
                    raise RankFailure(r, what, f"it sent {len(values)} partial sums instead of {len(positions)}")
                nodes = [
                    Node(k, j, v.to(ctx.device), t)
                    for (k, j), v, t in zip(positions, values, tokens.tolist(), strict=True)
                ]
            else:
                nodes = []
            for node in nodes:
                total.push(node)
        root = total.total()
        if root.tokens == 0:
            H = torch.zeros(self.K, self.K, dtype=torch.float32, device=ctx.device)
        else:
            H = root.value.mul_(2 / root.tokens)
        for r in owners[1:]:
            ctx._send_tensors([H], r, f"sending the Hessian of {name or 'a Linear'} to rank {r}")
        return H
