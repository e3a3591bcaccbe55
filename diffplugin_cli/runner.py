"""Batch runs over files and folders: plan outputs, skip finished work, process, write results.

Data flow: inputs -> WorkItems (output paths) -> resume check -> batches of equal processed size
-> pipeline -> atomic image + sidecar writes -> run summary (OUT/diffplugin-run.json).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image

from . import __version__
from .atomic import atomic_path, sweep_stale_temporaries
from .errors import EXIT_FAILURES, EXIT_INTERRUPTED, EXIT_OK, DiffPluginError, ImageError
from .distributed import Shard
from .install import installed_selector
from .images import DEFAULT_MAX_PIXELS, LoadedImage, load_image, looks_like_image, output_extension, save_image
from .pipeline import DiffPluginPipeline
from .plugins import TaskPlugin, load_plugin
from .reporting import Reporter
from .registry import Registry, discover_plugins, find_plugin, plugin_search_path
from .selector import ReferenceSelector, Selection, TextSelector
from .sizing import processed_size

SIDECAR_SCHEMA_VERSION = 1
SUMMARY_SCHEMA_VERSION = 1
SUMMARY_NAME = "diffplugin-run.json"


@dataclass
class RunOptions:
    """Everything a run needs besides its inputs; the CLI flags map one to one."""

    output_dir: Path
    tasks: Sequence[str]
    plugin_dirs: Sequence[str | os.PathLike] = ()
    steps: int = 20
    chain_steps: int = 3
    seed: int = 42
    seed_from_name: bool = False
    size_rule: str = "square"
    resolution: int = 512
    keep_size: bool = True
    batch_size: int = 1
    suffix: str = ""
    ext: str = "png"
    overwrite: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    device: str = "auto"
    dtype: str = "auto"
    base_model: str | None = None
    clip_model: str | None = None
    registry: str | os.PathLike | None = None
    instruction: str | None = None
    selector: str = "text"
    threshold: float = 0.0
    selector_heads: str | os.PathLike | None = None
    tile_size: int | None = None
    offload: str | None = None
    compile: bool = False
    channels_last: bool = False


@dataclass
class WorkItem:
    source: Path
    relpath: Path
    output: Path

    @property
    def sidecar(self) -> Path:
        return self.output.with_suffix(".json")


@dataclass
class RunSummary:
    output_dir: str
    inputs: int = 0
    processed: int = 0
    skipped: int = 0
    failed: int = 0
    no_match: int = 0
    interrupted: bool = False
    failures: list[dict] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    plugins: list[dict] = field(default_factory=list)
    selection: dict | None = None
    started_at: str = ""
    seconds: float = 0.0
    processes: int = 1
    process: int = 0

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        if self.process:  # another process of a sharded run: the main one reports for all
            return EXIT_OK
        return EXIT_FAILURES if self.failed else EXIT_OK

    def to_json(self) -> dict:
        data = asdict(self)
        data["images_per_second"] = round(self.processed / self.seconds, 4) if self.seconds else 0.0
        data["exit_code"] = self.exit_code
        return {"schema_version": SUMMARY_SCHEMA_VERSION, "version": __version__} | data


# --- planning ---------------------------------------------------------------------------------

def collect_inputs(inputs: Sequence[str], output_dir: Path, suffix: str, ext: str, stdin: Iterable[str] = ()) -> tuple[list[WorkItem], list[dict]]:
    """Expand files, folders and '-' (paths on stdin) into WorkItems, plus failures for bad paths."""
    out_root = output_dir.resolve()
    items: list[WorkItem] = []
    failures: list[dict] = []
    claimed: dict[Path, Path] = {}

    def add(source: Path, relpath: Path) -> None:
        extension = output_extension(ext, source)
        output = output_dir / relpath.parent / f"{relpath.stem}{suffix}.{extension}"
        key = output.resolve()
        if key == source.resolve():
            failures.append({"path": str(source), "reason": "the output would overwrite the input (use --suffix or another -o)"})
        elif key in claimed:
            failures.append({"path": str(source), "reason": f"same output name as {claimed[key]} ({output})"})
        else:
            claimed[key] = source
            items.append(WorkItem(source, relpath, output))

    for arg in inputs:
        paths = [line.strip() for line in stdin if line.strip()] if arg == "-" else [arg]
        for raw in paths:
            path = Path(raw)
            if path.is_dir():
                if path.resolve() == out_root:
                    raise DiffPluginError(f"{path}: the output folder is the input folder; choose another -o")
                for found in _walk_images(path, out_root):
                    add(found, found.relative_to(path))
            elif path.is_file():
                add(path, Path(path.name))
            else:
                failures.append({"path": raw, "reason": "no such file or folder"})
    return items, failures


def _walk_images(folder: Path, exclude: Path) -> Iterator[Path]:
    """Images under `folder`, recursively and sorted; hidden entries and the output folder skipped."""
    for root, dirs, files in os.walk(folder):
        root_path = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (root_path / d).resolve() != exclude)
        for name in sorted(files):
            path = root_path / name
            if not name.startswith(".") and looks_like_image(path):
                yield path


def seed_for(relpath: Path, options: RunOptions) -> int:
    """The run's seed, or with --seed-from-name a stable hash of the relative path."""
    if not options.seed_from_name:
        return options.seed
    return int.from_bytes(hashlib.sha256(relpath.as_posix().encode()).digest()[:4], "big") & 0x7FFFFFFF


def request_of(item: WorkItem, input_sha256: str, plugins: Sequence[TaskPlugin], options: RunOptions, base: tuple[str, str]) -> dict:
    """What determines an output: a finished output whose sidecar holds the same request is skipped."""
    selector = {"instruction": options.instruction, "selector": options.selector, "threshold": options.threshold} if options.instruction is not None else {}
    return selector | {
        "input_sha256": input_sha256,
        "plugins": [[p.name, p.sha256, p.init] for p in plugins],
        "seed": seed_for(item.relpath, options),
        "steps": options.steps,
        "chain_steps": options.chain_steps,
        "size_rule": options.size_rule,
        "resolution": options.resolution,
        "keep_size": options.keep_size,
        **({"tile_size": options.tile_size} if options.size_rule == "native" else {}),
        "dtype": options.dtype,
        "base_model": base[0],
        "clip_model": base[1],
    }


def is_done(item: WorkItem, request: dict) -> bool:
    if not item.output.is_file():
        return False
    try:
        return json.loads(item.sidecar.read_text(encoding="utf-8")).get("request") == request
    except (OSError, ValueError, AttributeError):
        return False


# --- running ----------------------------------------------------------------------------------

class _InterruptGuard:
    """Ctrl-C stops the run between writes: one arriving mid-write waits until the write is done."""

    def __init__(self) -> None:
        self.writing = False
        self.pending = False
        self._previous = None

    def __enter__(self) -> "_InterruptGuard":
        if _in_main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _on_sigint(self, signum, frame) -> None:
        if self.writing:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def write(self):
        self.writing = True
        try:
            yield
        finally:
            self.writing = False
        if self.pending:
            raise KeyboardInterrupt


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@dataclass
class Choice:
    """The plugins for one image, the selection behind them, and the image's CLIP hidden states
    if choosing computed them (the pipeline reuses them instead of running CLIP again)."""

    plugins: list[TaskPlugin]
    selection: Selection | None = None
    clip_hidden: tuple[torch.Tensor, ...] | None = None


class PluginChooser:
    """Decides which plugins restore an image: fixed (--task, text selector) or per image (reference)."""

    def __init__(self, plugins: list[TaskPlugin], selection: Selection | None = None):
        self.plugins, self.selection = plugins, selection

    def choose(self, image: LoadedImage, pipeline: Callable[[], DiffPluginPipeline]) -> Choice:
        return Choice(self.plugins, self.selection)


class ReferenceChooser(PluginChooser):
    """The authors' selector: every installed plugin's F^p for this image is a key."""

    def __init__(self, installed: list[TaskPlugin], selector: ReferenceSelector, options: RunOptions, order: Sequence[str]):
        super().__init__(installed)
        self.selector, self.options, self.order = selector, options, order

    def choose(self, image, pipeline):
        pipe = pipeline()
        hidden = pipe.clip_hidden_states([image.rgb])
        prompts = {plugin.name: pipe.visual_prompt(plugin, hidden) for plugin in self.plugins}
        selection = self.selector.select(self.options.instruction, prompts, self.options.threshold, self.order)
        by_name = {plugin.name: plugin for plugin in self.plugins}
        return Choice([by_name[name] for name in selection.selected], selection, hidden)


def make_chooser(options: RunOptions, registry: Registry, base_model: str) -> PluginChooser:
    dirs = plugin_search_path(options.plugin_dirs)
    if options.instruction is None:
        if not options.tasks:
            raise DiffPluginError("no plugin given: use --task NAME[,NAME...] or -i \"instruction\"")
        return PluginChooser([load_plugin(find_plugin(name, dirs), registry.entry(name)) for name in options.tasks])
    installed = sorted(discover_plugins(dirs))
    if not installed:
        raise DiffPluginError("no plugins installed to choose from; give --plugin-dir or set DIFFPLUGIN_PLUGIN_PATH")
    if options.selector == "reference":
        heads = options.selector_heads or installed_selector()
        if not heads:
            raise DiffPluginError("--selector reference needs the authors' heads: `diffplugin plugins install reference-selector` or --selector-heads PromptTunner.pt")
        plugins = [load_plugin(find_plugin(name, dirs), registry.entry(name)) for name in installed]
        return ReferenceChooser(plugins, ReferenceSelector.from_pretrained(heads, base_model), options, registry.order)
    if options.selector != "text":
        raise DiffPluginError(f"--selector {options.selector!r}: expected text or reference")
    selection = TextSelector.from_file(options.selector_heads).select(options.instruction, installed, options.threshold, registry.order)
    return PluginChooser([load_plugin(find_plugin(name, dirs), registry.entry(name)) for name in selection.selected], selection)


def run(
    inputs: Sequence[str],
    options: RunOptions,
    *,
    stdin: Iterable[str] = (),
    reporter: Reporter | None = None,
    pipeline: DiffPluginPipeline | None = None,
    pipeline_factory: Callable[[], DiffPluginPipeline] | None = None,
) -> RunSummary:
    """Restore every input image into `options.output_dir`; returns the run summary (also written to disk).

    Raises DiffPluginError when the run cannot start (no plugin, bad paths, models missing).
    """
    reporter = reporter or Reporter()
    started = time.perf_counter()
    if options.batch_size < 1 or options.steps < 1 or options.chain_steps < 1 or options.resolution < 8:
        raise DiffPluginError("--batch-size, --steps and --chain-steps must be >= 1 and --resolution >= 8")
    registry = Registry.load(options.registry)
    base_ids = (options.base_model or registry.base_model, options.clip_model or registry.clip_model)
    chooser = make_chooser(options, registry, base_ids[0])
    items, failures = collect_inputs(inputs, options.output_dir, options.suffix, options.ext, stdin)
    shard = Shard.current()
    items, failures = shard.take(items), (failures if shard.is_main else [])
    device = shard.device if shard.world > 1 and options.device == "auto" else options.device
    if not shard.is_main:
        reporter = _FailuresOnly(reporter)
    summary = RunSummary(
        output_dir=str(options.output_dir),
        inputs=len(items) + len(failures),
        started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        plugins=[{"name": p.name, "sha256": p.sha256, "init": p.init, "path": str(p.path)} for p in chooser.plugins],
        selection=chooser.selection.to_json() if chooser.selection else None,
        processes=shard.world,
        process=shard.rank,
    )
    for failure in failures:
        _fail(summary, reporter, failure["path"], failure["reason"])
    options.output_dir.mkdir(parents=True, exist_ok=True)
    if shard.is_main:  # one sweeper, before anyone writes: another process's temporaries are live
        sweep_stale_temporaries(options.output_dir)
    shard.barrier()

    loaded: list[DiffPluginPipeline] = [pipeline] if pipeline else []

    def get_pipeline() -> DiffPluginPipeline:
        """Models load on first need: a run with nothing left to do loads none."""
        if not loaded:
            pins = (None if options.base_model else registry.base_revision, None if options.clip_model else registry.clip_revision)
            loaded.append(pipeline_factory() if pipeline_factory else DiffPluginPipeline.from_pretrained(
                *base_ids, device, options.dtype, *pins, offload=options.offload, compile_unet=options.compile, channels_last=options.channels_last))
        return loaded[0]

    reporter.start(summary.inputs)
    reporter.advance(len(failures))
    try:
        with _InterruptGuard() as guard:
            for batch in _batches(_pending_images(items, chooser, get_pipeline, options, base_ids, summary, reporter), options):
                _process_batch(batch, get_pipeline(), options, base_ids, summary, reporter, guard)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        reporter.close()
        summary.seconds = round(time.perf_counter() - started, 3)
        name = SUMMARY_NAME if shard.world == 1 else f".diffplugin-run.process{shard.rank}.json"
        with atomic_path(options.output_dir / name) as tmp:
            tmp.write_text(json.dumps(summary.to_json(), indent=2) + "\n", encoding="utf-8")
    if shard.world > 1:
        shard.barrier()
        if shard.is_main:
            summary = _merge_process_summaries(options.output_dir, shard.world)
    return summary


def _merge_process_summaries(output_dir: Path, world: int) -> RunSummary:
    """One run summary from the per-process ones (which are then removed)."""
    parts = [output_dir / f".diffplugin-run.process{rank}.json" for rank in range(world)]
    loaded = [json.loads(part.read_text(encoding="utf-8")) for part in parts]
    fields = {name for name in RunSummary.__dataclass_fields__}
    merged = RunSummary(**{k: v for k, v in loaded[0].items() if k in fields})
    for other in loaded[1:]:
        for count in ("inputs", "processed", "skipped", "failed", "no_match"):
            setattr(merged, count, getattr(merged, count) + other[count])
        merged.failures += other["failures"]
        merged.outputs += other["outputs"]
        merged.interrupted = merged.interrupted or other["interrupted"]
        merged.seconds = max(merged.seconds, other["seconds"])
    with atomic_path(output_dir / SUMMARY_NAME) as tmp:
        tmp.write_text(json.dumps(merged.to_json(), indent=2) + "\n", encoding="utf-8")
    for part in parts:
        part.unlink()
    return merged


class _FailuresOnly(Reporter):
    """Other processes of a sharded run: their failures still print, the progress bar is the main one's."""

    def __init__(self, inner: Reporter):
        self.inner = inner

    def failure(self, path: str, reason: str) -> None:
        self.inner.failure(path, reason)


@dataclass
class _Pending:
    item: WorkItem
    image: LoadedImage
    request: dict
    size: tuple[int, int]
    plugins: list[TaskPlugin]
    selection: Selection | None
    clip_hidden: tuple[torch.Tensor, ...] | None


def _pending_images(items, chooser, get_pipeline, options, base_ids, summary, reporter) -> Iterator[_Pending]:
    """Load inputs one at a time, dropping bad ones and those already done (unless --overwrite).

    A generator, so a long run holds only the images of the batches being filled.
    """
    for item, image in _prefetched(items, options.max_pixels, depth=2 * options.batch_size):
        if isinstance(image, ImageError):
            _fail(summary, reporter, str(item.source), str(image))
            reporter.advance()
            continue
        choice = chooser.choose(image, get_pipeline)
        plugins = choice.plugins
        if not plugins:
            summary.no_match += 1
            reporter.advance()
            continue
        request = request_of(item, image.sha256, plugins, options, base_ids)
        if not options.overwrite and is_done(item, request):
            summary.skipped += 1
            reporter.advance()
            continue
        size = processed_size(*image.size, options.size_rule, options.resolution)
        yield _Pending(item, image, request, size, plugins, choice.selection, choice.clip_hidden)


def _prefetched(items: Sequence[WorkItem], max_pixels: int, depth: int) -> Iterator[tuple[WorkItem, LoadedImage | ImageError]]:
    """Decode the next inputs in a background thread while the current batch is processed."""
    loaded: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    stop = threading.Event()

    def work() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                try:
                    result: LoadedImage | ImageError = load_image(item.source, max_pixels)
                except ImageError as exc:
                    result = exc
                loaded.put((item, result))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            loaded.put(exc)
            return
        loaded.put(None)

    worker = threading.Thread(target=work, name="diffplugin-prefetch", daemon=True)
    worker.start()
    try:
        while (entry := loaded.get()) is not None:
            if isinstance(entry, BaseException):
                raise entry
            yield entry
    finally:
        stop.set()
        while worker.is_alive():  # unblock a worker waiting on a full queue
            with contextlib.suppress(queue.Empty):
                loaded.get(timeout=0.05)


def _batches(pending: Iterable[_Pending], options: RunOptions) -> Iterator[list[_Pending]]:
    """Group images of equal processed size and plugin chain, at most batch_size at a time."""
    buckets: dict[tuple, list[_Pending]] = {}
    for entry in pending:
        key = (entry.size, tuple(id(plugin) for plugin in entry.plugins))
        bucket = buckets.setdefault(key, [])
        bucket.append(entry)
        if len(bucket) == options.batch_size:
            yield buckets.pop(key)
    yield from buckets.values()


def _process_batch(batch, pipeline, options, base_ids, summary, reporter, guard) -> None:
    plugins = batch[0].plugins
    started = time.perf_counter()
    try:
        outputs = pipeline(
            [entry.image.rgb for entry in batch],
            plugins,
            [entry.request["seed"] for entry in batch],
            steps=options.steps,
            chain_steps=options.chain_steps,
            size_rule=options.size_rule,
            resolution=options.resolution,
            hidden_states=_batched_hidden_states(batch),
            tile_size=options.tile_size,
        )
    except (RuntimeError, ValueError) as exc:
        for entry in batch:
            _fail(summary, reporter, str(entry.item.source), f"processing failed ({str(exc).splitlines()[0]})")
            reporter.advance()
        return
    seconds = (time.perf_counter() - started) / len(batch)
    for entry, output in zip(batch, outputs):
        processed = output.size
        if options.keep_size and output.size != entry.image.size:
            output = output.resize(entry.image.size, Image.LANCZOS)
        sidecar = _sidecar(entry, output, processed, pipeline, options, base_ids, seconds)
        with guard.write():
            try:
                save_image(output, entry.image.alpha, entry.item.output)
                with atomic_path(entry.item.sidecar) as tmp:
                    tmp.write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
            except OSError as exc:
                _fail(summary, reporter, str(entry.item.source), f"cannot write {entry.item.output} ({exc.strerror or exc})")
            else:
                summary.processed += 1
                summary.outputs.append(str(entry.item.output))
            reporter.advance()


def _batched_hidden_states(batch: list[_Pending]) -> tuple[torch.Tensor, ...] | None:
    """The batch's CLIP hidden states if the chooser computed every image's, else None."""
    if any(entry.clip_hidden is None for entry in batch):
        return None
    return tuple(torch.cat(layer) for layer in zip(*(entry.clip_hidden for entry in batch)))


def _sidecar(entry: _Pending, output: Image.Image, processed: tuple[int, int], pipeline, options, base_ids, seconds) -> dict:
    """The per-output JSON record; its schema is documented in README (schema_version 1)."""
    request, plugins = entry.request, entry.plugins
    return {
        "schema_version": SIDECAR_SCHEMA_VERSION,
        "input": {"path": str(entry.item.source), "sha256": entry.image.sha256, "width": entry.image.size[0], "height": entry.image.size[1], "mode": entry.image.mode},
        "output": {"path": str(entry.item.output), "width": output.size[0], "height": output.size[1]},
        "plugins": [{"name": p.name, "sha256": p.sha256, "init": p.init, "steps": options.steps if i == 0 else options.chain_steps} for i, p in enumerate(plugins)],
        "selector": entry.selection.to_json() if entry.selection else None,
        "seed": request["seed"],
        "steps": options.steps,
        "chain_steps": options.chain_steps,
        "size_rule": options.size_rule,
        "resolution": options.resolution,
        "processed_size": list(processed),
        "original_size": list(entry.image.size),
        "dtype": str(pipeline.dtype).removeprefix("torch."),
        "device": str(pipeline.device),
        "base_model": base_ids[0],
        "clip_model": base_ids[1],
        "version": __version__,
        "seconds": round(seconds, 3),
        "vae_decode_fp32_retry": pipeline.decode_retried,
        "tiling": pipeline.last_tiling,
        "peak_memory_mib": peak_memory_mib(pipeline.device),
        "request": request,
    }


def peak_memory_mib(device) -> dict:
    """Peak memory so far: the process's resident set, and the GPU's allocations on CUDA."""
    import torch

    rss = None
    with contextlib.suppress(ImportError):
        import resource

        rss = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
    cuda = round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if getattr(device, "type", "") == "cuda" else None
    return {"rss": rss, "cuda": cuda}


def _fail(summary: RunSummary, reporter: Reporter, path: str, reason: str) -> None:
    summary.failed += 1
    summary.failures.append({"path": path, "reason": reason})
    reporter.failure(path, reason)
