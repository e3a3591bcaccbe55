"""The plugin home: install, list, verify and remove plugins and the authors' selector heads.

Layout of $DIFFPLUGIN_HOME (default: the user cache dir, e.g. ~/.cache/diffplugin):
    plugins/NAME.safetensors   the plugin, converted to our single-file format
    plugins/NAME.json          its install record (sources, sha256 of every file, verified or not)
    selector/reference.safetensors (+ .json)   the authors' Plugin-Selector heads
Installs download into a private staging folder, verify (sha256 from the registry, else trust
on first use: the computed sha256 is recorded and shown), convert, then rename into place under a
lock: a failed or corrupted download installs nothing and leaves the previous version intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Callable

from . import __version__
from .atomic import atomic_path, file_sha256
from .download import Progress, fetch
from .errors import DiffPluginError
from .registry import Registry

SELECTOR_NAME = "reference-selector"
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")


def plugin_home() -> Path:
    """$DIFFPLUGIN_HOME, else the user cache dir (XDG on Linux)."""
    if os.environ.get("DIFFPLUGIN_HOME"):
        return Path(os.environ["DIFFPLUGIN_HOME"])
    if sys.platform == "darwin":
        return Path.home() / "Library/Caches/diffplugin"
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA", Path.home())) / "diffplugin"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffplugin"


def installed_plugins_dir(home: Path | None = None) -> Path:
    return (home or plugin_home()) / "plugins"


def installed_selector(home: Path | None = None) -> Path | None:
    path = (home or plugin_home()) / "selector/reference.safetensors"
    return path if path.is_file() else None


@dataclass
class InstallRecord:
    name: str
    path: str
    sha256: str
    source: str
    verified: bool
    files: dict = field(default_factory=dict)  # relpath -> {"source", "sha256", "verified"}
    installed_at: str = ""
    version: str = __version__

    @property
    def size(self) -> int:
        return Path(self.path).stat().st_size if Path(self.path).exists() else 0


def records(home: Path | None = None) -> dict[str, InstallRecord]:
    """Every install record in the home, by name."""
    home = home or plugin_home()
    found = {}
    for record_file in sorted([*(home / "plugins").glob("*.json"), *(home / "selector").glob("*.json")]):
        with contextlib.suppress(ValueError, TypeError, OSError):
            data = json.loads(record_file.read_text(encoding="utf-8"))
            found[data["name"]] = InstallRecord(**data)
    return found


def install(target: str, registry: Registry, name: str | None = None, home: Path | None = None,
            progress: Callable[[str], Progress] | None = None) -> list[InstallRecord]:
    """Install a registry plugin NAME, 'all', 'selector', a local PATH or a URL.

    `progress(label)` may return a callback (bytes, total) for each file downloaded.
    """
    home = home or plugin_home()
    if target == "all":
        names = list(registry.plugins) + ([SELECTOR_NAME] if registry.selector_files else [])
        return [install_registry_entry(n, registry, home, progress) for n in names]
    if target in registry.plugins or target == SELECTOR_NAME:
        return [install_registry_entry(target, registry, home, progress)]
    if "://" in target:
        return [_install_source({"url": target}, name or _stem(PurePosixPath(target.split("?")[0]).name), registry, home, progress)]
    path = Path(target)
    if path.exists():
        return [_install_source({"path": str(path)}, name or _stem(path.name), registry, home, progress)]
    known = ", ".join([*registry.plugins, SELECTOR_NAME, "all"])
    raise DiffPluginError(f"{target}: not a registry plugin ({known}), an existing path or a URL")


def install_registry_entry(name: str, registry: Registry, home: Path, progress=None) -> InstallRecord:
    files = registry.selector_files if name == SELECTOR_NAME else registry.entry(name).files
    if not files:
        raise DiffPluginError(f"{name}: the registry ({registry.path}) lists no files for it; install a local copy with "
                              f"`diffplugin plugins install /path/to/{name} --name {name}`")
    with _staging(home) as stage:
        fetched = {}
        for relpath, source in files.items():
            dest = _inside(stage / "files", relpath)
            dest.parent.mkdir(parents=True, exist_ok=True)
            label = f"{name}/{relpath}"
            try:
                digest = fetch(source, dest, progress(label) if progress else None)
            except DiffPluginError as exc:
                raise DiffPluginError(f"{exc}; to install from a local copy: diffplugin plugins install /path/to/{name} --name {name}") from None
            expected = source.get("sha256")
            if expected and expected.lower() != digest:
                raise DiffPluginError(f"{label}: checksum mismatch (expected {expected}, got {digest}); nothing installed")
            fetched[relpath] = {"source": source.get("url") or f"hub:{source.get('hub')}/{source.get('path')}", "sha256": digest, "verified": bool(expected)}
        return _place(stage, stage / "files", name, registry, home, fetched, source=registry.entry(name).source or str(registry.path))


def _install_source(source: dict, name: str, registry: Registry, home: Path, progress=None) -> InstallRecord:
    """A user's plugin: a local folder/.safetensors/archive, or a URL to a .safetensors or archive."""
    with _staging(home) as stage:
        if "url" in source:
            filename = PurePosixPath(source["url"].split("?")[0]).name or "download"
            local = stage / "download" / filename
            local.parent.mkdir(parents=True)
            digest = fetch(source, local, progress(filename) if progress else None)
            origin = source["url"]
        else:
            local = Path(source["path"])
            digest = file_sha256(local) if local.is_file() else None
            origin = str(local.resolve())
        if local.is_file() and local.name.endswith(ARCHIVE_SUFFIXES):
            plugin_path = _plugin_root(_extract(local, stage / "unpacked"))
        else:
            plugin_path = local
        files = {local.name: {"source": origin, "sha256": digest, "verified": False}} if digest else _hash_tree(plugin_path, origin)
        return _place(stage, plugin_path, name, registry, home, files, source=origin)


def _place(stage: Path, plugin_path: Path, name: str, registry: Registry, home: Path, files: dict, source: str) -> InstallRecord:
    """Convert (which also refuses unsafe pickles) and move into the home atomically, under a lock."""
    if name == SELECTOR_NAME:
        converted = _convert_selector(plugin_path, stage)
        target = home / "selector/reference.safetensors"
    else:
        from .plugins import convert_plugin

        converted = convert_plugin(plugin_path, stage / f"{name}.safetensors", name=name, task=name,
                                   init=registry.entry(name).init if name in registry.plugins else None, source=source)
        target = installed_plugins_dir(home) / f"{name}.safetensors"
    record = InstallRecord(
        name=name,
        path=str(target),
        sha256=file_sha256(converted),
        source=source,
        verified=all(f["verified"] for f in files.values()),
        files=files,
        installed_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(home, name):
        os.replace(converted, target)
        with atomic_path(target.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(asdict(record), indent=2) + "\n", encoding="utf-8")
    return record


def _convert_selector(path: Path, stage: Path) -> Path:
    from safetensors.torch import save_file

    from .selector import load_prompt_tuner

    source = path / "PromptTunner.pt" if path.is_dir() else path
    heads = load_prompt_tuner(source)
    out = stage / "reference.safetensors"
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in heads.state_dict().items()}, str(tmp), metadata={"format": "diffplugin-selector"})
    return out


def remove(name: str, home: Path | None = None) -> InstallRecord:
    home = home or plugin_home()
    record = records(home).get(name)
    if record is None:
        raise DiffPluginError(f"{name}: not installed in {home}")
    with _lock(home, name):
        for path in (Path(record.path), Path(record.path).with_suffix(".json")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return record


def verify(home: Path | None = None) -> list[dict]:
    """Re-hash every installed file against its record."""
    results = []
    for name, record in records(home).items():
        path = Path(record.path)
        if not path.is_file():
            results.append({"name": name, "ok": False, "reason": f"{path} is missing"})
            continue
        actual = file_sha256(path)
        ok = actual == record.sha256
        results.append({"name": name, "ok": ok, "reason": "" if ok else f"sha256 is {actual}, recorded {record.sha256}"})
    return results


# --- helpers ------------------------------------------------------------------------------------

@contextlib.contextmanager
def _staging(home: Path):
    (home / ".staging").mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix="install-", dir=home / ".staging"))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def _lock(home: Path, name: str):
    """Serialise installs and removals of one name across processes (POSIX advisory lock)."""
    (home / ".locks").mkdir(parents=True, exist_ok=True)
    with open(home / ".locks" / f"{name}.lock", "w") as handle:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: the atomic renames still hold
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _inside(root: Path, relpath: str) -> Path:
    """`root / relpath`, refusing absolute paths and '..' that would leave `root`."""
    parts = PurePosixPath(relpath.replace("\\", "/")).parts
    if not parts or PurePosixPath(relpath).is_absolute() or ".." in parts:
        raise DiffPluginError(f"refused: the path {relpath!r} would leave the install folder")
    return root.joinpath(*parts)


def _extract(archive: Path, dest: Path) -> Path:
    """Unpack a zip/tar, refusing absolute paths, '..', links and special files."""
    dest.mkdir(parents=True)
    for name, kind, open_member in _members(archive):
        target = _inside(dest, name)
        if kind == "other":
            raise DiffPluginError(f"{archive}: refused: {name} is a link or special file")
        if kind == "dir":
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with open_member() as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)
    return dest


def _members(archive: Path):
    """(name, 'file' | 'dir' | 'other', opener) for each member of a zip or tar archive."""
    try:
        if archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zipped:
                for info in zipped.infolist():
                    is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
                    kind = "other" if is_link else "dir" if info.is_dir() else "file"
                    yield info.filename, kind, lambda info=info: zipped.open(info)
        else:
            with tarfile.open(archive) as tarred:
                for member in tarred.getmembers():
                    kind = "file" if member.isfile() else "dir" if member.isdir() else "other"
                    yield member.name, kind, lambda member=member: tarred.extractfile(member)
    except (tarfile.TarError, zipfile.BadZipFile) as exc:
        raise DiffPluginError(f"{archive}: not a readable archive ({exc})") from None


def _plugin_root(folder: Path) -> Path:
    """The folder holding tpb.pt + scb/ (or the one .safetensors) at the top of an unpacked archive."""
    for candidate in (folder, *sorted(p for p in folder.iterdir() if p.is_dir())):
        if (candidate / "tpb.pt").is_file() or (candidate / "PromptTunner.pt").is_file():
            return candidate
    singles = sorted(folder.rglob("*.safetensors"))
    if len(singles) == 1:
        return singles[0]
    raise DiffPluginError("no plugin in the archive (expected tpb.pt and scb/ at its top or in one folder)")


def _hash_tree(path: Path, origin: str) -> dict:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(p.relative_to(path) if path.is_dir() else p.name): {"source": origin, "sha256": file_sha256(p), "verified": False} for p in files}


def _stem(filename: str) -> str:
    for suffix in (".safetensors", *ARCHIVE_SUFFIXES):
        if filename.endswith(suffix):
            return filename[: -len(suffix)]
    return filename
