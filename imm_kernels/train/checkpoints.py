"""Training checkpoints on disk: written atomically, checked on load, found again after any crash.

A run directory holds its checkpoints as complete folders and a pointer to the newest:

    OUT/checkpoints/step_0001000/   model, ema, optimizer (.safetensors), config.json, state.json
                                    (an FSDP run: ema.safetensors, config.json, state.json and sharded/,
                                    torch.distributed.checkpoint's files for model and optimizer)
    OUT/checkpoints/step_0002000/
    OUT/latest                      "checkpoints/step_0002000", replaced with os.replace

Writing one (`write_checkpoint`): every file goes into `checkpoints/step_N.partial/`, is
fsynced, and `state.json` is written last with the SHA-256 of every other file; the folder is
fsynced, renamed to `step_N` in one rename, the parent fsynced, and only then is `latest`
replaced (write `latest.tmp`, fsync, `os.replace`, fsync the run directory). Older complete
checkpoints beyond `keep` are deleted after that. A crash at any point leaves the previous
checkpoint complete and findable: `find_checkpoint` follows `latest` when it names a complete
checkpoint, else takes the newest complete `step_*` folder (a `.partial` folder is never
complete: it lacks state.json or its checksums fail). Loading verifies every checksum.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from ..model_files import file_sha256

__all__ = [
    "CheckpointError",
    "CHECKPOINTS_DIR",
    "LATEST_FILE",
    "STATE_FILE",
    "CONFIG_FILE",
    "write_checkpoint",
    "begin_checkpoint",
    "finish_checkpoint",
    "find_checkpoint",
    "open_checkpoint",
    "complete_checkpoints",
    "verify_checkpoint",
    "read_state",
]

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
STATE_FILE = "state.json"
CONFIG_FILE = "config.json"
LEGACY_CHECKPOINT_DIR = "checkpoint"  # the single folder of runs written before checkpoints/ and latest
_PARTIAL_SUFFIX = ".partial"
_STEP_FOLDER = re.compile(r"^step_(\d{7,})(?:_(\d+))?$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit: the message names the file."""


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Makes the directory's entries (new names, renames) durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_durably(path: Path, value: dict) -> None:
    """JSON written and fsynced (non-finite floats are an error here: callers pass finite values or None)."""
    with open(path, "w") as file:
        file.write(json.dumps(value, indent=2, allow_nan=False) + "\n")
        file.flush()
        os.fsync(file.fileno())


def _step_folders(checkpoints: Path) -> list[tuple[int, int, Path]]:
    """(step, suffix, path) of every step_N[_k] folder, oldest first."""
    if not checkpoints.is_dir():
        return []
    found = []
    for child in checkpoints.iterdir():
        match = _STEP_FOLDER.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), int(match.group(2) or 0), child))
    return sorted(found, key=lambda item: item[:2])


def write_checkpoint(run_dir: Path, step: int, write_files, *, keep: int) -> Path:
    """Writes checkpoint `step` of run_dir as described in the module docstring; returns its folder.

    write_files(folder) writes every file but state.json and returns the state dict to store in it
    (JSON-able); the SHA-256 of each file is added as state["files"].
    """
    partial, final = begin_checkpoint(run_dir, step)
    return finish_checkpoint(run_dir, partial, final, write_files(partial), keep=keep)


def begin_checkpoint(run_dir: Path, step: int) -> tuple[Path, Path]:
    """(partial, final): a new empty step_N.partial folder to write checkpoint `step` into, and the name it
    will have when complete. Removes what earlier saves that never finished left behind."""
    checkpoints = run_dir / CHECKPOINTS_DIR
    checkpoints.mkdir(parents=True, exist_ok=True)
    for stale in checkpoints.glob(f"*{_PARTIAL_SUFFIX}"):
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step_{step:07d}"
    taken = {path.name for _, _, path in _step_folders(checkpoints)}
    suffix = 0
    while (f"{name}_{suffix}" if suffix else name) in taken:  # a step saved again (resumed from an older one)
        suffix += 1
    final = checkpoints / (f"{name}_{suffix}" if suffix else name)
    partial = checkpoints / (final.name + _PARTIAL_SUFFIX)
    partial.mkdir()
    return partial, final


def finish_checkpoint(run_dir: Path, partial: Path, final: Path, state: dict, *, keep: int) -> Path:
    """Completes begin_checkpoint's folder once every file is in it (also in subfolders, such as the
    shards of an FSDP run): fsyncs, state.json with every file's SHA-256, the rename, `latest`, rotation."""
    checkpoints = run_dir / CHECKPOINTS_DIR
    files = sorted(path.relative_to(partial).as_posix() for path in partial.rglob("*") if path.is_file())
    for file_name in files:
        _fsync_file(partial / file_name)
    for folder in sorted({(partial / file_name).parent for file_name in files}, reverse=True):
        _fsync_dir(folder)
    state = {**state, "files": {file_name: file_sha256(partial / file_name) for file_name in files}}
    write_json_durably(partial / STATE_FILE, state)
    _fsync_dir(partial)
    os.rename(partial, final)
    _fsync_dir(checkpoints)
    pointer = run_dir / (LATEST_FILE + ".tmp")
    with open(pointer, "w") as file:
        file.write(f"{CHECKPOINTS_DIR}/{final.name}\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(pointer, run_dir / LATEST_FILE)
    _fsync_dir(run_dir)
    for _, _, old in _step_folders(checkpoints)[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(folder: Path) -> dict:
    path = folder / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: incomplete checkpoint, {STATE_FILE} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path}: not a checkpoint state (no integer 'step')")
    return state


def verify_checkpoint(folder: Path) -> dict:
    """The folder's state.json after checking that every file it lists is there with its SHA-256."""
    state = read_state(folder)
    files = state.get("files")
    if files is None:  # written before checksums: nothing to verify
        return state
    if not isinstance(files, dict):
        raise CheckpointError(f"{folder / STATE_FILE}: 'files' is not a name -> SHA-256 table")
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (the checkpoint lists it)")
        if file_sha256(path) != expected:
            raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt or was changed")
    return state


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete, verified checkpoints, oldest first."""
    complete = []
    for _, _, folder in _step_folders(run_dir / CHECKPOINTS_DIR):
        try:
            verify_checkpoint(folder)
        except CheckpointError:
            continue
        complete.append(folder)
    return complete


def _is_checkpoint_folder(path: Path) -> bool:
    return (path / STATE_FILE).is_file() and (path / CONFIG_FILE).is_file()


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint to load for `path`: a checkpoint folder itself, or a run directory's newest complete one.

    For a run directory: the folder `latest` names when it is complete, else the newest complete
    checkpoints/step_* folder (a crash can leave `latest` behind or a folder half written), else the
    single checkpoint/ folder of runs from before this layout. A folder given as such is not read here.
    """
    path = Path(path)
    if _is_checkpoint_folder(path):
        return path
    return _newest_complete(path)[0]


def open_checkpoint(path: str | os.PathLike) -> tuple[Path, dict]:
    """(folder, state): `find_checkpoint`'s folder and its verified state.json, every file hashed once."""
    path = Path(path)
    if _is_checkpoint_folder(path):
        return path, verify_checkpoint(path)
    return _newest_complete(path)


def _newest_complete(run_dir: Path) -> tuple[Path, dict]:
    """A run directory's checkpoint as find_checkpoint describes it, with its verified state."""
    latest = run_dir / LATEST_FILE
    if latest.is_file():
        target = run_dir / latest.read_text().strip()
        if target.parent == run_dir / CHECKPOINTS_DIR and _is_checkpoint_folder(target):
            try:
                return target, verify_checkpoint(target)
            except CheckpointError:
                pass
    for _, _, folder in reversed(_step_folders(run_dir / CHECKPOINTS_DIR)):
        try:
            return folder, verify_checkpoint(folder)
        except CheckpointError:
            continue
    legacy = run_dir / LEGACY_CHECKPOINT_DIR
    if _is_checkpoint_folder(legacy):
        return legacy, verify_checkpoint(legacy)
    if (run_dir / CHECKPOINTS_DIR).is_dir():
        raise CheckpointError(
            f"{run_dir}: no complete checkpoint in {CHECKPOINTS_DIR}/ (every one is partial or corrupt)"
        )
    raise FileNotFoundError(
        f"checkpoint {str(run_dir)!r} is not a checkpoint: no {STATE_FILE} and {CONFIG_FILE} in it, and no "
        f"{CHECKPOINTS_DIR}/ of a run directory"
    )


def holds_run(path: Path) -> bool:
    """Whether a directory already holds (part of) a training run."""
    return any((path / name).exists() for name in (CONFIG_FILE, LATEST_FILE, CHECKPOINTS_DIR, LEGACY_CHECKPOINT_DIR))
