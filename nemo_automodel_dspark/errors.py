"""The one error type the tools raise for a user mistake, and the one way it is shown: a line, no traceback."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

USER_ERROR_STATUS = 2  # the status argparse exits with for a bad flag: every refusal exits alike
OTHER_RANKS_WAIT_S = 2.0


class ToolError(RuntimeError):
    """A refused request (bad configuration, a resume that does not match, a path in the way)."""


def report_user_error(command: str, err: object) -> int:
    """Print `dspark <command>: error: <err>` on stderr (rank 0 alone under torchrun); the status to exit with."""
    if os.environ.get("RANK", "0") == "0":
        print(f"dspark {command}: error: {err}", file=sys.stderr, flush=True)
    else:  # torchrun stops every rank at the first exit: the silent ranks wait so that rank 0's line gets out
        time.sleep(OTHER_RANKS_WAIT_S)
    return USER_ERROR_STATUS


def require_file(path: str | os.PathLike, flag: str) -> Path:
    """`path` as a Path, or a ToolError naming the flag when it is not a file (a folder is named as one)."""
    if Path(path).is_dir():
        model = (Path(path) / "config.json").is_file()
        raise ToolError(f"{flag} {path}: {'a model folder (config.json)' if model else 'a folder'}, not a file")
    if not Path(path).is_file():
        raise ToolError(f"{flag} {path}: no such file")
    return Path(path)


def require_draft_dir(path: str | os.PathLike, flag: str = "--draft") -> Path:
    """A saved DSpark draft folder (has config.json), or a ToolError that says what to pass instead."""
    if not (Path(path) / "config.json").is_file():
        raise ToolError(
            f"{flag} {path}: not a saved DSpark draft (no config.json); pass a checkpoint folder such as "
            "OUTPUT_DIR/checkpoints/epoch_E_step_S"
        )
    return Path(path)


def require_output_file(path: str | os.PathLike | None, flag: str) -> None:
    """Before any work: `path` (when given) must be a file name we can create, not a folder or under a read-only one."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir() or str(path).endswith(os.sep):
        raise ToolError(f"{flag} {path}: is a directory; pass a file name")
    parent = target.parent
    while not parent.exists():  # the writer creates missing folders; the nearest existing one must be writable
        parent = parent.parent
    _require_writable_folder(parent, flag, path)
    if target.exists() and not os.access(target, os.W_OK):
        raise ToolError(f"{flag} {path}: the file is not writable")


def require_count(value: int | None, flag: str, minimum: int = 1) -> None:
    """A count flag (rows, prompts, tokens, bins) must be at least `minimum` when given."""
    if value is not None and value < minimum:
        raise ToolError(f"{flag} {value}: must be >= {minimum}")


def require_device(device: str | None, flag: str) -> None:
    """`cpu`, `cuda` or `cuda:N` that this machine has (None or `auto`: chosen later), else one line naming `flag`
    (instead of torch's `Torch not compiled with CUDA enabled` traceback once the models load)."""
    if device in (None, "auto"):
        return
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise ToolError(f"{flag} {device}: not a device; use cpu, cuda or cuda:N") from err
    if parsed.type == "cpu":
        return
    if parsed.type != "cuda":
        raise ToolError(f"{flag} {device}: not supported here; use cpu, cuda or cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ToolError(f"{flag} {device}: CUDA is not available on this machine (torch {torch.__version__}); use cpu")
    if parsed.index is not None and parsed.index >= count:
        raise ToolError(f"{flag} {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def require_output_dir(path: str | os.PathLike, flag: str) -> None:
    """Before any work: `path` is a folder we can create or write into, not a file."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ToolError(f"{flag} {path}: is a file; pass a folder")
    parent = target
    while not parent.exists():
        parent = parent.parent
    _require_writable_folder(parent, flag, path)


def _require_writable_folder(folder: Path, flag: str, path: str | os.PathLike) -> None:
    """`folder` must take a new file: asked of the OS (`access`) and then tried, with a hidden probe file removed at
    once, since `access` says yes where the write would still fail (root, /proc, some network mounts)."""
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ToolError(f"{flag} {path}: cannot write there ({folder} is not a writable folder)")
    probe = folder / f".dspark-write-probe-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as err:
        message = f"{flag} {path}: cannot write there (a file cannot be created in {folder}: {err.strerror})"
        raise ToolError(message) from err
