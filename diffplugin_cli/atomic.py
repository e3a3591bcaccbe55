"""File helpers: atomic writes (write beside the target, then rename, so a killed run leaves no
half file) and streaming SHA-256."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

TMP_MARK = ".diffplugin-tmp"
_UMASK = os.umask(0o022)  # read once at import, before any worker thread creates files
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike):
    """Yield a temporary path beside `target`; it replaces `target` only if the block succeeds.

    The temporary name starts with a dot (skipped by the input walk) and carries TMP_MARK,
    so a later run can sweep what a killed run left behind. The file gets the mode a plain
    `open` would give it (the replaced file's, else 0o666 minus the umask), whatever its writer
    chose: safetensors >= 0.8 creates its files 0o600, unreadable to other users.
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}{TMP_MARK}{target.suffix}")
    try:
        yield tmp
        mode = target.stat().st_mode if target.exists() else 0o666 & ~_UMASK
        os.chmod(tmp, mode & 0o7777)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def sweep_stale_temporaries(folder: Path) -> int:
    """Remove temporaries a killed run left under `folder`; returns how many."""
    removed = 0
    for stale in folder.rglob(f".*{TMP_MARK}*"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
            removed += 1
    return removed


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
