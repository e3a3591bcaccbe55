"""`diffplugin run` behaviour on folders: batching, resume, bad inputs, image modes, exit codes.

These use a 64x64 processing size and 2 steps so each image costs a fraction of a second.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffplugin_cli import RunOptions, run
from diffplugin_cli.runner import SUMMARY_NAME

from .conftest import BASE, CLIP, PLUGINS, cli_args

FAST = ("--resolution", "64", "--steps", "2", "--quiet")


def make_images(folder: Path, count: int, size=(40, 30)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def invoke(*args: str, stdin: str | None = None):
    from diffplugin_cli.cli import app

    return CliRunner().invoke(app, ["run", *args, *cli_args()], input=stdin)


def options(out: Path, **overrides) -> RunOptions:
    values = dict(output_dir=out, tasks=["desnow"], plugin_dirs=[PLUGINS], steps=2, resolution=64,
                  base_model=BASE, clip_model=CLIP, device="cpu", dtype="fp32")
    return RunOptions(**(values | overrides))


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


def test_batch_size_does_not_change_outputs(tmp_path, pipeline):
    """Equal up to float rounding of batched kernels: the manifest's chain tolerance (a chain re-reads uint8)."""
    make_images(tmp_path / "in", 3, size=(50, 50))
    single = run([str(tmp_path / "in")], options(tmp_path / "b1", tasks=["desnow", "lowlight"], resolution=128), pipeline=pipeline)
    batched = run([str(tmp_path / "in")], options(tmp_path / "b3", tasks=["desnow", "lowlight"], resolution=128, batch_size=3), pipeline=pipeline)
    assert single.processed == batched.processed == 3
    for name in ("img00.png", "img01.png", "img02.png"):
        diff = np.abs(pixels(tmp_path / "b1" / name) - pixels(tmp_path / "b3" / name))
        assert diff.max() <= 2 and (diff > 0).mean() <= 0.01


def test_outputs_mirror_tree_with_sidecars_and_summary(tmp_path, pipeline):
    make_images(tmp_path / "in" / "sub" / "deeper", 1)
    make_images(tmp_path / "in", 2)
    (tmp_path / "in" / ".hidden.png").write_bytes(b"")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    Image.new("RGB", (20, 20)).save(tmp_path / "in" / "UPPER.JPG")
    Image.new("RGB", (20, 20)).save(tmp_path / "in" / "no_extension", format="PNG")
    summary = run([str(tmp_path / "in")], options(tmp_path / "out", suffix="_r"), pipeline=pipeline)
    produced = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png"))
    assert produced == ["UPPER_r.png", "img00_r.png", "img01_r.png", "no_extension_r.png", "sub/deeper/img00_r.png"]
    assert summary.processed == 5 and summary.failed == 0 and summary.exit_code == 0
    sidecar = json.loads((tmp_path / "out" / "sub/deeper/img00_r.json").read_text())
    assert sidecar["schema_version"] == 1
    assert sidecar["plugins"][0]["name"] == "desnow" and len(sidecar["plugins"][0]["sha256"]) == 64
    assert sidecar["input"]["sha256"] and sidecar["processed_size"] == [64, 64] and sidecar["original_size"] == [40, 30]
    assert sidecar["selector"] is None and sidecar["seed"] == 42 and sidecar["steps"] == 2 and sidecar["chain_steps"] == 3
    assert {"dtype", "device", "base_model", "clip_model", "version", "seconds"} <= set(sidecar)
    assert sidecar["vae_decode_fp32_retry"] is False
    assert sidecar["peak_memory_mib"]["rss"] > 100 and sidecar["peak_memory_mib"]["cuda"] is None
    on_disk = json.loads((tmp_path / "out" / SUMMARY_NAME).read_text())
    assert on_disk["processed"] == 5 and on_disk["exit_code"] == 0


def test_resume_skips_finished_and_redoes_changed_requests(tmp_path, pipeline):
    make_images(tmp_path / "in", 2)
    first = run([str(tmp_path / "in")], options(tmp_path / "out"), pipeline=pipeline)
    stamp = (tmp_path / "out" / "img00.png").stat().st_mtime_ns
    again = run([str(tmp_path / "in")], options(tmp_path / "out"), pipeline=pipeline)
    assert (first.processed, again.processed, again.skipped) == (2, 0, 2)
    assert (tmp_path / "out" / "img00.png").stat().st_mtime_ns == stamp
    forced = run([str(tmp_path / "in")], options(tmp_path / "out", overwrite=True), pipeline=pipeline)
    assert forced.processed == 2
    reseeded = run([str(tmp_path / "in")], options(tmp_path / "out", seed=7), pipeline=pipeline)
    assert reseeded.processed == 2
    (tmp_path / "out" / "img01.png").unlink()
    repaired = run([str(tmp_path / "in")], options(tmp_path / "out", seed=7), pipeline=pipeline)
    assert (repaired.processed, repaired.skipped) == (1, 1)


def test_bad_inputs_are_reported_and_never_stop_the_batch(tmp_path):
    folder = tmp_path / "in"
    make_images(folder, 2)
    (folder / "empty.png").write_bytes(b"")
    good = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(good, format="PNG")
    (folder / "truncated.png").write_bytes(good.getvalue()[:60])
    (folder / "text.png").write_text("this is not an image")
    Image.new("RGB", (300, 300)).save(folder / "huge.png")
    (folder / "dangling.png").symlink_to(tmp_path / "missing.png")
    result = invoke(str(folder), str(tmp_path / "nope.png"), "-o", str(tmp_path / "out"), "--task", "desnow", "--max-pixels", "50000", *FAST)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    reasons = {Path(line.split(": ", 1)[0]).name: line.split(": ", 1)[1] for line in lines}
    assert set(reasons) == {"empty.png", "truncated.png", "text.png", "huge.png", "dangling.png", "nope.png"}
    assert "empty" in reasons["empty.png"]
    assert "truncated" in reasons["truncated.png"]
    assert "not an image" in reasons["text.png"]
    assert "--max-pixels" in reasons["huge.png"]
    assert "cannot read" in reasons["dangling.png"]
    assert "no such file" in reasons["nope.png"]
    summary = json.loads((tmp_path / "out" / SUMMARY_NAME).read_text())
    assert summary["processed"] == 2 and summary["failed"] == 6 and len(summary["failures"]) == 6
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["img00.png", "img01.png"]


def _exif_rotated_jpeg(path: Path) -> None:
    image = Image.new("RGB", (40, 20), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(path, exif=exif)


def test_image_modes_alpha_and_exif(tmp_path, pipeline):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("L", (30, 20), 128).save(folder / "gray.png")
    Image.new("LA", (30, 20), (128, 200)).save(folder / "gray_alpha.png")
    Image.new("P", (30, 20), 3).save(folder / "palette.png")
    palette_t = Image.new("P", (30, 20), 1)
    palette_t.info["transparency"] = 1
    palette_t.save(folder / "palette_t.png", transparency=1)
    alpha = Image.linear_gradient("L").resize((30, 20))
    rgba = Image.new("RGBA", (30, 20), (10, 200, 30, 255))
    rgba.putalpha(alpha)
    rgba.save(folder / "rgba.png")
    Image.new("CMYK", (30, 20), (0, 128, 128, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16)).save(folder / "deep16.png")
    _exif_rotated_jpeg(folder / "rotated.jpg")
    summary = run([str(folder)], options(tmp_path / "out"), pipeline=pipeline)
    assert summary.failed == 0 and summary.processed == 8
    out = tmp_path / "out"
    kept = Image.open(out / "rgba.png")
    assert kept.mode == "RGBA" and np.array_equal(np.asarray(kept.getchannel("A")), np.asarray(alpha))
    assert Image.open(out / "gray_alpha.png").mode == "RGBA"
    assert Image.open(out / "palette_t.png").mode == "RGBA"
    assert Image.open(out / "rotated.png").size == (20, 40)
    assert json.loads((out / "deep16.json").read_text())["input"]["mode"].startswith("I")
    for name in ("gray", "palette", "cmyk", "deep16"):
        assert Image.open(out / f"{name}.png").mode == "RGB"


def test_keep_size_and_output_types(tmp_path, pipeline):
    make_images(tmp_path / "in", 1, size=(50, 30))
    run([str(tmp_path / "in")], options(tmp_path / "keep"), pipeline=pipeline)
    assert Image.open(tmp_path / "keep" / "img00.png").size == (50, 30)
    run([str(tmp_path / "in")], options(tmp_path / "native", keep_size=False), pipeline=pipeline)
    assert Image.open(tmp_path / "native" / "img00.png").size == (64, 64)
    run([str(tmp_path / "in")], options(tmp_path / "jpg", ext="jpg"), pipeline=pipeline)
    assert Image.open(tmp_path / "jpg" / "img00.jpg").format == "JPEG"
    run([str(tmp_path / "in")], options(tmp_path / "same", ext="same"), pipeline=pipeline)
    assert Image.open(tmp_path / "same" / "img00.png").format == "PNG"


def test_seed_from_name_is_stable_and_differs_per_image(tmp_path, pipeline):
    make_images(tmp_path / "in", 2)
    run([str(tmp_path / "in")], options(tmp_path / "a", seed_from_name=True), pipeline=pipeline)
    run([str(tmp_path / "in")], options(tmp_path / "b", seed_from_name=True, overwrite=True), pipeline=pipeline)
    seeds = [json.loads((tmp_path / "a" / f"img0{i}.json").read_text())["seed"] for i in range(2)]
    assert seeds[0] != seeds[1] and 42 not in seeds
    assert seeds == [json.loads((tmp_path / "b" / f"img0{i}.json").read_text())["seed"] for i in range(2)]


def test_stdin_path_list_and_json_summary(tmp_path):
    paths = make_images(tmp_path / "in", 2)
    result = invoke("-", "-o", str(tmp_path / "out"), "--task", "desnow", "--json", *FAST, stdin="\n".join(map(str, paths)) + "\n\n")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["processed"] == 2 and summary["exit_code"] == 0 and summary["schema_version"] == 1


def test_inputs_are_never_overwritten(tmp_path, pipeline):
    make_images(tmp_path / "in", 1)
    result = invoke(str(tmp_path / "in"), "-o", str(tmp_path / "in"), "--task", "desnow", *FAST)
    assert result.exit_code == 2 and "output folder is the input folder" in result.stderr
    # An output folder inside the input folder is left out of the walk, so a rerun finds no new inputs.
    first = run([str(tmp_path / "in")], options(tmp_path / "in" / "restored"), pipeline=pipeline)
    second = run([str(tmp_path / "in")], options(tmp_path / "in" / "restored"), pipeline=pipeline)
    assert (first.processed, second.inputs, second.skipped) == (1, 1, 1)
    # A file given directly whose output would land on itself is refused.
    direct = run([str(tmp_path / "in" / "restored" / "img00.png")], options(tmp_path / "in" / "restored"), pipeline=pipeline)
    assert direct.failed == 1 and "overwrite the input" in direct.failures[0]["reason"]


@pytest.mark.parametrize(
    "args,message",
    [
        (("--task", "nosuch"), "plugin 'nosuch' not found"),
        ((), "no plugin given"),
        (("--task", "desnow", "--ext", "gif"), "--ext"),
        (("--task", "desnow", "--size-rule", "huge"), "--size-rule"),
        (("-i", "remove snow", "--task", "desnow"), "not both"),
        (("-i", "remove snow", "--selector", "magic"), "--selector"),
    ],
)
def test_usage_errors_exit_2(tmp_path, args, message):
    make_images(tmp_path / "in", 1)
    result = invoke(str(tmp_path / "in"), "-o", str(tmp_path / "out"), *args, *FAST)
    assert result.exit_code == 2 and message in result.stderr


@pytest.mark.parametrize("command, default", [(["run"], "(default: from the registry)"),
                                              (["train", "selector"], "(default: the shipped one)"),
                                              (["eval"], "(default: test_data of the task in the registry)")])
def test_help_shows_the_defaults_its_texts_name(command, default):
    """Rich reads "[default: ...]" as markup and drops it; help texts must survive rendering."""
    from diffplugin_cli.cli import app

    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert default in " ".join(result.output.replace("│", " ").split())


def test_missing_base_model_offline_names_the_flag(tmp_path):
    make_images(tmp_path / "in", 1)
    from diffplugin_cli.cli import app

    result = CliRunner().invoke(app, ["run", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--task", "desnow",
                                      "--plugin-dir", str(PLUGINS), "--base-model", str(tmp_path / "no-model"), *FAST])
    assert result.exit_code == 2 and "--base-model" in result.stderr


# --- real processes: kill, interrupt -------------------------------------------------------------

def _start(tmp_path: Path, count: int) -> tuple[subprocess.Popen, Path]:
    make_images(tmp_path / "in", count)
    out = tmp_path / "out"
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "diffplugin_cli", "run", str(tmp_path / "in"), "-o", str(out), "--task", "desnow",
               "--resolution", "256", "--steps", "6", "--quiet", *cli_args()]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE), out


def _wait_for_outputs(out: Path, process: subprocess.Popen, count: int = 1, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(list(out.glob("*.json"))) < count:
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no output appeared"
        time.sleep(0.02)


def test_killed_run_resumes_to_the_full_set(tmp_path):
    process, out = _start(tmp_path, 6)
    _wait_for_outputs(out, process, 2)
    process.kill()
    process.wait()
    done_before = {p.name for p in out.glob("img*.json")}
    assert 0 < len(done_before) < 6
    rerun = subprocess.run([sys.executable, "-m", "diffplugin_cli", *process.args[3:], "--json"], capture_output=True, text=True,
                           env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["skipped"] == len(done_before) and summary["processed"] == 6 - len(done_before)
    assert sorted(p.name for p in out.iterdir()) == sorted([f"img{i:02d}.{e}" for i in range(6) for e in ("png", "json")] + [SUMMARY_NAME])
    for i in range(6):
        Image.open(out / f"img{i:02d}.png").load()
        json.loads((out / f"img{i:02d}.json").read_text())


def test_ctrl_c_exits_130_with_complete_files(tmp_path):
    process, out = _start(tmp_path, 6)
    _wait_for_outputs(out, process, 1)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["interrupted"] is True and summary["exit_code"] == 130
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    for sidecar in out.glob("img*.json"):
        Image.open(sidecar.with_suffix(".png")).load()


def test_accelerate_launch_shards_a_run_over_two_processes(tmp_path):
    """`accelerate launch -m diffplugin_cli run`: every image once, one merged summary, resumable."""
    make_images(tmp_path / "in", 5)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1", "--main_process_port", "29519",
               "-m", "diffplugin_cli", "run", str(tmp_path / "in"), "-o", str(out), "--task", "desnow", *FAST, "--json", *cli_args()]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    [line] = [l for l in first.stdout.splitlines() if l.startswith("{")]
    summary = json.loads(line)
    assert (summary["processed"], summary["inputs"], summary["processes"]) == (5, 5, 2)
    assert sorted(summary["outputs"]) == sorted(str(out / f"img{i:02d}.png") for i in range(5))
    assert sorted(p.name for p in out.iterdir()) == sorted([f"img{i:02d}.{e}" for i in range(5) for e in ("png", "json")] + [SUMMARY_NAME])
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads([l for l in again.stdout.splitlines() if l.startswith("{")][0])["skipped"] == 5


def test_half_precision_decode_that_overflows_is_redone_in_fp32():
    from diffplugin_cli.pipeline import decode_latents

    class OverflowingVae(torch.nn.Module):
        """Stands in for an SD VAE whose fp16 decode overflows."""

        class config:
            scaling_factor = 0.5

        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(1, dtype=torch.float16))

        def decode(self, latents):
            out = latents * self.scale
            if self.scale.dtype == torch.float16:
                out = out * float("inf")
            return type("Out", (), {"sample": out})()

    vae = OverflowingVae()
    decoded, retried = decode_latents(vae, torch.ones(1, 4, 2, 2, dtype=torch.float16))
    assert retried and torch.isfinite(decoded).all() and decoded.dtype == torch.float32
    assert vae.scale.dtype == torch.float16  # back to half afterwards
    fine, again = decode_latents(vae.float(), torch.ones(1, 4, 2, 2))
    assert not again and torch.equal(fine, torch.full((1, 4, 2, 2), 2.0))
