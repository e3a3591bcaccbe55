"""Plugin files: the authors' format, our safetensors format, conversion, registry and discovery."""

from __future__ import annotations

import json
import os
import pickle
import stat

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from diffplugin_cli import DiffPluginError, Registry, convert_plugin, load_plugin, read_plugin
from diffplugin_cli.cli import app
from diffplugin_cli.plugins import load_weights_file

from .conftest import PLUGINS


def test_authors_format_with_module_prefix_and_extra_config_keys():
    raw = torch.load(PLUGINS / "lowlight/tpb.pt", weights_only=True)["model"]
    assert all(key.startswith("module.") for key in raw)
    extra = json.loads((PLUGINS / "lowlight/scb/config.json").read_text())
    assert "way_to_concat" in extra and "_class_name" not in extra
    plugin = load_plugin(PLUGINS / "lowlight", Registry.load().entry("lowlight"))
    assert plugin.init == "noise" and plugin.name == "lowlight"
    assert plugin.tpb.config.clip_v_dim == 32 and plugin.tpb.config.out_dim == 768
    assert len(plugin.scb.controlnet_down_blocks) == 3
    for key, value in raw.items():
        assert torch.equal(plugin.tpb.state_dict()[key.removeprefix("module.")], value)


@pytest.mark.parametrize("name", ["desnow", "lowlight"])
def test_convert_round_trip_is_bit_exact(tmp_path, name):
    single = convert_plugin(PLUGINS / name, tmp_path / f"{name}.safetensors", task=name, init=Registry.load().entry(name).init)
    back = convert_plugin(single, tmp_path / "authors" / name)
    again = convert_plugin(back, tmp_path / "again.safetensors")
    original, converted, twice = read_plugin(PLUGINS / name), read_plugin(single), read_plugin(again)
    for part in ("tpb_state", "scb_state"):
        a, b, c = getattr(original, part), getattr(converted, part), getattr(twice, part)
        assert a.keys() == b.keys() == c.keys()
        assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert original.scb_config == converted.scb_config == twice.scb_config
    with safe_open(single, framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "diffplugin-plugin" and metadata["name"] == name and metadata["task"] == name
    assert metadata["version"].startswith("diffplugin ")


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_written_files_get_the_usual_permissions(tmp_path):
    """safetensors creates its files 0o600; ours get what `open` gives, and an overwrite keeps the old mode."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    single = convert_plugin(PLUGINS / "desnow", tmp_path / "desnow.safetensors", task="desnow")
    assert stat.S_IMODE(single.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    single.chmod(0o640)
    convert_plugin(PLUGINS / "desnow", single, task="desnow")
    assert stat.S_IMODE(single.stat().st_mode) == 0o640


def test_single_file_plugin_keeps_init_and_gives_the_same_prompt(tmp_path, pipeline):
    single = convert_plugin(PLUGINS / "lowlight", tmp_path / "mine.safetensors", init="noise")
    from_file = load_plugin(single)  # no registry entry: the init mode comes from the file
    from_authors = load_plugin(PLUGINS / "lowlight", Registry.load().entry("lowlight"))
    assert from_file.init == "noise" and from_file.name == "lowlight"
    hidden = tuple(torch.randn(1, 257, 32) for _ in range(25))
    assert torch.equal(pipeline.visual_prompt(from_file, hidden), pipeline.visual_prompt(from_authors, hidden))


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_with_code_is_refused(tmp_path):
    bad = tmp_path / "evil" / "tpb.pt"
    (tmp_path / "evil" / "scb").mkdir(parents=True)
    with open(bad, "wb") as handle:
        pickle.dump({"model": _RunsCode()}, handle)
    with pytest.raises(DiffPluginError, match="refused to load"):
        load_weights_file(bad)
    (tmp_path / "evil/scb/config.json").write_text("{}")
    (tmp_path / "evil/scb/diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(DiffPluginError, match="refused to load"):
        load_plugin(tmp_path / "evil")


def test_weights_that_do_not_fit_the_config_give_a_clear_error(tmp_path):
    folder = tmp_path / "broken"
    convert_plugin(PLUGINS / "desnow", folder)
    config = json.loads((folder / "scb/config.json").read_text())
    (folder / "scb/config.json").write_text(json.dumps(config | {"block_out_channels": [32]}))
    with pytest.raises(DiffPluginError, match="SCB weights do not fit"):
        load_plugin(folder)


def test_not_a_plugin_file(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"garbage")
    with pytest.raises(DiffPluginError, match="not a readable safetensors"):
        read_plugin(tmp_path / "x.safetensors")
    with pytest.raises(DiffPluginError, match="missing tpb.pt"):
        read_plugin(tmp_path)


def test_registry_file_and_environment(tmp_path, monkeypatch):
    registry = Registry.load()
    assert set(registry.plugins) == {"desnow", "dehaze", "deblur", "derain", "face", "lowlight", "demoire", "highlight"}
    assert {n for n, e in registry.plugins.items() if e.init == "noise"} == {"lowlight", "highlight"}
    custom = tmp_path / "reg.toml"
    custom.write_text('[base]\nmodel = "/models/sd"\n[plugins.mine]\ninit = "noise"\n')
    monkeypatch.setenv("DIFFPLUGIN_REGISTRY", str(custom))
    assert Registry.load().base_model == "/models/sd" and Registry.load().entry("mine").init == "noise"
    custom.write_text('[plugins.bad]\ninit = "sideways"\n')
    with pytest.raises(DiffPluginError, match="init"):
        Registry.load()


def test_plugins_list_and_convert_cli(tmp_path, monkeypatch):
    runner = CliRunner()
    converted = runner.invoke(app, ["plugins", "convert", str(PLUGINS / "desnow"), str(tmp_path / "dirs/desnow.safetensors")])
    assert converted.exit_code == 0, converted.output
    monkeypatch.setenv("DIFFPLUGIN_PLUGIN_PATH", str(tmp_path / "dirs"))
    listed = runner.invoke(app, ["plugins", "list", "--plugin-dir", str(PLUGINS), "--json"])
    assert listed.exit_code == 0, listed.output
    rows = {row["name"]: row for row in json.loads(listed.stdout)["plugins"]}
    assert rows["desnow"]["format"] == "authors"  # --plugin-dir comes before the environment
    assert rows["lowlight"]["found"] and not rows["face"]["found"]
    only_env = json.loads(runner.invoke(app, ["plugins", "list", "--json"]).stdout)
    assert {r["name"]: r["format"] for r in only_env["plugins"]}["desnow"] == "safetensors"
    bad = runner.invoke(app, ["plugins", "convert", str(tmp_path / "nothing"), str(tmp_path / "x.safetensors")])
    assert bad.exit_code == 2 and "no plugin there" in bad.stderr
