"""Training the Plugin-Selector heads with the paper's contrastive loss (Eq. 6).

Each step samples B anchors (a label's key: a learned key for the text selector, a plugin's
max-pooled F^p of some image for the reference one), one positive text of the anchor's label and
N negative texts of other labels, and minimises -log softmax(cos / tau)[positive]. `null` is a
label like the tasks: its texts are out-of-scope requests and negated clauses ("keep the snow"),
which is what teaches "none" and mixed requests. A compound clause naming two damages ("the snowy
photo is too dark") carries both labels (`desnow+lowlight`): it is a positive of each and a negative
of neither. A binary cross-entropy term on the scores
against every label calibrates the decision at threshold 0 (Eq. 6 alone ranks, it does not place
the zero). Text selector: the sentence encoder is frozen below a fine-tuned copy of its top
layer, so the frozen token states are computed once and each step runs one transformer layer over
its texts. Reference selector: as the paper, only proj_v, proj_t and logit_scale learn; the base
text encoder's pooled outputs and the plugins' F^p are computed once.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .selector import NULL_KEY, PromptTuner, SentenceEncoder, TextSelectorHeads, cosine_scores

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PREFIXES = ("", "please ", "can you ", "could you ", "i want to ", "i'd like to ", "help me ", "i need you to ")
TEMPLATE_FILES = ("none", "negation", "inverse")
LAYER_CONFIG_KEYS = ("hidden_size", "num_attention_heads", "intermediate_size", "hidden_act", "layer_norm_eps",
                     "hidden_dropout_prob", "attention_probs_dropout_prob")  # what a copy of an encoder layer needs
SUFFIXES = ("", " please", " in this photo", " from the image", " for me", " in the picture")
LABEL_JOIN = "+"  # a text of several labels carries them joined: "desnow+lowlight"


def label_parts(label: str) -> list[str]:
    return label.split(LABEL_JOIN)


@dataclass
class LabelledTexts:
    """Training texts, each with its label and the generator it came from (`sources`: a corpus file,
    a template kind of `vocabulary.toml`; empty when unknown), by which training draws (`LabelPool`)."""
    texts: list[str]
    labels: list[str]
    sources: list[str] = field(default_factory=list)


def packaged_corpus() -> Path:
    return Path(str(resources.files("diffplugin_cli") / "selector_corpus"))


def load_corpus(folder: str | Path | None = None, tasks: Sequence[str] | None = None, variants: int = 4, seed: int = 0) -> LabelledTexts:
    """Clause-level training texts: `<task>.txt` (one phrasing a line), and, all labelled null,
    `none.txt` (out-of-scope requests) and `negation.txt`/`inverse.txt` templates x `objects.toml`
    ("keep the snow", "add fog"). Each of those phrasings gets `variants` random prefix/suffix
    variants. Then the compositional phrasings of `vocabulary.toml`, as they are."""
    folder = Path(folder) if folder else packaged_corpus()
    tasks = list(tasks) if tasks else sorted(p.stem for p in folder.glob("*.txt") if p.stem not in TEMPLATE_FILES)
    corpus = LabelledTexts([], [])

    def add(text: str, label: str, source: str) -> None:
        rng = random.Random(f"{seed}:{label}:{text}")  # each line's variants stay put when other lines change
        forms = {text} | {f"{rng.choice(PREFIXES)}{text}{rng.choice(SUFFIXES)}".strip() for _ in range(variants)}
        for form in sorted(forms):
            corpus.texts.append(form)
            corpus.labels.append(label)
            corpus.sources.append(source)

    for task in tasks:
        for line in _lines(folder / f"{task}.txt"):
            add(line, task, f"{task}.txt")
    for line in _lines(folder / "none.txt"):
        add(line, NULL_KEY, "none.txt")
    objects = tomllib.loads((folder / "objects.toml").read_text(encoding="utf-8")) if (folder / "objects.toml").is_file() else {}
    for name in ("negation.txt", "inverse.txt"):
        for template in _lines(folder / name):
            for task in tasks:
                for word in objects.get(task, ()):
                    add(template.format(obj=word), NULL_KEY, name)
    if (folder / "vocabulary.toml").is_file():
        vocabulary = tomllib.loads((folder / "vocabulary.toml").read_text(encoding="utf-8"))
        for text, label, source in compose_vocabulary(vocabulary, tasks, seed):
            corpus.texts.append(text)
            corpus.labels.append(label)
            corpus.sources.append(f"vocabulary:{source}")
    return corpus


def compose_vocabulary(vocabulary: dict, tasks: Sequence[str], seed: int = 0) -> list[tuple[str, str, str]]:
    """`vocabulary.toml` filled into its templates: every verb with every word of a task (one random
    template each), a few random templates per noun, adjective, task name and fix; labelled null, the
    same words in refusals ("keep it dark", "no dehazing"), the inverse edits ("make it foggy") and
    the out-of-scope edits. Each text comes as (text, label, template kind).

    Each word draws its templates from its own seeded generator, so editing one list of the file
    leaves the phrasings of every other word as they were."""
    templates, verbs = vocabulary["templates"], vocabulary["verbs"]

    def fill(kind: str, count: int, label: str, key: str, **words: str) -> list[tuple[str, str, str]]:
        chosen = random.Random(f"{seed}:{kind}:{key}").sample(templates[kind], count)
        return [(template.format(**words), label, kind) for template in chosen]

    def with_bare(drawn: list[tuple[str, str, str]], **word: str) -> list[tuple[str, str, str]]:
        """The drawn texts, plus the plain form ([templates] `bare`, optional) of each of their kinds that has one and the draws left out."""
        plain = templates.get("bare", {})
        bare = [(plain[kind].format(**word), label, kind) for kind, label in {text_kind: label for _, label, text_kind in drawn}.items() if kind in plain]
        return drawn + [pair for pair in bare if pair not in drawn]

    pairs: list[tuple[str, str, str]] = []
    for task in tasks:
        words = vocabulary.get("tasks", {}).get(task)
        if not words:
            continue
        task_verbs = verbs[words["verbs"]]
        for verb in task_verbs:
            for noun in words["nouns"]:
                pairs += fill("act", 1, task, f"{verb}:{noun}", verb=verb, noun=noun)
        for noun in words["nouns"] if words["verbs"] == "remove" else ():
            pairs += fill("describe", 3, task, noun, noun=noun)
        for kind, count in (("bad", 3), ("good", 2), ("damaged", 2)):
            for adjective in words.get(kind, ()):
                pairs += fill(kind, count, task, adjective, adj=adjective)
        # the damaged photo asked to become good, "make the dark photo brighter": without these the
        # damage word after "make the" reads as the inverse edit ("make it dark", null)
        attributes = vocabulary.get("compound", {}).get("attributes", {}).get(task, ())
        for adjective in words.get("good", ()) if attributes and "mend" in templates else ():
            attribute = random.Random(f"{seed}:mend-attribute:{task}:{adjective}").choice(attributes)
            pairs += fill("mend", 2, task, f"{task}:{adjective}", adj=adjective, attr=attribute)
        # the same words refused, null: "keep it dark", "without making it brighter", "don't restore the face"
        for kind, refusals in (("bad", "keep"), ("good", "refuse")):
            for adjective in words.get(kind, ()):
                pairs += fill(refusals, 3, NULL_KEY, adjective, adj=adjective)
        for noun in words["nouns"]:
            verb = random.Random(f"{seed}:spare-verb:{noun}").choice(task_verbs)
            pairs += fill("spare", 4, NULL_KEY, noun, noun=noun, verb=verb)
        # the task by name, asked for and refused: "de-snow it" / "do not desnow the photo", "snow removal please" / "no dehazing"
        for name in words.get("names", ()):
            pairs += with_bare(fill("name", 2, task, name, name=name) + fill("decline", 2, NULL_KEY, name, name=name), name=name)
        for fix in words.get("fixes", ()):
            pairs += with_bare(fill("want", 2, task, fix, fix=fix) + fill("skip", 2, NULL_KEY, fix, fix=fix), fix=fix)
        pairs += compose_subjects(vocabulary, task, words, seed) + compose_places(vocabulary, task, words, seed)
        # edits a task makes that its nouns do not say: lowlight lifts the shadows ("open up the shadows")
        if "edits" in words:
            pairs += compose_edits(vocabulary, words["edits"], task, seed)
    pairs += compose_compounds(vocabulary, tasks, seed)
    for adjective in vocabulary.get("inverse", {}).get("adjectives", ()):
        pairs += [(template.format(adj=adjective), NULL_KEY, "inverse") for template in templates["inverse"]]
    edits = vocabulary.get("edits", {})
    for group in (value for value in edits.values() if isinstance(value, dict)):
        pairs += compose_edits(vocabulary, group, NULL_KEY, seed)
    # the edits of `edit_groups` once more with a position in the frame: "remove the car on the left"
    places = vocabulary.get("places", {})
    for name in places.get("edit_groups", ()):
        for thing in edits[name]["things"]:
            rng = random.Random(f"{seed}:edit-place:{name}:{thing}")
            pairs.append((rng.choice(templates["edit_place"]).format(verb=rng.choice(edits[name]["verbs"]), thing=thing,
                                                                     place=rng.choice(places["frame"])), NULL_KEY, "edit_place"))
    return pairs


def compose_edits(vocabulary: dict, group: dict, label: str, seed: int = 0) -> list[tuple[str, str, str]]:
    """An edit group (`verbs` x `things`) in the `[edits]` templates, one random template each, and each
    thing once more in a photo of a subject, so a subject cues no label: "add a hat in the photo of
    the bride". Out-of-scope groups are labelled null, a task's own group with the task."""
    templates, everyone = vocabulary["edits"]["templates"], subject_pool(vocabulary.get("subjects", {}))
    pairs = []
    for verb in group["verbs"]:
        for thing in group["things"]:
            template = random.Random(f"{seed}:edit:{verb}:{thing}").choice(templates)
            pairs.append((template.format(verb=verb, thing=thing), label, "edit"))
    for thing in group["things"] if everyone else ():
        rng = random.Random(f"{seed}:edit-subject:{thing}")
        subject = rng.choice(everyone)
        template = rng.choice(vocabulary["templates"]["edit_subject"])
        pairs.append((template.format(verb=rng.choice(group["verbs"]), thing=thing, subject=subject), label, "edit_subject"))
    return pairs


def subject_pool(subjects: dict[str, list[str]], groups: Sequence[str] | None = None) -> list[str]:
    """The subjects of the named `[subjects]` groups (all of them, in file order, when none are named)."""
    return [subject for group in (groups if groups is not None else subjects) for subject in subjects[group]]


def compose_subjects(vocabulary: dict, task: str, words: dict, seed: int = 0) -> list[tuple[str, str, str]]:
    """The task's words in a photo of a subject ("derain the picture of the harbour", "the photo of
    the bride is pixelated in the face"), and the same with the damage kept (null: "the fog over the
    bridge can stay"). Users name what their photo shows; without these the heads meet subjects only
    in out-of-scope edits ("change the text on the sign") and read them as "none". One template and
    one subject per word, each from a generator seeded with the word, among the subject groups the
    task names (`subjects = ["people"]` for face; all groups when it names none). A bare task name
    takes every template, each with its own subject: "deblur the picture of the license plate" is a
    common way to ask, and one text per name left the heads reading such requests as "none"."""
    subjects = vocabulary.get("subjects")
    if not subjects:
        return []
    templates, removal = vocabulary["templates"], words["verbs"] == "remove"
    pool = subject_pool(subjects, words.get("subjects"))
    task_verbs = vocabulary["verbs"][words["verbs"]]

    def fill(kind: str, label: str, key: str, **slots: str) -> tuple[str, str, str]:
        rng = random.Random(f"{seed}:{kind}:{task}:{key}")
        return rng.choice(templates[kind]).format(subject=rng.choice(pool), **slots), label, kind

    pairs = []
    for noun in words["nouns"]:
        verb = random.Random(f"{seed}:subject-verb:{noun}").choice(task_verbs)
        pairs.append(fill("act_subject", task, noun, verb=verb, noun=noun))
        if removal:
            pairs += [fill("describe_subject", task, noun, noun=noun), fill("spare_subject", NULL_KEY, noun, noun=noun)]
    for name in words.get("names", ()):
        for template in templates["name_subject"]:
            rng = random.Random(f"{seed}:name_subject:{task}:{name}:{template}")
            pairs.append((template.format(name=name, subject=rng.choice(pool)), task, "name_subject"))
    for adjective in words.get("bad", ()):
        pairs += [fill("bad_subject", task, adjective, adj=adjective), fill("keep_subject", NULL_KEY, adjective, adj=adjective)]
    return pairs


def compose_places(vocabulary: dict, task: str, words: dict, seed: int = 0) -> list[tuple[str, str, str]]:
    """The task's nouns with where the damage sits: a position in the frame ("remove the rain on the
    left") or, for removal tasks, a relation to a subject ("the fog hanging over the harbour is too
    strong"); kept, null ("the glare on the left can stay"). The corpus's other place phrases are in
    out-of-scope edits ("remove the man on the left"), so without these a position reads as "none".
    Two asked-for texts per noun, and for removal tasks one describing and one kept, each with its
    own template and place from a generator seeded with the noun. A task's own `spots` (highlight:
    "on his forehead") are where only its damage sits; drawn among hundreds of places they would
    hardly come up, so each noun takes the same kinds once more with one of them."""
    places = vocabulary.get("places")
    if not places:
        return []
    templates, removal = vocabulary["templates"], words["verbs"] == "remove"
    spots = list(places["frame"])
    if removal:
        pool = subject_pool(vocabulary.get("subjects", {}), words.get("subjects"))
        spots += [f"{relation} {subject}" for relation in places["relations"] for subject in pool]
    task_verbs = vocabulary["verbs"][words["verbs"]]
    kinds = [("act_place", task), ("act_place", task)] + ([("describe_place", task), ("spare_place", NULL_KEY)] if removal else [])
    pairs = []
    pools = [("place", spots)] + ([("spot", words["spots"])] if words.get("spots") else [])
    for noun in words["nouns"]:
        for pool_name, pool in pools:
            rng = random.Random(f"{seed}:{pool_name}:{task}:{noun}")
            for kind, label in kinds:
                text = rng.choice(templates[kind]).format(verb=rng.choice(task_verbs), noun=noun, place=rng.choice(pool))
                pairs.append((text, label, kind))
    return pairs


def compose_compounds(vocabulary: dict, tasks: Sequence[str], seed: int = 0) -> list[tuple[str, str, str]]:
    """`[compound]` of `vocabulary.toml`: clauses that name two damages at once, labelled with both
    tasks. The clause splitter cannot separate "the snowy photo is too dark", so the heads must learn
    that one clause can ask for two plugins. Each attribute of a task (snowy) goes with every other
    task, in `per_pair` random templates that task's words can fill: its `bad` adjectives ("is
    {bad}"), the nouns of a removal task ("has {noun} too") or its fixes ("needs {fix}")."""
    compound = vocabulary.get("compound")
    if not compound:
        return []
    words = vocabulary.get("tasks", {})
    pairs: list[tuple[str, str, str]] = []
    for first in tasks:
        for attribute in compound["attributes"].get(first, ()):
            for second in (task for task in tasks if task != first and task in words):
                rng = random.Random(f"{seed}:compound:{attribute}:{second}")
                fillers = {"bad": words[second].get("bad", ()), "fix": words[second].get("fixes", ()),
                           "noun": words[second]["nouns"] if words[second]["verbs"] == "remove" else ()}
                usable = [t for t in compound["templates"] if all(fillers[key] for key in fillers if f"{{{key}}}" in t)]
                for template in rng.sample(usable, min(compound["per_pair"], len(usable))):
                    text = template.format(attr=attribute, **{key: rng.choice(values) for key, values in fillers.items() if values})
                    pairs.append((text, LABEL_JOIN.join(sorted((first, second))), "compound"))
    return pairs


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and not line.startswith("#")]


SHIPPED_MEMBERS = 3  # training runs (seeds 0, 1, 2) averaged in the shipped text heads


def shipped_training_texts(folder: str | Path | None = None) -> set[str]:
    """Every text, lower-cased, that the shipped members train on: member i draws the corpus with
    seed i, whose prefix/suffix variants differ, so one seed's corpus misses some of them."""
    return {text.lower() for seed in range(SHIPPED_MEMBERS) for text in load_corpus(folder, seed=seed).texts}


@dataclass
class TrainConfig:
    steps: int = 800
    batch_size: int = 32
    negatives: int = 7
    temperature: float = 0.07
    lr: float = 1e-3
    tuned_layers: int = 3
    tuned_lr: float = 5e-5
    weight_decay: float = 0.01
    calibration_weight: float = 1.0
    null_margin: float = 1.0  # written into the text heads; gates scores, not used in training
    share_layers: bool = True  # ensembles: the members take the mean of their tuned layers (see share_tuned_layers)
    seed: int = 0


def negatives_by_label(by_label: dict[int, list[int]]) -> dict[int, list[int]]:
    """Each label's candidate negatives: the texts of the other labels, each once, none of its own
    (a compound text of this label is never its negative). Computed once, sampled every step."""
    negatives = {}
    for label, texts in by_label.items():
        own = set(texts)
        negatives[label] = list(dict.fromkeys(i for other in by_label if other != label for i in by_label[other] if i not in own))
    return negatives


@dataclass
class LabelPool:
    """One label's texts grouped by source. `draw` picks a source with probability proportional to
    the square root of its size, then one of its texts: drawn uniformly over the label, null's 34
    "don't dehaze it" refusals would meet the loss about a sixth as often, since its 6766 "leave
    the snow alone"/"add snow" template texts would take two thirds of its draws."""
    groups: list[list[int]]

    def __post_init__(self) -> None:
        self.cumulative = list(itertools.accumulate(math.sqrt(len(group)) for group in self.groups))

    def draw(self, rng: random.Random) -> int:
        group = self.groups[0] if len(self.groups) == 1 else rng.choices(self.groups, cum_weights=self.cumulative)[0]
        return rng.choice(group)


def source_pools(corpus: LabelledTexts, by_label: dict[int, list[int]]) -> dict[int, LabelPool]:
    """Each label's `LabelPool` (one group when the corpus has no sources)."""
    sources = corpus.sources or [""] * len(corpus.texts)
    pools = {}
    for label, texts in by_label.items():
        groups: dict[str, list[int]] = {}
        for i in texts:
            groups.setdefault(sources[i], []).append(i)
        pools[label] = LabelPool(list(groups.values()))
    return pools


def contrastive_step(
    similarity: Callable[[list[int], list[int]], torch.Tensor],
    pools: dict[int, LabelPool],
    negatives: dict[int, list[int]],
    config: TrainConfig,
    rng: random.Random,
) -> torch.Tensor:
    """Eq. 6 over one batch: anchors of random labels, 1 positive (`LabelPool.draw`) + N negatives each.

    `similarity(anchor_labels, text_indices)` gives cos(anchor key, text) [A, T]."""
    labels = list(pools)
    anchors, candidates = [], []
    for _ in range(config.batch_size):
        label = rng.choice(labels)
        others = negatives[label]
        anchors.append(label)
        candidates.append([pools[label].draw(rng)] + rng.sample(others, min(config.negatives, len(others))))
    width = min(len(c) for c in candidates)
    texts = [i for c in candidates for i in c[:width]]  # [B * (1 + N)]
    cos = similarity(anchors, texts).reshape(len(anchors), len(anchors), width)
    own = cos[torch.arange(len(anchors)), torch.arange(len(anchors))]  # each anchor against its own texts
    return F.cross_entropy(own / config.temperature, torch.zeros(len(anchors), dtype=torch.long))


class CachedStates:
    """The frozen encoder's token states of every corpus text, computed once; batches are padded on demand."""

    def __init__(self, encoder: SentenceEncoder, texts: Sequence[str], below_top: int, chunk: int = 256):
        self.states: list[torch.Tensor] = []
        for start in range(0, len(texts), chunk):
            states, mask = encoder.token_states(texts[start:start + chunk], below_top)
            self.states += [row[: int(length)].clone() for row, length in zip(states, mask.sum(1))]

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.states[i] for i in indices]
        states = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(row), dtype=torch.long) for row in rows], batch_first=True)
        return states, mask


def selector_loss(
    similarity: Callable[[list[int], list[int]], torch.Tensor],
    scores: Callable[[list[int]], torch.Tensor],
    pools: dict[int, LabelPool],
    negatives: dict[int, list[int]],
    targets: torch.Tensor,
    config: TrainConfig,
    rng: random.Random,
) -> torch.Tensor:
    """Eq. 6 plus the calibration term: BCE of `scores(texts)` [T, labels] against each text's labels
    (`targets`, multi-hot), on texts drawn label-balanced (then by source, `LabelPool.draw`), so the
    large null class does not dominate."""
    loss = contrastive_step(similarity, pools, negatives, config, rng)
    if config.calibration_weight:
        texts = [pools[rng.randrange(len(pools))].draw(rng) for _ in range(config.batch_size * 4)]
        loss = loss + config.calibration_weight * F.binary_cross_entropy_with_logits(scores(texts), targets[texts])
    return loss


def optimise(groups: list[dict], step_loss: Callable[[], torch.Tensor], config: TrainConfig, log: Callable[[int, float], None] | None) -> None:
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    for step in range(1, config.steps + 1):
        loss = step_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if log and (step % 50 == 0 or step == config.steps):
            log(step, loss.item())


def label_index(corpus: LabelledTexts, names: Sequence[str]) -> tuple[torch.Tensor, dict[int, list[int]]]:
    """Each text's labels as a multi-hot row [texts, labels], and the texts of each label."""
    index = {name: i for i, name in enumerate(names)}
    targets = torch.zeros(len(corpus.labels), len(names))
    for row, label in enumerate(corpus.labels):
        targets[row, [index[part] for part in label_parts(label)]] = 1.0
    return targets, {i: targets[:, i].nonzero().flatten().tolist() for i in range(len(names))}


def corpus_labels(corpus: LabelledTexts) -> list[str]:
    """The text heads' labels for `corpus`: its tasks sorted, then null."""
    return sorted({part for label in corpus.labels for part in label_parts(label)} - {NULL_KEY}) + [NULL_KEY]


def new_text_heads(encoder: SentenceEncoder, names: list[str], config: TrainConfig, cache: CachedStates,
                   by_label: dict[int, list[int]]) -> TextSelectorHeads:
    """Fresh heads: tuned layers copied from the encoder's top ones, each key at its label's prototype."""
    encoder_config = {key: getattr(encoder.model.config, key) for key in LAYER_CONFIG_KEYS} if config.tuned_layers else None
    heads = TextSelectorHeads(labels=tuple(names), text_dim=encoder.model.config.hidden_size, tuned_layers=config.tuned_layers,
                              encoder_config=encoder_config, null_margin=config.null_margin)
    layers = encoder.model.encoder.layer
    for top, layer in zip(heads.top, layers[len(layers) - config.tuned_layers:]):
        top.load_state_dict(layer.state_dict())
    with torch.no_grad():
        heads.eval()
        count = len(cache.states)
        pooled = torch.cat([heads.pooled(*cache.batch(range(start, min(start + 256, count)))) for start in range(0, count, 256)])
        heads.label_keys.copy_(torch.stack([F.normalize(pooled[by_label[i]].mean(0), dim=0) for i in range(len(names))]))
    return heads


def train_text_selector(
    corpus: LabelledTexts,
    encoder: SentenceEncoder,
    config: TrainConfig = TrainConfig(),
    log: Callable[[int, float], None] | None = None,
    init: TextSelectorHeads | None = None,
) -> TextSelectorHeads:
    """Train the text selector's heads on `corpus` (labels: tasks and null): from scratch, or
    fine-tuned from a copy of `init` (same labels and tuned layers; it keeps init's null margin).

    The encoder's layers below the `tuned_layers` copies stay frozen, so their token states are
    computed once; each step runs only the copies, pooling and MLP over the texts it samples."""
    if encoder.dropped:
        raise ValueError("training the text selector needs the whole sentence encoder (its top layers start the tuned copies)")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    names = corpus_labels(corpus)
    cache = CachedStates(encoder, corpus.texts, config.tuned_layers)
    targets, by_label = label_index(corpus, names)
    negatives, pools = negatives_by_label(by_label), source_pools(corpus, by_label)
    if init is None:
        heads = new_text_heads(encoder, names, config, cache, by_label)
    else:
        if list(init.config.labels) != names or init.config.tuned_layers != config.tuned_layers:
            raise ValueError(f"the initial heads have labels {list(init.config.labels)} and {init.config.tuned_layers} tuned layers; "
                             f"this corpus and config need {names} and {config.tuned_layers}")
        heads = copy.deepcopy(init).float().requires_grad_(True)
    heads.train()
    groups = [{"params": [p for name, p in heads.named_parameters() if not name.startswith("top.")], "lr": config.lr}]
    if config.tuned_layers:
        groups.append({"params": list(heads.top.parameters()), "lr": config.tuned_lr})

    def step_loss() -> torch.Tensor:
        projected: dict[int, torch.Tensor] = {}

        def embed(texts: list[int]) -> torch.Tensor:
            """Projected embeddings of corpus texts; the layer runs once per call over texts not yet seen this step."""
            new = sorted(set(texts) - set(projected))
            if new:
                projected.update(zip(new, heads.project(*cache.batch(new))))
            return torch.stack([projected[i] for i in texts])

        def similarity(anchor_labels: list[int], texts: list[int]) -> torch.Tensor:
            keys = F.normalize(heads.label_keys[torch.tensor(anchor_labels)], dim=-1)
            return keys @ F.normalize(embed(texts), dim=-1).T  # [A, T]

        return selector_loss(similarity, lambda texts: cosine_scores(heads.label_keys, embed(texts), heads.logit_scale),
                             pools, negatives, targets, config, rng)

    optimise(groups, step_loss, config, log)
    return heads.eval().requires_grad_(False)


def share_tuned_layers(members: Sequence[TextSelectorHeads]) -> None:
    """Give every member the mean of the members' tuned layers, in place; each keeps its own MLP and keys.

    Run apart, each member's tuned layers make one instruction at a time slower (each member
    beyond the first added 6.5 to 8.6 ms here).
    All members start those layers from the encoder's own and move them little (lr 5e-5), so their
    mean keeps the ensemble's choices (the shipped heads: 8400 of 8600 cases of v3 to v31 right,
    separate or shared; 6 cases changed, 3 each way) and the text selector runs it once."""
    layers = [member.top.state_dict() for member in members]
    mean = {name: torch.stack([state[name] for state in layers]).mean(dim=0) for name in layers[0]}
    for member in members:
        member.top.load_state_dict(mean)


def train_reference_selector(
    corpus: LabelledTexts,
    plugin_keys: dict[str, torch.Tensor],
    null_key: torch.Tensor,
    text_embeddings: torch.Tensor,
    config: TrainConfig = TrainConfig(),
    log: Callable[[int, float], None] | None = None,
) -> PromptTuner:
    """Train the authors' heads (proj_v, proj_t, logit_scale) as the paper does: only the heads learn;
    a task's anchor is its plugin's max-pooled F^p of a random training image (the pseudo label),
    null's is the pooled text of " ". `plugin_keys`: plugin -> [images, dim]; `text_embeddings`:
    the base text encoder's pooled output of each corpus text, [texts, dim]."""
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    names = sorted(plugin_keys) + [NULL_KEY]
    key_sets = [plugin_keys[name] for name in sorted(plugin_keys)] + [null_key.reshape(1, -1)]
    targets, by_label = label_index(corpus, names)
    negatives, pools = negatives_by_label(by_label), source_pools(corpus, by_label)
    heads = PromptTuner(dim=text_embeddings.shape[1]).train()

    def anchors(labels: Sequence[int]) -> torch.Tensor:
        return heads.proj_v(torch.stack([key_sets[label][rng.randrange(len(key_sets[label]))] for label in labels]))

    def similarity(anchor_labels: list[int], texts: list[int]) -> torch.Tensor:
        return F.normalize(anchors(anchor_labels), dim=-1) @ F.normalize(heads.proj_t(text_embeddings[texts]), dim=-1).T

    def scores(texts: list[int]) -> torch.Tensor:  # against every label's key from one random image each
        return cosine_scores(anchors(range(len(names))), heads.proj_t(text_embeddings[texts]), heads.logit_scale)

    optimise([{"params": list(heads.parameters()), "lr": config.lr}],
             lambda: selector_loss(similarity, scores, pools, negatives, targets, config, rng), config, log)
    return heads.eval().requires_grad_(False)
