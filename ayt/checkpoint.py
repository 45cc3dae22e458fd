"""Training checkpoints, snapshots and run directories.

A run directory `runs/<name>/` holds:

    LOCK                          owner of the run while `train` runs (pid, host, start time)
    config.json, metrics.jsonl    settings; one JSON line per logged step (appended, one write() each)
    results.json                  training and evaluation results (read-modify-write under results.json.lock)
    checkpoints/ckpt-<it>.pt      full checkpoints: model, EMA, optimiser, iteration, RNG states, config,
                                  world size and micro-batching; the last `keep_last` are kept
    snapshots/snapshot-<it>.pt    EMA-only snapshots every `snapshot_every` iterations (evaluation, figures)

Files are written to a temporary name unique to the writing process and renamed into place, so a
kill at any moment leaves the previous file intact. They are read with `torch.load(weights_only=True)`:
no code from a checkpoint ever runs. An unreadable newest checkpoint is moved aside (`*.corrupt`) and
the previous one is used, with a warning naming the file.
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import re
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

FORMAT = "ayt-checkpoint"
VERSION = 1
_CKPT_RE = re.compile(r"^ckpt-(\d+)\.pt$")
_SNAP_RE = re.compile(r"^snapshot-(\d+)\.pt$")
_TMP_RE = re.compile(r"\.tmp(-\d+-[0-9a-f]+)?$")
LOCK_NAME = "LOCK"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or belongs to another model or run."""


class UnreadableCheckpointError(CheckpointError):
    """A checkpoint file exists but cannot be read (empty, truncated, corrupt)."""


class CheckpointWriteError(OSError):
    """A checkpoint or snapshot could not be written (disk full, I/O error); the previous one is intact."""


class RunInUseError(RuntimeError):
    """Another live process holds the run directory's lock."""


def warn(msg: str) -> None:
    print(f"[ayt] warning: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Atomic writes

def _tmp_name(path: Path) -> Path:
    """A temporary name next to `path`, unique to this process and call: <name>.tmp-<pid>-<hex>."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _chain(exc: BaseException) -> list[BaseException]:
    """An exception and its causes/contexts (torch.save wraps a failed write's OSError in a RuntimeError)."""
    out: list[BaseException] = []
    e: Optional[BaseException] = exc
    while e is not None and all(e is not o for o in out):
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _disk_full(exc: BaseException, directory: Path) -> bool:
    """Did a write fail because the disk (or quota) is full? The errno anywhere in the exception chain,
    else the free space itself."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
    try:
        return shutil.disk_usage(directory).free < (1 << 20)
    except OSError:
        return False


def _write_atomic(path: Path, write: Callable[[Any], None], what: str) -> None:
    """write(file) into a unique temporary file, fsync, rename over `path`. On failure the temporary
    file is removed and `path` is left as it was; a failed write (an OSError, possibly wrapped by
    torch.save) becomes a CheckpointWriteError that says so, and says when the disk is full."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        os_errors = [c for c in _chain(e) if isinstance(c, OSError)]
        if not os_errors and not (isinstance(e, RuntimeError) and "inline_container" in str(e)):
            raise  # not an I/O failure (e.g. KeyboardInterrupt, an unpicklable object)
        previous = f"{path} is unchanged" if path.exists() else "no earlier file was replaced"
        if _disk_full(e, path.parent):
            raise CheckpointWriteError(errno.ENOSPC, f"cannot write {what} {path}: the disk is full (no space left "
                                       f"on device). {previous} and no temporary file was left; free some space "
                                       "(e.g. old runs' checkpoints, or set keep_last=) and continue with --resume") from e
        raise CheckpointWriteError(os_errors[0].errno if os_errors else errno.EIO,
                                   f"cannot write {what} {path}: {e}. {previous} and no temporary file was left") from e


def save_atomic(obj: Any, path: str | os.PathLike, what: str = "checkpoint") -> None:
    """torch.save to a unique temporary file, fsync, then rename over `path`."""
    _write_atomic(Path(path), lambda f: torch.save(obj, f), what)


def write_bytes_atomic(data: bytes, path: str | os.PathLike, what: str = "file") -> None:
    _write_atomic(Path(path), lambda f: f.write(data), what)


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    write_bytes_atomic((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), path)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line with a single write() on an O_APPEND descriptor (lines never interleave)."""
    data = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.write(fd, data) != len(data):
            raise OSError(errno.EIO, f"short write appending to {path}")
    finally:
        os.close(fd)


def remove_stale_temps(run_dir: str | os.PathLike) -> list[Path]:
    """Delete temporary files a killed writer left in checkpoints/ and snapshots/ (call under the run lock)."""
    removed = []
    for sub in ("checkpoints", "snapshots"):
        d = Path(run_dir) / sub
        if d.is_dir():
            for p in d.iterdir():
                if _TMP_RE.search(p.name):
                    p.unlink(missing_ok=True)
                    removed.append(p)
    return removed


# ----------------------------------------------------------------------------------------------
# Locks: one writer per run directory; short read-modify-write sections on results.json

def _proc_stat(pid: int) -> Optional[list[str]]:
    """Fields of /proc/<pid>/stat after the command name (Linux), or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()


def _process_start(pid: int) -> Optional[str]:
    st = _proc_stat(pid)
    return st[19] if st and len(st) > 19 else None   # field 22: start time in clock ticks since boot


def _pid_alive(pid: int, start: Optional[str]) -> bool:
    """Is process `pid` (this host) still the one that wrote the lock? Zombies and reused pids are not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    st = _proc_stat(pid)
    if st is not None:
        if st[0] in ("Z", "X"):
            return False
        if start is not None and len(st) > 19 and st[19] != start:
            return False
    return True


def _read_lock(path: Path, attempts: int = 20) -> Optional[dict]:
    """The owner record of a lock file; None when it vanished. A record still being written (empty)
    is retried briefly; one that stays unreadable is reported as {} (treated as stale)."""
    for _ in range(attempts):
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            return json.loads(text)
        except ValueError:
            time.sleep(0.05)
    return {}


class FileLock:
    """An exclusive lock file created atomically (O_CREAT | O_EXCL) holding the owner's pid, host and
    start time. A lock whose owner is dead (same host), or older than `stale_after` seconds, is taken
    over with a warning; a live owner makes `acquire` wait up to `wait` seconds, then raise
    RunInUseError. Use as a context manager; release removes the file only if it is still ours."""

    def __init__(self, path: str | os.PathLike, what: str, wait: float = 0.0, stale_after: Optional[float] = None,
                 quiet_takeover: bool = False):
        self.path, self.what, self.wait, self.stale_after = Path(path), what, wait, stale_after
        self.quiet_takeover = quiet_takeover
        self.token: Optional[str] = None

    def _record(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "token": secrets.token_hex(8), "command": " ".join(sys.argv)[:500]}

    def _stale(self, owner: dict) -> bool:
        if not owner:
            return True
        if self.stale_after is not None:
            try:
                if time.time() - self.path.stat().st_mtime > self.stale_after:
                    return True
            except FileNotFoundError:
                return False
        if owner.get("host") != socket.gethostname():
            return False  # cannot check a process on another host
        return not _pid_alive(int(owner.get("pid", -1)), owner.get("process_start"))

    def _take_over(self, owner: dict) -> None:
        """Remove a stale lock, guarded so that two takers never remove each other's fresh lock."""
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - guard.stat().st_mtime > 30:  # a taker killed inside this tiny section
                    guard.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            time.sleep(0.05)
            return
        try:
            os.close(fd)
            current = _read_lock(self.path)
            if current is not None and current.get("token") == owner.get("token"):
                self.path.unlink(missing_ok=True)
                if not self.quiet_takeover:
                    warn(f"{self.what}: taking over the lock {self.path} left by pid {owner.get('pid', '?')} on "
                         f"{owner.get('host', '?')} since {owner.get('started', '?')}; that process is gone")
        finally:
            guard.unlink(missing_ok=True)

    def _refusal(self, owner: dict) -> RunInUseError:
        hint = "; wait for it or stop it"
        if owner.get("host") != socket.gethostname():
            hint += f" (if it is no longer running, delete {self.path})"
        return RunInUseError(f"{self.what} is in use by pid {owner.get('pid', '?')} on {owner.get('host', '?')} since "
                             f"{owner.get('started', '?')}{hint}")

    def acquire(self) -> "FileLock":
        deadline = time.time() + self.wait
        while True:
            rec = self._record()
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _read_lock(self.path)
                if owner is None:
                    continue           # released meanwhile
                if self._stale(owner):
                    self._take_over(owner)
                    continue
                if time.time() >= deadline:
                    raise self._refusal(owner) from None
                time.sleep(min(0.05, max(deadline - time.time(), 0)))
                continue
            try:
                os.write(fd, json.dumps(rec).encode())
            finally:
                os.close(fd)
            self.token = rec["token"]
            return self

    def release(self) -> None:
        if self.token is None:
            return
        owner = _read_lock(self.path, attempts=1)
        if owner and owner.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self.token = None

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def run_lock(run_dir: str | os.PathLike) -> FileLock:
    """The lock a training run holds on its directory for its whole duration (not yet acquired)."""
    return FileLock(Path(run_dir) / LOCK_NAME, f"run {run_dir}")


def update_json(path: str | os.PathLike, update: Callable[[dict], None], wait: float = 120.0) -> dict:
    """Read-modify-write a JSON file (e.g. results.json) under a short-lived `<file>.lock`, so training
    and `ayt eval` writing at the same time lose nothing. update(obj) modifies obj in place."""
    path = Path(path)
    with FileLock(path.with_name(path.name + ".lock"), f"{path}", wait=wait, stale_after=wait, quiet_takeover=True):
        try:
            obj = json.loads(path.read_text()) if path.exists() else {}
        except ValueError as e:
            raise CheckpointError(f"{path} is not valid JSON ({e}); move it aside to start a fresh one") from e
        update(obj)
        write_json_atomic(obj, path)
    return obj


# ----------------------------------------------------------------------------------------------
# Locating and reading checkpoints and snapshots

def checkpoint_path(run_dir: str | os.PathLike, it: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"ckpt-{it:08d}.pt"


def snapshot_path(run_dir: str | os.PathLike, it: int) -> Path:
    return Path(run_dir) / "snapshots" / f"snapshot-{it:08d}.pt"


def _listing(d: Path, pattern: re.Pattern) -> list[tuple[int, Path]]:
    if not d.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in d.iterdir() if (m := pattern.match(p.name)))


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(iteration, path) of every full checkpoint in a run directory, oldest first."""
    return _listing(Path(run_dir) / "checkpoints", _CKPT_RE)


def list_snapshots(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(iteration, path) of every EMA-only snapshot in a run directory, oldest first."""
    return _listing(Path(run_dir) / "snapshots", _SNAP_RE)


def list_weights(run_dir: str | os.PathLike, which: str = "ema") -> list[tuple[int, Path]]:
    """(iteration, path) of every iteration whose `which` weights a run holds, oldest first.
    which="ema": snapshots and full checkpoints (the smaller snapshot where both exist);
    which="model" (the raw weights): full checkpoints only."""
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    if which == "model":
        return list_checkpoints(run_dir)
    return sorted({**dict(list_checkpoints(run_dir)), **dict(list_snapshots(run_dir))}.items())


def read_torch_file(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """torch.load(weights_only=True) with a clear error (and its reason) for missing, empty, truncated,
    corrupt or non-torch files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise UnreadableCheckpointError(f"cannot read checkpoint {path}: it is empty (0 bytes), probably an "
                                        "interrupted write")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UnreadableCheckpointError(f"cannot read checkpoint {path} ({size} bytes): truncated, corrupt or not a "
                                        f"torch file ({type(e).__name__}: {reason})") from e


def is_checkpoint(obj: Any) -> bool:
    """Does a loaded object carry the ayt checkpoint header (full checkpoint or snapshot)?"""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def is_snapshot(state: dict) -> bool:
    return state.get("kind") == "snapshot"


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load and check an ayt checkpoint or snapshot; clear errors for missing, corrupt or foreign files."""
    return check_checkpoint(read_torch_file(path, map_location), path)


def check_checkpoint(ckpt: Any, path: str | os.PathLike) -> dict:
    """The header and version checks of `load_checkpoint`, for an already loaded object."""
    if not is_checkpoint(ckpt):
        raise CheckpointError(f"{path} is not an ayt training checkpoint (no '{FORMAT}' header); "
                              "plain state dicts and EDM .pkl files are accepted as net.init, not for --resume")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ckpt.get('version')} is not supported (expected {VERSION})")
    return ckpt


def move_aside(path: Path) -> Path:
    """Rename an unreadable file to <name>.corrupt (or .corrupt-N); never deletes anything."""
    target, n = path.with_name(path.name + ".corrupt"), 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.corrupt-{n}"), n + 1
    os.rename(path, target)
    return target


def load_newest_readable(candidates: list[tuple[int, Path]], where: str,
                         map_location: Any = "cpu") -> tuple[Path, dict]:
    """(path, state) of the newest readable file among `candidates` [(iteration, path), oldest first].
    Each unreadable newer one is moved aside (*.corrupt) with a warning naming it and the reason."""
    for _, p in reversed(candidates):
        try:
            return p, load_checkpoint(p, map_location)
        except CheckpointError as e:
            if not p.exists():
                continue  # another reader (e.g. another rank of `ayt eval`) moved it aside meanwhile
            if not isinstance(e, UnreadableCheckpointError):
                raise     # a foreign or newer-version file is an error, not a reason to fall back
            try:
                moved = f"moved it to {move_aside(p).name}"
            except FileNotFoundError:
                moved = "it vanished meanwhile"
            except OSError as e2:
                moved = f"could not move it aside ({e2.strerror or e2})"
            warn(f"{e}; {moved}; using the previous one")
    if not candidates:
        raise CheckpointError(f"{where} holds no checkpoints")
    raise CheckpointError(f"{where}: none of its {len(candidates)} checkpoint file(s) is readable (see the "
                          "warnings above; they were moved aside as *.corrupt)")


def load_run_checkpoint(path: str | os.PathLike, which: str = "ema", map_location: Any = "cpu") -> tuple[Path, dict]:
    """(path, state) for a run directory or a checkpoint/snapshot file. A run directory gives its
    newest readable file holding the `which` weights (see `list_weights`), falling back past
    unreadable ones; a snapshot file asked for which="model" is refused."""
    p = Path(path)
    if p.is_dir():
        ckpt_path, state = load_newest_readable(list_weights(p, which), f"run directory {p}", map_location)
    elif p.exists():
        ckpt_path, state = p, load_checkpoint(p, map_location)
    else:
        raise CheckpointError(f"no such run directory or checkpoint: {p}")
    if which not in state:
        raise CheckpointError(f"{ckpt_path} is an EMA-only snapshot; the raw weights ('{which}') are only in full "
                              "checkpoints (checkpoints/ckpt-*.pt; keep them all with keep_last=0)")
    return ckpt_path, state


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


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` full checkpoints (0 keeps all). Snapshots and files moved
    aside as *.corrupt are never touched."""
    ckpts = list_checkpoints(run_dir)
    doomed = [p for _, p in ckpts[:-keep_last]] if keep_last > 0 else []
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


# ----------------------------------------------------------------------------------------------
# Disk use

def state_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's state dict tensors (parameters and buffers); works on the meta device."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def checkpoint_bytes(model: torch.nn.Module) -> dict:
    """File sizes for a model (tensor bytes; the header adds a few kB): a full checkpoint holds the
    model, its EMA and the optimiser's two moment buffers per parameter (Adam / RAdam), about 16 bytes
    per fp32 parameter; a snapshot only the EMA, 4 bytes per parameter."""
    states = state_bytes(model)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"params": sum(p.numel() for p in model.parameters()), "full": 2 * states + 2 * params,
            "snapshot": states}


def run_disk_use(cfg, img_channels: int = 3, label_dim: int = 0) -> dict:
    """Checkpoint sizes of a run config's network (built on the meta device: nothing is allocated) and
    the disk its checkpoints take by the end of the run: now (the last keep_last full checkpoints plus
    a snapshot every snapshot_every iterations) and with every full checkpoint kept (keep_last=0)."""
    from .augment import AUG_SETS
    from .features import build_feature_net
    from .runs import build_diffusion_net  # in the function: ayt.runs imports this module
    with torch.device("meta"):
        if cfg.stage == "feature":
            net = build_feature_net(cfg.feature.arch, resolution=cfg.data.resolution, in_channels=img_channels,
                                    num_outputs=len(AUG_SETS[cfg.feature.aug_set]))
        else:
            net = build_diffusion_net(cfg, img_channels, label_dim)
    out = checkpoint_bytes(net)
    saved = -(-cfg.iters // cfg.ckpt_every)  # ceil: every ckpt_every iterations and at the end
    kept = min(cfg.keep_last, saved) if cfg.keep_last else saved
    snapshots = cfg.iters // cfg.snapshot_every if cfg.snapshot_every else 0
    out.update(run=kept * out["full"] + snapshots * out["snapshot"], keep_all=saved * out["full"],
               kept_checkpoints=kept, snapshots=snapshots)
    return out


# (image channels, classes) of the paper-scale data sets, for `disk_use_table` (no data is read).
_PAPER_DATA = {"cifar10": (3, 10), "imagenet64": (3, 1000)}


def disk_use_table() -> str:
    """The README's table of checkpoint sizes per paper-scale preset (Markdown), from `run_disk_use`."""
    from .config import PRESETS, make_config

    def gb(n: int) -> str:
        return f"{n / 1e9:.2f} GB" if n < 10e9 else f"{n / 1e9:.0f} GB"
    rows = ["| preset | parameters | full checkpoint | EMA snapshot | run at the defaults | every checkpoint kept |",
            "|---|---|---|---|---|---|"]
    for name in PRESETS:
        family = name.split("-")[0]
        if family not in _PAPER_DATA:
            continue
        cfg = make_config(name)
        channels, classes = _PAPER_DATA[family]
        u = run_disk_use(cfg, channels, classes if cfg.data.conditional else 0)
        rows.append(f"| `{name}` | {u['params'] / 1e6:.1f}M | {gb(u['full'])} | {gb(u['snapshot'])} | "
                    f"{gb(u['run'])} ({u['kept_checkpoints']} full + {u['snapshots']} snapshots) | "
                    f"{gb(u['keep_all'])} |")
    return "\n".join(rows)


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
