"""`diffplugin plugins install|list|info|remove|verify` against a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import stat
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from diffplugin_cli.cli import app
from diffplugin_cli.errors import DiffPluginError
from diffplugin_cli.install import install, records, verify
from diffplugin_cli.plugins import read_plugin
from diffplugin_cli.registry import Registry

from .conftest import CONFORMANCE, PLUGINS

AUTHORS_FILES = ("tpb.pt", "scb/config.json", "scb/diffusion_pytorch_model.bin")


class FileServer:
    """Serves bytes by path with HTTP Range support; can cut a response short once per path."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut_after: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                cut = server.cut_after.pop(self.path, None)
                self.wfile.write(body[:cut] if cut is not None else body)
                if cut is not None:
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    serving = FileServer()
    for name in ("desnow", "lowlight"):
        for rel in AUTHORS_FILES:
            serving.files[f"/{name}/{rel}"] = (PLUGINS / name / rel).read_bytes()
    serving.files["/selector/PromptTunner.pt"] = (CONFORMANCE / "selector/PromptTunner.pt").read_bytes()
    yield serving
    serving.close()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFPLUGIN_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def write_registry(path: Path, server: FileServer, with_sha: bool = True, overrides: dict | None = None) -> Registry:
    lines = ['[base]\nmodel = "unused"\n', '[selector.files]\n"PromptTunner.pt" = { url = "%s/selector/PromptTunner.pt" }\n' % server.url]
    for name, init in (("desnow", "input"), ("lowlight", "noise")):
        lines.append(f'[plugins.{name}]\ndescription = "{name}"\ninit = "{init}"\n[plugins.{name}.files]\n')
        for rel in AUTHORS_FILES:
            sha = (overrides or {}).get((name, rel)) or hashlib.sha256(server.files[f"/{name}/{rel}"]).hexdigest()
            lines.append(f'"{rel}" = {{ url = "{server.url}/{name}/{rel}"' + (f', sha256 = "{sha}"' if with_sha else "") + " }\n")
    path.write_text("".join(lines))
    return Registry.load(path)


def test_install_verifies_converts_and_is_found_by_run(tmp_path, home, server):
    registry = write_registry(tmp_path / "reg.toml", server)
    [record] = install("desnow", registry)
    assert record.verified and Path(record.path) == home / "plugins/desnow.safetensors"
    original, installed = read_plugin(PLUGINS / "desnow"), read_plugin(record.path)
    assert all(torch.equal(original.scb_state[k], installed.scb_state[k]) for k in original.scb_state)
    assert installed.provenance["init"] == "input" and installed.provenance["source"]
    assert set(record.files) == set(AUTHORS_FILES)
    listed = CliRunner().invoke(app, ["plugins", "list", "--json", "--registry", str(tmp_path / "reg.toml")])
    row = {r["name"]: r for r in json.loads(listed.stdout)["plugins"]}["desnow"]
    assert row["installed"] and row["verified"] and row["sha256"] == record.sha256 and row["format"] == "safetensors"
    from diffplugin_cli.registry import find_plugin, plugin_search_path

    assert find_plugin("desnow", plugin_search_path()) == home / "plugins/desnow.safetensors"


def test_all_installs_plugins_and_selector_heads(tmp_path, home, server):
    registry = write_registry(tmp_path / "reg.toml", server, with_sha=False)
    installed = install("all", registry)
    assert sorted(r.name for r in installed) == ["desnow", "lowlight", "reference-selector"]
    assert not any(r.verified for r in installed)  # no published sha256: trust on first use, recorded
    assert all(len(info["sha256"]) == 64 for r in installed for info in r.files.values())
    from diffplugin_cli.install import installed_selector
    from diffplugin_cli.selector import load_prompt_tuner

    heads = load_prompt_tuner(installed_selector())
    raw = torch.load(CONFORMANCE / "selector/PromptTunner.pt", weights_only=True)["model"]
    assert torch.equal(heads.proj_v.weight, raw["proj_v.weight"])
    plain = tmp_path / "plain.txt"
    plain.write_text("")
    installed_files = sorted(home.rglob("*.safetensors"))
    assert len(installed_files) == 3  # readable by whoever reads the plain file (safetensors alone writes 0o600)
    assert {stat.S_IMODE(path.stat().st_mode) for path in installed_files} == {stat.S_IMODE(plain.stat().st_mode)}


def test_resume_after_a_dropped_connection(tmp_path, home, server):
    registry = write_registry(tmp_path / "reg.toml", server)
    server.cut_after["/desnow/scb/diffusion_pytorch_model.bin"] = 100_000
    [record] = install("desnow", registry)
    assert record.verified
    ranges = [rng for path, rng in server.requests if path == "/desnow/scb/diffusion_pytorch_model.bin"]
    assert ranges == [None, "bytes=100000-"]


def test_checksum_mismatch_installs_nothing_and_keeps_the_previous_version(tmp_path, home, server):
    good = write_registry(tmp_path / "good.toml", server)
    [previous] = install("desnow", good)
    write_registry(tmp_path / "bad.toml", server, overrides={("desnow", "tpb.pt"): "0" * 64})
    result = CliRunner().invoke(app, ["plugins", "install", "desnow", "--registry", str(tmp_path / "bad.toml")])
    assert result.exit_code == 1 and "checksum mismatch" in result.stderr and "nothing installed" in result.stderr
    assert records()["desnow"].sha256 == previous.sha256 and verify() == [{"name": "desnow", "ok": True, "reason": ""}]
    assert not list((home / ".staging").iterdir())
    fresh = write_registry(tmp_path / "bad2.toml", server, overrides={("lowlight", "tpb.pt"): "1" * 64})
    with pytest.raises(DiffPluginError, match="checksum mismatch"):
        install("lowlight", fresh)
    assert "lowlight" not in records()


def test_unreachable_source_names_it_and_the_local_way(tmp_path, home, server):
    write_registry(tmp_path / "reg.toml", server)
    server.close()
    result = CliRunner().invoke(app, ["plugins", "install", "desnow", "--registry", str(tmp_path / "reg.toml")])
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert "\n" not in line and server.url in line and "plugins install /path/to/desnow --name desnow" in line


def test_concurrent_installs_of_the_same_plugin(tmp_path, home, server):
    registry = write_registry(tmp_path / "reg.toml", server)
    errors = []

    def worker():
        try:
            install("desnow", registry)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(p.name for p in (home / "plugins").iterdir()) == ["desnow.json", "desnow.safetensors"]
    assert verify() == [{"name": "desnow", "ok": True, "reason": ""}]
    read_plugin(home / "plugins/desnow.safetensors")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_malicious_pickle_is_refused(tmp_path, home, server):
    server.files["/desnow/tpb.pt"] = pickle.dumps({"model": _RunsCode()})
    registry = write_registry(tmp_path / "reg.toml", server)
    with pytest.raises(DiffPluginError, match="refused to load"):
        install("desnow", registry)
    assert not (home / "plugins/desnow.safetensors").exists()


def _archive(path: Path, members: dict[str, bytes], kind: str) -> Path:
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as zipped:
            for name, data in members.items():
                zipped.writestr(name, data)
    else:
        with tarfile.open(path, "w:gz") as tarred:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tarred.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_local_archive_and_url_installs(tmp_path, home, server, kind):
    members = {f"mine/{rel}": (PLUGINS / "lowlight" / rel).read_bytes() for rel in AUTHORS_FILES}
    archive = _archive(tmp_path / f"mine.{kind}", members, kind)
    registry = write_registry(tmp_path / "reg.toml", server)
    [record] = install(str(archive), registry)
    assert record.name == "mine" and Path(record.path).is_file() and not record.verified
    server.files[f"/dl/theirs.{kind}"] = archive.read_bytes()
    [from_url] = install(f"{server.url}/dl/theirs.{kind}", registry, name="theirs")
    assert from_url.name == "theirs" and from_url.source.startswith(server.url)


@pytest.mark.parametrize("evil", ["../escape/tpb.pt", "/abs/tpb.pt"])
def test_archive_path_traversal_is_refused(tmp_path, home, server, evil):
    archive = _archive(tmp_path / "evil.tar.gz", {evil: b"x", **{f"p/{rel}": (PLUGINS / "desnow" / rel).read_bytes() for rel in AUTHORS_FILES}}, "tar.gz")
    with pytest.raises(DiffPluginError, match="would leave the install folder"):
        install(str(archive), write_registry(tmp_path / "reg.toml", server), name="evil")
    assert not (tmp_path / "escape").exists() and "evil" not in records()


def test_archive_symlink_is_refused(tmp_path, home, server):
    path = tmp_path / "link.tar.gz"
    with tarfile.open(path, "w:gz") as tarred:
        link = tarfile.TarInfo("p/tpb.pt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tarred.addfile(link)
    with pytest.raises(DiffPluginError, match="link or special file"):
        install(str(path), write_registry(tmp_path / "reg.toml", server), name="link")
    zipped = tmp_path / "link.zip"
    with zipfile.ZipFile(zipped, "w") as archive:
        info = zipfile.ZipInfo("p/tpb.pt")
        info.external_attr = 0o120777 << 16
        archive.writestr(info, "/etc/passwd")
    with pytest.raises(DiffPluginError, match="link or special file"):
        install(str(zipped), write_registry(tmp_path / "reg.toml", server), name="link")


def test_local_folder_info_verify_remove(tmp_path, home, server):
    runner = CliRunner()
    registry_flag = ["--registry", str(write_registry(tmp_path / "reg.toml", server).path)]
    result = runner.invoke(app, ["plugins", "install", str(PLUGINS / "lowlight"), "--name", "mylow", *registry_flag])
    assert result.exit_code == 0, result.output
    assert "not verified" in result.stdout and "mylow" in result.stdout
    info = json.loads(runner.invoke(app, ["plugins", "info", "mylow"]).stdout)
    assert info["verified"] is False and set(info["files"]) == set(AUTHORS_FILES)
    assert runner.invoke(app, ["plugins", "verify"]).exit_code == 0
    with open(info["path"], "r+b") as handle:  # tamper
        handle.seek(100)
        handle.write(b"\0\0\0\0")
    tampered = runner.invoke(app, ["plugins", "verify"])
    assert tampered.exit_code == 1 and "FAILED" in tampered.stdout
    assert runner.invoke(app, ["plugins", "remove", "mylow"]).exit_code == 0
    assert "mylow" not in records() and not Path(info["path"]).exists()
    assert runner.invoke(app, ["plugins", "remove", "mylow"]).exit_code == 2


def test_unknown_target(tmp_path, home, server):
    result = CliRunner().invoke(app, ["plugins", "install", "nosuch", "--registry", str(write_registry(tmp_path / "reg.toml", server).path)])
    assert result.exit_code == 1 and "not a registry plugin" in result.stderr


def test_hub_sources_come_through_huggingface_hub(tmp_path, home, monkeypatch):
    """A registry entry naming a hub file: fetched with huggingface_hub (here from a prepared offline cache)."""
    cache = tmp_path / "hf-cache"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--authors--diff-plugin" / "snapshots" / revision
    for rel in AUTHORS_FILES:
        (snapshot / "desnow" / rel).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / "desnow" / rel).write_bytes((PLUGINS / "desnow" / rel).read_bytes())
    (cache / "models--authors--diff-plugin" / "refs").mkdir(parents=True)
    (cache / "models--authors--diff-plugin" / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    entries = "".join(f'"{rel}" = {{ hub = "authors/diff-plugin", path = "desnow/{rel}", '
                      f'sha256 = "{hashlib.sha256((PLUGINS / "desnow" / rel).read_bytes()).hexdigest()}" }}\n' for rel in AUTHORS_FILES)
    (tmp_path / "reg.toml").write_text(f'[plugins.desnow]\ninit = "input"\n[plugins.desnow.files]\n{entries}')
    [record] = install("desnow", Registry.load(tmp_path / "reg.toml"))
    assert record.verified and record.files["tpb.pt"]["source"] == "hub:authors/diff-plugin/desnow/tpb.pt"
    original, installed = read_plugin(PLUGINS / "desnow"), read_plugin(record.path)
    assert all(torch.equal(original.tpb_state[k], installed.tpb_state[k]) for k in original.tpb_state)
    (tmp_path / "reg.toml").write_text('[plugins.desnow]\ninit = "input"\n[plugins.desnow.files]\n"tpb.pt" = { hub = "authors/missing", path = "tpb.pt" }\n')
    with pytest.raises(DiffPluginError, match="from the hub repo authors/missing"):
        install("desnow", Registry.load(tmp_path / "reg.toml"))
