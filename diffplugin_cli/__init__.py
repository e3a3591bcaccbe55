"""diffplugin: Diff-Plugin image restoration (one frozen Stable Diffusion, many Task-Plugins).

Library use mirrors the CLI:

    from diffplugin_cli import DiffPluginPipeline, load_plugin, RunOptions, run

Names are imported on first use, so that `diffplugin --help` does not load torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "DiffPluginError": "errors",
    "ImageError": "errors",
    "ModelNotFoundError": "errors",
    "SpatialComplementBranch": "models",
    "TaskPromptBranch": "models",
    "DiffPluginPipeline": "pipeline",
    "TaskPlugin": "plugins",
    "convert_plugin": "plugins",
    "load_plugin": "plugins",
    "read_plugin": "plugins",
    "write_plugin": "plugins",
    "Registry": "registry",
    "RunOptions": "runner",
    "RunSummary": "runner",
    "run": "runner",
    "ReferenceSelector": "selector",
    "Selection": "selector",
    "TextSelector": "selector",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffplugin_cli' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
