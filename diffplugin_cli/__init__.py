"""diffplugin: Diff-Plugin image restoration (one frozen Stable Diffusion, many Task-Plugins).

Library use mirrors the CLI:

    from diffplugin_cli import DiffPluginPipeline, load_plugin, RunOptions, run
"""

__version__ = "0.1.0"

from .errors import DiffPluginError, ImageError, ModelNotFoundError  # noqa: E402
from .models import SpatialComplementBranch, TaskPromptBranch  # noqa: E402
from .pipeline import DiffPluginPipeline  # noqa: E402
from .plugins import TaskPlugin, convert_plugin, load_plugin, read_plugin, write_plugin  # noqa: E402
from .registry import Registry  # noqa: E402
from .runner import RunOptions, RunSummary, run  # noqa: E402

__all__ = [
    "DiffPluginError",
    "DiffPluginPipeline",
    "ImageError",
    "ModelNotFoundError",
    "Registry",
    "RunOptions",
    "RunSummary",
    "SpatialComplementBranch",
    "TaskPlugin",
    "TaskPromptBranch",
    "convert_plugin",
    "load_plugin",
    "read_plugin",
    "run",
    "write_plugin",
]
