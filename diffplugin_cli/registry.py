"""The plugin registry (`plugins.toml`) and where plugins are found on disk."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import DiffPluginError

PACKAGED_REGISTRY = Path(__file__).with_name("plugins.toml")
INIT_MODES = ("input", "noise")


@dataclass(frozen=True)
class PluginEntry:
    """What the registry knows about one Task-Plugin."""

    name: str
    description: str = ""
    init: str = "input"
    steps: int = 20
    examples: tuple[str, ...] = ()
    source: str = ""
    files: dict = field(default_factory=dict)
    test_data: str = ""
    test_reference: str = ""


@dataclass(frozen=True)
class Registry:
    base_model: str
    clip_model: str
    plugins: dict[str, PluginEntry]
    path: Path
    order: tuple[str, ...] = ()
    selector_files: dict = field(default_factory=dict)
    base_revision: str | None = None
    clip_revision: str | None = None

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "Registry":
        """Read `path`, else $DIFFPLUGIN_REGISTRY, else the registry shipped with the package."""
        path = Path(path or os.environ.get("DIFFPLUGIN_REGISTRY") or PACKAGED_REGISTRY)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DiffPluginError(f"{path}: registry file not found") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise DiffPluginError(f"{path}: not a valid registry TOML file ({exc})") from None
        base = data.get("base", {})
        plugins = {}
        for name, raw in data.get("plugins", {}).items():
            init = raw.get("init", "input")
            if init not in INIT_MODES:
                raise DiffPluginError(f"{path}: plugin {name!r} has init={init!r}; expected one of {INIT_MODES}")
            plugins[name] = PluginEntry(
                name=name,
                description=raw.get("description", ""),
                init=init,
                steps=int(raw.get("steps", 20)),
                examples=tuple(raw.get("examples", ())),
                source=raw.get("source", ""),
                files=dict(raw.get("files", {})),
                test_data=raw.get("test_data", ""),
                test_reference=raw.get("test_reference", ""),
            )
        return cls(
            base_model=base.get("model", "CompVis/stable-diffusion-v1-4"),
            clip_model=base.get("clip", "openai/clip-vit-large-patch14"),
            plugins=plugins,
            path=path,
            order=tuple(data.get("selector", {}).get("order", ())) or tuple(plugins),
            selector_files=dict(data.get("selector", {}).get("files", {})),
            base_revision=base.get("model_revision"),
            clip_revision=base.get("clip_revision"),
        )

    def entry(self, name: str) -> PluginEntry:
        """The registry entry for `name`, or defaults for a plugin the registry does not list."""
        return self.plugins.get(name) or PluginEntry(name=name)


def plugin_search_path(plugin_dirs: list[str | os.PathLike] | None = None) -> list[Path]:
    """Folders searched for plugins: --plugin-dir values, then $DIFFPLUGIN_PLUGIN_PATH, then the
    plugins installed by `diffplugin plugins install`."""
    from .install import installed_plugins_dir

    dirs = [Path(d) for d in plugin_dirs or ()]
    env = os.environ.get("DIFFPLUGIN_PLUGIN_PATH", "")
    dirs += [Path(d) for d in env.split(os.pathsep) if d]
    return dirs + [installed_plugins_dir()]


def plugin_location(folder: Path, name: str) -> Path | None:
    """`folder/name.safetensors` (our format) or `folder/name/` holding the authors' tpb.pt + scb/."""
    single = folder / f"{name}.safetensors"
    if single.is_file():
        return single
    authors = folder / name
    if (authors / "tpb.pt").is_file() and (authors / "scb").is_dir():
        return authors
    return None


def discover_plugins(dirs: list[Path]) -> dict[str, Path]:
    """Every plugin found in `dirs`, by name; an earlier folder wins over a later one."""
    found: dict[str, Path] = {}
    for folder in dirs:
        if not folder.is_dir():
            continue
        for child in sorted(folder.iterdir()):
            name = child.name[: -len(".safetensors")] if child.name.endswith(".safetensors") else child.name
            if name.startswith(".") or name in found:
                continue
            location = plugin_location(folder, name)
            if location is not None:
                found[name] = location
    return found


def find_plugin(name: str, dirs: list[Path]) -> Path:
    for folder in dirs:
        location = plugin_location(folder, name)
        if location is not None:
            return location
    searched = ", ".join(str(d) for d in dirs)
    raise DiffPluginError(f"plugin {name!r} not found; searched {searched} (install it with `diffplugin plugins install {name}` or give --plugin-dir)")
