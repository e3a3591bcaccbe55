"""Giving back the resident pages of model weights mapped from disk.

On CPU, safetensors (and torch.load with mmap, for .bin files) maps a weight file into memory
instead of copying it, so every page a model has touched counts in the process's RSS and stays
there. A model that is idle for a while (CLIP vision once a batch's image features are computed,
the UNet while the VAE decodes) can give those pages back with madvise(MADV_DONTNEED): they leave
RSS and are read again, unchanged, from the page cache (or the file) the next time the model
runs. Only file mappings that nothing has written to are dropped: the mapping is private, so a
written page would revert to the file's content.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass
from itertools import chain

import torch

MADV_DONTNEED = 4  # the same value on every Linux architecture


@dataclass(frozen=True)
class FileMapping:
    start: int
    end: int
    resident: int  # bytes
    written: int  # bytes of pages that differ from the file (dirty or copied on write)


def release_mapped_weights(model: torch.nn.Module) -> int:
    """Drop the resident pages of the unwritten files that `model`'s CPU weights are mapped from.

    Returns the bytes taken out of RSS; 0 off Linux, for weights in anonymous memory (converted
    to another dtype, or trained) or on another device.
    """
    if not sys.platform.startswith("linux"):
        return 0
    addresses = {t.data_ptr() for t in chain(model.parameters(), model.buffers()) if t.device.type == "cpu" and t.numel()}
    if not addresses:
        return 0
    madvise = ctypes.CDLL(None).madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    released = 0
    for mapping in file_mappings():
        if mapping.written or not any(mapping.start <= address < mapping.end for address in addresses):
            continue
        if madvise(mapping.start, mapping.end - mapping.start, MADV_DONTNEED) == 0:
            released += mapping.resident
    return released


def file_mappings() -> list[FileMapping]:
    """The process's mappings of regular files, from /proc/self/smaps."""
    mappings, current, fields = [], None, {}

    def close() -> None:
        if current is not None:
            written = fields.get("Private_Dirty", 0) + fields.get("Shared_Dirty", 0) + fields.get("Anonymous", 0)
            mappings.append(FileMapping(*current, resident=fields.get("Rss", 0), written=written))

    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as smaps:
        for line in smaps:
            parts = line.split(maxsplit=5)
            if not parts[0].endswith(":"):  # a mapping's header: range perms offset device inode [path]
                close()
                current, fields = None, {}
                if len(parts) == 6 and parts[4] != "0" and parts[5].startswith("/"):
                    current = tuple(int(value, 16) for value in parts[0].split("-"))
            elif current is not None and len(parts) >= 3 and parts[2] == "kB":
                fields[parts[0][:-1]] = int(parts[1]) * 1024
    close()
    return mappings
