"""Checkpoints of --fsdp runs: torch.distributed.checkpoint (DCP) directories that resume at any world size.

OUT/checkpoints/step_00000300/ holds DCP's files (every rank writes its rows of the model and optimizer state, as
`get_state_dict` gives them; DCP reshards them on load) and run.pt, rank 0's torch.save of the benchmark's own
state: step, data position (a position in the global sample order, the same at any world size), scheduler, RNG
states, evals, options. step_00000300.json beside it holds the sha256 of every file (benchmarks/checkpoint.py
checks them). The directory is written under a temporary name, its files fsynced (DCP's writer syncs its own),
renamed when complete and only then given its checksum file: a crash leaves the previous checkpoints intact.
"""

import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from . import checkpoint as ckpt

RUN_FILE = "run.pt"


def _rng_state():
    """ckpt's RNG states, with the CUDA generator of this rank's device only: every rank restores it on its own
    device, whatever the number of devices."""
    rng = ckpt._rng_state()
    rng["cuda"] = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    return rng


def _set_rng_state(rng):
    ckpt._set_rng_state({**rng, "cuda": None})
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def _fsync_tree(path):
    for name in os.listdir(path):
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    ckpt.fsync_dir(path)


def save(output_dir, step, model, optimizer, payload, args_dict, keep, rank, world):
    """Write step_<step>/ (every rank's shards + rank 0's run.pt) and its checksum file; keep the newest `keep`.
    Called on every rank."""
    final = os.path.join(ckpt.checkpoint_dir(output_dir), f"step_{step:08d}")
    tmp = [f"{final}{ckpt.TMP_MARK}{os.getpid()}"]
    dist.broadcast_object_list(tmp, src=0)  # one directory for all ranks: rank 0's name
    tmp = tmp[0]
    if rank == 0:
        os.makedirs(tmp)
        ckpt.durable_replace(
            lambda t: torch.save({**payload, "step": step, "rng": _rng_state()}, t), os.path.join(tmp, RUN_FILE)
        )
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)  # returns when all wrote
    if rank == 0:
        _fsync_tree(tmp)
        files = {name: ckpt.sha256_file(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
        ckpt.remove(final)  # an older checkpoint of this step (a resumed run passes it again)
        os.replace(tmp, final)
        ckpt.fsync_dir(os.path.dirname(final))
        meta = {"files": files, "step": step, "world_size": world, "format": "torch.distributed.checkpoint"}
        ckpt.write_json(ckpt.meta_path(final), {**meta, "args": args_dict})
        ckpt.remove_old(output_dir, keep)
    dist.barrier()
    return final


def _check_same_entries(path, state):
    """Refuse a checkpoint whose entries differ from what this run's model and optimizer hold: DCP would fill
    the common ones and silently drop saved entries the fresh state lacks."""
    saved = set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)
    wanted = set(flatten_state_dict(state)[0])
    missing, unused = sorted(wanted - saved), sorted(saved - wanted)
    if missing or unused:
        raise ValueError(
            f"{path}: the checkpoint's entries differ from this run's model and optimizer state "
            f"({len(missing)} missing, e.g. {missing[:3]}; {len(unused)} not used, e.g. {unused[:3]})"
        )


def load(path, model, optimizer):
    """Load a step_<step>/ directory into the sharded model and optimizer (at this run's world size); restore
    the RNG states; return run.pt's payload. Called on every rank."""
    # on a fresh optimizer get_state_dict first builds the state with one zero-lr step, so DCP has tensors of
    # this world size's layout to read the saved rows into
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    _check_same_entries(path, state)
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    payload = ckpt.read(os.path.join(path, RUN_FILE))
    _set_rng_state(payload["rng"])
    return payload
