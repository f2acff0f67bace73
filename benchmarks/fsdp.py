"""--fsdp: benchmarks.pretrain with FSDP2 under torchrun (gloo on CPU, nccl on CUDA).

Every transformer block and the root are `fully_shard`ed: each rank holds a Shard(0) slice of every weight and of
its optimizer state, and reads its own slice of the same global batch, so the run is a single-process run on that
global batch (the gradients are averaged over ranks by FSDP's reduce-scatter). Only rank 0 writes logs, summaries
and checksum files; checkpoints are torch.distributed.checkpoint directories (benchmarks/dcp_checkpoint.py).
"""

import os

import torch
import torch.distributed as dist

from .cli import USAGE_EXIT, UsageError
from .optimizers import REFERENCE

TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LAUNCH = "torchrun --standalone --nproc_per_node N -m benchmarks.pretrain --fsdp ..."


def check_launch(args, env=None):
    """Refuse --fsdp misuse before anything is built (UsageError naming the flag and the value)."""
    if not args.fsdp:
        return
    env = os.environ if env is None else env
    missing = [k for k in TORCHRUN_ENV if k not in env]
    if missing:
        raise UsageError(f"--fsdp needs torchrun's environment ({', '.join(missing)} not set): run `{LAUNCH}`")
    if args.layerwise:
        raise UsageError("--fsdp with --layerwise: layer-wise updates run inside backward, on unsharded gradients")
    if args.optimizer in REFERENCE or args.optimizer == "adam8bit":
        raise UsageError(
            f"--fsdp with --optimizer {args.optimizer}: that package's optimizer does not train sharded (DTensor) "
            "parameters; use a lowrank_optim optimizer or adamw"
        )
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    local_rank = int(env["LOCAL_RANK"])
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise UsageError(
            f"--fsdp: LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) on this node: "
            "start at most one process per GPU (--nproc_per_node)"
        )


def shard_model(model, device, world):
    """FSDP2 over a LlamaForCausalLM on a 1-D mesh of `device`'s type (fully_shard's default would pick CUDA
    whenever it exists, even for a --device cpu run): one unit per decoder layer (its weights gathered just for
    its forward and backward) and the root (embeddings, final norm, lm_head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def rank0_decides(decide, rank):
    """decide() on rank 0 only (reading files once, printing once); its result, or its UsageError, on every
    rank. The other ranks then stop with the same status without a second copy of the message, instead of
    waiting in a collective for a rank that stopped."""
    outcome = [None]
    if rank == 0:
        try:
            outcome[0] = (None, decide())
        except UsageError as e:
            outcome[0] = (str(e), None)
    dist.broadcast_object_list(outcome, src=0)
    error, result = outcome[0]
    if error is not None:
        if rank == 0:
            raise UsageError(error)
        raise SystemExit(USAGE_EXIT)
    return result


def scalar(t):
    """A Python float from a tensor that may be a (replicated) DTensor, e.g. clip_grad_norm_'s total norm."""
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


def local_state_bytes(optimizer):
    """Bytes of optimizer state this rank holds (the local rows of each DTensor)."""
    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                v = v.to_local() if hasattr(v, "to_local") else v
                total += v.numel() * v.element_size()
    return total


def memory_summary(optimizer, peak_bytes, world):
    """The summary's memory entries: state bytes summed over ranks (each holds its rows, and its own copy of the
    0-dim counters) and per rank; the largest peak and every rank's."""
    per_rank = [None] * world
    dist.all_gather_object(per_rank, (local_state_bytes(optimizer), peak_bytes))
    return {
        "state_bytes": sum(b for b, _ in per_rank),
        "state_bytes_per_rank": [b for b, _ in per_rank],
        "peak_mem_bytes": max(m for _, m in per_rank),
        "peak_mem_bytes_per_rank": [m for _, m in per_rank],
    }
