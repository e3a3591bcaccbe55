"""Large images in latent tiles, offloading, channels-last, torch.compile and weights mapped from
disk leaving RSS, on the tiny base."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffplugin_cli import DiffPluginPipeline
from diffplugin_cli.cli import app
from diffplugin_cli.memory import file_mappings, release_mapped_weights
from diffplugin_cli.tiling import TILE_CANDIDATES, LatentTiling, choose_tile, vae_tiling

from .conftest import BASE, CLIP, CONFORMANCE, cli_args

FAST = ["--steps", "2", "--task", "desnow"]


def _photo(size: tuple[int, int]) -> Image.Image:
    return Image.open(sorted((CONFORMANCE / "inputs").iterdir())[0]).convert("RGB").resize(size)


# --- tiling ------------------------------------------------------------------------------------

@pytest.mark.parametrize("height, width", [(17, 25), (8, 8), (40, 9), (64, 130)])
def test_tiles_cover_the_latent_and_blend_a_pointwise_function_exactly(height, width):
    tiling = LatentTiling(tile=8, overlap=2)
    covered = torch.zeros(height, width)
    for rows, cols in tiling.windows(height, width):
        assert rows.stop <= height and cols.stop <= width
        assert rows.stop - rows.start == min(8, height) and cols.stop - cols.start == min(8, width)
        covered[rows, cols] += 1
    assert covered.min() >= 1
    latents = torch.randn(2, 4, height, width)
    blended = tiling.blend(lambda w: latents[..., w[0], w[1]] * 3 - 1, latents)
    torch.testing.assert_close(blended, latents * 3 - 1)


def test_overlapping_tiles_are_averaged_with_edge_falloff():
    """Two tiles predicting different constants: each tile's own part keeps its value, the overlap
    moves monotonically from one to the other (no step, so no seam)."""
    tiling = LatentTiling(tile=8, overlap=4)
    latents = torch.zeros(1, 1, 8, 12)
    row = tiling.blend(lambda w: torch.full((1, 1, 8, 8), float(w[1].start)), latents)[0, 0, 0]
    assert [w[1].start for w in tiling.windows(8, 12)] == [0, 4]
    assert torch.all(row[:4] == 0) and torch.all(row[8:] == 4)
    assert torch.all(row[4:8].diff() > 0)


def test_tile_size_follows_free_memory():
    assert choose_tile(torch.device("cpu"), torch.float32, 1, free_bytes=64 * 2**30)[0] == TILE_CANDIDATES[0]
    small = choose_tile(torch.device("cpu"), torch.float32, 1, free_bytes=400 * 2**20)[0]
    assert small < TILE_CANDIDATES[0]
    assert choose_tile(torch.device("cpu"), torch.float16, 1, free_bytes=400 * 2**20)[0] > small  # half the bytes per value
    assert choose_tile(torch.device("cpu"), torch.float32, 1, free_bytes=1)[0] == TILE_CANDIDATES[-1]


def test_invalid_tilings_are_refused():
    for tile, overlap in ((12, 2), (8, 8), (8, -1)):
        with pytest.raises(ValueError):
            LatentTiling(tile, overlap)


def test_vae_tiling_is_restored(pipeline):
    vae = pipeline.base.vae
    before = (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size)
    with vae_tiling(vae, 64):
        assert (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size) == (True, 64, 8)
    assert (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size) == before


def test_native_size_small_image_is_one_tile(pipeline, plugins):
    """Below a tile, native is the plain procedure at the image's own (8-floored) size: the same
    as the authors' reference rule, which keeps images whose sides reach the resolution."""
    image = _photo((100, 70))
    native = pipeline([image], [plugins["desnow"]], [3], steps=2, size_rule="native")[0]
    assert pipeline.last_tiling is None and native.size == (96, 64)
    kept = pipeline([image], [plugins["desnow"]], [3], steps=2, size_rule="reference", resolution=64)[0]
    assert np.array_equal(np.asarray(native), np.asarray(kept))


def test_run_native_size_in_tiles(tmp_path):
    (tmp_path / "in").mkdir()
    _photo((200, 136)).save(tmp_path / "in/big.png")
    args = ["run", str(tmp_path / "in"), "-o", str(tmp_path / "out"), *FAST, "--size-rule", "native", "--json", *cli_args()]
    result = CliRunner().invoke(app, [*args, "--tile-size", "64"])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "out/big.png").size == (200, 136)
    sidecar = json.loads((tmp_path / "out/big.json").read_text())
    # latent 25 x 17 in 8-position tiles overlapping by 2: 4 columns x 3 rows
    assert sidecar["tiling"] == {"tile": 64, "overlap": 16, "tiles": 12, "tile_from": "--tile-size", "free_memory_mib": None, "vae_tiling": True}
    assert sidecar["processed_size"] == [200, 136] and sidecar["request"]["tile_size"] == 64
    assert json.loads(CliRunner().invoke(app, [*args, "--tile-size", "64"]).stdout)["skipped"] == 1
    again = CliRunner().invoke(app, [*args, "--tile-size", "128", "--overwrite"])
    assert json.loads((tmp_path / "out/big.json").read_text())["tiling"]["tiles"] == 4, again.output
    bad = CliRunner().invoke(app, [*args, "--tile-size", "100"])
    assert bad.exit_code == 2 and "multiple of 64" in bad.output


# --- offloading, channels-last, compile ---------------------------------------------------------

def _restore(pipe: DiffPluginPipeline, plugins) -> np.ndarray:
    return np.asarray(pipe([_photo((64, 64))], [plugins["desnow"]], [5], steps=3, resolution=64)[0])


@pytest.mark.parametrize("settings", [{"offload": "model"}, {"offload": "sequential"}, {"channels_last": True}])
def test_memory_and_speed_settings_keep_the_output(pipeline, plugins, settings):
    """On this CPU, offloading's execution device is the CPU: what it shows is that the hooks
    leave the procedure's numbers untouched."""
    pipe = DiffPluginPipeline.from_pretrained(BASE, CLIP, device="cpu", dtype="fp32", **settings)
    if "offload" in settings:
        assert all(hasattr(model, "_hf_hook") for model in (pipe.base.unet, pipe.base.vae, pipe.base.clip_vision))
    else:
        assert pipe.base.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.array_equal(_restore(pipe, plugins), _restore(pipeline, plugins))


def test_offload_flag_is_checked(tmp_path):
    result = CliRunner().invoke(app, ["run", str(tmp_path), "-o", str(tmp_path / "out"), *FAST, "--offload", "disk", *cli_args()])
    assert result.exit_code == 2 and "--offload" in result.output


@pytest.mark.slow
def test_compiled_unet_gives_the_same_output_and_does_not_compile_per_size(pipeline, plugins):
    """torch.compile with dynamic shapes. PyTorch compiles again once when a non-square size
    follows square ones (duck sizing took height == width); after that, new sizes and batch
    sizes (above 1) reuse the graph."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    pipe = DiffPluginPipeline.from_pretrained(BASE, CLIP, device="cpu", dtype="fp32", compile_unet=True)

    def restore(p, size, batch):
        return [np.asarray(image) for image in p([_photo(size)] * batch, [plugins["desnow"]], list(range(batch)), steps=2, size_rule="native")]

    for compiled, eager in zip(restore(pipe, (128, 128), 2), restore(pipeline, (128, 128), 2)):
        diff = np.abs(compiled.astype(int) - eager.astype(int))  # fused kernels round differently
        assert diff.max() <= 2 and (diff > 0).mean() <= 0.01, (diff.max(), (diff > 0).mean())
    restore(pipe, (256, 192), 3)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for size, batch in (((192, 128), 2), ((320, 128), 3)):
        restore(pipe, size, batch)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


# --- weights mapped from disk ------------------------------------------------------------------

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


def _mapping_of(weight: torch.Tensor):
    return next(m for m in file_mappings() if m.start <= weight.data_ptr() < m.end)


@linux_only
def test_idle_weights_leave_rss_and_the_output_is_unchanged(plugins):
    """CLIP's weights leave once the features are computed, the UNet's before the decode."""
    pipe = DiffPluginPipeline.from_pretrained(BASE, CLIP, device="cpu", dtype="fp32")
    weights = [next(pipe.base.clip_vision.parameters()), next(pipe.base.unet.parameters())]
    pipe.release_idle_weights = False
    kept = _restore(pipe, plugins)
    assert all(_mapping_of(weight).resident > 0 for weight in weights)
    pipe.release_idle_weights = True
    for _ in range(2):  # the second run reads the released weights back from the files
        assert np.array_equal(_restore(pipe, plugins), kept)
        assert [_mapping_of(weight).resident for weight in weights] == [0, 0]


@linux_only
def test_weights_written_after_loading_are_never_dropped():
    """The mapping is private: dropping a written page would bring the file's value back."""
    from transformers import CLIPVisionModel

    model = CLIPVisionModel.from_pretrained(CLIP)
    weight = next(model.parameters())
    with torch.no_grad():
        weight.add_(1.0)
    changed = weight.clone()
    assert _mapping_of(weight).written > 0
    assert release_mapped_weights(model) == 0
    assert torch.equal(weight, changed)
