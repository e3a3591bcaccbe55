"""Selector tasks behind `diffplugin select`, `train selector` and `eval selector`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

from . import __version__
from .errors import DiffPluginError, ImageError
from .registry import Registry, discover_plugins, find_plugin, plugin_search_path
from .selector import NULL_KEY, ReferenceSelector, Selection, SentenceEncoder, TextSelector, load_text_heads, save_heads, text_selector_dtype
from .selector_eval import evaluate, read_cases
from .selector_training import SHIPPED_MEMBERS, TrainConfig, corpus_labels, load_corpus, share_tuned_layers, train_text_selector


@dataclass
class SelectRequest:
    selector: str = "text"
    threshold: float = 0.0
    heads: str | os.PathLike | None = None
    plugin_dirs: Sequence[str | os.PathLike] = field(default_factory=list)
    base_model: str | None = None
    clip_model: str | None = None
    registry: str | os.PathLike | None = None
    dtype: str = "fp32"  # text selector: fp32 or bf16


def open_selector(request: SelectRequest, image: str | os.PathLike | None = None) -> Callable[[Sequence[str]], list[Selection]]:
    """A function instructions -> their Selections, with the models loaded once (the text selector scores them together).

    text: scores the installed plugins it knows, or every task it knows when none is installed.
    reference: needs the image, the authors' heads and the installed plugins (their F^p are keys).
    """
    registry = Registry.load(request.registry)
    dirs = plugin_search_path(request.plugin_dirs)
    installed = sorted(discover_plugins(dirs))
    if request.selector == "text":
        selector = TextSelector.from_file(request.heads, dtype=text_selector_dtype(request.dtype))
        known = [label for label in selector.labels if label != NULL_KEY]
        candidates = [name for name in installed if name in known] or known
        return lambda texts: selector.select_many(texts, candidates, request.threshold, registry.order)
    if request.selector != "reference":
        raise DiffPluginError(f"--selector {request.selector!r}: expected text or reference")
    if request.dtype != "fp32":
        raise DiffPluginError(f"--dtype {request.dtype}: text selector only (the reference selector runs in fp32, as the authors')")
    from .install import installed_selector

    heads = request.heads or installed_selector()
    if image is None or heads is None:
        raise DiffPluginError("--selector reference needs an IMAGE and the authors' heads (`diffplugin plugins install reference-selector` or --selector-heads PromptTunner.pt)")
    if not installed:
        raise DiffPluginError("--selector reference scores installed plugins; give --plugin-dir or set DIFFPLUGIN_PLUGIN_PATH")
    rgb = _load_rgb(image)  # a bad image fails before any model loads
    pipeline, plugins, base_model = _plugin_features(request, registry, dirs, installed)
    hidden = pipeline.clip_hidden_states([rgb])
    prompts = {name: pipeline.visual_prompt(plugin, hidden) for name, plugin in plugins.items()}
    selector = ReferenceSelector.from_pretrained(heads, base_model)
    return lambda texts: [selector.select(text, prompts, request.threshold, registry.order) for text in texts]


def instruction_batches(stream: BinaryIO, chunk_bytes: int = 1 << 16) -> Iterator[list[str]]:
    """Non-blank lines of a binary stream, in groups of the lines that were ready to read together.

    A pipe's backlog comes as one group, to be scored together; a line typed or sent alone comes
    alone, as soon as it ends, so `select -i -` answers a slow producer line by line. Bytes that
    are not UTF-8 are replaced, never fatal."""
    pending = b""
    while chunk := stream.read1(chunk_bytes):
        *lines, pending = (pending + chunk).split(b"\n")
        batch = [text for text in (line.decode("utf-8", "replace").rstrip("\r") for line in lines) if text.strip()]
        if batch:
            yield batch
    last = pending.decode("utf-8", "replace").rstrip("\r")
    if last.strip():
        yield [last]


def _plugin_features(request: SelectRequest, registry: Registry, dirs, installed: Sequence[str]):
    """What the reference selector's keys come from: the pipeline (CLIP vision, TPB) and the installed plugins."""
    from .pipeline import DiffPluginPipeline
    from .plugins import load_plugin

    base_model = request.base_model or registry.base_model
    pipeline = DiffPluginPipeline.from_pretrained(base_model, request.clip_model or registry.clip_model, "cpu", "fp32")
    return pipeline, {name: load_plugin(find_plugin(name, dirs), registry.entry(name)) for name in installed}, base_model


def _load_rgb(image: str | os.PathLike):
    from .images import load_image

    try:
        return load_image(image).rgb
    except ImageError as exc:
        raise DiffPluginError(f"{image}: {exc}") from None


def _provenance(texts, settings: TrainConfig, **extra: str) -> dict[str, str]:
    return ({"trained_with": f"diffplugin {__version__}", "corpus_texts": str(len(texts.texts))} | extra
            | {k: str(v) for k, v in vars(settings).items()})


def train_text_heads_file(out: str | os.PathLike, corpus: str | os.PathLike | None = None, log=None, members: int | None = None,
                          init: str | os.PathLike | None = None, **config) -> Path:
    """Train the text selector and write its heads (with provenance) to `out`.

    `members` (default: as many as the shipped heads) > 1 trains that many heads, with seeds seed,
    seed + 1, ..., each exactly as a single run with that seed, and writes them as one ensemble
    whose scores are averaged: one run's errors depend on its seed (the order of its batches), and
    the mean of several runs depends on it less. With `share_layers` (default) the members then
    share the mean of their tuned layers (`share_tuned_layers`).

    `init` (a heads file, or "shipped") fine-tunes its members, member i from its member i, instead
    of training from scratch: a few hundred steps at a low learning rate move the choices far less
    than a new run does, so phrasings added to the corpus can be taught without retraining."""
    starts = _initial_heads(init, members, config)
    members = len(starts) if starts else (SHIPPED_MEMBERS if members is None else members)
    if members < 1:
        raise DiffPluginError(f"--members {members}: expected 1 or more")
    first = TrainConfig(**config)
    encoder = SentenceEncoder()
    trained, sizes = [], []
    for member in range(members):
        settings = replace(first, seed=first.seed + member)
        texts = load_corpus(corpus, seed=settings.seed)
        if starts and list(starts[member].config.labels) != corpus_labels(texts):
            raise DiffPluginError(f"--init {init}: its heads have labels {', '.join(starts[member].config.labels)}; "
                                  f"the corpus has {', '.join(corpus_labels(texts))}")
        member_log = log and (lambda step, loss, done=member * settings.steps: log(done + step, loss))
        trained.append(train_text_selector(texts, encoder, settings, member_log, init=starts[member] if starts else None))
        sizes.append(str(len(texts.texts)))
    if first.share_layers and members > 1:
        share_tuned_layers(trained)
    provenance = _provenance(texts, first, members=str(members), corpus_texts=",".join(sizes)) | ({"init": str(init)} if init else {})
    return save_heads(trained, out, provenance)


def _initial_heads(init: str | os.PathLike | None, members: int | None, config: dict) -> list:
    """The members `init` holds (none without it). The fine-tuned heads keep its tuned layers and null
    margin: `config` gets them (so the provenance records them), and flags asking otherwise are refused."""
    if init is None:
        return []
    starts = load_text_heads(None if str(init) == "shipped" else init)
    if members not in (None, len(starts)):
        raise DiffPluginError(f"--members {members}: --init {init} holds {len(starts)} heads, and each member starts from one")
    kept = {"tuned_layers": starts[0].config.tuned_layers, "null_margin": starts[0].config.null_margin}
    for name, value in kept.items():
        if config.get(name, value) != value:
            raise DiffPluginError(f"--{name.replace('_', '-')} {config[name]:g}: fine-tuned heads keep those of --init {init} ({value:g})")
    config.update(kept)
    return starts


def train_reference_heads_file(out: str | os.PathLike, images: str | os.PathLike, request: SelectRequest, corpus: str | os.PathLike | None = None,
                               log=None, **config) -> Path:
    """Train the authors' selector heads from scratch, as the paper: the installed plugins' max-pooled F^p
    of each image in `images` are the pseudo-labelled keys, the corpus texts (pooled by the base text
    encoder) the queries. Writes safetensors that `--selector-heads` loads."""
    import torch

    from .images import images_by_name
    from .selector import load_base_text_encoder, plugin_key, pooled_text
    from .selector_training import train_reference_selector

    # The reference selector tunes no encoder and gates at null as the authors (recorded in provenance).
    settings = TrainConfig(**config, tuned_layers=0, null_margin=0.0)
    registry = Registry.load(request.registry)
    dirs = plugin_search_path(request.plugin_dirs)
    installed = sorted(discover_plugins(dirs))
    if not installed:
        raise DiffPluginError("training the reference selector needs installed plugins; give --plugin-dir or set DIFFPLUGIN_PLUGIN_PATH")
    texts = load_corpus(corpus, tasks=installed, seed=settings.seed)
    missing = sorted(set(installed) - set(texts.labels))
    if missing:
        raise DiffPluginError(f"no training texts for plugin(s) {', '.join(missing)}: add <plugin>.txt to the corpus (--corpus)")
    paths = sorted(images_by_name(images).values())
    if not paths:
        raise DiffPluginError(f"{images}: no images to take the plugins' F^p from")
    pipeline, plugins, base_model = _plugin_features(request, registry, dirs, installed)
    keys: dict[str, list] = {name: [] for name in installed}
    for path in paths:
        hidden = pipeline.clip_hidden_states([_load_rgb(path)])
        for name, plugin in plugins.items():
            keys[name].append(plugin_key(pipeline.visual_prompt(plugin, hidden)))
    tokenizer, text_encoder = load_base_text_encoder(base_model)
    embeddings = torch.cat([pooled_text(tokenizer, text_encoder, texts.texts[i:i + 256]) for i in range(0, len(texts.texts), 256)])
    null = pooled_text(tokenizer, text_encoder, [" "])[0]
    heads = train_reference_selector(texts, {name: torch.stack(rows) for name, rows in keys.items()}, null, embeddings, settings, log)
    return save_heads(heads, out, _provenance(texts, settings, images=str(len(paths)), plugins=",".join(installed), base_model=base_model))


def evaluate_text_selector(cases_path: str | os.PathLike, heads: str | os.PathLike | None = None, threshold: float = 0.0,
                           dtype: str = "fp32") -> dict:
    cases = read_cases(cases_path)
    selector = TextSelector.from_file(heads, dtype=text_selector_dtype(dtype))
    classes = [label for label in selector.labels if label != NULL_KEY]
    report = evaluate(cases, selector.raw_scores_many, classes, threshold)
    return {"selector": "text", "heads": str(heads or "shipped"), "dtype": dtype, "threshold": threshold, "cases": str(cases_path), "metrics": report}
