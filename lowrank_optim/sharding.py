"""Sharded parameters (FSDP2 ``fully_shard``): DTensors sharded on dim 0 (rows) over a 1-D device mesh.

Every state tensor of a sharded parameter (with at least one dim) is kept as a DTensor ``Shard(0)`` of the very
tensor a single process would hold, so ``torch.distributed.checkpoint`` saves, loads and reshards it, and a full
state dict loads into one process. 0-dim counters and numbers are the same on every rank and stay plain.

A step works on one of two views of that state:

* ``local`` (the low-rank route with fp32 Adam moments, and dense Adam): each rank steps its own rows. The rows of
  a right-side projection ``G Q`` are local; a left-side one ``P^T G`` is summed over ranks (one all-reduce of
  r x n), its moments are split by rows of r and the directions gathered back (one all-gather of r x n). Bases are
  stored as shards and gathered for use (one all-gather of the basis per step).
* ``gather`` (8-bit states, Adafactor, the spectral route): the parameter, its gradient and its state are gathered,
  the single-process step runs on them, and each rank keeps its rows. Correct for every part, at the cost of one
  all-gather of the gradient and the state per step.

A new basis from the gradient: where the projector offers ``refresh_rows`` (``refreshes_by_rows``; local view),
every rank computes it from its own rows with the projector's small collectives (``rsvd``: sums of n x k products
and gathers of m x k sketches; ``columns`` by norm and a right-side ``dct``: one all-reduce of scores). Otherwise
the gradient is gathered once per refresh and the basis computed by one owner rank per parameter (round-robin over
parameters), which broadcasts it. Projectors whose basis does not depend on the gradient (``random``, ``blocks``,
``columns`` drawn at random) draw it on every rank from (seed, parameter, refresh count): no communication.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist


def is_sharded(t) -> bool:
    # a DTensor exists only once its module is imported: importing it here would cost every user seconds
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t):
    return t.to_local() if is_sharded(t) else t


def chunk_range(size: int, rank: int, world: int) -> Tuple[int, int]:
    """Rows [start, stop) of a ``size``-row tensor that ``rank`` holds under ``Shard(0)`` (torch.chunk's split:
    ceil(size / world) rows per rank, the last ranks possibly fewer or none)."""
    chunk = -(-size // world) if size else 0
    start = min(rank * chunk, size)
    return start, min(start + chunk, size)


def check_param(p: torch.Tensor, where: str) -> None:
    """Refuse what cannot be trained right: FSDP1's flattened parameters and placements other than ``Shard(0)``
    on a 1-D mesh (tensor parallel ``Shard(1)``, ``Replicate`` in a hybrid mesh, ``Partial``)."""
    if getattr(p, "_is_flat_param", False) or getattr(p, "_fsdp_flattened", False):
        raise ValueError(
            f"{where}: a parameter flattened by FSDP1 (shape {tuple(p.shape)}): its matrix shape is hidden, so "
            "nothing could be projected; wrap the model with FSDP2 (torch.distributed.fsdp.fully_shard)"
        )
    if not is_sharded(p):
        return
    placements = tuple(p.placements)
    if p.device_mesh.ndim != 1 or len(placements) != 1 or not (placements[0].is_shard() and placements[0].dim == 0):
        raise ValueError(
            f"{where}: a DTensor parameter of shape {tuple(p.shape)} with placements {placements} on a "
            f"{p.device_mesh.ndim}-D mesh: only Shard(0) on a 1-D mesh (FSDP2 fully_shard) is supported; tensor "
            "parallel (Shard(1)), hybrid meshes (Replicate) and Partial placements are not"
        )


class Spread:
    """How a sharded parameter's rows (and those of every tensor sharded with it) are spread over its mesh."""

    def __init__(self, p):
        self.mesh = p.device_mesh
        self.group = self.mesh.get_group()
        self.rank = self.mesh.get_local_rank()
        self.world = self.mesh.size()

    def rows(self, size: int) -> Tuple[int, int]:
        return chunk_range(size, self.rank, self.world)

    def mine(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full tensor."""
        start, stop = self.rows(full.shape[0])
        return full[start:stop]

    def wrap(self, rows: torch.Tensor, global_rows: int):
        """This rank's rows as a ``Shard(0)`` DTensor of a (global_rows, ...) tensor."""
        from torch.distributed.tensor import DTensor, Shard

        shape = torch.Size((global_rows, *rows.shape[1:]))
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(
            rows.contiguous(), self.mesh, (Shard(0),), run_check=False, shape=shape, stride=stride
        )

    def gather(self, rows: torch.Tensor, global_rows: int) -> torch.Tensor:
        """The full tensor from every rank's rows (one all-gather)."""
        return self.wrap(rows, global_rows).full_tensor()

    def sum_(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the ranks of the mesh, in place (one all-reduce)."""
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x

    def scores(
        self, global_rows: int, row_values: Optional[torch.Tensor], column_parts: Optional[torch.Tensor]
    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Scores of a matrix whose rows are spread over the mesh, whole on every rank, in one all-reduce:
        ``row_values`` (one per row of this rank, e.g. row norms: exact, as each rank adds its own values among
        zeros) and ``column_parts`` (this rank's part of a sum over rows, one per column: summed over ranks)."""
        parts = []
        if row_values is not None:
            start, stop = self.rows(global_rows)
            placed = row_values.new_zeros(global_rows)
            placed[start:stop] = row_values
            parts.append(placed)
        if column_parts is not None:
            parts.append(column_parts.reshape(-1))
        both = self.sum_(torch.cat(parts))
        split = global_rows if row_values is not None else 0
        return (both[:split] if row_values is not None else None), (both[split:] if column_parts is not None else None)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """Frobenius norm of a tensor whose rows are spread over the mesh (one all-reduce of a number)."""
        local = torch.linalg.vector_norm(x, dtype=torch.float32)  # one read, no squared copy (0 for no rows)
        return self.sum_(local.square()).sqrt().to(x.dtype)

    def owner(self, index: int) -> int:
        """The rank that computes parameter ``index``'s new basis (round-robin)."""
        return index % self.world


# ---------------------------------------------------------------------------------------------------- state views
def state_view(state: Dict, spread: Spread, full_keys: Callable[[str], bool]) -> Dict:
    """A step's view of a sharded parameter's state: this rank's rows (aliases: in-place updates land in the
    DTensor) or, for keys where ``full_keys(key)`` holds, the gathered full tensor (a copy)."""
    return {k: (v.full_tensor() if full_keys(k) else v.to_local()) if is_sharded(v) else v for k, v in state.items()}


def global_stand_ins(state: Dict, keys: Callable[[str], bool]) -> Dict:
    """``state`` with each sharded entry under ``keys(key)`` replaced by zeros of its global shape and dtype, on
    this rank's device: enough for checks that read only shapes (a saved basis against the group's settings),
    without communication, so any rank may run them alone."""
    return {
        k: torch.zeros(v.shape, dtype=v.dtype, device=v.to_local().device) if is_sharded(v) and keys(k) else v
        for k, v in state.items()
    }


def store_view(state: Dict, view: Dict, spread: Spread, full_keys: Callable[[str], bool], rows_of: Dict) -> None:
    """Write a step's view back into the sharded state: full tensors keep their rows, row tensors are wrapped
    (``rows_of[key]``: the global row count of a row tensor), 0-dim tensors and numbers stay plain."""
    for k in [k for k in state if k not in view]:
        del state[k]
    for k, v in view.items():
        old = state.get(k)
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            state[k] = v
        elif full_keys(k):
            rows = spread.mine(v)
            if is_sharded(old) and tuple(old.shape) == tuple(v.shape) and old.dtype == v.dtype:
                old.to_local().copy_(rows)
            else:
                state[k] = spread.wrap(rows, v.shape[0])
        elif not (is_sharded(old) and old.to_local() is v):
            state[k] = spread.wrap(v, rows_of.get(k, v.shape[0]))


# ---------------------------------------------------------------------------------------------------- refreshes
def broadcast_result(spread: Spread, owner: int, result: Optional[Dict[str, Any]], error: Optional[str], device):
    """The owner's refresh result (new ``proj_*`` entries, or its error message) on every rank."""
    meta = [None]
    if spread.rank == owner:
        meta[0] = (
            error,
            {
                k: ("tensor", tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else ("value", v)
                for k, v in (result or {}).items()
            },
        )
    dist.broadcast_object_list(meta, group=spread.group, group_src=owner, device=_object_device(device))
    error, layout = meta[0]
    if error is not None:
        return None, error
    out = {}
    for k, (kind, *rest) in layout.items():
        if kind == "value":
            out[k] = rest[0]
            continue
        shape, dtype = rest
        t = result[k].contiguous() if spread.rank == owner else torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(t, group=spread.group, group_src=owner)
        out[k] = t
    return out, None


def _object_device(device) -> Optional[torch.device]:
    return torch.device(device) if torch.device(device).type == "cuda" else None


def any_sharded(params) -> bool:
    return any(is_sharded(p) for p in params)


def flag_groups(spreads) -> list:
    """The distinct process groups of a step's sharded parameters, in a rank-independent order."""
    seen, out = set(), []
    for s in spreads:
        if id(s.group) not in seen:
            seen.add(id(s.group))
            out.append(s.group)
    return out


def max_over(found: torch.Tensor, groups) -> torch.Tensor:
    """The non-finite flag, 1 on every rank if it is 1 on any (all ranks skip a step together)."""
    for g in groups:
        dist.all_reduce(found, op=dist.ReduceOp.MAX, group=g)
    return found


# ---------------------------------------------------------------------------------------------------- projection
class RowsProjection:
    """A projector as one rank sees it in the ``local`` view: G is this rank's rows of the gradient matrix.

    right (Q n x r, gathered): ``R = G_rows Q`` are this rank's rows of R, no collective; back ``d_rows Q^T``.
    left (P m x r, this rank's rows): ``R = sum over ranks of P_rows^T G_rows`` (an all-reduce of r x n), the same
    on every rank; back ``P_rows d`` (d whole). full: both. An elementwise projector (``blocks``) acts on the rows
    as they are. The residual rules take norms through ``total_norm`` (see ``residual.py``)."""

    def __init__(self, proj, basis_state: Dict, spread: Spread):
        self.base, self.spread = proj, spread
        self.side, self.rank, self.shape = proj.side, proj.rank, proj.shape
        self.elementwise = getattr(proj, "elementwise", False)
        self.P = self.Q = None
        if not self.elementwise and proj.rank > 0:
            if self.side in ("left", "full"):
                start, stop = spread.rows(proj.shape[0])
                self.P = proj.basis(basis_state, "left")[start:stop]
            if self.side in ("right", "full"):
                self.Q = proj.basis(basis_state, "right")
        # rows of R spread over ranks (right side, elementwise); a left or full R is whole on every rank
        self.low_sharded = self.elementwise or self.side == "right"

    def covers(self, state) -> bool:
        return self.base.covers(state)

    def project(self, state, grad: torch.Tensor) -> Optional[torch.Tensor]:
        if self.elementwise or self.rank == 0:
            return self.base.project(state, grad)
        out = grad
        if self.P is not None:
            out = self.P.to(device=out.device, dtype=out.dtype).t().matmul(out)
        if self.Q is not None:
            out = out.matmul(self.Q.to(device=out.device, dtype=out.dtype))
        if self.P is not None:
            self.spread.sum_(out)
        return out

    def project_back(self, state, low: torch.Tensor) -> torch.Tensor:
        if self.elementwise:
            return self.base.project_back(state, low)
        out = low
        if self.P is not None:
            out = self.P.to(device=out.device, dtype=out.dtype).matmul(out)
        if self.Q is not None:
            out = out.matmul(self.Q.to(device=out.device, dtype=out.dtype).t())
        return out

    def add_back(self, state, low: torch.Tensor, out: torch.Tensor, alpha: float = 1.0) -> None:
        out.add_(self.project_back(state, low), alpha=alpha)

    def fused_apply(self, *args) -> bool:
        return False  # the Triton pass takes whole bases: a sharded step applies through torch


__all__ = [
    "RowsProjection",
    "Spread",
    "any_sharded",
    "broadcast_result",
    "check_param",
    "chunk_range",
    "flag_groups",
    "global_stand_ins",
    "is_sharded",
    "local",
    "max_over",
    "state_view",
    "store_view",
]
