"""Plugin-Selector: the authors' selector against the conformance set, the text selector, and `-i` runs."""

from __future__ import annotations

import json
import os
import random
import re
import select
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from diffplugin_cli import RunOptions, run
from diffplugin_cli.cli import app
from diffplugin_cli.errors import DiffPluginError
from diffplugin_cli.selection import SelectRequest, instruction_batches, open_selector, train_text_heads_file
from diffplugin_cli.selector import (
    NULL_KEY,
    PromptTuner,
    ReferenceSelector,
    SentenceEncoder,
    TextSelector,
    TextSelectorHeads,
    as_request,
    asks_for_edit,
    blur_only_on_faces,
    clauses,
    is_question,
    load_text_heads,
    murky_means_dark,
    refused_tasks,
    save_heads,
    wanted_labels,
)
from diffplugin_cli.selector_eval import evaluate, metrics, read_cases
from diffplugin_cli.selector_training import (
    LabelledTexts,
    TrainConfig,
    contrastive_step,
    label_index,
    negatives_by_label,
    source_pools,
    load_corpus,
    packaged_corpus,
    share_tuned_layers,
    shipped_training_texts,
    tomllib,
    train_text_selector,
)

from .conftest import BASE, CLIP, CONFORMANCE, MANIFEST, PLUGINS, cli_args
from .test_conformance import assert_image_close

SELECTOR_CASES = MANIFEST["selector_cases"]
HEADS = CONFORMANCE / "selector/PromptTunner.pt"
HELDOUT = Path(__file__).parent / "data/selector_heldout.jsonl"
DEV = Path(__file__).parent / "data/selector_dev.jsonl"  # 150 cases written with v5, whose errors guide corpus changes
CASE_FILES = sorted((Path(__file__).parent / "data").glob("selector_*.jsonl"))  # the held-out sets (docs/selector-evaluation.md: how each was written) and dev
# cases the corpus came to generate word for word were dropped (v17's "no desnowing" became a training
# text; 23 more, in v2 to v29 and dev, were texts of the shipped members' own seeds 1 and 2)
CASES_UNDER_300 = {"selector_heldout_v2.jsonl": 150, "selector_heldout_v3.jsonl": 199, "selector_dev.jsonl": 149,
                   "selector_heldout_v4.jsonl": 298, "selector_heldout_v5.jsonl": 295, "selector_heldout_v7.jsonl": 299,
                   "selector_heldout_v9.jsonl": 298, "selector_heldout_v12.jsonl": 299, "selector_heldout_v16.jsonl": 299,
                   "selector_heldout_v17.jsonl": 298, "selector_heldout_v18.jsonl": 298, "selector_heldout_v24.jsonl": 299,
                   "selector_heldout_v25.jsonl": 299, "selector_heldout_v27.jsonl": 299, "selector_heldout_v29.jsonl": 299}


@pytest.fixture(scope="module")
def reference(pipeline, plugins):
    selector = ReferenceSelector.from_pretrained(HEADS, BASE)
    image = Image.open(CONFORMANCE / "inputs/small_75x70.png").convert("RGB")
    hidden = pipeline.clip_hidden_states([image])
    prompts = {name: pipeline.visual_prompt(plugins[name], hidden) for name in ("desnow", "lowlight")}
    return selector, prompts, image


@pytest.fixture(scope="module")
def text_selector():
    return TextSelector.from_file()


def selected_with_null(selection):
    """The manifest lists `null` among the selected keys; we report it as a score only."""
    return selection.selected + ([NULL_KEY] if selection.scores[NULL_KEY] > selection.threshold else [])


@pytest.mark.parametrize("index", range(len(SELECTOR_CASES)))
def test_reference_selector_scores_and_selection(reference, index):
    selector, prompts, _ = reference
    case = SELECTOR_CASES[index]
    tensors = load_file(CONFORMANCE / case["expected"]["tensors"])
    assert selector.tokenizer(case["prompt"]).input_ids == case["token_ids_until_eos"]
    assert (selector.pooled_text([case["prompt"]]) - tensors[f"text_pooled_{index}"]).abs().max() <= 1e-4
    raw = selector.raw_scores(case["prompt"], prompts)
    assert list(raw) == case["plugin_keys"]
    assert np.allclose(list(raw.values()), case["expected"]["scores_raw"], atol=1e-4)
    selection = selector.select(case["prompt"], prompts)
    assert np.allclose(list(selection.scores.values()), case["expected"]["scores_final"], atol=1e-4)
    assert selected_with_null(selection) == case["expected"]["selected"]


def test_reference_selector_keys(reference):
    selector, prompts, _ = reference
    keys = load_file(CONFORMANCE / "expected/selector/selector.safetensors")["keys_tokenmax"]
    for row, prompt in zip(keys, prompts.values()):
        assert (prompt[0].amax(dim=0) - row).abs().max() <= 1e-4
    assert (selector._null[0] - keys[-1]).abs().max() <= 1e-4


def _chain_param(index):
    runs = SELECTOR_CASES[index]["expected"]["plugins_run"]
    return pytest.param(index, id=SELECTOR_CASES[index]["prompt"] or "space", marks=[pytest.mark.slow] if runs else [])


@pytest.mark.parametrize("index", [_chain_param(i) for i in range(len(SELECTOR_CASES))])
def test_reference_selection_runs_the_authors_chain(pipeline, plugins, reference, index):
    """The demo flow: selected plugins in key order, first with 20 steps, later with 3, short-side size rule."""
    selector, prompts, image = reference
    case = SELECTOR_CASES[index]
    expected = case["expected"]
    selection = selector.select(case["prompt"], prompts, order=["desnow", "lowlight"])
    assert selection.selected == expected["plugins_run"]
    stages = {}

    def record(stage, step, timestep, latents, **_):
        stages[stage] = latents.clone()

    output = pipeline([image], [plugins[name] for name in selection.selected], [case["seed"]], steps=case["steps"],
                      size_rule="short-side", resolution=case["image_resolution"], callback=record)[0]
    assert list(output.size) == expected["output_size"]
    tensors = load_file(CONFORMANCE / expected["tensors"])
    for k, key in enumerate(expected["tensor_keys"]["stage_final_latents"]):
        assert (stages[k] - tensors[key]).abs().max() <= (1e-2 if k == 0 else 5e-2)
    if expected["output_png"]:
        reference_png = np.asarray(Image.open(CONFORMANCE / expected["output_png"]).convert("RGB"))
        assert_image_close(np.asarray(output), reference_png, max_share=0.01)


def test_text_selector_picks_tasks_in_registry_order(text_selector):
    tasks = [label for label in text_selector.labels if label != NULL_KEY]
    assert set(tasks) == {"desnow", "dehaze", "deblur", "derain", "face", "lowlight", "demoire", "highlight"}
    order = ["desnow", "derain", "dehaze", "demoire", "highlight", "deblur", "lowlight", "face"]
    assert text_selector.select("brighten it and remove the snow", tasks, order=order).selected == ["desnow", "lowlight"]
    assert text_selector.select("remove the rain", tasks).selected == ["derain"]
    assert text_selector.select("make it a painting", tasks).is_none
    assert text_selector.select("remove the snow", tasks, threshold=100.0).is_none


@pytest.mark.parametrize("instruction", ["", "   ", "remove snow " * 120, "enlever la neige s'il vous plaît", "雪を消して", "!!!", "\t\n",
                                         "remove the sn\udcffow", "remove the \ud800 snow"])  # a byte of argv that is not UTF-8; a lone surrogate
def test_odd_instructions_give_a_clear_result(text_selector, instruction):
    tasks = [label for label in text_selector.labels if label != NULL_KEY]
    selection = text_selector.select(instruction, tasks)
    selection.instruction.encode("utf-8")  # valid Unicode, for the JSON output and the sidecar
    assert set(selection.scores) == set(tasks) | {NULL_KEY}
    assert all(score >= 0 for score in selection.scores.values())
    if not instruction.strip():
        assert selection.is_none


def test_scoring_many_instructions_together_matches_one_at_a_time(text_selector, monkeypatch):
    """Batched scoring (eval, `select -i -`) gives each instruction the scores and selection it gets alone."""
    import diffplugin_cli.selector as selector_module

    monkeypatch.setattr(selector_module, "CLAUSES_PER_BATCH", 8)  # several batches, each mixing instructions
    tasks = [label for label in text_selector.labels if label != NULL_KEY]
    texts = [case["text"] for case in read_cases(HELDOUT)[::10]] + ["", "remove snow " * 120, "雪を消して"]
    together = text_selector.select_many(texts, tasks)
    assert sum(len(clauses(text)) for text in texts) > 3 * selector_module.CLAUSES_PER_BATCH
    for text, batched in zip(texts, together, strict=True):
        alone = text_selector.select(text, tasks)
        assert batched.instruction == text and batched.selected == alone.selected
        assert batched.scores == pytest.approx(alone.scores, abs=1e-4)


def test_instruction_batches_are_the_lines_ready_together():
    class Chunks:
        """A stream whose reads return these chunks, as a pipe returns what was written so far."""

        def __init__(self, *chunks: bytes):
            self.chunks = list(chunks)

        def read1(self, size: int) -> bytes:
            return self.chunks.pop(0) if self.chunks else b""

    stream = Chunks(b"remove the rain\n", b"remove the snow\nbrigh", b"ten it\r\n\n   \nfix the \xff blur\n", b"no newline at the end")
    assert list(instruction_batches(stream)) == [
        ["remove the rain"], ["remove the snow"], ["brighten it", "fix the \ufffd blur"], ["no newline at the end"]]


def test_select_from_a_pipe_answers_each_line_as_it_comes():
    """`select -i -` does not wait for more input (or the end of it) before answering a line."""
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "diffplugin_cli", "select", "-i", "-"], env=env,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for instruction, wanted in (("remove the rain", ["derain"]), ("make it a cartoon", [])):
            process.stdin.write(instruction + "\n")
            process.stdin.flush()
            ready, _, _ = select.select([process.stdout], [], [], 120)
            assert ready, f"no answer to {instruction!r} while stdin stays open"
            answer = json.loads(process.stdout.readline())
            assert answer["instruction"] == instruction and answer["selected"] == wanted
        process.stdin.close()
        assert process.wait(timeout=60) == 0 and process.stdout.read() == ""
    finally:
        process.kill()


def test_reference_selector_accepts_long_instructions(reference):
    selector, prompts, _ = reference
    selection = selector.select("remove the snow please " * 40, prompts)  # > 77 tokens: truncated as the authors
    assert set(selection.scores) == {"desnow", "lowlight", NULL_KEY}
    stray_byte = selector.select("remove the sn\udcffow", prompts)  # argv that is not UTF-8
    assert stray_byte.instruction == "remove the sn\ufffdow" and set(stray_byte.scores) == {"desnow", "lowlight", NULL_KEY}


def test_clauses():
    assert clauses("remove snow and brighten") == ["remove snow", "brighten"]
    assert clauses("fix the stripes without changing the face") == ["fix the stripes", "without changing the face"]
    assert clauses("   ") == [""]
    # a noun phrase joined by "and" takes the verb of the clause before it
    assert clauses("leave the darkness and the snow, restore the faces") == ["leave the darkness", "leave the snow", "restore the faces"]
    assert clauses("keep the fog and the rain AND the glare") == ["keep the fog", "keep the rain", "keep the glare"]
    assert clauses("wipe out the rain streaks and the glare") == ["wipe out the rain streaks", "wipe out the glare"]
    assert clauses("the portrait is dark and the face is damaged") == ["the portrait is dark", "the face is damaged"]
    assert clauses("remove rain and then the fog") == ["remove rain", "the fog"]
    assert clauses("keep it, and the fog") == ["keep it", "the fog"]


def test_is_question():
    for text in ("will it rain tomorrow in lisbon", "why does my photo look hazy?", "how do I shoot in the rain",
                 "is this sharp enough to print", "are my photos blurry", "what does desnow mean", "Is it foggy in London today"):
        assert is_question(text), text
    # requests put as questions, and a predicate left after "and" ("... has moire and is out of focus")
    for text in ("will you brighten it", "can you remove the snow", "could you sharpen it", "how would you fix the blur",
                 "what can you do about the haze", "why don't you brighten it", "is it possible to remove the rain",
                 "is there a way to fix the glare", "how about sharpening it", "is out of focus", "are too dark",
                 "isolate the face", "whatever works, brighten it"):
        assert not is_question(text), text


def test_a_question_asks_for_no_edit(text_selector):
    """Questions about the weather, technique or meaning select nothing (the shipped heads alone
    select a task for these held-out questions); a request beside a question, or put as one, still
    counts."""
    tasks = [label for label in text_selector.labels if label != NULL_KEY]
    for text in ("will it rain tomorrow in lisbon", "why are my photos of the moon blurry", "is it going to snow in paris next week"):
        assert text_selector.select(text, tasks).is_none, text
        assert all(score == 0.0 for label, score in text_selector.raw_scores(text).items() if label != NULL_KEY), text
    assert text_selector.select("is this too dark? brighten it", tasks).selected == ["lowlight"]
    assert text_selector.select("could you remove the snow?", tasks).selected == ["desnow"]
    assert text_selector.select("how would you fix the blur?", tasks).selected == ["deblur"]
    assert text_selector.select("what can you do about the haze", tasks).selected == ["dehaze"]
    assert text_selector.select("is it possible to remove the rain streaks?", tasks).selected == ["derain"]
    assert text_selector.select("the monitor photo has moire and is out of focus", tasks).selected == ["deblur", "demoire"]


def test_asks_for_edit():
    assert asks_for_edit(["will it rain tomorrow", "remove the snow"]) == [False, True]
    assert asks_for_edit(["where is the moire", "remove it"]) == [True, True]
    assert asks_for_edit(["is there glare on his glasses", "if so", "take it out"])[0] is True
    assert asks_for_edit(["is there snow in this photo", "if so remove it"]) == [True, True]
    for kept in ("leave it", "i like it", "if so", "keep it", "remove it from my memory"):
        assert asks_for_edit(["is there snow in this photo", kept])[0] is False, kept


def test_a_clause_that_only_praises_asks_for_no_edit(text_selector):
    """The shipped heads counted `dehaze` for "the haze is atmospheric" beside a request for another fix."""
    assert asks_for_edit(["the smog is so atmospheric", "lighten the street"]) == [False, True]
    assert asks_for_edit(["the fog is not fine"]) == [True]
    assert asks_for_edit(["the photo looks dark"]) == [True]
    tasks = [label for label in text_selector.labels if label != NULL_KEY]
    assert text_selector.select("the mist is moody, brighten the foreground", tasks).selected == ["lowlight"]
    assert text_selector.select("the snowfall is lovely, sharpen the photo", tasks).selected == ["deblur"]


def test_a_question_followed_by_a_fix_of_what_it_names_is_a_request(text_selector):
    """The question says what "it" is; before, "where is the moire? remove it" selected nothing."""
    tasks = [label for label in text_selector.labels if label != NULL_KEY]
    assert text_selector.select("where is the moire? remove it", tasks).selected == ["demoire"]
    assert text_selector.select("is there glare on his glasses? if so, take it out", tasks).selected == ["highlight"]
    assert text_selector.select("is there snow in this photo? if so, keep it", tasks).is_none


def test_wanted_labels():
    labels = ["dehaze", "lowlight", NULL_KEY]
    wanted = wanted_labels(["remove the haze", "make the sky darker", "will it rain"], labels).tolist()
    assert wanted == [[True, True, True], [True, False, True], [False, False, False]]
    for darkening in ("darken the corners", "it's too bright", "the photo is overexposed", "lower the exposure a bit",
                      "reduce the brightness of the dress", "turn the brightness down", "even darker", "darker"):
        assert wanted_labels([darkening], labels).tolist() == [[True, False, True]], darkening
    for brightening in ("brighten it", "the photo is darker than it should be", "the dark room needs light", "raise the exposure"):
        assert wanted_labels([brightening], labels).tolist() == [[True, True, True]], brightening


def test_a_request_to_darken_never_selects_lowlight(text_selector):
    """Low-light enhancement brightens: the shipped heads chose it for these, the opposite edit."""
    tasks = [label for label in text_selector.labels if label != NULL_KEY]
    for darkening in ("it's too bright", "the photo is overexposed", "reduce the exposure", "make the dark alley photo even darker"):
        assert text_selector.select(darkening, tasks).is_none, darkening
    assert text_selector.select("the cobblestones shine too brightly in the sun, reduce the glare", tasks).selected == ["highlight"]
    assert text_selector.select("brighten the foreground but darken the sky", tasks).selected == ["lowlight"]


def test_a_request_for_more_shine_never_selects_highlight(text_selector):
    """Highlight removal takes shine away: the shipped heads chose it for these, the opposite edit."""
    tasks = [label for label in text_selector.labels if label != NULL_KEY]
    for shining in ("make the pond more reflective", "make the marble floor more reflective", "make the glare on the window brighter"):
        assert text_selector.select(shining, tasks).is_none, shining
    for removal in ("remove the glossy reflections on the glass", "make the glare go away", "make the shiny forehead matte"):
        assert text_selector.select(removal, tasks).selected == ["highlight"], removal
    labels = ["highlight", NULL_KEY]
    assert wanted_labels(["make the lake look glassy and reflective for the poster"], labels).tolist() == [[False, True]]
    assert wanted_labels(["make the shiny forehead matte"], labels).tolist() == [[True, True]]


def test_a_figurative_use_of_a_tasks_verb_is_no_request(text_selector):
    """A skill sharpened or a day brightened is no photo edit: the shipped heads chose `deblur` and `lowlight` for these."""
    tasks = [label for label in text_selector.labels if label != NULL_KEY]
    for figurative in ("sharpen my baking skills", "brighten up the study with new lamps"):
        assert text_selector.select(figurative, tasks).is_none, figurative
    assert text_selector.select("sharpen my photo", tasks).selected == ["deblur"]
    assert text_selector.select("brighten my evening photos", tasks).selected == ["lowlight"]
    labels = ["deblur", "lowlight", NULL_KEY]
    for figurative, wanted in (("sharpen my pencil", [False, True, True]), ("brighten my day with a joke", [True, False, True]),
                               ("brighten up the porch with some flowers", [True, False, True])):
        assert wanted_labels([figurative], labels).tolist() == [wanted], figurative
    assert wanted_labels(["brighten the morning shot"], labels).tolist() == [[True, True, True]]


def test_murky_means_dark():
    assert murky_means_dark(["the cellar photo is murky", "dim", "make it brighter"]) == [True, False, False]
    assert murky_means_dark(["the lake looks murky"]) == [False]  # no darkness named: murky may be haze
    assert murky_means_dark(["the valley is murky with fog at night"]) == [False]  # the haze is named
    labels = ["dehaze", "lowlight", NULL_KEY]
    assert wanted_labels(["the cellar photo is murky", "dim"], labels).tolist() == [[False, True, True], [True, True, True]]


def test_a_murky_dark_photo_is_no_request_to_dehaze(text_selector):
    """The shipped heads added `dehaze` for "murky" beside darkness."""
    tasks = [label for label in text_selector.labels if label != NULL_KEY]
    assert text_selector.select("the garage photo came out murky and dark, make it brighter", tasks).selected == ["lowlight"]
    assert text_selector.select("clear the fog and brighten the murky harbour photo at night", tasks).selected == ["dehaze", "lowlight"]


def test_blur_only_on_faces():
    assert blur_only_on_faces("the bride's face is faded and soft, restore it")
    assert blur_only_on_faces("repair the old print, his features are smudged")
    for blur_elsewhere in ("restore the faces and sharpen the blurry background", "the old portrait is blurry and the face is damaged",
                           "the faces are smudged by camera shake", "restore her face"):
        assert not blur_only_on_faces(blur_elsewhere), blur_elsewhere
    labels = ["deblur", "face", NULL_KEY]
    parts = ["the bride's face is faded", "soft", "restore it"]
    assert wanted_labels(parts, labels, "the bride's face is faded and soft, restore it").tolist() == [[False, True, True]] * 3


def test_a_blurred_face_alone_is_no_request_to_deblur(text_selector):
    """The shipped heads added `deblur` when blur words described the face."""
    tasks = [label for label in text_selector.labels if label != NULL_KEY]
    assert text_selector.select("the bride's face is faded and blurry, restore it", tasks).selected == ["face"]
    assert text_selector.select("restore the faces and sharpen the blurry background", tasks).selected == ["deblur", "face"]


def test_refused_tasks():
    assert refused_tasks(["brighten the rainy street", "without removing the rain"]) == {"derain"}
    assert refused_tasks(["make it brighter", "without taking out the snow or the fog"]) == {"desnow", "dehaze"}
    assert refused_tasks(["remove the falling snow", "without removing the snow on the ground"]) == set()
    assert refused_tasks(["dehaze it", "without removing the mist over the lake"]) == set()
    assert refused_tasks(["brighten it", "without losing detail"]) == set()
    assert refused_tasks(["brighten the rainy street", "without the rain"]) == set()  # "without the rain" asks to remove it
    labels = ["derain", "lowlight", NULL_KEY]
    assert wanted_labels(["brighten the rainy street", "without removing the rain"], labels).tolist() == [[False, True, True]] * 2


def test_a_refused_task_counts_nowhere_in_the_instruction(text_selector):
    """The shipped heads count `derain` for "the rainy street" though the instruction keeps the rain."""
    tasks = [label for label in text_selector.labels if label != NULL_KEY]
    assert text_selector.select("brighten the rainy street without removing the rain", tasks).selected == ["lowlight"]
    assert text_selector.select("remove the falling snow without removing the snow on the ground", tasks).selected == ["desnow"]


def test_as_request():
    assert as_request("only the snow should go") == "remove the snow"
    assert as_request("the glare on the car hood must go") == "remove the glare on the car hood"
    assert as_request("the fog is not") == "remove the fog"
    assert as_request("The rain isn't okay") == "remove The rain"
    assert as_request("the fog is not a problem") == "the fog is not a problem"
    assert as_request("the snow should go on forever") == "the snow should go on forever"
    assert as_request("it must go") == "it must go"


def test_a_damage_that_should_go_is_a_request(text_selector):
    """The shipped heads score "the snow should go" and "the fog is not" about as `null`."""
    tasks = [label for label in text_selector.labels if label != NULL_KEY]
    assert text_selector.select("only the sleet should go, keep the gloom", tasks).selected == ["desnow"]
    assert text_selector.select("the blur is fine, the smog isn't", tasks).selected == ["dehaze"]
    assert text_selector.select("the fog is not a problem", tasks).is_none


def test_shipped_heads_read_a_place_as_part_of_the_request(text_selector):
    """Where the damage is does not make a request out of scope (the heads before read these as none)."""
    tasks = [label for label in text_selector.labels if label != NULL_KEY]
    assert text_selector.select("remove the rain streaks on the left", tasks).selected == ["derain"]
    assert text_selector.select("get rid of the mist in the background", tasks).selected == ["dehaze"]
    assert text_selector.select("remove the man on the left", tasks).is_none


def test_shipped_heads_read_a_bare_task_name(text_selector):
    """"desnow it" is the shortest request there is (the heads before read it as none)."""
    tasks = [label for label in text_selector.labels if label != NULL_KEY]
    assert text_selector.select("desnow it", tasks).selected == ["desnow"]
    assert text_selector.select("desnow it, don't brighten it", tasks).selected == ["desnow"]
    assert text_selector.select("don't desnow it", tasks).is_none


def test_shipped_heads_read_a_plain_refusal_of_a_fix(text_selector):
    """"no desnowing" refuses the task (the heads before also selected `desnow` with it)."""
    tasks = [label for label in text_selector.labels if label != NULL_KEY]
    assert text_selector.select("no desnowing, only lighten it", tasks).selected == ["lowlight"]
    assert text_selector.select("no desnowing, just sharpen it", tasks).selected == ["deblur"]
    assert text_selector.select("no desnowing and no brightening, remove the rain", tasks).selected == ["derain"]


def test_shipped_heads_read_shine_on_skin_as_highlight(text_selector):
    """The shine on a forehead or nose is highlight's (the heads before read it as none)."""
    tasks = [label for label in text_selector.labels if label != NULL_KEY]
    assert text_selector.select("remove the shine on the forehead", tasks).selected == ["highlight"]
    assert text_selector.select("reduce the shine on his nose and add sunglasses", tasks).selected == ["highlight"]
    assert text_selector.select("keep the shine on her forehead", tasks).is_none


def test_shipped_heads_read_forget_and_praise_as_refusals(text_selector):
    """"forget the fog" and "the snow is pretty" keep that damage (the heads before also selected it)."""
    tasks = [label for label in text_selector.labels if label != NULL_KEY]
    assert text_selector.select("forget the fog, remove the rain", tasks).selected == ["derain"]
    assert text_selector.select("the snow is pretty, sharpen the photo", tasks).selected == ["deblur"]
    assert text_selector.select("the fog is charming, restore the faces", tasks).selected == ["face"]
    assert text_selector.select("thicken the mist over the field", tasks).is_none  # more of it wanted


def test_shipped_heads_read_sleet_as_snow_and_a_darker_mood_as_no_request(text_selector):
    """Sleet and wet snow are desnow's words, and "darker and moodier" asks for no plugin (the heads
    before left out `desnow` for the sleet, added `derain` to the wet snow and selected `lowlight`
    for the moods)."""
    tasks = [label for label in text_selector.labels if label != NULL_KEY]
    assert text_selector.select("get rid of the sleet on the photo of the tram", tasks).selected == ["desnow"]
    assert text_selector.select("the photo is full of wet snow, clean it", tasks).selected == ["desnow"]
    assert text_selector.select("remove the sleet and brighten the shot", tasks).selected == ["desnow", "lowlight"]
    assert text_selector.select("the sleet can stay, sharpen the photo", tasks).selected == ["deblur"]
    assert text_selector.select("make the bedroom darker and moodier", tasks).is_none
    assert text_selector.select("make the alley even darker and moodier", tasks).is_none


def test_shipped_heads_read_make_it_clear_as_a_result_and_a_blurred_portrait_as_deblur(text_selector):
    """"make it clear" names no damage, so after a described face it adds nothing; a blurred portrait
    is `deblur`, a face only when a face is named; shine said with a verb is highlight's (the heads
    before added `dehaze` to the faces, `face` to the portraits and read the shining head as none)."""
    tasks = [label for label in text_selector.labels if label != NULL_KEY]
    assert text_selector.select("the grandmother's face is grainy, make it clear", tasks).selected == ["face"]
    assert text_selector.select("the faces are smudged, make them clear", tasks).selected == ["face"]
    assert text_selector.select("make it clear", tasks).is_none
    assert text_selector.select("the fog is thick, make it clear", tasks).selected == ["dehaze"]
    assert text_selector.select("the portrait came out fuzzy, sharpen it", tasks).selected == ["deblur"]
    assert text_selector.select("sharpen the shaky portrait of my aunt", tasks).selected == ["deblur"]
    assert text_selector.select("restore the portrait", tasks).selected == ["face"]
    assert text_selector.select("the bald head shines, fix it", tasks).selected == ["highlight"]


def test_shipped_heads_read_a_shower_as_rain_sun_glare_as_glare_and_hidden_faces_as_darkness(text_selector):
    """A shower is rain, the sun's glare is highlight's, and a photo too dark to see the faces is
    `lowlight` alone (the heads before selected nothing for the showers, the glare alone and the
    black cave photo, only `dehaze` beside the haze, and added `face` to the dark party photo); a
    "without dehazing" refusal, which the corpus now holds, still refuses."""
    tasks = [label for label in text_selector.labels if label != NULL_KEY]
    assert text_selector.select("the shower left diagonal lines across my picture of the orchard", tasks).selected == ["derain"]
    assert text_selector.select("remove the shower from my picture of the rose garden", tasks).selected == ["derain"]
    assert text_selector.select("tone down the sun glare on the pond", tasks).selected == ["highlight"]
    assert text_selector.select("cut the haze and tone down the sun glare on the lake", tasks).selected == ["dehaze", "highlight"]
    assert text_selector.select("my photo of the party is too dark to see their faces", tasks).selected == ["lowlight"]
    assert text_selector.select("the cave photo is almost black", tasks).selected == ["lowlight"]
    assert text_selector.select("brighten it without dehazing", tasks).selected == ["lowlight"]


def test_shipped_heads_read_darkening_on_purpose_and_power_lines_as_no_request(text_selector):
    """Darker on purpose is a tone edit, not `lowlight`, and power lines are not moire: the heads
    with three tuned layers read these held-out requests as no request, where the two-layer heads
    before them selected `lowlight` for the first four and `demoire` for the last; a request to
    brighten still selects `lowlight`."""
    tasks = [label for label in text_selector.labels if label != NULL_KEY]
    for text in ("lower the brightness of the lamps", "darken the washed out sky", "make the picture darker for a horror poster",
                 "darken the photo so it looks like evening", "remove the power lines from the photo of the church"):
        assert text_selector.select(text, tasks).is_none, text
    assert text_selector.select("brighten the dark photo of the lamps", tasks).selected == ["lowlight"]


def test_a_refusal_covers_every_noun_joined_by_and(text_selector):
    """"leave A and B": B is refused too, not read as a request of its own."""
    tasks = [label for label in text_selector.labels if label != NULL_KEY]
    assert text_selector.select("keep the fog and the rain as they are", tasks).is_none
    assert text_selector.select("leave the haze and the snow, sharpen the photo", tasks).selected == ["deblur"]
    assert set(text_selector.select("get rid of the rain and the fog", tasks).selected) == {"derain", "dehaze"}


def test_metrics_follow_the_paper_definitions():
    scores = [{"a": 1.0, "b": 0.0}, {"a": 0.0, "b": 2.0}, {"a": 0.5, "b": 0.5}, {"a": 0.0, "b": 0.0}]
    labels = [["a"], ["b"], ["a"], []]
    result = metrics(scores, labels, ["a", "b"])
    assert result["ZTA"] == 0.75  # the third selects b as well
    assert result["OP"] == 3 / 4 and result["OR"] == 1.0
    assert result["CP"] == (1.0 + 0.5) / 2 and result["mAP"] == 1.0


def per_label_sample(corpus: LabelledTexts, per_label: int, seed: int = 0) -> LabelledTexts:
    """At most `per_label` texts of each label of `corpus`, drawn at random, in corpus order."""
    rng, by_label = random.Random(seed), {}
    for row, label in enumerate(corpus.labels):
        by_label.setdefault(label, []).append(row)
    rows = sorted(row for label_rows in by_label.values() for row in rng.sample(label_rows, min(per_label, len(label_rows))))
    return LabelledTexts(*([column[row] for row in rows] for column in (corpus.texts, corpus.labels, corpus.sources)))


def test_training_on_a_small_corpus_raises_held_out_zta():
    encoder = SentenceEncoder()
    corpus = per_label_sample(load_corpus(variants=0), per_label=20)  # every task, null and pair; ~500 texts
    cases = read_cases(HELDOUT)
    # Fine-tuned top layers, as shipped, on fewer texts per step; gated at null itself (margin 0), so
    # that the untrained heads cannot pass for "none" by the margin alone.
    small = TrainConfig(batch_size=8, null_margin=0.0)
    untrained = train_text_selector(corpus, encoder, replace(small, steps=0))
    trained = train_text_selector(corpus, encoder, replace(small, steps=40))
    tasks = [label for label in trained.config.labels if label != NULL_KEY]
    before = evaluate(cases, TextSelector(untrained, encoder).raw_scores_many, tasks)["overall"]["ZTA"]
    after = evaluate(cases, TextSelector(trained, encoder).raw_scores_many, tasks)["overall"]["ZTA"]
    assert after > before + 0.25, (before, after)  # 0.319 -> 0.687 with the corpus v22 chose (0.397 -> 0.693 with v21's)


def test_compound_clauses_carry_both_tasks():
    """One clause can name two damages ("the snowy photo is too dark"); the corpus labels such a clause
    with both tasks, and only with tasks being trained."""
    corpus = load_corpus(variants=0)
    compounds = {text: label.split("+") for text, label in zip(corpus.texts, corpus.labels) if "+" in label}
    assert compounds["the snowy photo is too dark"] == ["desnow", "lowlight"]
    assert all(len(set(tasks)) == 2 and NULL_KEY not in tasks for tasks in compounds.values())
    assert len({tuple(tasks) for tasks in compounds.values()}) == 28  # every pair of the eight tasks
    two = load_corpus(tasks=["desnow", "lowlight"], variants=0)
    assert {label for label in two.labels if "+" in label} == {"desnow+lowlight"}
    targets, by_label = label_index(LabelledTexts(["a", "b", "a and b", "c"], ["desnow", "lowlight", "desnow+lowlight", NULL_KEY]),
                                    ["desnow", "lowlight", NULL_KEY])
    assert targets.tolist() == [[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert by_label == {0: [0, 2], 1: [1, 2], 2: [3]}


def test_a_photo_named_by_its_damage_is_asked_to_become_good():
    """"make the dark photo brighter": the corpus puts each task's damage attribute before one of its
    good words, the wanted result, and labels the text with that task alone."""
    vocabulary = tomllib.loads((packaged_corpus() / "vocabulary.toml").read_text(encoding="utf-8"))
    corpus = load_corpus(variants=0)
    mend = [(text, label) for text, label, source in zip(corpus.texts, corpus.labels, corpus.sources) if source == "vocabulary:mend"]
    attributes = vocabulary["compound"]["attributes"]
    assert {label for _, label in mend} == set(attributes)
    for text, label in mend:
        good = vocabulary["tasks"][label]["good"]
        assert any(f" {attribute} " in text for attribute in attributes[label]), text
        assert any(text.endswith(word) for word in good), text


def test_shipped_heads_read_a_dark_photo_asked_to_look_brighter_as_lowlight(text_selector, training_texts):
    """The damage word after "make the" once read as the inverse edit ("make it dark", no request): the
    heads before the `mend` phrasings scored `lowlight` -1.65 against null 3.37 here. Darker stays
    no request."""
    tasks = [label for label in text_selector.labels if label != NULL_KEY]
    for text, selected in (("make the dark image look brighter", ["lowlight"]), ("make the dark photo darker", [])):
        assert text not in training_texts
        assert text_selector.select(text, tasks).selected == selected


def test_subjects_come_with_every_task_and_with_null():
    """Users name what the photo shows ("derain the picture of the harbour"). The corpus puts each
    task's words in photos of subjects, and the same subjects in refusals and out-of-scope edits
    (null), so that a subject cues neither a task nor "none"; face takes people only."""
    subjects = tomllib.loads((packaged_corpus() / "vocabulary.toml").read_text(encoding="utf-8"))["subjects"]
    corpus = load_corpus(variants=0)
    photo_of = re.compile(r"(?:photo|shot|picture|image|snapshot) of (.+?)(?: is | came | looks |,|$)")
    named: dict[str, set[str]] = {}
    for text, label in zip(corpus.texts, corpus.labels):
        for subject in photo_of.findall(text):
            named.setdefault(label, set()).add(subject)
    everyone = set(subjects["people"]) | set(subjects["scenes"])
    assert all(named[task] & everyone for task in ("desnow", "derain", "dehaze", "deblur", "face", "lowlight", "demoire", "highlight"))
    assert named["face"] <= set(subjects["people"])
    assert len(named[NULL_KEY] & everyone) >= len(everyone) // 2


def test_a_bare_task_name_meets_several_subjects():
    """"deblur the picture of the license plate": each task name comes in every name_subject template,
    with more than one subject, so a bare name on a described photo is not rare in the corpus."""
    vocabulary = tomllib.loads((packaged_corpus() / "vocabulary.toml").read_text(encoding="utf-8"))
    corpus = load_corpus(variants=0)
    named = [(text, label) for text, label, source in zip(corpus.texts, corpus.labels, corpus.sources) if source == "vocabulary:name_subject"]
    for task, words in vocabulary["tasks"].items():
        for name in words.get("names", ()):
            texts = [text for text, label in named if label == task and re.search(rf"\b{re.escape(name)} (?:the|my|this) ", text)]
            assert len(texts) == len(vocabulary["templates"]["name_subject"]), (task, name, texts)
            assert len({text.rsplit(" of ", 1)[1] for text in texts}) > 1, (task, name, texts)


def test_places_come_with_every_task_and_with_null():
    """Users say where the damage is ("remove the rain on the left", "the fog hanging over the
    harbour"). The corpus puts each task's nouns with a place, asked for, and for removal tasks also
    kept (null), and the out-of-scope edits with a place too (null), so that a place cues neither a
    task nor "none"; face takes positions in the frame only."""
    places = tomllib.loads((packaged_corpus() / "vocabulary.toml").read_text(encoding="utf-8"))["places"]
    corpus = load_corpus(variants=0)
    by_source: dict[str, list[tuple[str, str]]] = {}
    for text, label, source in zip(corpus.texts, corpus.labels, corpus.sources):
        by_source.setdefault(source, []).append((text, label))
    asked = by_source["vocabulary:act_place"] + by_source["vocabulary:describe_place"]
    assert {label for _, label in asked} == {"desnow", "derain", "dehaze", "deblur", "face", "lowlight", "demoire", "highlight"}
    assert {label for _, label in by_source["vocabulary:spare_place"] + by_source["vocabulary:edit_place"]} == {NULL_KEY}
    relations = tuple(f" {relation} " for relation in places["relations"])
    assert any(any(r in text for r in relations) for text, label in asked if label == "dehaze")
    face = [text for text, label in asked if label == "face"]
    assert face and all(any(text.endswith(f" {spot}") for spot in places["frame"]) for text in face)
    assert any("on the left" in text for text, _ in by_source["vocabulary:act_place"])
    assert any("on the left" in text for text, _ in by_source["vocabulary:edit_place"] + by_source["vocabulary:spare_place"])


def test_a_task_s_own_spots_come_with_each_of_its_nouns():
    """Shine sits on skin ("the shine on his forehead"), and the same body parts come in
    out-of-scope edits ("slim the nose"). Highlight's own `spots` put each of its nouns once more
    with one of them, asked for and kept (null); the other tasks have none."""
    vocabulary = tomllib.loads((packaged_corpus() / "vocabulary.toml").read_text(encoding="utf-8"))
    words = vocabulary["tasks"]["highlight"]
    assert [task for task, entry in vocabulary["tasks"].items() if "spots" in entry] == ["highlight"]
    corpus = load_corpus(variants=0)
    spotted = [(text, label, source) for text, label, source in zip(corpus.texts, corpus.labels, corpus.sources)
               if source.endswith("_place") and any(f" {spot}" in text for spot in words["spots"])]
    for noun in words["nouns"]:
        mine = [(label, source) for text, label, source in spotted if f" {noun} on " in f" {text}"]
        assert ("highlight", "vocabulary:act_place") in mine and (NULL_KEY, "vocabulary:spare_place") in mine, noun


def test_a_task_s_own_edits_are_labelled_with_the_task():
    """"lift the shadows" asks for brightening and "tone down the glare" for glare removal, though no
    noun of those tasks says so, while "deepen the shadows" and "tone down the street lights" are tone
    edits and "remove my shadow" a retouch. A task's own `edits` group fills the out-of-scope edit
    templates with its verbs and things, labelled with the task; `[edits.deepen]` puts lowlight's
    things in null edits, places included ("the shadows on the hills": the verb decides), and
    `[edits.shadow]` names shadows to remove and `[edits.darker]` shadows made darker, null only."""
    vocabulary = tomllib.loads((packaged_corpus() / "vocabulary.toml").read_text(encoding="utf-8"))
    owners = {task: entry["edits"] for task, entry in vocabulary["tasks"].items() if "edits" in entry}
    assert sorted(owners) == ["highlight", "lowlight"]
    corpus = load_corpus(variants=0)
    edits = [(text, label) for text, label, source in zip(corpus.texts, corpus.labels, corpus.sources)
             if source in ("vocabulary:edit", "vocabulary:edit_subject")]
    assert {label for _, label in edits} == set(owners) | {NULL_KEY}
    for task, own in owners.items():
        mine = [text for text, label in edits if label == task]
        assert len(mine) == len(own["verbs"]) * len(own["things"]) + len(own["things"]), task
        assert all(any(f"{verb} {thing}" in text for verb in own["verbs"] for thing in own["things"]) for text in mine), task
    lifted, deepen = [text for text, label in edits if label == "lowlight"], vocabulary["edits"]["deepen"]
    for thing in set(owners["lowlight"]["things"]) & set(deepen["things"]):
        assert any(thing in text for text in lifted) and any(thing in text and label == NULL_KEY for text, label in edits), thing
    toned = set(owners["highlight"]["verbs"]) & set(vocabulary["edits"]["tone"]["verbs"])
    assert toned and all(any(text.startswith(verb) or f" {verb} " in text for text, label in edits if label == NULL_KEY) for verb in toned)
    assert any(" on the " in thing for thing in set(owners["lowlight"]["things"]) & set(deepen["things"]))
    for thing in vocabulary["edits"]["shadow"]["things"] + vocabulary["edits"]["darker"]["things"]:
        assert {label for text, label in edits if thing in text} == {NULL_KEY}, thing


def test_a_face_with_blur_words_is_face_only():
    """"the faces are mushy" asks for face restoration alone: the corpus holds face-only texts with
    blur and pixel words, so that those words do not add deblurring to a face request."""
    corpus = load_corpus(variants=0)
    damaged = {text: label for text, label, source in zip(corpus.texts, corpus.labels, corpus.sources) if source == "vocabulary:damaged"}
    assert set(damaged.values()) == {"face"}
    assert any("pixelated" in text for text in damaged) and any("mushy" in text for text in damaged)


def test_every_task_name_and_fix_comes_in_its_plainest_forms():
    """Each name of a task is in the corpus in its bare forms, "desnow it" asking for the task and
    "don't desnow it" refusing it, and each fix in its plainest refusal, "no desnowing". Random
    template draws once left "desnow it" and "no desnowing" out, and the heads read the first as
    none and the second as desnow."""
    vocabulary = tomllib.loads((packaged_corpus() / "vocabulary.toml").read_text(encoding="utf-8"))
    corpus = load_corpus(variants=0)
    labels: dict[str, set[str]] = {}
    for text, label in zip(corpus.texts, corpus.labels):
        labels.setdefault(text, set()).add(label)
    for task, words in vocabulary["tasks"].items():
        for name in words.get("names", ()):
            assert labels.get(f"{name} it") == {task}, name
            assert labels.get(f"don't {name} it") == {NULL_KEY}, name
        for fix in words.get("fixes", ()):
            assert labels.get(f"no {fix}") == {NULL_KEY}, fix


def test_wanted_damage_and_fixes_we_do_not_make_are_null():
    """Some requests use a task's words to ask for the damage ("sprinkle some snow over it", "dim the
    street lights", "blur the background like portrait mode") or for a fix no plugin makes ("fix the
    red eyes", "whiten his teeth", "remove the power cables"). The corpus labels them null and never a
    task, so that the edit, not the word, decides."""
    corpus = load_corpus(variants=0)
    null = [text for text, label in zip(corpus.texts, corpus.labels) if label == NULL_KEY]
    tasks = [text for text, label in zip(corpus.texts, corpus.labels) if label != NULL_KEY]
    for phrase in ("sprinkle some snow over it", "make it look like it was shot in rain", "dim the street lights",
                   "blur the background like portrait mode", "make the car look glossier", "fix the red eyes",
                   "whiten his teeth", "make my face thinner", "the power cables"):
        assert any(phrase in text for text in null), phrase
        assert not any(phrase in text for text in tasks), phrase


def test_a_text_is_never_a_negative_of_its_own_labels():
    """Eq. 6 with several labels per text: a compound clause is a positive of each of its tasks and
    never among the negatives of an anchor of one of them."""
    labels = ["desnow", "lowlight", "desnow+lowlight", NULL_KEY] * 3
    corpus = LabelledTexts([str(i) for i in range(len(labels))], labels)
    targets, by_label = label_index(corpus, ["desnow", "lowlight", NULL_KEY])
    seen = {}

    def similarity(anchors, texts):
        seen.update(anchors=anchors, texts=texts)
        return torch.zeros(len(anchors), len(texts))

    for seed in range(20):
        contrastive_step(similarity, source_pools(corpus, by_label), negatives_by_label(by_label), TrainConfig(batch_size=6, negatives=7),
                         random.Random(seed))
        width = len(seen["texts"]) // len(seen["anchors"])
        for row, anchor in enumerate(seen["anchors"]):
            positive, *negatives = seen["texts"][row * width:(row + 1) * width]
            assert targets[positive, anchor] == 1 and negatives
            assert all(targets[text, anchor] == 0 for text in negatives)


def test_training_draws_rare_phrasings_more_often_than_their_share():
    """A label's text is drawn by source (a corpus file, a template kind) with probability in
    proportion to the square root of its size, then uniformly: the 26 "don't dehaze it"-type refusals
    must not drown among null's thousands of template texts. Without sources, draws are uniform."""
    corpus = load_corpus(variants=0)
    assert len(corpus.sources) == len(corpus.texts)
    source_of = dict(zip(corpus.texts, corpus.sources))
    assert source_of["don't dehaze it"] == "vocabulary:decline" and source_of["leave the snow alone"] == "negation.txt"
    labels = [NULL_KEY] * 104
    texts = [str(i) for i in range(104)]
    with_sources, without_sources = LabelledTexts(texts, labels, ["many"] * 100 + ["few"] * 4), LabelledTexts(texts, labels)
    for texts, expected in ((with_sources, 2 / 12), (without_sources, 4 / 104)):  # sqrt(4) / (sqrt(100) + sqrt(4)); uniform: 4 of 104
        pool = source_pools(texts, label_index(texts, [NULL_KEY])[1])[0]
        rng = random.Random(0)
        share = sum(pool.draw(rng) >= 100 for _ in range(20000)) / 20000
        assert abs(share - expected) < 0.01, (share, expected)


def test_tuned_layers_start_as_the_encoders_top_layers_and_round_trip(tmp_path, text_selector):
    """Untrained, the copied top layers reproduce the frozen encoder's mean-pooled embeddings; trained
    weights survive save/load, so the shipped file alone (plus the packaged encoder) gives the scores."""
    encoder = SentenceEncoder()
    corpus = load_corpus(small_corpus(tmp_path / "corpus"))
    texts = ["remove the snow", "don't remove the fog, only brighten it", "x"]
    untrained = train_text_selector(corpus, encoder, TrainConfig(steps=0))
    states, mask = encoder.token_states(texts)
    weights = mask.unsqueeze(-1).float()
    frozen = torch.nn.functional.normalize((states * weights).sum(1) / weights.sum(1), dim=-1)
    assert untrained.config.tuned_layers == text_selector.members[0].config.tuned_layers  # the default is the shipped count
    assert (untrained.pooled(*encoder.token_states(texts, below_top=untrained.config.tuned_layers)) - frozen).abs().max() <= 1e-5

    trained = train_text_selector(corpus, encoder, TrainConfig(steps=3, batch_size=4))
    assert not torch.equal(trained.top[-1].output.dense.weight, encoder.model.encoder.layer[-1].output.dense.weight)
    path = save_heads(trained, tmp_path / "heads.safetensors")
    selector, reloaded = TextSelector(trained, encoder), TextSelector.from_file(path, encoder)
    for text in texts:
        assert reloaded.raw_scores(text) == selector.raw_scores(text)


def test_the_selector_skips_the_encoder_layers_its_heads_replace(text_selector):
    """The shipped selector loads the encoder without the top layers its heads hold tuned copies of:
    same scores, bit for bit, as with the whole encoder, those layers fewer per instruction."""
    tuned = text_selector.members[0].config.tuned_layers
    whole = TextSelector(text_selector.members, SentenceEncoder())
    assert tuned > 0 and text_selector.encoder.dropped == tuned
    assert len(text_selector.encoder.model.encoder.layer) == len(whole.encoder.model.encoder.layer) - tuned
    for text in ("remove the snow and brighten", "derain without dehazing", "make it a painting", "é" * 300):
        assert text_selector.raw_scores(text) == whole.raw_scores(text)
    with pytest.raises(DiffPluginError, match=f"without its top {tuned} layers"):
        text_selector.encoder.token_states(["x"], below_top=0)
    with pytest.raises(ValueError, match="whole sentence encoder"):
        train_text_selector(load_corpus(variants=0), text_selector.encoder, TrainConfig(steps=0))


def test_a_bf16_text_selector_rounds_the_scores_and_keeps_the_selection(text_selector):
    """`dtype=torch.bfloat16` runs the encoder and the heads in bf16 (faster on CPUs with native bf16):
    the clause scores move by rounding, the selections stay. (The null gate compares two scores, so a
    task within rounding of its clause's null may flip between its score and 0: "the foggy morning
    shot is too dark" gates highlight's -6.3 to 0 in bf16, selected by neither.) Heads and an
    encoder of different dtypes are refused."""
    bf16 = TextSelector.from_file(dtype=torch.bfloat16)
    assert bf16.encoder.model.dtype == torch.bfloat16 and {member.dtype for member in bf16.members} == {torch.bfloat16}
    tasks = [label for label in text_selector.labels if label != NULL_KEY]
    for text in ("remove the snow and brighten", "remove the rain", "make it a painting", "the foggy morning shot is too dark", "sharpen the blurry face"):
        exact, rounded = text_selector._clause_scores(clauses(text)), bf16._clause_scores(clauses(text))
        assert not torch.equal(rounded, exact) and torch.allclose(rounded, exact, atol=0.25), text
        assert bf16.select(text, tasks).selected == text_selector.select(text, tasks).selected
    with pytest.raises(DiffPluginError, match="share one dtype"):
        TextSelector(text_selector.members, bf16.encoder)


def small_corpus(folder: Path, lines: int = 20) -> Path:
    """A corpus folder with the first `lines` phrasings of desnow, lowlight and none: training on it is quick."""
    folder.mkdir()
    for name in ("desnow", "lowlight", "none"):
        (folder / f"{name}.txt").write_text("\n".join((packaged_corpus() / f"{name}.txt").read_text().splitlines()[:lines]))
    return folder


def assert_scores_are_the_members_mean(ensemble: TextSelector, members: list[TextSelectorHeads], text: str) -> None:
    """A one-clause `text`'s raw scores are the mean of each member run on its own, gated at null + 1."""
    per_member = torch.stack([member(*ensemble.encoder.token_states([text], below_top=member.config.tuned_layers))[0] for member in members])
    mean = dict(zip(ensemble.labels, per_member.mean(0).tolist()))
    raw = ensemble.raw_scores(text)
    assert raw[NULL_KEY] == pytest.approx(mean[NULL_KEY], abs=1e-6)
    assert all(raw[label] == pytest.approx(mean[label] if mean[label] > mean[NULL_KEY] + 1.0 else 0.0, abs=1e-6)
               for label in ensemble.labels if label != NULL_KEY)


def test_an_ensemble_averages_its_members_and_round_trips(tmp_path):
    """Several heads score a clause by their mean, and one file holds them all."""
    encoder = SentenceEncoder()
    corpus = load_corpus(small_corpus(tmp_path / "corpus"))
    members = [train_text_selector(corpus, encoder, TrainConfig(steps=3, batch_size=4, seed=seed)) for seed in (0, 1)]
    ensemble = TextSelector(members, encoder)
    assert len(ensemble.layer_groups) == 2  # trained apart: each member runs its own tuned layers
    text = "remove the snow"  # one clause: its scores are the instruction's
    assert_scores_are_the_members_mean(ensemble, members, text)
    assert ensemble.raw_scores(text) != TextSelector(members[0], encoder).raw_scores(text) != TextSelector(members[1], encoder).raw_scores(text)
    reloaded = TextSelector.from_file(save_heads(members, tmp_path / "ensemble.safetensors"), encoder)
    for text in ("remove the snow", "brighten it but keep the fog", "make it a cartoon"):
        assert reloaded.raw_scores(text) == ensemble.raw_scores(text)


def test_members_sharing_tuned_layers_run_them_once(tmp_path):
    """After `share_tuned_layers` the members hold one copy of the layers: the selector runs it once
    per batch of clauses, and scores as running every member on its own would."""
    encoder = SentenceEncoder()
    corpus = load_corpus(small_corpus(tmp_path / "corpus"))
    members = [train_text_selector(corpus, encoder, TrainConfig(steps=3, batch_size=4, seed=seed)) for seed in (0, 1, 2)]
    assert not members[0].has_tuned_layers_of(members[1])
    share_tuned_layers(members)
    assert members[0].has_tuned_layers_of(members[1]) and members[0].has_tuned_layers_of(members[2])
    ensemble = TextSelector(members, encoder)
    assert [len(group) for group in ensemble.layer_groups] == [3]
    calls = []
    hooks = [member.top[0].register_forward_hook(lambda *_: calls.append(1)) for member in members]
    try:
        ensemble.raw_scores("remove the snow")
    finally:
        for hook in hooks:
            hook.remove()
    assert len(calls) == 1
    assert_scores_are_the_members_mean(ensemble, members, "remove the snow")
    reloaded = TextSelector.from_file(save_heads(members, tmp_path / "shared.safetensors"), encoder)
    assert [len(group) for group in reloaded.layer_groups] == [3]
    assert reloaded.raw_scores("brighten it but keep the fog") == ensemble.raw_scores("brighten it but keep the fog")


def test_null_margin_gates_clause_scores(text_selector):
    """A task counts for a clause only when it beats that clause's null by more than the heads'
    null margin (1.0 in the shipped heads and `train selector`'s default; 0 is the authors' rule)."""
    assert text_selector.members[0].config.null_margin == 1.0
    text = "remove the snow but keep the fog"
    states = text_selector.encoder.token_states(clauses(text), text_selector.members[0].config.tuned_layers)
    per_clause = torch.stack([member(*states) for member in text_selector.members]).mean(0)
    null = per_clause[:, text_selector.labels.index(NULL_KEY)]

    def with_margin(margin: float) -> TextSelector:
        members = [TextSelectorHeads.from_config(member.config, null_margin=margin) for member in text_selector.members]
        for heads, member in zip(members, text_selector.members):
            heads.load_state_dict(member.state_dict())
        return TextSelector(members, text_selector.encoder)

    for margin in (0.0, 1.0, 100.0):
        raw = with_margin(margin).raw_scores(text)
        for j, label in enumerate(text_selector.labels):
            if label != NULL_KEY:
                gated = torch.where(per_clause[:, j] > null + margin, per_clause[:, j], 0.0)  # 0 where it fails
                expected = gated.max().item()
                assert raw[label] == pytest.approx(expected, abs=1e-5), (margin, label)
    assert with_margin(100.0).select(text, ["desnow", "dehaze"]).is_none
    assert with_margin(0.0).select(text, ["desnow", "dehaze"]).selected == ["desnow"]


def test_train_selector_cli_stores_the_null_margin(tmp_path):
    """`train selector --null-margin M` writes M into the heads; without it, the default 1.0."""
    corpus = small_corpus(tmp_path / "corpus")
    for flag, expected in (([], 1.0), (["--null-margin", "0.5"], 0.5)):
        out = tmp_path / f"heads{expected}.safetensors"
        result = CliRunner().invoke(app, ["train", "selector", "--corpus", str(corpus), "--steps", "2", "--batch-size", "4",
                                          "--members", "1", "--out", str(out), *flag])
        assert result.exit_code == 0, result.output
        assert [heads.config.null_margin for heads in load_text_heads(out)] == [expected]


def test_train_selector_cli_shares_the_members_layers_unless_told(tmp_path):
    """`train selector --members 2` writes members with one shared copy of the tuned layers; `--separate-layers` keeps each its own."""
    corpus = small_corpus(tmp_path / "corpus")
    for flag, shared in (([], True), (["--separate-layers"], False)):
        out = tmp_path / f"heads{shared}.safetensors"
        result = CliRunner().invoke(app, ["train", "selector", "--corpus", str(corpus), "--steps", "2", "--batch-size", "4",
                                          "--members", "2", "--out", str(out), *flag])
        assert result.exit_code == 0, result.output
        first, second = load_text_heads(out)
        assert first.has_tuned_layers_of(second) is shared
        assert not torch.equal(first.label_keys, second.label_keys)


def test_training_an_ensemble_is_training_each_seed_alone(tmp_path):
    """`--members 2 --seed 0 --separate-layers` holds exactly the heads of `--members 1 --seed 0` and
    `--members 1 --seed 1`; by default the same heads, but with the mean of their tuned layers."""
    settings = {"corpus": small_corpus(tmp_path / "corpus"), "steps": 2, "batch_size": 4}
    separate = load_text_heads(train_text_heads_file(tmp_path / "separate.safetensors", members=2, share_layers=False, **settings))
    shared = load_text_heads(train_text_heads_file(tmp_path / "shared.safetensors", members=2, **settings))
    alone = [load_text_heads(train_text_heads_file(tmp_path / f"seed{seed}.safetensors", members=1, seed=seed, **settings))
             for seed in (0, 1)]
    assert [len(heads) for heads in (separate, shared, *alone)] == [2, 2, 1, 1]
    for member, [single] in zip(separate, alone):
        assert member.state_dict().keys() == single.state_dict().keys()
        assert all(torch.equal(value, single.state_dict()[key]) for key, value in member.state_dict().items())
    assert not torch.equal(separate[0].label_keys, separate[1].label_keys)
    assert not alone[0][0].has_tuned_layers_of(alone[1][0])
    mean = {name: torch.stack([single.top.state_dict()[name] for [single] in alone]).mean(dim=0) for name in alone[0][0].top.state_dict()}
    for member, [single] in zip(shared, alone):
        assert all(torch.equal(value, mean[key[len("top."):]] if key.startswith("top.") else single.state_dict()[key])
                   for key, value in member.state_dict().items())


def test_fine_tuning_starts_each_member_from_the_initial_heads(tmp_path):
    """`init=FILE` continues training member i from the file's member i: with a zero learning rate
    the members come back unchanged; with steps they move a little, nowhere near the fresh run's."""
    settings = {"corpus": small_corpus(tmp_path / "corpus"), "batch_size": 4, "steps": 2}
    fresh = load_text_heads(train_text_heads_file(tmp_path / "fresh.safetensors", members=2, **settings))
    fresh_keys = [member.label_keys.clone() for member in fresh]  # what the same run gives without init
    torch.manual_seed(0)
    for member in fresh:  # keys no training run would start from
        member.label_keys.copy_(torch.nn.functional.normalize(torch.randn_like(member.label_keys), dim=-1))
    start = save_heads(fresh, tmp_path / "start.safetensors")
    frozen = load_text_heads(train_text_heads_file(tmp_path / "frozen.safetensors", init=start, lr=0.0, tuned_lr=0.0, **settings))
    tuned = load_text_heads(train_text_heads_file(tmp_path / "tuned.safetensors", init=start, **settings))
    assert len(frozen) == len(tuned) == 2
    for initial, unchanged, moved, keys in zip(load_text_heads(start), frozen, tuned, fresh_keys):
        assert all(torch.equal(value, unchanged.state_dict()[key]) for key, value in initial.state_dict().items())
        assert not torch.equal(initial.label_keys, moved.label_keys)
        assert torch.allclose(initial.label_keys, moved.label_keys, atol=0.01)  # two Adam steps of lr 1e-3
        assert not torch.allclose(moved.label_keys, keys, atol=0.1)


def test_train_selector_cli_refuses_init_heads_that_do_not_fit(tmp_path, text_selector):
    """`--init` heads keep their labels, members, tuned layers and null margin: a corpus of other
    tasks or a flag asking otherwise is a one-line error naming the heads."""
    corpus = small_corpus(tmp_path / "corpus")
    args = ["train", "selector", "--corpus", str(corpus), "--steps", "1", "--batch-size", "4", "--out", str(tmp_path / "out.safetensors")]
    shipped = CliRunner().invoke(app, [*args, "--init", "shipped"])
    assert shipped.exit_code == 2 and "--init shipped: its heads have labels deblur, dehaze" in shipped.stderr, shipped.output
    assert "the corpus has desnow, lowlight, null" in shipped.stderr
    shipped_heads = text_selector.members
    tuned = shipped_heads[0].config.tuned_layers
    assert tuned != 1 and len(shipped_heads) != 2  # the flags below must ask for something else
    for flag, value, expected in (("--members", "2", f"holds {len(shipped_heads)} heads"), ("--tuned-layers", "1", f"({tuned})"), ("--null-margin", "0.5", "(1)")):
        refused = CliRunner().invoke(app, [*args, "--init", "shipped", flag, value])
        assert refused.exit_code == 2 and f"{flag} {value}:" in refused.stderr and expected in refused.stderr, refused.output
    assert not (tmp_path / "out.safetensors").exists()


@pytest.fixture(scope="module")
def training_texts():
    return shipped_training_texts()


@pytest.mark.parametrize("path", CASE_FILES, ids=lambda path: path.stem)
def test_held_out_cases_are_not_training_texts(path, training_texts):
    cases = read_cases(path)
    assert len(CASE_FILES) >= 40 and len(cases) >= CASES_UNDER_300.get(path.name, 300)
    assert {"single", "multi", "none", "single+unsupported", "negation"} == {c["kind"] for c in cases}
    assert not [c["text"] for c in cases if c["text"].lower() in training_texts]


# --- CLI ---------------------------------------------------------------------------------------

def test_select_json_and_json_lines():
    runner = CliRunner()
    result = runner.invoke(app, ["select", "-i", "remove the snow", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"instruction", "selector", "scores", "selected", "threshold"}
    assert data["selector"] == "text" and data["selected"] == ["desnow"]
    lines = runner.invoke(app, ["select", "-i", "-"], input="remove the rain\n\nmake it a cartoon\n")
    assert lines.exit_code == 0
    parsed = [json.loads(line) for line in lines.stdout.splitlines()]
    assert [p["selected"] for p in parsed] == [["derain"], []]
    bf16 = runner.invoke(app, ["select", "-i", "remove the snow", "--dtype", "bf16", "--json"])
    assert bf16.exit_code == 0, bf16.output
    assert json.loads(bf16.stdout)["selected"] == ["desnow"] and json.loads(bf16.stdout)["scores"] != data["scores"]
    fp16 = runner.invoke(app, ["select", "-i", "remove the snow", "--dtype", "fp16"])
    assert fp16.exit_code == 2 and "fp32 or bf16" in fp16.stderr


def test_select_reference_through_cli():
    result = CliRunner().invoke(app, ["select", "-i", "remove snow and brighten", str(CONFORMANCE / "inputs/small_75x70.png"),
                                      "--selector", "reference", "--selector-heads", str(HEADS), "--plugin-dir", str(PLUGINS),
                                      "--base-model", BASE, "--clip-model", CLIP, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["selected"] == ["desnow", "lowlight"]
    assert abs(data["scores"]["desnow"] - SELECTOR_CASES[2]["expected"]["scores_final"][0]) <= 1e-4
    missing = CliRunner().invoke(app, ["select", "-i", "x", "--selector", "reference"])
    assert missing.exit_code == 2 and "needs an IMAGE" in missing.stderr
    bf16 = CliRunner().invoke(app, ["select", "-i", "x", "--selector", "reference", "--dtype", "bf16"])
    assert bf16.exit_code == 2 and "text selector only" in bf16.stderr


def test_train_reference_selector_learns_from_plugin_features(tmp_path):
    """`train selector --selector reference`: the authors' heads trained as the paper, with the
    installed plugins' F^p of a folder of images as keys. Trained heads select the right plugin (or
    none) for most corpus texts; freshly initialised ones (what training starts from) do not."""
    corpus = small_corpus(tmp_path / "corpus", lines=40)
    images = tmp_path / "images"
    images.mkdir()
    for path in (CONFORMANCE / "inputs").glob("*.png"):
        (images / path.name).write_bytes(path.read_bytes())
    trained = tmp_path / "trained.safetensors"
    args = ["train", "selector", "--selector", "reference", "--corpus", str(corpus), "--plugin-dir", str(PLUGINS), "--base-model", BASE,
            "--clip-model", CLIP, "--out", str(trained)]
    missing = CliRunner().invoke(app, args)
    assert missing.exit_code == 2 and "needs --images" in missing.stderr
    ensemble = CliRunner().invoke(app, [*args, "--members", "2"])
    assert ensemble.exit_code == 2 and "--members" in ensemble.stderr
    for flag, value in (("--null-margin", "0.5"), ("--tuned-layers", "1"), ("--tuned-lr", "1e-4"), ("--init", "shipped")):
        refused = CliRunner().invoke(app, [*args, flag, value])
        assert refused.exit_code == 2 and flag in refused.stderr and "text selector only" in refused.stderr
    result = CliRunner().invoke(app, [*args, "--images", str(images), "--steps", "150"])
    assert result.exit_code == 0, result.output
    torch.manual_seed(0)  # the initialisation training starts from
    untrained = save_heads(PromptTuner(dim=768), tmp_path / "untrained.safetensors")

    texts = load_corpus(corpus)
    rng = random.Random(0)
    sample = [(text, label) for wanted in ("desnow", "lowlight", NULL_KEY)
              for text, label in rng.sample([pair for pair in zip(texts.texts, texts.labels) if pair[1] == wanted], 15)]

    def accuracy(heads: Path) -> float:
        request = SelectRequest("reference", heads=heads, plugin_dirs=[PLUGINS], base_model=BASE, clip_model=CLIP)
        select = open_selector(request, CONFORMANCE / "inputs/small_75x70.png")
        selections = select([text for text, _ in sample])
        return sum(selection.selected == ([] if label == NULL_KEY else [label]) for selection, (_, label) in zip(selections, sample)) / len(sample)

    before, after = accuracy(untrained), accuracy(trained)
    print(f"balanced accuracy on corpus texts: untrained {before:.3f}, trained {after:.3f}")
    assert after >= 0.75 and after > before + 0.3, (before, after)


def test_eval_selector_cli(tmp_path):
    """Schema and dtype of `eval selector` on a few held-out cases of each kind (the metrics have their own tests)."""
    per_kind: dict[str, list[str]] = {}
    for line in HELDOUT.read_text(encoding="utf-8").splitlines():
        per_kind.setdefault(json.loads(line)["kind"], []).append(line)
    cases = tmp_path / "cases.jsonl"
    cases.write_text("".join(line + "\n" for lines in per_kind.values() for line in lines[:4]), encoding="utf-8")
    result = CliRunner().invoke(app, ["eval", "selector", "--cases", str(cases), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["metrics"]
    assert {"overall", "single", "multi", "none", "single+unsupported", "negation"} == set(report)
    assert {"ZTA", "mAP", "CP", "OP", "OR", "CF1", "OF1"} <= set(report["overall"])
    assert json.loads(result.stdout)["dtype"] == "fp32"
    bf16 = CliRunner().invoke(app, ["eval", "selector", "--cases", str(cases), "--dtype", "bf16", "--json"])
    assert bf16.exit_code == 0, bf16.output
    assert json.loads(bf16.stdout)["dtype"] == "bf16"
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n')
    bad = CliRunner().invoke(app, ["eval", "selector", "--cases", str(tmp_path / "bad.jsonl")])
    assert bad.exit_code == 2 and "bad.jsonl:1" in bad.stderr


def _images(folder: Path, count: int) -> None:
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (40, 30), (40 * i, 90, 200)).save(folder / f"img{i}.png")


def _options(out: Path, **overrides) -> RunOptions:
    values = dict(output_dir=out, tasks=[], plugin_dirs=[PLUGINS], steps=2, resolution=64, base_model=BASE, clip_model=CLIP, device="cpu", dtype="fp32")
    return RunOptions(**(values | overrides))


def test_run_with_text_instruction_records_the_selection(tmp_path, pipeline):
    _images(tmp_path / "in", 2)
    summary = run([str(tmp_path / "in")], _options(tmp_path / "out", instruction="brighten it and remove the snow"), pipeline=pipeline)
    assert summary.processed == 2 and summary.selection["selected"] == ["desnow", "lowlight"]
    sidecar = json.loads((tmp_path / "out/img0.json").read_text())
    assert [p["name"] for p in sidecar["plugins"]] == ["desnow", "lowlight"]
    assert sidecar["selector"]["instruction"] == "brighten it and remove the snow" and sidecar["selector"]["selector"] == "text"
    assert set(sidecar["selector"]["scores"]) >= {"desnow", "lowlight", NULL_KEY}
    again = run([str(tmp_path / "in")], _options(tmp_path / "out", instruction="brighten it and remove the snow"), pipeline=pipeline)
    assert again.skipped == 2
    changed = run([str(tmp_path / "in")], _options(tmp_path / "out", instruction="remove the snow"), pipeline=pipeline)
    assert changed.processed == 2


def test_run_with_nothing_to_do_reports_no_match(tmp_path):
    _images(tmp_path / "in", 2)
    result = CliRunner().invoke(app, ["run", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-i", "make it a painting", "--json", *cli_args()])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["no_match"] == 2 and summary["processed"] == 0 and summary["selection"]["selected"] == []
    assert not list((tmp_path / "out").glob("*.png"))
    both = CliRunner().invoke(app, ["run", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-i", "x", "--task", "desnow", *cli_args()])
    assert both.exit_code == 2


def test_run_with_reference_selector_selects_per_image(tmp_path, pipeline, plugins):
    """Selection and restoration share one CLIP pass per image, and the output is what the
    pipeline gives for the selected plugins on its own."""
    _images(tmp_path / "in", 2)
    clip_calls = []
    hook = pipeline.base.clip_vision.register_forward_hook(lambda module, args, output: clip_calls.append(args[0].shape[0]))
    try:
        summary = run([str(tmp_path / "in")], _options(tmp_path / "out", instruction="remove snow", selector="reference", selector_heads=HEADS,
                                                        batch_size=2), pipeline=pipeline)
    finally:
        hook.remove()
    assert summary.processed == 2
    assert clip_calls == [1, 1]
    sidecars = [json.loads((tmp_path / f"out/img{i}.json").read_text()) for i in range(2)]
    assert sidecars[0]["selector"]["selector"] == "reference" and sidecars[0]["selector"]["selected"] == [p["name"] for p in sidecars[0]["plugins"]]
    selected = sidecars[0]["selector"]["selected"]
    assert selected and sidecars[1]["selector"]["selected"] == selected  # so both went through one batch
    images = [Image.open(tmp_path / f"in/img{i}.png").convert("RGB") for i in range(2)]
    alone = pipeline(images, [plugins[name] for name in selected], [s["seed"] for s in sidecars], steps=2, resolution=64)
    for i, expected in enumerate(alone):  # run's default --keep-size resizes back
        assert np.array_equal(np.asarray(expected.resize(images[i].size, Image.LANCZOS)), np.asarray(Image.open(tmp_path / f"out/img{i}.png")))


@pytest.mark.slow
def test_a_shipped_text_head_is_reproduced_by_the_documented_command(tmp_path):
    """The shipped heads are `diffplugin train selector --out ...` with defaults: three members, seeds
    0, 1, 2, each the run `--members 1 --seed K` but for the tuned layers, which all take the mean
    of the three runs' (test_training_an_ensemble_is_training_each_seed_alone). Retraining all three
    takes 25 to 80 minutes here, too long for CI, so this retrains the last member, whose seed and
    corpus draw come from the offset, and compares what is its own: the MLP, keys and scale. Bits
    depend on the CPU's kernels (on a machine other than the one that trained them, 8e-5 apart
    after 800 steps), so it asks for the same tensors to rounding and, with the shared layers, the
    same selections."""
    from importlib import resources

    import torch

    member = 2
    out = tmp_path / "heads.safetensors"
    result = CliRunner().invoke(app, ["train", "selector", "--members", "1", "--seed", str(member), "--out", str(out)])
    assert result.exit_code == 0, result.output
    shipped_path = str(resources.files("diffplugin_cli") / "text_selector.safetensors")
    members, [retrained] = load_text_heads(shipped_path), load_text_heads(out)
    shipped = members[member]
    assert all(members[0].has_tuned_layers_of(other) for other in members)  # one shared copy
    assert shipped.state_dict().keys() == retrained.state_dict().keys()
    assert all(torch.allclose(value, retrained.state_dict()[key], rtol=0, atol=1e-3) for key, value in shipped.state_dict().items()
               if not key.startswith("top."))
    retrained.top.load_state_dict(shipped.top.state_dict())  # as `share_tuned_layers` gives every member
    encoder = SentenceEncoder(drop_top=shipped.config.tuned_layers)
    alone, again = TextSelector(shipped, encoder), TextSelector(retrained, encoder)
    tasks = [label for label in alone.labels if label != NULL_KEY]
    for case in read_cases(HELDOUT):
        shipped_choice, retrained_choice = (selector.select(case["text"], tasks) for selector in (alone, again))
        assert retrained_choice.scores == pytest.approx(shipped_choice.scores, abs=1e-3), case["text"]
        assert retrained_choice.selected == shipped_choice.selected, case["text"]
    with safe_open(shipped_path, framework="pt") as a, safe_open(str(out), framework="pt") as b:
        shipped_meta, retrained_meta = a.metadata(), b.metadata()
    # Config (tuned layers, null margin) and training settings agree; the ensemble's own fields differ.
    assert (shipped_meta["members"], shipped_meta["seed"], retrained_meta["seed"]) == ("3", "0", str(member))
    assert shipped_meta["corpus_texts"].split(",")[member] == retrained_meta["corpus_texts"]
    differing = {"members", "seed", "corpus_texts"}
    assert {k: v for k, v in shipped_meta.items() if k not in differing} == {k: v for k, v in retrained_meta.items() if k not in differing}
