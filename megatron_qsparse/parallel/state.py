"""Who talks to whom: tensor, pipeline and data parallelism from one topology, and DeepSpeed's mpu.

One :class:`ParallelState` is the single source of truth for the parallel degrees, this process's
coordinates and the process groups. It is built from DeepSpeed's
``PipeModelDataParallelTopology(num_pp, num_mp=TP, num_dp)`` (axes ``pipe, data, model``, the
``model`` = tensor-parallel axis fastest, so the ranks of one TP group are consecutive, as in
Megatron-LM), and hands DeepSpeed the ``mpu`` object it expects (:meth:`ParallelState.mpu`).

Layers read their group from the state they are built with (default: the *current* state, set once
by :func:`initialize_model_parallel` at setup; without it, a single-process state with no process
groups, so unit tests build models without ``torch.distributed``). :meth:`ParallelState.virtual`
gives the shapes of one TP rank without any process group (checkpoint conversion, sharding).

Groups (all made with ``torch.distributed.new_group`` in the same order on every rank):

* tensor-parallel (TP): same ``pipe`` and ``data`` coordinates;
* pipeline (PP): same ``data`` and ``model``;
* data-parallel (DP): same ``pipe`` and ``model`` — gradients are averaged and ZeRO partitions
  live here; every TP rank of one DP rank reads the same micro-batches;
* model-parallel (MP = TP x PP): same ``data`` — DeepSpeed sums gradient norms and checks
  overflow over it (the convention of DeepSpeed's own ``PipelineParallelGrid``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from megatron_qsparse.config import ConfigError
from megatron_qsparse.parallel.random import RNGStatesTracker


@dataclass(frozen=True)
class ParallelDims:
    """The parallel degrees: ``world_size = tp * pp * dp``."""

    tp: int = 1
    pp: int = 1
    dp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @classmethod
    def from_world(cls, world_size: int, tp: int = 1, pp: int = 1) -> "ParallelDims":
        """The degrees for ``world_size`` processes; DP takes what TP x PP leave.

        Raises :class:`ConfigError` (one line naming the flag and the fix) when they do not fit.
        """
        for flag, v in (("--tensor-model-parallel-size", tp),
                        ("--pipeline-model-parallel-size", pp)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{flag}: got {v}; use a positive integer")
        if world_size < 1:
            raise ConfigError(f"world size {world_size} is not positive; launch at least one "
                              "process")
        if world_size % (tp * pp):
            raise ConfigError(f"--tensor-model-parallel-size: world size {world_size} is not "
                              f"divisible by TP x PP = {tp} x {pp} = {tp * pp}; launch a multiple "
                              f"of {tp * pp} processes or change the parallel sizes")
        return cls(tp=tp, pp=pp, dp=world_size // (tp * pp))


@dataclass(frozen=True)
class Axis:
    """This process's place along one parallel axis: ``size``, ``rank`` in it, the global ``ranks``
    of its group (in group order) and the ``torch.distributed`` group (None without processes)."""

    size: int = 1
    rank: int = 0
    ranks: tuple[int, ...] = (0,)
    group: Any = None


class ParallelState:
    """Degrees, coordinates and process groups of one process (see the module docstring).

    Attributes ``tp``, ``pp``, ``dp``, ``mp`` are :class:`Axis`; shortcuts ``tp_size``,
    ``tp_rank``, ``tp_group`` etc. ``rng`` is the TP-aware dropout RNG tracker. ``topology`` is
    DeepSpeed's ``PipeModelDataParallelTopology`` (None for the single/virtual states).
    """

    def __init__(self, dims: ParallelDims, rank: int = 0, *, tp: Axis | None = None,
                 pp: Axis | None = None, dp: Axis | None = None, mp: Axis | None = None,
                 topology: Any = None, virtual: bool = False):
        self.dims, self.rank, self.topology, self.virtual = dims, rank, topology, virtual
        self.tp = tp or Axis(dims.tp, 0, tuple(range(dims.tp)))
        self.pp = pp or Axis(dims.pp, 0, tuple(range(dims.pp)))
        self.dp = dp or Axis(dims.dp, 0, tuple(range(dims.dp)))
        self.mp = mp or Axis(self.tp.size * self.pp.size, 0, (0,))
        self.rng = RNGStatesTracker()

    # ------------------------------------------------------------------ builders

    @classmethod
    def single(cls) -> "ParallelState":
        """One process, no process groups (TP = PP = DP = 1)."""
        return cls(ParallelDims())

    @classmethod
    def virtual_tp(cls, tp_size: int, tp_rank: int) -> "ParallelState":
        """The shapes of TP rank ``tp_rank`` of ``tp_size`` without any process group: layers built
        with it hold that rank's shards (for sharding weights and checkpoint conversion); running
        a forward pass that needs a collective raises."""
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"TP rank {tp_rank} is not in [0, {tp_size})")
        tp = Axis(tp_size, tp_rank, tuple(range(tp_size)))
        return cls(ParallelDims(tp=tp_size), rank=tp_rank, tp=tp, virtual=True)

    @classmethod
    def build(cls, tp: int = 1, pp: int = 1) -> "ParallelState":
        """Groups for the running ``torch.distributed`` job (every rank must call this, in the
        same order as its other ``new_group`` calls). Without an initialized process group this
        is :meth:`single` (and TP x PP must then be 1)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            dims = ParallelDims.from_world(1, tp, pp)
            return cls(dims)
        world, rank = dist.get_world_size(), dist.get_rank()
        dims = ParallelDims.from_world(world, tp, pp)
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        topo = PipeModelDataParallelTopology(num_pp=dims.pp, num_mp=dims.tp, num_dp=dims.dp)
        coord = topo.get_coord(rank)

        def axis(name: str, my_index: int) -> Axis:
            mine = None
            for ranks in topo.get_axis_comm_lists(name):
                group = dist.new_group(ranks=ranks)
                if rank in ranks:
                    mine = Axis(len(ranks), my_index, tuple(ranks), group)
            assert mine is not None and mine.ranks[my_index] == rank
            return mine

        tp_axis = axis("model", coord.model)
        pp_axis = axis("pipe", coord.pipe)
        dp_axis = axis("data", coord.data)
        mp_axis = None
        for d in range(dims.dp):  # model parallel = all of TP x PP sharing one data coordinate
            ranks = sorted(topo.filter_match(data=d))
            group = dist.new_group(ranks=ranks)
            if rank in ranks:
                mp_axis = Axis(len(ranks), ranks.index(rank), tuple(ranks), group)
        return cls(dims, rank, tp=tp_axis, pp=pp_axis, dp=dp_axis, mp=mp_axis, topology=topo)

    # ------------------------------------------------------------------ shortcuts

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    tp_size = property(lambda self: self.tp.size)
    tp_rank = property(lambda self: self.tp.rank)
    pp_size = property(lambda self: self.pp.size)
    pp_rank = property(lambda self: self.pp.rank)
    dp_size = property(lambda self: self.dp.size)
    dp_rank = property(lambda self: self.dp.rank)

    @property
    def tp_group(self):
        """The TP process group; raises for a virtual state with TP > 1 (no processes)."""
        if self.tp.group is None and self.tp.size > 1:
            raise RuntimeError("this ParallelState is virtual (shapes only): it has no "
                               "tensor-parallel process group to run collectives on")
        return self.tp.group

    @property
    def dp_group(self):
        return self.dp.group

    @property
    def pp_group(self):
        return self.pp.group

    def seed(self, seed: int) -> None:
        """Seed the model-parallel RNG (dropout inside the TP region, e.g. on this rank's
        attention heads): ``seed + 2718 + tp_rank`` (Megatron's offset). Only with TP > 1; at
        TP = 1 the default generator serves everything."""
        if self.tp_size > 1:
            self.rng.reset()
            self.rng.add(MODEL_PARALLEL_RNG, seed + 2718 + self.tp_rank)

    def fork_rng(self) -> contextlib.AbstractContextManager:
        """Context in which the default generator is this TP rank's model-parallel RNG (a no-op at
        TP = 1). Wrap dropout applied to TP-split activations in it."""
        if self.tp_size == 1:
            return contextlib.nullcontext()
        return self.rng.fork(MODEL_PARALLEL_RNG)

    def mpu(self) -> "DeepSpeedMPU":
        """The object to pass as ``deepspeed.initialize(mpu=...)``."""
        return DeepSpeedMPU(self)

    def __repr__(self) -> str:
        kind = " virtual" if self.virtual else ""
        return (f"ParallelState{kind}(rank={self.rank}, tp={self.tp_rank}/{self.tp_size}, "
                f"pp={self.pp_rank}/{self.pp_size}, dp={self.dp_rank}/{self.dp_size})")


MODEL_PARALLEL_RNG = "model-parallel-rng"


class DeepSpeedMPU:
    """The ``mpu`` DeepSpeed 0.19 queries (engine, ZeRO 1-3, gradient clipping, checkpoints).

    ``get_model_parallel_*`` is the TP x PP group (norms are summed and overflow checked over it;
    checkpoint files are named ``mp_rank_XX`` after its rank); ``get_tensor_model_parallel_*``
    the TP group (ZeRO counts replicated parameters on TP rank 0 only); ``get_data_parallel_*``
    the DP group (gradient averaging, ZeRO partitions, the broadcast of the initial weights).
    Sequence parallelism is not offered (DeepSpeed then uses the DP group for everything).
    """

    def __init__(self, state: ParallelState):
        self.state = state

    def get_global_rank(self) -> int:
        return self.state.rank

    # model parallel = TP x PP
    def get_model_parallel_rank(self) -> int:
        return self.state.mp.rank

    def get_model_parallel_world_size(self) -> int:
        return self.state.mp.size

    def get_model_parallel_group(self):
        return self.state.mp.group

    def get_model_parallel_src_rank(self) -> int:
        return self.state.mp.ranks[0]

    # tensor parallel
    def get_tensor_model_parallel_rank(self) -> int:
        return self.state.tp.rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.state.tp.size

    def get_tensor_model_parallel_group(self):
        return self.state.tp.group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.state.tp.ranks[0]

    get_slice_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size
    get_slice_parallel_group = get_tensor_model_parallel_group

    # pipeline
    def get_pipeline_model_parallel_rank(self) -> int:
        return self.state.pp.rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.state.pp.size

    def get_pipeline_model_parallel_group(self):
        return self.state.pp.group

    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
    get_pipe_parallel_group = get_pipeline_model_parallel_group

    # data parallel
    def get_data_parallel_rank(self) -> int:
        return self.state.dp.rank

    def get_data_parallel_world_size(self) -> int:
        return self.state.dp.size

    def get_data_parallel_group(self):
        return self.state.dp.group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.state.dp.ranks)


# ---------------------------------------------------------------------------------------------
# the current state (set once at setup, like Megatron's parallel_state)

_SINGLE = ParallelState.single()
_current: ParallelState | None = None


def get_parallel_state() -> ParallelState:
    """The state set by :func:`initialize_model_parallel`, else a single-process state."""
    return _current if _current is not None else _SINGLE


def set_parallel_state(state: ParallelState | None) -> None:
    """Make ``state`` current (None: back to the single-process default)."""
    global _current
    _current = state


def initialize_model_parallel(tp: int = 1, pp: int = 1) -> ParallelState:
    """Build the groups of the running job (:meth:`ParallelState.build`) and make them current."""
    state = ParallelState.build(tp, pp)
    set_parallel_state(state)
    return state


@contextlib.contextmanager
def using(state: ParallelState) -> Iterator[ParallelState]:
    """Temporarily make ``state`` current."""
    prev = _current
    set_parallel_state(state)
    try:
        yield state
    finally:
        set_parallel_state(prev)
