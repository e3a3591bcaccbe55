"""Training the Plugin-Selector heads with the paper's contrastive loss (Eq. 6).

Each step samples B anchors (a label's key: a learned key for the text selector, a plugin's
max-pooled F^p of some image for the reference one), one positive text of the anchor's label and
N negative texts of other labels, and minimises -log softmax(cos / tau)[positive]. `null` is a
label like the tasks: its texts are out-of-scope requests and negated clauses ("keep the snow"),
which is what teaches "none" and mixed requests. A binary cross-entropy term on the scores
against every label calibrates the decision at threshold 0 (Eq. 6 alone ranks, it does not place
the zero). The sentence encoder is frozen, so texts are embedded once and training is cheap.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .selector import NULL_KEY, SentenceEncoder, TextSelectorHeads

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PREFIXES = ("", "please ", "can you ", "could you ", "i want to ", "i'd like to ", "help me ", "i need you to ")
TEMPLATE_FILES = ("none", "negation", "inverse")
SUFFIXES = ("", " please", " in this photo", " from the image", " for me", " in the picture")


@dataclass
class LabelledTexts:
    texts: list[str]
    labels: list[str]


def packaged_corpus() -> Path:
    return Path(str(resources.files("diffplugin_cli") / "selector_corpus"))


def load_corpus(folder: str | Path | None = None, tasks: Sequence[str] | None = None, variants: int = 4, seed: int = 0) -> LabelledTexts:
    """Clause-level training texts: `<task>.txt` (one phrasing a line), and, all labelled null,
    `none.txt` (out-of-scope requests) and `negation.txt`/`inverse.txt` templates x `objects.toml`
    ("keep the snow", "add fog"). Each of those phrasings gets `variants` random prefix/suffix
    variants. Then the compositional phrasings of `vocabulary.toml`, as they are."""
    folder = Path(folder) if folder else packaged_corpus()
    rng = random.Random(seed)
    tasks = list(tasks) if tasks else sorted(p.stem for p in folder.glob("*.txt") if p.stem not in TEMPLATE_FILES)
    corpus = LabelledTexts([], [])

    def add(text: str, label: str) -> None:
        forms = {text} | {f"{rng.choice(PREFIXES)}{text}{rng.choice(SUFFIXES)}".strip() for _ in range(variants)}
        for form in sorted(forms):
            corpus.texts.append(form)
            corpus.labels.append(label)

    for task in tasks:
        for line in _lines(folder / f"{task}.txt"):
            add(line, task)
    for line in _lines(folder / "none.txt"):
        add(line, NULL_KEY)
    objects = tomllib.loads((folder / "objects.toml").read_text(encoding="utf-8")) if (folder / "objects.toml").is_file() else {}
    for template in _lines(folder / "negation.txt") + _lines(folder / "inverse.txt"):
        for task in tasks:
            for word in objects.get(task, ()):
                add(template.format(obj=word), NULL_KEY)
    if (folder / "vocabulary.toml").is_file():
        vocabulary = tomllib.loads((folder / "vocabulary.toml").read_text(encoding="utf-8"))
        for text, label in compose_vocabulary(vocabulary, tasks, rng):
            corpus.texts.append(text)
            corpus.labels.append(label)
    return corpus


def compose_vocabulary(vocabulary: dict, tasks: Sequence[str], rng: random.Random) -> list[tuple[str, str]]:
    """`vocabulary.toml` filled into its templates: every verb with every word of a task (one random
    template each), a few random templates per noun and adjective, and the null inverse edits."""
    templates, verbs = vocabulary["templates"], vocabulary["verbs"]
    pairs: list[tuple[str, str]] = []
    for task in tasks:
        words = vocabulary.get("tasks", {}).get(task)
        if not words:
            continue
        for verb in verbs[words["verbs"]]:
            for noun in words["nouns"]:
                pairs.append((rng.choice(templates["act"]).format(verb=verb, noun=noun), task))
        for noun in words["nouns"] if words["verbs"] == "remove" else ():
            pairs += [(template.format(noun=noun), task) for template in rng.sample(templates["describe"], 3)]
        for kind, count in (("bad", 3), ("good", 2)):
            for adjective in words.get(kind, ()):
                pairs += [(template.format(adj=adjective), task) for template in rng.sample(templates[kind], count)]
    for adjective in vocabulary.get("inverse", {}).get("adjectives", ()):
        pairs += [(template.format(adj=adjective), NULL_KEY) for template in templates["inverse"]]
    return pairs


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and not line.startswith("#")]


@dataclass
class TrainConfig:
    steps: int = 1500
    batch_size: int = 32
    negatives: int = 7
    temperature: float = 0.07
    lr: float = 1e-3
    weight_decay: float = 0.01
    calibration_weight: float = 1.0
    seed: int = 0


def contrastive_step(
    similarity: Callable[[list[int], torch.Tensor], torch.Tensor],
    text_embeddings: torch.Tensor,
    by_label: dict[int, list[int]],
    config: TrainConfig,
    rng: random.Random,
) -> torch.Tensor:
    """Eq. 6 over one batch: anchors of random labels, 1 positive + N negatives each."""
    labels = list(by_label)
    anchors, candidates = [], []
    for _ in range(config.batch_size):
        label = rng.choice(labels)
        others = [i for other in labels if other != label for i in by_label[other]]
        anchors.append(label)
        candidates.append([rng.choice(by_label[label])] + rng.sample(others, min(config.negatives, len(others))))
    width = min(len(c) for c in candidates)
    texts = torch.tensor([c[:width] for c in candidates])  # [B, 1 + N]
    cos = similarity(anchors, text_embeddings[texts.reshape(-1)]).reshape(len(anchors), len(anchors), width)
    own = cos[torch.arange(len(anchors)), torch.arange(len(anchors))]  # each anchor against its own texts
    return F.cross_entropy(own / config.temperature, torch.zeros(len(anchors), dtype=torch.long))


def train_text_selector(
    corpus: LabelledTexts,
    encoder: SentenceEncoder,
    config: TrainConfig = TrainConfig(),
    log: Callable[[int, float], None] | None = None,
) -> TextSelectorHeads:
    """Train the text selector's heads from scratch on `corpus` (labels: tasks and null)."""
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    names = sorted(set(corpus.labels) - {NULL_KEY}) + [NULL_KEY]
    index = {name: i for i, name in enumerate(names)}
    embeddings = encoder(corpus.texts)
    targets = torch.tensor([index[label] for label in corpus.labels])
    by_label = {i: (targets == i).nonzero().flatten().tolist() for i in range(len(names))}
    heads = TextSelectorHeads(labels=tuple(names), text_dim=embeddings.shape[1]).train()
    with torch.no_grad():  # start each key at its label's prototype
        heads.label_keys.copy_(torch.stack([F.normalize(embeddings[by_label[i]].mean(0), dim=0) for i in range(len(names))]))
    optimizer = torch.optim.AdamW(heads.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def similarity(anchor_labels: list[int], texts: torch.Tensor) -> torch.Tensor:
        keys = F.normalize(heads.label_keys[torch.tensor(anchor_labels)], dim=-1)
        return keys @ F.normalize(heads.project(texts), dim=-1).T  # [A, T]

    for step in range(1, config.steps + 1):
        loss = contrastive_step(similarity, embeddings, by_label, config, rng)
        if config.calibration_weight:  # texts drawn label-balanced, so the large null class does not dominate
            batch = torch.tensor([rng.choice(by_label[rng.randrange(len(names))]) for _ in range(config.batch_size * 4)])
            scores = heads(embeddings[batch])
            loss = loss + config.calibration_weight * F.binary_cross_entropy_with_logits(scores, F.one_hot(targets[batch], len(names)).float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if log and (step % 50 == 0 or step == config.steps):
            log(step, loss.item())
    return heads.eval().requires_grad_(False)
