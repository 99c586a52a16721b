"""The text demo: its data (captions, held-out parts), its checker, and the shipped model."""

import numpy as np
import pytest

from mlx_starflow import Pipeline
from mlx_starflow.demo_text import checker, lm, scenes
from mlx_starflow.loading.hub import DEMO_TEXT
from mlx_starflow.loading.text import EMBED_TEMPLATE


def _drawn(n, seed, held=None, two_share=0.4):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s = scenes.random_scene(rng, held=held, two_share=two_share)
        out.append((s, scenes.draw(s, rng)))
    return out


def test_checker_reads_drawn_scenes():
    hits = {k: [] for k in ("colour", "shape", "size", "cell", "present")}
    for scene, image in _drawn(300, 11):
        for v in checker.judge(image, [(t.colour, t.shape, t.size, t.cell) for t in scene.things]):
            for k in hits:
                hits[k].append(v[k])
    acc = {k: float(np.mean(v)) for k, v in hits.items()}
    assert min(acc.values()) >= 0.96, acc


def test_checker_is_not_fooled_by_a_changed_image():
    scene = scenes.Scene((scenes.Thing("red", "triangle", "large", (0, 0)),), "white")
    image = scenes.draw(scene, np.random.default_rng(0))
    (found,) = checker.read(image)
    assert (found.colour, found.shape, found.size, found.cell) == ("red", "triangle", "large", (0, 0))
    (moved,) = checker.read(image[::-1, ::-1])  # upside down, to the other corner
    assert moved.cell == (2, 2) and moved.shape != "triangle"
    (blue,) = checker.read(image[..., ::-1])  # channels swapped: red -> blue
    assert blue.colour == "blue"
    assert checker.read(np.full((36, 36, 3), 120, np.uint8)) == []


def test_training_never_shows_the_held_out_parts():
    rng = np.random.default_rng(3)
    for _ in range(500):
        scene = scenes.random_scene(rng, held=False, two_share=0.5)
        assert not any(scenes.held_out(t) for t in scene.things)
        c = scenes.caption(scene, rng)
        assert not any(h in c.template for h in scenes.HELD_OUT_TEMPLATES + scenes.HELD_OUT_TWO)
    held = [scenes.random_scene(rng, n=1, held=True) for _ in range(50)]
    assert all(scenes.held_out(s.things[0]) for s in held)


def test_every_caption_word_is_in_the_vocabulary():
    tok = lm.build_tokenizer()
    unk = tok.token_to_id("<unk>")
    rng = np.random.default_rng(4)
    lengths = []
    for _ in range(300):
        scene = scenes.random_scene(rng, held=None, two_share=0.5)
        text = scenes.caption(scene, rng, held_phrasing=None).text
        ids = tok.encode(EMBED_TEMPLATE.format(prompt=text)).ids
        assert unk not in ids, text
        lengths.append(len(ids))
    assert np.mean(np.array(lengths) <= 40) >= 0.98  # txt_size: the rare longer ones are truncated


shipped = pytest.mark.skipif(not (DEMO_TEXT / "model.safetensors").is_file(), reason="the text demo is not shipped")


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained("demo-text")


@shipped
def test_shipped_model_draws_free_prompts(pipe):
    prompts = [
        "a large red circle in the top left corner",
        "a big blue square in the center",
        "there is a large yellow triangle at the bottom right",
        "a large green circle on the left side",
    ]
    wanted = [("red", "circle", "large", (0, 0)), ("blue", "square", "large", (1, 1))]
    wanted += [("yellow", "triangle", "large", (2, 2)), ("green", "circle", "large", (1, 0))]
    r = pipe.generate(prompts, num_images=3, seed=0)
    verdicts = [checker.judge(np.asarray(im), [wanted[i // 3]])[0] for i, im in enumerate(r.images)]
    assert np.mean([v["colour"] for v in verdicts]) >= 0.75
    assert np.mean([v["cell"] for v in verdicts]) >= 0.6


@shipped
def test_shipped_model_names_unknown_words(pipe):
    with pytest.raises(ValueError, match='the demo does not know: "giraffe", "banana"'):
        pipe.generate(["a giraffe eating a red banana"], seed=0)


@shipped
def test_score_ranks_the_right_caption_of_a_drawn_image(pipe):
    scene = scenes.Scene((scenes.Thing("blue", "circle", "large", (0, 0)),), "black")
    image = scenes.draw(scene, np.random.default_rng(1))
    captions = [
        "a large blue circle in the top left corner",
        "a large red circle in the top left corner",
        "a large blue circle in the bottom right corner",
        "a large blue triangle in the top left corner",
    ]
    r = pipe.score([image], captions, seed=0)
    assert r.best() == [captions[0]]


@shipped
def test_edit_to_a_new_prompt(pipe):
    src = pipe.generate(["a large red circle in the center"], num_images=4, seed=5)
    r = pipe.edit(
        src.images,
        "a large blue circle in the center",
        source_prompt="a large red circle in the center",
        strength=0.3,
        seed=7,
        num_images=4,
    )
    colours = [checker.judge(np.asarray(im), [("blue", "circle", "large", (1, 1))])[0]["colour"] for im in r.images]
    assert sum(colours) >= 3
    assert pipe.examples and all(not pipe.tokenizer.unknown_words(p) for p in pipe.examples)
