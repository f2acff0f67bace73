"""Counting collectives: how many of each kind ran on this rank while a block ran, and their sizes.

    with CollectiveCounter() as c:
        optimizer.step()
    c.totals()  # {"all_gather": (calls, bytes), "all_reduce": ..., ...}

It wraps the Python entry points of torch.distributed (torch 2.13: ``all_reduce``, ``broadcast``,
``broadcast_object_list``, ``all_gather``, ``all_gather_single``, ``all_gather_into_tensor``,
``reduce_scatter_single``, ``reduce_scatter_tensor``, ... in ``torch.distributed`` and in ``distributed_c10d``,
where its own helpers look them up) and the functional collectives that DTensor uses: ``DTensor.full_tensor()``
redistributes ``Shard(0)`` to ``Replicate`` through ``Shard._to_replicate_tensor``, which calls
``_functional_collectives.all_gather_single`` on the shard padded to ceil(rows / W) rows (the
``_c10d_functional.all_gather_into_tensor`` op). A counted call made inside another one (a deprecated alias calling
its successor, the two broadcasts of ``broadcast_object_list``) is not counted again; it only adds its bytes to an
outer call that has no tensor of its own.

Bytes: the size of the collective's whole tensor as this rank sees it: the gathered output of an all-gather, the
input of a reduce-scatter, the tensor of an all-reduce or a broadcast (including padding)."""

import inspect

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.distributed.distributed_c10d as c10d

# name -> (kind, where its whole tensor is: an argument index, "result", or None for the inner calls' bytes)
C10D = {
    "all_reduce": ("all_reduce", 0),
    "all_reduce_coalesced": ("all_reduce", 0),
    "broadcast": ("broadcast", 0),
    "all_gather": ("all_gather", 0),
    "all_gather_single": ("all_gather", 0),
    "all_gather_into_tensor": ("all_gather", 0),
    "_all_gather_base": ("all_gather", 0),
    "reduce_scatter": ("reduce_scatter", 1),
    "reduce_scatter_single": ("reduce_scatter", 1),
    "reduce_scatter_tensor": ("reduce_scatter", 1),
    "_reduce_scatter_base": ("reduce_scatter", 1),
    "all_to_all_single": ("all_to_all", 1),
    "all_to_all": ("all_to_all", 1),
    "reduce": ("reduce", 0),
    "gather": ("gather", 0),
    "scatter": ("scatter", 0),
    "send": ("send", 0),
    "recv": ("recv", 0),
    "isend": ("send", 0),
    "irecv": ("recv", 0),
    "broadcast_object_list": ("broadcast_object_list", None),
    "all_gather_object": ("all_gather_object", None),
    "gather_object": ("gather_object", None),
    "scatter_object_list": ("scatter_object_list", None),
    "barrier": ("barrier", None),
}
FUNCTIONAL = {
    "all_reduce": ("all_reduce", 0),
    "all_reduce_coalesced": ("all_reduce", 0),
    "broadcast": ("broadcast", 0),
    "all_gather_single": ("all_gather", "result"),
    "all_gather_single_autograd": ("all_gather", "result"),
    "all_gather_tensor": ("all_gather", "result"),
    "all_gather_tensor_autograd": ("all_gather", "result"),
    "all_gather_single_coalesced": ("all_gather", "result"),
    "all_gather_into_tensor_coalesced": ("all_gather", "result"),
    "reduce_scatter_single": ("reduce_scatter", 0),
    "reduce_scatter_single_autograd": ("reduce_scatter", 0),
    "reduce_scatter_tensor": ("reduce_scatter", 0),
    "reduce_scatter_tensor_autograd": ("reduce_scatter", 0),
    "reduce_scatter_single_coalesced": ("reduce_scatter", 0),
    "reduce_scatter_tensor_coalesced": ("reduce_scatter", 0),
    "all_to_all_single": ("all_to_all", 0),
    "permute_tensor": ("permute", 0),
}


def tensor_bytes(x) -> int:
    """Bytes of a tensor, or of the tensors in a (nested) list of them; 0 for anything else."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(tensor_bytes(t) for t in x)
    return 0


class CollectiveCounter:
    """A context manager that records [kind, bytes] for every collective started on this rank inside it."""

    def __init__(self):
        self.calls = []  # [kind, bytes] per outermost collective, in order
        self._outer = None  # (record, where) of the collective running now
        self._depth = 0
        self._saved = []

    def __enter__(self):
        for module, table in ((dist, C10D), (c10d, C10D), (funcol, FUNCTIONAL)):
            for name, (kind, where) in table.items():
                original = getattr(module, name, None)
                if original is not None:
                    self._saved.append((module, name, original))
                    setattr(module, name, self._wrap(original, kind, where))
        return self

    def __exit__(self, *exc):
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)
        self._saved = []
        return False

    def _wrap(self, original, kind, where):
        names = list(inspect.signature(original).parameters)

        def tensor_at(args, kwargs, index):
            if len(args) > index:
                return args[index]
            return kwargs.get(names[index]) if index < len(names) else None

        def counted(*args, **kwargs):
            if self._outer is None:
                record = [kind, tensor_bytes(tensor_at(args, kwargs, where)) if isinstance(where, int) else 0]
                self.calls.append(record)
                self._outer = (record, where)
                try:
                    result = original(*args, **kwargs)
                finally:
                    self._outer = None
                if where == "result":
                    record[1] = tensor_bytes(result)
                return result
            record, outer_where = self._outer
            if outer_where is None and self._depth == 0 and isinstance(where, int):
                record[1] += tensor_bytes(tensor_at(args, kwargs, where))  # an object collective's tensors
            self._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted

    def totals(self):
        """{kind: (calls, bytes)} over everything recorded."""
        out = {}
        for kind, nbytes in self.calls:
            calls, total = out.get(kind, (0, 0))
            out[kind] = (calls + 1, total + nbytes)
        return out


__all__ = ["C10D", "FUNCTIONAL", "CollectiveCounter", "tensor_bytes"]
