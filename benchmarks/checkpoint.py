"""Checkpoint files of the pretraining benchmark: durable writes, a checksum beside each checkpoint, and the
choice of which checkpoint to resume from.

Layout: OUT/checkpoints/step_00000300.pt (torch.save of tensors, numbers, strings, lists and dicts only, so it
loads with weights_only=True) and step_00000300.json beside it: {"sha256": hash of the .pt file's bytes, "step",
"args": the run's resolved options}. A checkpoint counts only if both files exist and the hash matches, so a
flipped bit, a truncated copy or a crash between the two writes is never resumed from.

--fsdp runs write a directory instead, OUT/checkpoints/step_00000300/ (benchmarks/dcp_checkpoint.py), with
step_00000300.json beside it: {"files": {name: sha256 of each file in the directory}, "step", "args", ...}; the
same rule holds for every file in it.
"""

import glob
import hashlib
import json
import os
import random
import shutil

import numpy as np
import torch

TMP_MARK = ".tmp"


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_replace(write, path):
    """write(tmp_path), fsync the file, rename it over `path`, fsync the directory: after a crash `path` is the
    old or the new file, complete either way."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}{TMP_MARK}{os.getpid()}"
    write(tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(directory)


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=str)

    durable_replace(write, path)


def sha256_file(path, chunk=1 << 22):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_dir(output_dir):
    return os.path.join(output_dir, "checkpoints")


def meta_path(ckpt_path):
    return os.path.splitext(os.path.normpath(ckpt_path))[0] + ".json"  # (a directory may be given with a slash)


def is_sharded(path):
    """A checkpoint of an --fsdp run (a torch.distributed.checkpoint directory), not a single file."""
    return os.path.isdir(path)


def list_checkpoints(output_dir):
    """Checkpoints by step, oldest first (intact or not): step_*.pt files and --fsdp runs' step_* directories."""
    paths = glob.glob(os.path.join(checkpoint_dir(output_dir), "step_*.pt"))
    paths += [
        p
        for p in glob.glob(os.path.join(checkpoint_dir(output_dir), "step_*"))
        if os.path.isdir(p) and TMP_MARK not in os.path.basename(p)
    ]
    return sorted(paths, key=lambda p: (os.path.basename(os.path.splitext(p)[0]), p))


def remove(path):
    """Delete a checkpoint: its checksum file first, so a half-deleted one is never intact."""
    if os.path.exists(meta_path(path)):
        os.remove(meta_path(path))
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def remove_stale_tmp(output_dir):
    """Half-written files (and --fsdp checkpoint directories) a killed run left behind (no live writer: call
    before this run saves anything)."""
    removed = []
    for folder in (output_dir, checkpoint_dir(output_dir)):
        for path in glob.glob(os.path.join(folder, f"*{TMP_MARK}[0-9]*")):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            removed.append(path)
    return removed


def _verify_files(path, meta):
    """Why the directory `path` does not hold exactly the files its checksum file lists, or None."""
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        return "its checksum file lists no files"
    present = sorted(os.listdir(path))
    for name in sorted(files):
        if name not in present:
            return f"{name} is missing"
        if sha256_file(os.path.join(path, name)) != files[name]:
            return f"checksum mismatch in {name} (the file is corrupt or was changed)"
    extra = [name for name in present if name not in files]
    if extra:
        return f"files not in its checksum file: {', '.join(extra)}"
    return None


def verify(path):
    """(meta dict, None) for an intact checkpoint (a file, or an --fsdp run's directory), else (None, why not)."""
    if not os.path.exists(path):
        return None, "no such file"
    try:
        with open(meta_path(path)) as f:
            meta = json.load(f)
    except FileNotFoundError:
        return None, f"its checksum file {os.path.basename(meta_path(path))} is missing"
    except (OSError, ValueError) as e:
        return None, f"its checksum file is unreadable ({e})"
    if is_sharded(path):
        why = _verify_files(path, meta)
        return (None, why) if why else (meta, None)
    if meta.get("sha256") != sha256_file(path):
        return None, "checksum mismatch (the file is corrupt or was changed)"
    return meta, None


def newest_intact(output_dir):
    """(path, meta, [(skipped path, why)]) of the newest intact checkpoint; path None when there is none."""
    skipped = []
    for path in reversed(list_checkpoints(output_dir)):
        meta, why = verify(path)
        if meta is not None:
            return path, meta, skipped
        skipped.append((path, why))
    return None, None, skipped


def _rng_state():
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(rng):
    torch.set_rng_state(rng["torch"])
    n = rng["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save(output_dir, step, payload, args_dict, keep):
    """Write step_<step>.pt (payload + RNG states) and its checksum file; keep only the newest `keep`."""
    path = os.path.join(checkpoint_dir(output_dir), f"step_{step:08d}.pt")
    durable_replace(lambda tmp: torch.save({**payload, "step": step, "rng": _rng_state()}, tmp), path)
    write_json(meta_path(path), {"sha256": sha256_file(path), "step": step, "args": args_dict})
    remove_old(output_dir, keep)
    return path


def remove_old(output_dir, keep):
    """Keep only the newest `keep` checkpoints."""
    for old in list_checkpoints(output_dir)[:-keep]:
        remove(old)


def _safe_globals():
    """Classes the reference optimizers (galore-torch, fira) keep in their state: their projector objects."""
    out = []
    for module, name in (
        ("galore_torch.galore_projector", "GaLoreProjector"),
        ("fira.gradient_projection", "GradientProjector"),
    ):
        try:
            out.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return out


def read(path):
    """The checkpoint's payload. weights_only=True: loading runs no pickled code (the reference packages'
    projector classes are allow-listed by name)."""
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def load(path):
    """The checkpoint's payload, with the RNG states it saved restored."""
    state = read(path)
    _set_rng_state(state["rng"])
    return state


def truncate_log(path, step):
    """Drop log entries after `step` (written by the run that is being resumed, past its last checkpoint)."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    keep = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(keep) != len(lines):

        def write(tmp):
            with open(tmp, "w") as f:
                f.writelines(keep)

        durable_replace(write, path)
    return len(lines) - len(keep)
