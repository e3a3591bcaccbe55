"""Task-Plugin files: the authors' format, our single-file format, and conversion between them.

Authors' format (a folder):  tpb.pt (torch pickle of {'model': state_dict}, keys maybe 'module.'-prefixed),
                             scb/config.json, scb/diffusion_pytorch_model.bin
Our format (one file):       NAME.safetensors with tensors 'tpb.*' and 'scb.*'; the metadata holds both
                             configs and the provenance (name, task, init, source, version).
Weights are data: pickles are read with torch.load(weights_only=True) only.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .atomic import atomic_path, file_sha256
from .errors import DiffPluginError
from .models import SpatialComplementBranch, TaskPromptBranch
from .registry import INIT_MODES, PluginEntry

FORMAT_TAG = "diffplugin-plugin"
FORMAT_VERSION = "1"
AUTHORS_FILES = ("tpb.pt", "scb/config.json", "scb/diffusion_pytorch_model.bin")
PROVENANCE_KEYS = ("name", "task", "init", "source", "version", "base_model", "steps", "data_sha256")


@dataclass
class PluginWeights:
    """A plugin as plain data: configs, state dicts and provenance, before any model is built."""

    tpb_config: dict
    tpb_state: dict[str, torch.Tensor]
    scb_config: dict
    scb_state: dict[str, torch.Tensor]
    provenance: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_models(cls, tpb: TaskPromptBranch, scb: SpatialComplementBranch, provenance: dict[str, str]) -> "PluginWeights":
        """Trained or freshly built branches as plain data, ready for `write_plugin`."""

        def config(model) -> dict:
            return {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items() if not k.startswith("_")}

        def state(model) -> dict[str, torch.Tensor]:
            return {k: v.detach().cpu() for k, v in model.state_dict().items()}

        return cls(config(tpb), state(tpb), config(scb), state(scb), provenance)


@dataclass
class TaskPlugin:
    """A loaded plugin, ready for the pipeline."""

    name: str
    tpb: TaskPromptBranch
    scb: SpatialComplementBranch
    init: str
    sha256: str
    path: Path
    provenance: dict[str, str]


def read_plugin(path: str | os.PathLike) -> PluginWeights:
    """Read a plugin in either format; the format is told by the path (folder or .safetensors file)."""
    path = Path(path)
    if path.is_dir():
        return _read_authors_folder(path)
    if path.is_file():
        return _read_single_file(path)
    raise DiffPluginError(f"{path}: no plugin there (expected a folder with tpb.pt and scb/, or a .safetensors file)")


def write_plugin(weights: PluginWeights, dst: str | os.PathLike) -> Path:
    """Write `weights` as our single file (dst ends in .safetensors) or as the authors' folder."""
    dst = Path(dst)
    if dst.suffix == ".safetensors":
        _write_single_file(weights, dst)
    else:
        _write_authors_folder(weights, dst)
    return dst


def convert_plugin(src: str | os.PathLike, dst: str | os.PathLike, **provenance: str) -> Path:
    """Convert between the two formats; `provenance` fills in or overrides name/task/init/source/version."""
    weights = read_plugin(src)
    weights.provenance.setdefault("name", _plugin_name(Path(src)))
    weights.provenance.update({k: v for k, v in provenance.items() if v})
    return write_plugin(weights, dst)


def load_plugin(path: str | os.PathLike, entry: PluginEntry | None = None) -> TaskPlugin:
    """Build TPB and SCB from `path`. The init mode comes from the file's metadata, else the registry."""
    path = Path(path)
    weights = read_plugin(path)
    tpb = TaskPromptBranch.from_config(weights.tpb_config)
    scb = SpatialComplementBranch.from_config(weights.scb_config)
    for model, state, part in ((tpb, weights.tpb_state, "TPB"), (scb, weights.scb_state, "SCB")):
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first_line = str(exc).splitlines()[0] if str(exc) else "shape mismatch"
            raise DiffPluginError(f"{path}: {part} weights do not fit its config ({first_line})") from None
        model.eval().requires_grad_(False)
    name = weights.provenance.get("name") or _plugin_name(path)
    init = weights.provenance.get("init") or (entry.init if entry else "input")
    if init not in INIT_MODES:
        raise DiffPluginError(f"{path}: init mode {init!r} is not one of {INIT_MODES}")
    return TaskPlugin(name, tpb, scb, init, plugin_sha256(path), path, weights.provenance)


def plugin_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a single-file plugin, or of the authors' folder as 'relpath  sha256' lines in a fixed order."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    lines = "".join(f"{rel}  {file_sha256(path / rel)}\n" for rel in AUTHORS_FILES)
    return hashlib.sha256(lines.encode()).hexdigest()


def load_weights_file(path: Path) -> dict:
    """torch.load restricted to tensors and plain containers: a pickle carrying code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DiffPluginError(f"{path}: file not found") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DiffPluginError(f"{path}: refused to load: not a plain weights file ({reason})") from None


def _plugin_name(path: Path) -> str:
    return path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.name


def _read_authors_folder(folder: Path) -> PluginWeights:
    missing = [rel for rel in AUTHORS_FILES if not (folder / rel).is_file()]
    if missing:
        raise DiffPluginError(f"{folder}: not a plugin folder, missing {', '.join(missing)}")
    raw = load_weights_file(folder / "tpb.pt")
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise DiffPluginError(f"{folder / 'tpb.pt'}: expected a pickle of {{'model': state_dict}}")
    tpb_state = {k.removeprefix("module."): v for k, v in raw["model"].items()}
    try:
        scb_config = json.loads((folder / "scb/config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DiffPluginError(f"{folder / 'scb/config.json'}: invalid JSON ({exc})") from None
    scb_state = load_weights_file(folder / "scb/diffusion_pytorch_model.bin")
    return PluginWeights(
        tpb_config=TaskPromptBranch.config_from_state_dict(tpb_state),
        tpb_state=tpb_state,
        scb_config=_known_scb_keys(scb_config),
        scb_state=scb_state,
        provenance={"name": folder.name},
    )


def _known_scb_keys(config: dict) -> dict:
    """The authors' configs carry keys of their experiments (way_to_concat, ...): keep only ours."""
    accepted = set(inspect.signature(SpatialComplementBranch.__init__).parameters) - {"self"}
    return {k: v for k, v in config.items() if k in accepted}


def _read_single_file(path: Path) -> PluginWeights:
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise DiffPluginError(f"{path}: not a readable safetensors file ({exc})") from None
    if metadata.get("format") != FORMAT_TAG:
        raise DiffPluginError(f"{path}: not a diffplugin plugin file (metadata 'format' is {metadata.get('format')!r})")
    return PluginWeights(
        tpb_config=json.loads(metadata["tpb_config"]),
        tpb_state={k[4:]: v for k, v in tensors.items() if k.startswith("tpb.")},
        scb_config=json.loads(metadata["scb_config"]),
        scb_state={k[4:]: v for k, v in tensors.items() if k.startswith("scb.")},
        provenance={k: metadata[k] for k in PROVENANCE_KEYS if metadata.get(k)},
    )


def _write_single_file(weights: PluginWeights, dst: Path) -> None:
    tensors = {f"tpb.{k}": v.contiguous() for k, v in weights.tpb_state.items()}
    tensors |= {f"scb.{k}": v.contiguous() for k, v in weights.scb_state.items()}
    provenance = {"version": f"diffplugin {__version__}"} | weights.provenance
    metadata = {
        "format": FORMAT_TAG,
        "format_version": FORMAT_VERSION,
        "tpb_config": json.dumps(weights.tpb_config, sort_keys=True),
        "scb_config": json.dumps(weights.scb_config, sort_keys=True),
    } | {k: str(v) for k, v in provenance.items() if k in PROVENANCE_KEYS}
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _write_authors_folder(weights: PluginWeights, dst: Path) -> None:
    """The authors' layout, for use with their scripts. Their TPB has a fixed d=1024 unless edited."""
    (dst / "scb").mkdir(parents=True, exist_ok=True)
    with atomic_path(dst / "tpb.pt") as tmp:
        torch.save({"model": weights.tpb_state}, tmp)
    config = {"_class_name": "SCBNet"} | weights.scb_config
    with atomic_path(dst / "scb/config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    with atomic_path(dst / "scb/diffusion_pytorch_model.bin") as tmp:
        torch.save(weights.scb_state, tmp)
