"""Training checkpoints and run directories.

A checkpoint is one file `runs/<name>/checkpoints/ckpt-<iteration>.pt` holding the model, its EMA,
the optimiser, the iteration, the data-order position, the RNG states and the config. It is written
to a temporary file and renamed into place, so a kill at any moment leaves the previous checkpoint
intact. Files are read with `torch.load(weights_only=True)`: no code from a checkpoint ever runs.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch

FORMAT = "ayt-checkpoint"
VERSION = 1
_CKPT_RE = re.compile(r"^ckpt-(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or belongs to another model or run."""


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to `path.tmp`, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def checkpoint_path(run_dir: str | os.PathLike, it: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"ckpt-{it:08d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(iteration, path) of every checkpoint in a run directory, oldest first."""
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in d.iterdir() if (m := _CKPT_RE.match(p.name))]
    return sorted(out)


def read_torch_file(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """torch.load(weights_only=True) with a clear error for missing, corrupt or non-torch files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path} (corrupt or not a torch file): {e}") from e


def is_checkpoint(obj: Any) -> bool:
    """Does a loaded object carry the ayt checkpoint header?"""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load and check an ayt checkpoint; clear errors for missing, corrupt or foreign files."""
    return check_checkpoint(read_torch_file(path, map_location), path)


def check_checkpoint(ckpt: Any, path: str | os.PathLike) -> dict:
    """The header and version checks of `load_checkpoint`, for an already loaded object."""
    if not is_checkpoint(ckpt):
        raise CheckpointError(f"{path} is not an ayt training checkpoint (no '{FORMAT}' header); "
                              "plain state dicts and EDM .pkl files are accepted as net.init, not for --resume")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ckpt.get('version')} is not supported (expected {VERSION})")
    return ckpt


def latest_checkpoint(run_dir: str | os.PathLike) -> Optional[Path]:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory -> its latest checkpoint; a file -> itself."""
    p = Path(path)
    if p.is_dir():
        latest = latest_checkpoint(p)
        if latest is None:
            raise CheckpointError(f"run directory {p} holds no checkpoints (expected {p}/checkpoints/ckpt-*.pt)")
        return latest
    if not p.exists():
        raise CheckpointError(f"no such run directory or checkpoint: {p}")
    return p


def load_state_dict_strict(module: torch.nn.Module, state: dict, what: str) -> None:
    """load_state_dict(strict=True) with a readable error naming missing/unexpected/mismatched keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        def head(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {head(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {head(unexpected)}")
        if shapes:
            parts.append("shape mismatch: " + head([f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shapes]))
        raise CheckpointError(f"{what} does not match this model ({'; '.join(parts)})")
    module.load_state_dict(state, strict=True)
