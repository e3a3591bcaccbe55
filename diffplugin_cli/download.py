"""Fetching files: streaming HTTP with resume and retries, or the Hugging Face hub. Hashes as it goes."""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from .atomic import file_sha256
from .errors import DiffPluginError

CHUNK = 1 << 20
Progress = Callable[[int, int | None], None]  # (bytes so far, total or None)


class DownloadError(DiffPluginError):
    """A source could not be fetched (offline, unreachable, refused)."""


def fetch(source: dict, dest: Path, progress: Progress | None = None, retries: int = 4, timeout: float = 30.0) -> str:
    """Fetch one registry file entry ({url=...} or {hub=..., path=..., revision=...}) to `dest`; returns its sha256.

    A partial download is kept as `dest.part` and resumed (HTTP Range) on retry or on a later call.
    """
    if "hub" in source:
        return _fetch_hub(source, dest)
    url = source.get("url")
    if not url:
        raise DiffPluginError(f"registry file entry {source!r} has neither url nor hub")
    part = dest.with_name(dest.name + ".part")
    last_error: Exception | None = None
    for attempt in range(retries + 1):
        try:
            _stream(url, part, progress, timeout)
            os.replace(part, dest)
            return file_sha256(dest)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            if isinstance(exc, urllib.error.HTTPError) and exc.code not in (408, 429, 500, 502, 503, 504):
                raise DownloadError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
            last_error = exc
            time.sleep(min(0.2 * 2**attempt, 2.0))
    reason = getattr(last_error, "reason", None) or last_error
    raise DownloadError(f"cannot download {url}: {reason}") from None


def _stream(url: str, part: Path, progress: Progress | None, timeout: float) -> None:
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if have and response.status != 206:  # the server ignored the range: start again
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(part, "ab" if have else "wb") as out:
            done = have
            while chunk := response.read(CHUNK):
                out.write(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
        if total is not None and done != total:
            raise OSError(f"connection closed after {done} of {total} bytes")


def _fetch_hub(source: dict, dest: Path) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        cached = hf_hub_download(source["hub"], source["path"], revision=source.get("revision"))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise DownloadError(f"cannot download {source['path']} from the hub repo {source['hub']}: {str(exc).splitlines()[0]}") from None
    dest.write_bytes(Path(cached).read_bytes())
    return file_sha256(dest)
