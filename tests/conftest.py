"""Offline fixtures: the tiny models of ../shared/conformance, loaded once per session."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
from diffplugin_cli.cli import _quiet_third_party_logs  # noqa: E402

# What `diffplugin` sets before transformers/diffusers are imported (they read it at import).
_quiet_third_party_logs()
os.environ.pop("DIFFPLUGIN_PLUGIN_PATH", None)
os.environ.pop("DIFFPLUGIN_REGISTRY", None)
# Never the user's own plugin home: installed plugins would change what tests find.
os.environ["DIFFPLUGIN_HOME"] = tempfile.mkdtemp(prefix="diffplugin-test-home-")
atexit.register(shutil.rmtree, os.environ["DIFFPLUGIN_HOME"], ignore_errors=True)

import torch  # noqa: E402

# The reference outputs were produced with 2 threads; other counts change the last bits.
torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
CONFORMANCE = Path(os.environ.get("DIFFPLUGIN_CONFORMANCE", REPO.parent / "shared" / "conformance"))
if not (CONFORMANCE / "manifest.json").is_file():
    raise RuntimeError(f"conformance set not found at {CONFORMANCE}; set DIFFPLUGIN_CONFORMANCE")
MANIFEST = json.loads((CONFORMANCE / "manifest.json").read_text())
BASE = str(CONFORMANCE / "base")
CLIP = str(CONFORMANCE / "clip_vision")
PLUGINS = CONFORMANCE / "plugins"


@pytest.fixture(scope="session")
def pipeline():
    from diffplugin_cli import DiffPluginPipeline

    return DiffPluginPipeline.from_pretrained(BASE, CLIP, device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def plugins():
    from diffplugin_cli import Registry, load_plugin

    registry = Registry.load()
    return {name: load_plugin(PLUGINS / name, registry.entry(name)) for name in ("desnow", "lowlight")}


def cli_args(*extra: str) -> list[str]:
    """Common `run` flags pointing at the tiny offline models."""
    return ["--plugin-dir", str(PLUGINS), "--base-model", BASE, "--clip-model", CLIP, "--device", "cpu", *extra]
