"""The `diffplugin` command: parses arguments and calls the library; no logic of its own."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

# Only light imports here: torch, diffusers and transformers load inside the commands that need them.
from . import __version__
from .errors import EXIT_USAGE, DiffPluginError
from .images import DEFAULT_MAX_PIXELS
from .registry import Registry, discover_plugins, plugin_search_path
from .sizing import SIZE_RULES

app = typer.Typer(
    help="Diff-Plugin image restoration: one frozen Stable Diffusion, small Task-Plugins per task.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
plugins_app = typer.Typer(help="Find and convert Task-Plugins.", no_args_is_help=True)
train_app = typer.Typer(help="Train new Task-Plugins or the Plugin-Selector's heads.", no_args_is_help=True)
eval_app = typer.Typer(help="Evaluate restored images (FID/KID/CLIP-FID/CLIP-KID, PSNR/SSIM/LPIPS) or the Plugin-Selector.",
                       invoke_without_command=True)
app.add_typer(plugins_app, name="plugins")
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")

stderr = Console(stderr=True)


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        print(f"diffplugin {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Restore photos with Diff-Plugin Task-Plugins (desnow, dehaze, deblur, derain, face, lowlight, demoire, highlight)."""
    _quiet_third_party_logs()


@app.command()
def run(
    inputs: List[str] = typer.Argument(..., help="Image files, folders (walked recursively) or '-' to read paths from stdin, one per line."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder; the input tree is mirrored under it."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="Plugins to apply, comma-separated, in this order (e.g. desnow,lowlight)."),
    instruction: Optional[str] = typer.Option(None, "-i", "--instruction", help="Free-text request; the Plugin-Selector picks the plugins."),
    plugin_dir: List[Path] = typer.Option([], "--plugin-dir", help="Folder holding plugins (NAME.safetensors or the authors' NAME/ folder); repeatable. Also $DIFFPLUGIN_PLUGIN_PATH."),
    steps: int = typer.Option(20, help="Denoising steps of the first plugin."),
    chain_steps: int = typer.Option(3, help="Denoising steps of every later plugin in a chain (the authors use 3)."),
    seed: int = typer.Option(42, help="Seed of every image's noise (the authors' default is 42)."),
    seed_from_name: bool = typer.Option(False, "--seed-from-name", help="Seed each image from a stable hash of its relative path instead."),
    size_rule: str = typer.Option("square", help=f"Processing size: {', '.join(SIZE_RULES)} (reference = the authors' infer.py rule)."),
    resolution: int = typer.Option(512, help="Processing resolution used by the size rule."),
    keep_size: bool = typer.Option(True, "--keep-size/--no-keep-size", help="Save outputs at the input's own width and height."),
    batch_size: int = typer.Option(1, help="Images processed together (equal processed size only); outputs do not depend on it."),
    suffix: str = typer.Option("", help="Added to each output's file stem, e.g. _restored."),
    ext: str = typer.Option("png", help="Output type: png, jpg, webp or same (as the input)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo outputs that a previous run already finished."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, help="Refuse inputs with more pixels than this."),
    device: str = typer.Option("auto", help="auto, cuda, cuda:N, mps or cpu."),
    dtype: str = typer.Option("auto", help="auto (fp16 on CUDA, fp32 elsewhere), fp32, fp16 or bf16."),
    base_model: Optional[str] = typer.Option(None, help="Stable Diffusion 1.x hub id or local folder (default: from the registry)."),
    clip_model: Optional[str] = typer.Option(None, help="CLIP vision hub id or local folder (default: from the registry)."),
    registry: Optional[Path] = typer.Option(None, help="Plugin registry TOML (default: $DIFFPLUGIN_REGISTRY or the packaged one)."),
    selector: str = typer.Option("text", help="With -i: text (instruction only, offline) or reference (the authors' selector, per image)."),
    threshold: float = typer.Option(0.0, help="With -i: a plugin is selected when its score is above this."),
    selector_heads: Optional[Path] = typer.Option(None, help="With -i: selector heads (reference: the authors' PromptTunner.pt; text: default the shipped ones)."),
    tile_size: Optional[int] = typer.Option(None, help="With --size-rule native: latent tile size in pixels, a multiple of 64 (default: from free memory)."),
    offload: Optional[str] = typer.Option(None, help="Keep weights in CPU memory and move them to the GPU when used: model (per model) or sequential (per layer, least memory, slowest)."),
    compile_unet: bool = typer.Option(False, "--compile", help="torch.compile the UNet (dynamic shapes; the first batch pays the compile time)."),
    channels_last: bool = typer.Option(False, "--channels-last", help="channels-last memory format for the UNet and VAE (faster on recent GPUs)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print the run summary as one JSON object on stdout."),
) -> None:
    """Restore images with Task-Plugins; each output gets a JSON sidecar. Exit codes: 0 done, 1 some images failed, 2 usage error, 130 interrupted."""
    from .reporting import RichReporter
    from .runner import RunOptions, run as run_batch

    if instruction is not None and task:
        _fail("give either --task or -i/--instruction, not both")
    if ext not in ("png", "jpg", "webp", "same"):
        _fail(f"--ext {ext!r}: expected png, jpg, webp or same")
    if size_rule not in SIZE_RULES:
        _fail(f"--size-rule {size_rule!r}: expected one of {', '.join(SIZE_RULES)}")
    if tile_size is not None and (tile_size < 64 or tile_size % 64):
        _fail(f"--tile-size {tile_size}: expected a multiple of 64 pixels")
    if offload not in (None, "model", "sequential"):
        _fail(f"--offload {offload!r}: expected model or sequential")
    options = RunOptions(
        output_dir=output,
        tasks=[name.strip() for name in (task or "").split(",") if name.strip()],
        plugin_dirs=plugin_dir,
        steps=steps,
        chain_steps=chain_steps,
        seed=seed,
        seed_from_name=seed_from_name,
        size_rule=size_rule,
        resolution=resolution,
        keep_size=keep_size,
        batch_size=batch_size,
        suffix=suffix,
        ext=ext,
        overwrite=overwrite,
        max_pixels=max_pixels,
        device=device,
        dtype=dtype,
        base_model=base_model,
        clip_model=clip_model,
        registry=registry,
        instruction=instruction,
        selector=selector,
        threshold=threshold,
        selector_heads=selector_heads,
        tile_size=tile_size,
        offload=offload,
        compile=compile_unet,
        channels_last=channels_last,
    )
    reporter = RichReporter(show_progress=not quiet and stderr.is_terminal)
    try:
        summary = run_batch(inputs, options, stdin=sys.stdin if "-" in inputs else (), reporter=reporter)
    except DiffPluginError as exc:
        _fail(str(exc))
    if summary.process:  # another process of an `accelerate launch` run: the main one reports
        raise typer.Exit(summary.exit_code)
    if as_json:
        print(json.dumps(summary.to_json()))
    elif not quiet:
        stderr.print(
            f"{summary.processed} restored, {summary.skipped} already done, {summary.failed} failed"
            + (f", {summary.no_match} with no plugin matched" if summary.no_match else "")
            + (" (interrupted)" if summary.interrupted else "")
            + f" -> {output}"
        )
    raise typer.Exit(summary.exit_code)


@app.command()
def select(
    instruction: str = typer.Option(..., "-i", "--instruction", help="What to do, in words; '-' reads one instruction per line from stdin (JSON Lines out)."),
    image: Optional[Path] = typer.Argument(None, help="The image (needed by --selector reference)."),
    selector: str = typer.Option("text", help="text (instruction only, offline) or reference (the authors' selector; needs IMAGE)."),
    threshold: float = typer.Option(0.0, help="A plugin is selected when its score is above this."),
    selector_heads: Optional[Path] = typer.Option(None, help="Heads file (reference: PromptTunner.pt; text: default the shipped ones)."),
    plugin_dir: List[Path] = typer.Option([], "--plugin-dir", help="Folder holding plugins; repeatable. Also $DIFFPLUGIN_PLUGIN_PATH."),
    base_model: Optional[str] = typer.Option(None, help="Reference selector: SD-1.x hub id or folder (text encoder) (default: registry)."),
    clip_model: Optional[str] = typer.Option(None, help="Reference selector: CLIP vision hub id or folder (default: registry)."),
    registry: Optional[Path] = typer.Option(None, help="Plugin registry TOML."),
    dtype: str = typer.Option("fp32", help="Text selector: fp32 (as trained) or bf16 (faster on CPUs with native bf16; scores rounded)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Show which plugins an instruction selects, with every plugin's score."""
    from .selection import SelectRequest, instruction_batches, open_selector

    request = SelectRequest(selector, threshold, selector_heads, plugin_dir, base_model, clip_model, registry, dtype)
    try:
        choose = open_selector(request, image)
        if instruction == "-":
            for batch in instruction_batches(sys.stdin.buffer):
                print("\n".join(json.dumps(selection.to_json()) for selection in choose(batch)), flush=True)
            return
        [selection] = choose([instruction])
    except DiffPluginError as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(selection.to_json()))
        return
    table = Table(title=f"{selection.selector} selector, threshold {selection.threshold:g}")
    table.add_column("plugin")
    table.add_column("score", justify="right")
    table.add_column("selected")
    for name, score in sorted(selection.scores.items(), key=lambda kv: -kv[1]):
        table.add_row(name, f"{score:.3f}", "yes" if name in selection.selected else "")
    Console().print(table)
    print("selected: " + (", ".join(selection.selected) if selection.selected else "none (no plugin matches this request)"))


@train_app.command("plugin")
def train_plugin(
    name: str = typer.Option(..., help="Name of the new plugin (also its task)."),
    out: Path = typer.Option(..., "--out", help="Output folder: NAME.safetensors, checkpoints/, train_log.csv, validation/."),
    data: Optional[Path] = typer.Option(None, help="CSV of pairs: header input,target; the authors' image,conditioning_image; or no header (input,target)."),
    data_root: Optional[Path] = typer.Option(None, help="Folder the CSV paths are relative to (default: the CSV's folder)."),
    inputs: Optional[Path] = typer.Option(None, help="Folder of degraded inputs (file names matching --targets)."),
    targets: Optional[Path] = typer.Option(None, help="Folder of ground-truth images."),
    degrade: Optional[str] = typer.Option(None, help="Synthesise inputs from the targets: lowlight, blur, noise or jpeg (formulas in README)."),
    init_noise: str = typer.Option("input", help="Recorded in the plugin: input (start from the noised input) or noise (as lowlight/highlight)."),
    max_steps: int = typer.Option(1000, help="Optimisation steps."),
    resolution: int = typer.Option(512, help="Training crop size (short-side resize, random crop, random flip)."),
    batch_size: int = typer.Option(1, help="Pairs per step per process (the authors: 64 in all)."),
    lr: float = typer.Option(1e-5, help="AdamW learning rate (constant, as the paper)."),
    grad_accum: int = typer.Option(1, help="Gradient accumulation steps."),
    mixed_precision: str = typer.Option("no", help="no, fp16 or bf16 (through accelerate)."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Trade compute for memory."),
    checkpoint_every: int = typer.Option(500, help="Save a resumable checkpoint every N steps."),
    validate_every: int = typer.Option(0, help="Render --validation-images every N steps (0: never)."),
    validation_images: Optional[Path] = typer.Option(None, help="Folder of images to render during validation."),
    scb_init: str = typer.Option("zero", help="zero (zero output convs, as the paper) or unet (also copy the UNet's first down block)."),
    seed: int = typer.Option(0, help="Seed of sampling, augmentation, noise and initialisation."),
    resume: Optional[str] = typer.Option(None, help="Continue from 'latest' or a checkpoint folder."),
    base_model: Optional[str] = typer.Option(None, help="SD-1.x hub id or folder (default: registry)."),
    clip_model: Optional[str] = typer.Option(None, help="CLIP vision hub id or folder (default: registry)."),
    registry: Optional[Path] = typer.Option(None, help="Plugin registry TOML."),
) -> None:
    """Train a Task-Plugin (TPB + SCB) on a frozen base model; `accelerate launch -m diffplugin_cli train plugin ...` for many GPUs or machines."""
    from .images import looks_like_image
    from .training import TrainOptions, train_plugin as run_training
    from .training_data import read_pairs

    try:
        reg = Registry.load(registry)
        pairs = read_pairs(data, data_root, inputs, targets, degrade)
        validation = sorted(p for p in validation_images.iterdir() if looks_like_image(p)) if validation_images else []
        options = TrainOptions(
            name=name, out_dir=out, pairs=pairs, base_model=base_model or reg.base_model, clip_model=clip_model or reg.clip_model,
            init=init_noise, degrade=degrade, resolution=resolution, max_steps=max_steps, batch_size=batch_size, lr=lr, grad_accum=grad_accum,
            mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing, checkpoint_every=checkpoint_every,
            validate_every=validate_every, validation_images=validation, scb_init=scb_init, seed=seed, resume=resume,
        )
        result = run_training(options, log=lambda line: stderr.print(line))
    except DiffPluginError as exc:
        _fail(str(exc))
    print(result.plugin)


@train_app.command("selector")
def train_selector(
    out: Path = typer.Option(..., "--out", help="Where to write the heads (.safetensors)."),
    selector: str = typer.Option("text", help="text (our heads, no images needed) or reference (the authors' heads: needs --images and installed plugins)."),
    images: Optional[Path] = typer.Option(None, help="Reference: folder of images whose plugin F^p are the pseudo-labelled keys."),
    corpus: Optional[Path] = typer.Option(None, help="Corpus folder (<task>.txt, none.txt, negation.txt, inverse.txt, objects.toml, vocabulary.toml) (default: the shipped one)."),
    init: Optional[str] = typer.Option(None, help="Text: fine-tune these heads (a .safetensors file, or 'shipped') instead of training from scratch; they keep their members, tuned layers and null margin."),
    steps: int = typer.Option(800, help="Optimisation steps."),
    negatives: int = typer.Option(7, help="Negative texts per anchor in the contrastive loss (the paper's N)."),
    temperature: float = typer.Option(0.07, help="Temperature tau of the contrastive loss."),
    batch_size: int = typer.Option(32, help="Anchors per step."),
    lr: float = typer.Option(1e-3, help="AdamW learning rate of the heads (text: pooling MLP and keys)."),
    tuned_layers: Optional[int] = typer.Option(None, help="Text: top layers of the sentence encoder fine-tuned as part of the heads (default 3; 0: frozen encoder)."),
    tuned_lr: Optional[float] = typer.Option(None, help="Text: AdamW learning rate of the fine-tuned encoder layers (default 5e-5)."),
    null_margin: Optional[float] = typer.Option(None, help="Text: how far a task must score above a clause's null to count for it (stored in the heads; default 1.0; 0: the authors' rule)."),
    seed: int = typer.Option(0, help="Seed of sampling and initialisation."),
    members: Optional[int] = typer.Option(None, help="Text: train this many heads, with seeds SEED, SEED+1, ..., and average their scores (default: as many as the shipped heads; 1: a single run)."),
    share_layers: Optional[bool] = typer.Option(None, "--share-layers/--separate-layers", help="Text, with --members > 1: the members share the mean of their tuned layers, run once per instruction (default), or keep their own."),
    plugin_dir: List[Path] = typer.Option([], "--plugin-dir", help="Reference: folder holding plugins; repeatable. Also $DIFFPLUGIN_PLUGIN_PATH."),
    base_model: Optional[str] = typer.Option(None, help="Reference: SD-1.x hub id or folder (default: registry)."),
    clip_model: Optional[str] = typer.Option(None, help="Reference: CLIP vision hub id or folder (default: registry)."),
    registry: Optional[Path] = typer.Option(None, help="Plugin registry TOML."),
) -> None:
    """Train a selector's heads from scratch (the shipped text heads come from the defaults), or fine-tune text heads (--init)."""
    from .selection import SelectRequest, train_reference_heads_file, train_text_heads_file

    settings = {"steps": steps, "negatives": negatives, "temperature": temperature, "batch_size": batch_size, "lr": lr, "seed": seed}
    text_only = {name: value for name, value in (("tuned_layers", tuned_layers), ("tuned_lr", tuned_lr), ("null_margin", null_margin),
                                                 ("share_layers", share_layers), ("init", init))
                 if value is not None}  # those not given keep TrainConfig's defaults
    log = lambda step, loss: stderr.print(f"step {step}: loss {loss:.4f}")  # noqa: E731
    try:
        if selector == "text":
            written = train_text_heads_file(out, corpus, log=log, members=members, **settings | text_only)
        elif selector == "reference":
            if members not in (None, 1):
                raise DiffPluginError("--members: the reference selector's heads are one set, as the authors'")
            if text_only:
                flags = ", ".join("--" + name.replace("_", "-") for name in text_only)
                raise DiffPluginError(f"{flags}: text selector only (the reference heads are the authors' projections, gated at null)")
            if images is None:
                raise DiffPluginError("--selector reference needs --images DIR (the plugins' F^p of those images are its keys)")
            request = SelectRequest("reference", plugin_dirs=plugin_dir, base_model=base_model, clip_model=clip_model, registry=registry)
            written = train_reference_heads_file(out, images, request, corpus, log=log, **settings)
        else:
            raise DiffPluginError(f"--selector {selector!r}: expected text or reference")
    except DiffPluginError as exc:
        _fail(str(exc))
    print(written)


@eval_app.callback()
def eval_images(
    ctx: typer.Context,
    task: Optional[str] = typer.Option(None, help="Run this plugin over --data (resumable, into --cache-dir) and score its outputs."),
    metric: List[str] = typer.Option([], "--metric", "-m", help="fid, kid, clip-fid, clip-kid (vs --reference), psnr, ssim, lpips (pairs by name); repeatable."),
    data: Optional[Path] = typer.Option(None, help="Test inputs for --task (default: test_data of the task in the registry)."),
    reference: Optional[Path] = typer.Option(None, help="Reference images (ground truth or real clean photos) (default: test_reference in the registry)."),
    outputs: List[Path] = typer.Option([], "--outputs", help="Score existing output folders instead of running; give two to compare side by side."),
    feature_model: Optional[str] = typer.Option(None, help="Feature network for fid/kid/clip-*: a CLIP hub id or local folder (default: Inception; CLIP ViT-B/32 for clip-*)."),
    ssim_on: str = typer.Option("y", help="SSIM on y (luma, BT.601) or rgb."),
    csv_file: Optional[Path] = typer.Option(None, "--csv", help="Write one CSV row per image pair (pair metrics)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Where --task writes its outputs (default: under $DIFFPLUGIN_HOME/eval)."),
    plugin_dir: List[Path] = typer.Option([], "--plugin-dir", help="Folder holding plugins; repeatable."),
    base_model: Optional[str] = typer.Option(None, help="SD-1.x hub id or folder (default: registry)."),
    clip_model: Optional[str] = typer.Option(None, help="CLIP vision (image encoder) hub id or folder (default: registry)."),
    steps: int = typer.Option(20, help="Denoising steps for --task."),
    seed: int = typer.Option(42, help="Seed for --task."),
    size_rule: str = typer.Option("square", help="Size rule for --task."),
    resolution: int = typer.Option(512, help="Processing resolution for --task."),
    device: str = typer.Option("auto", help="Device for --task."),
    dtype: str = typer.Option("auto", help="dtype for --task."),
    registry: Optional[Path] = typer.Option(None, help="Plugin registry TOML."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (a list when comparing)."),
) -> None:
    """Score restored images: `diffplugin eval --task derain --metric fid --data TEST --reference REF`, or `--outputs DIR`."""
    if ctx.invoked_subcommand is not None:
        return
    from .evaluation import evaluate_folder, render_task_outputs

    if not metric:
        _fail("give at least one --metric (fid, kid, clip-fid, clip-kid, psnr, ssim, lpips)")
    if ssim_on not in ("y", "rgb"):
        _fail(f"--ssim-on {ssim_on!r}: expected y or rgb")
    try:
        reg = Registry.load(registry)
        folders = list(outputs)
        if task and not folders:
            rendered, _ = render_task_outputs(task, data, cache_dir, reg, plugin_dirs=plugin_dir, base_model=base_model, clip_model=clip_model,
                                              steps=steps, seed=seed, size_rule=size_rule, resolution=resolution, device=device, dtype=dtype)
            folders = [rendered]
        if not folders:
            _fail("give --task NAME (with --data) or --outputs DIR")
        ref = reference or (Path(reg.entry(task).test_reference) if task and reg.entry(task).test_reference else None)
        reports = [evaluate_folder(folder, ref, metric, feature_model, ssim_on, csv_file if len(folders) == 1 else None) for folder in folders]
    except DiffPluginError as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(reports[0] if len(reports) == 1 else reports))
        return
    table = Table(title=f"vs {reports[0]['reference']}")
    table.add_column("metric")
    for report in reports:
        table.add_column(f"{report['outputs']} ({report['counts']['outputs']} images)", justify="right")
    for name in metric:
        table.add_row(name + (" (x100)" if name.endswith("kid") else ""), *("inf" if r["metrics"][name] is None else f"{r['metrics'][name]:.4f}" for r in reports))
    Console().print(table)


@eval_app.command("selector")
def eval_selector(
    cases: Path = typer.Option(..., "--cases", help="JSON Lines: {\"text\": ..., \"labels\": [...], \"kind\": optional}."),
    selector_heads: Optional[Path] = typer.Option(None, help="Text selector heads (default: the shipped ones)."),
    threshold: float = typer.Option(0.0, help="A plugin is selected when its score is above this."),
    dtype: str = typer.Option("fp32", help="Text selector: fp32 (as trained) or bf16 (faster on CPUs with native bf16; scores rounded)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """ZTA, mAP, CP, OP, OR, CF1, OF1 of the text selector on labelled instructions, overall and per kind."""
    from .selection import evaluate_text_selector

    try:
        report = evaluate_text_selector(cases, selector_heads, threshold, dtype)
    except DiffPluginError as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(report))
        return
    columns = ("ZTA", "mAP", "CP", "OP", "OR", "CF1", "OF1", "cases")
    table = Table(title=f"text selector ({dtype}) on {cases}")
    table.add_column("kind")
    for column in columns:
        table.add_column(column, justify="right")
    for kind, values in report["metrics"].items():
        table.add_row(kind, *(f"{values[c]:.3f}" if c != "cases" else str(values[c]) for c in columns))
    Console().print(table)


@plugins_app.command("list")
def plugins_list(
    plugin_dir: List[Path] = typer.Option([], "--plugin-dir", help="Folder holding plugins; repeatable. Also $DIFFPLUGIN_PLUGIN_PATH."),
    registry: Optional[Path] = typer.Option(None, help="Plugin registry TOML (default: $DIFFPLUGIN_REGISTRY or the packaged one)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Show the registry's plugins and every plugin found: where, format, size, source, sha256, verified."""
    from .install import plugin_home, records

    try:
        reg = Registry.load(registry)
    except DiffPluginError as exc:
        _fail(str(exc))
    found = discover_plugins(plugin_search_path(plugin_dir))
    installed = records()
    rows = []
    for name in list(reg.plugins) + sorted((set(found) | set(installed)) - set(reg.plugins)):
        entry, location, record = reg.entry(name), found.get(name), installed.get(name)
        rows.append({
            "name": name,
            "description": entry.description,
            "init": entry.init,
            "available": bool(entry.files) or name == "reference-selector" and bool(reg.selector_files),
            "found": location is not None or record is not None,
            "path": str(location) if location else (record.path if record else None),
            "format": None if location is None else ("safetensors" if location.is_file() else "authors"),
            "installed": record is not None,
            "size": (location.stat().st_size if location and location.is_file() else record.size if record else None),
            "source": record.source if record else None,
            "sha256": record.sha256 if record else None,
            "verified": record.verified if record else None,
        })
    if as_json:
        print(json.dumps({"registry": str(reg.path), "home": str(plugin_home()), "plugins": rows}))
        return
    table = Table(title=f"Plugins (registry {reg.path}, home {plugin_home()})")
    for column in ("name", "description", "found at", "size", "verified"):
        table.add_column(column)
    for row in rows:
        size = f"{row['size'] / 2**20:.1f} MiB" if row["size"] else "-"
        verified = {True: "sha256 ok", False: "first use", None: "-"}[row["verified"]]
        table.add_row(row["name"], row["description"], f"{row['path']} ({row['format'] or 'installed'})" if row["found"] else "-", size, verified)
    Console().print(table)


@plugins_app.command("install")
def plugins_install(
    targets: List[str] = typer.Argument(..., help="Registry plugin names, 'all', 'reference-selector', a local folder/.safetensors/archive, or a URL."),
    name: Optional[str] = typer.Option(None, help="Name to install a path or URL under (default: from its file name)."),
    registry: Optional[Path] = typer.Option(None, help="Plugin registry TOML (default: $DIFFPLUGIN_REGISTRY or the packaged one)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    as_json: bool = typer.Option(False, "--json", help="Print the install records as JSON."),
) -> None:
    """Download, verify (sha256), convert to our single-file format and install into $DIFFPLUGIN_HOME."""
    from dataclasses import asdict

    from .install import install
    from .reporting import download_progress

    try:
        reg = Registry.load(registry)
        progress = None if quiet or not stderr.is_terminal else download_progress(stderr)
        installed = [record for target in targets for record in install(target, reg, name=name, progress=progress)]
    except DiffPluginError as exc:
        _fail(str(exc), code=1)
    if as_json:
        print(json.dumps([asdict(record) for record in installed]))
        return
    for record in installed:
        trust = "sha256 verified" if record.verified else "not verified (no published sha256): recorded " + ", ".join(
            f"{rel} {info['sha256']}" for rel, info in record.files.items())
        print(f"installed {record.name} -> {record.path} ({trust})")


@plugins_app.command("info")
def plugins_info(name: str = typer.Argument(..., help="An installed plugin.")) -> None:
    """Print an installed plugin's record (sources, sha256 of every file, verified or trusted on first use)."""
    from dataclasses import asdict

    from .install import records

    record = records().get(name)
    if record is None:
        _fail(f"{name}: not installed (see `diffplugin plugins list`)")
    print(json.dumps(asdict(record), indent=2))


@plugins_app.command("remove")
def plugins_remove(name: str = typer.Argument(..., help="An installed plugin.")) -> None:
    """Remove an installed plugin from $DIFFPLUGIN_HOME."""
    from .install import remove

    try:
        record = remove(name)
    except DiffPluginError as exc:
        _fail(str(exc))
    print(f"removed {record.name} ({record.path})")


@plugins_app.command("verify")
def plugins_verify(as_json: bool = typer.Option(False, "--json", help="Print the results as JSON.")) -> None:
    """Re-hash every installed file against its install record; exit 1 if any differs or is missing."""
    from .install import verify

    results = verify()
    if as_json:
        print(json.dumps(results))
    else:
        for result in results:
            print(f"{result['name']}: {'ok' if result['ok'] else 'FAILED: ' + result['reason']}")
    raise typer.Exit(0 if all(r["ok"] for r in results) else 1)


@plugins_app.command("convert")
def plugins_convert(
    src: Path = typer.Argument(..., help="A plugin: the authors' folder (tpb.pt + scb/) or our NAME.safetensors."),
    dst: Path = typer.Argument(..., help="Where to write: a path ending in .safetensors (ours) or a folder (the authors' layout)."),
    name: Optional[str] = typer.Option(None, help="Plugin name recorded in the file (default: from SRC)."),
    task: Optional[str] = typer.Option(None, help="Task recorded in the file."),
    init: Optional[str] = typer.Option(None, help="Init mode recorded in the file: input or noise."),
    source: Optional[str] = typer.Option(None, help="Where the weights come from, recorded in the file."),
) -> None:
    """Convert a plugin between the authors' format and our single-file safetensors format."""
    from .plugins import convert_plugin

    if init is not None and init not in ("input", "noise"):
        _fail(f"--init {init!r}: expected input or noise")
    try:
        written = convert_plugin(src, dst, name=name, task=task, init=init, source=source)
    except DiffPluginError as exc:
        _fail(str(exc))
    print(written)


def main() -> None:
    """Entry point of the `diffplugin` command."""
    app()


def _quiet_third_party_logs() -> None:
    """diffusers/transformers print loading chatter and progress bars we do not want in pipelines.

    Environment defaults, read when those libraries are first imported (after this runs), so
    `--help` does not pay for importing them; a user's own settings win.
    """
    for name, value in (("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(name, value)
