"""The text demo: its data (captions, held-out parts), its checker, and the shipped model."""

import json

import numpy as np
import pytest
from PIL import Image

from mlx_starflow import Pipeline
from mlx_starflow.cli import edit as edit_cli
from mlx_starflow.cli import score as score_cli
from mlx_starflow.demo_text import checker, cli, lm, scenes
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


# The shipped model draws the asked colour, place and size of one object well, its shape not
# reliably (docs/demo.md: its measured accuracies); these tests hold what it does.


@shipped
def test_shipped_model_draws_colour_place_and_size_of_held_out_prompts(pipe):
    from mlx_starflow.demo_text import evaluate

    r = evaluate.checker_accuracy(pipe, 48, objects=1, held_phrasing=False)  # 100 / 43.8 / 72.9 / 100% here
    assert r["colour"] >= 0.9 and r["cell"] >= 0.9 and r["size"] >= 0.65, {k: r[k] for k in evaluate.ATTRIBUTES}
    assert r["shape"] >= 0.35, r["shape"]  # the plain-likelihood model before: 19.8% on 96


@shipped
def test_shipped_model_follows_the_background_of_a_free_prompt(pipe):
    r = pipe.generate(
        ["a large red circle in the top left corner on a white background", "a big blue square on black"],
        num_images=4,
        seed=0,
    )
    assert [im.size for im in r.images] == [(36, 36)] * 8
    light = [float(np.median(np.asarray(im))) for im in r.images]
    assert min(light[:4]) > 170 and max(light[4:]) < 90, light


@shipped
def test_shipped_model_names_unknown_words(pipe):
    with pytest.raises(ValueError, match='the demo does not know: "giraffe", "eating", "banana"'):
        pipe.generate(["a giraffe eating a red banana"], seed=0)


@shipped
def test_score_ranks_captions_of_a_drawn_image(pipe):
    scene = scenes.Scene((scenes.Thing("blue", "circle", "large", (0, 0)),), "black")
    image = scenes.draw(scene, np.random.default_rng(1))
    captions = [
        "a large blue circle in the top left corner on black",
        "a large blue circle in the top left corner on a white background",
    ]
    r = pipe.score([image], captions, seed=0)
    assert r.bits_per_dim.shape == (1, 2) and np.all(np.isfinite(r.bits_per_dim))
    assert r.best() == [captions[0]]  # the background it does read


@shipped
def test_edit_to_a_new_prompt(pipe):
    src = pipe.generate(["a large red circle in the center on black"], num_images=2, seed=5)
    r = pipe.edit(
        src.images, "a large red circle in the center on a white background", strength=1.0, seed=7, num_images=2
    )
    assert all(float(np.median(np.asarray(im))) > 170 for im in r.images)
    assert pipe.examples and all(not pipe.tokenizer.unknown_words(p) for p in pipe.examples)


@shipped
def test_score_and_edit_commands(tmp_path, capsys):
    scene = scenes.Scene((scenes.Thing("green", "square", "large", (2, 0)),), "gray")
    Image.fromarray(scenes.draw(scene, np.random.default_rng(2))).save(tmp_path / "in.png")
    right, wrong = "a large green square in the bottom left corner on gray", "a green square on white"
    assert score_cli.main(["--model", "demo-text", "--image", str(tmp_path / "in.png"), "--prompt", wrong, right]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "most likely" in line]
    assert len(lines) == 1 and repr(right) in lines[0]
    out = tmp_path / "edited.png"
    argv = ["--model", "demo-text", "--image", str(tmp_path / "in.png"), "--prompt", "a large blue square"]
    assert edit_cli.main(argv + ["--source-prompt", right, "--output", str(out), "--seed", "1"]) == 0
    assert out.is_file()
    assert edit_cli.main(argv[:-1] + ["a large blue unicorn", "--output", str(tmp_path / "x.png")]) != 0
    assert 'does not know: "unicorn"' in capsys.readouterr().err


@shipped
def test_evaluate_command(tmp_path, capsys):
    out = tmp_path / "eval.json"
    cli.main(["evaluate", "--n", "2", "--rank-n", "2", "--noise-samples", "2", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["zero-shot noise_samples"] == 2
    ranking = report["zero-shot generated images, held-out combinations"]
    assert ranking["n"] == 2 and 1 <= ranking["mean_rank"] <= 10
    assert report["two objects, held-out phrasings"]["n"] == 2
    assert "own caption first among ten" in capsys.readouterr().out


def test_train_command(tmp_path, capsys):
    import mlx.core as mx

    small = ["--steps", "4", "--batch-size", "2", "--channels", "32", "--no-select"]
    cli.main(["train", "--out", str(tmp_path / "a"), "--lm-steps", "2", *small])
    b = ["--lm", str(tmp_path / "a" / "lm"), "--stop-after", "2", "--patch-size", "6", "--shallow", "1", "--beta", "1"]
    b.append("--frozen-embeddings")
    cli.main(["train", "--out", str(tmp_path / "b"), *b, *small])
    out = capsys.readouterr().out
    assert "flow step 4/4" in out and "saved" in out
    record = json.loads((tmp_path / "b" / "model" / "training.json").read_text())
    assert record["flow"]["steps"] == 4 and record["flow"]["stop_after"] == 2
    assert record["flow"]["patch_size"] == 6 and record["flow"]["shallow_layers"] == [1]
    assert record["flow"]["beta"] == 1.0 and np.isfinite(record["losses_per_100_steps"]).all()
    assert record["flow"]["train_table"] is False  # --frozen-embeddings: the text encoder is the LM's table
    key = "model.embed_tokens.weight"
    frozen = mx.load(str(tmp_path / "b" / "model" / "text_encoder" / "model.safetensors"))[key]
    assert mx.array_equal(frozen, mx.load(str(tmp_path / "b" / "lm" / "model.safetensors"))[key]).item()
    lm_table = mx.load(str(tmp_path / "a" / "lm" / "model.safetensors"))[key]  # the recipe: it learnt with the flow
    trained = mx.load(str(tmp_path / "a" / "model" / "text_encoder" / "model.safetensors"))[key]
    assert lm_table.shape == trained.shape and mx.abs(lm_table - trained).max().item() > 0
    config = json.loads((tmp_path / "b" / "model" / "config.json").read_text())
    assert config["patch_size"] == 6 and config["layers_per_block"] == [1, 3]  # a shallow block, the LM's 3 layers
    first = json.loads((tmp_path / "a" / "model" / "config.json").read_text())
    assert first["patch_size"] == 12 and first["layers_per_block"] == [3]  # the recipe: the deep block alone
    assert len(record["losses_per_100_steps"]) == 1 and record["lm"]["steps"] == 300  # the --lm folder's
    assert (tmp_path / "b" / "model" / "examples.txt").is_file()
    assert (tmp_path / "b" / "model" / "text_encoder" / "tokenizer.json").is_file()


def test_weighted_likelihood_is_the_likelihood_with_the_edges_weighted():
    import mlx.core as mx

    from mlx_starflow.demo_text import train

    args = lm.lm_args(20, hidden=32, layers=1, heads=1, head_dim=32, mlp=64)
    for shallow in ((), (1,)):
        mx.random.seed(0)
        model = train.Flow(train.flow_config(args, channels=32, shallow=shallow))
        x = mx.random.normal((2, 36, 36, 3)) * 0.5
        y = mx.random.normal((2, 5, 32))
        plain = -model.log_prob(x, y).mean() / (36 * 36 * 3)
        nll, same = train.weighted_nll(model, x, y, 0.0)
        assert abs(nll.item() - plain.item()) < 1e-5 and abs(same.item() - plain.item()) < 1e-5
        nll, weighted = train.weighted_nll(model, x, y, 0.5)
        assert abs(nll.item() - plain.item()) < 1e-5 and abs(weighted.item() - plain.item()) > 1e-4


def test_train_command_refuses_a_bad_layout(tmp_path, capsys):
    for bad in ("x", "1 9", "1 1 1 1 1"):
        with pytest.raises(SystemExit):
            cli.main(["train", "--out", str(tmp_path / "m"), "--shallow", bad])
        assert "argument --shallow" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_demo_commands_bound_the_work_they_set(tmp_path, capsys):
    # Every flag that sets an amount of work has an upper limit: one line, nothing written.
    from mlx_starflow import demo, demo_video

    runs = [
        (cli.main, ["train", "--out", str(tmp_path / "m"), "--steps", "10000000"], "--steps", "out of range"),
        (cli.main, ["train", "--out", str(tmp_path / "m"), "--lm-steps", "0"], "--lm-steps", "out of range"),
        (cli.main, ["train", "--out", str(tmp_path / "m"), "--batch-size", "lots"], "--batch-size", "not a whole"),
        (cli.main, ["evaluate", "--rank-n", "1e9"], "--rank-n", "not a whole"),
        (cli.main, ["train", "--out", str(tmp_path / "m"), "--beta", "nan"], "--beta", "out of range"),
        (cli.main, ["train", "--out", str(tmp_path / "m"), "--beta", "half"], "--beta", "not a number"),
        (cli.main, ["grid", "--cols", "100000"], "--cols", "out of range"),
        (demo.main, ["train", "--out", str(tmp_path / "m"), "--steps", "-1"], "--steps", "out of range"),
        (demo_video.main, ["evaluate", "--n", "999999999"], "--n", "out of range"),
    ]
    for main, argv, flag, why in runs:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}" in err and why in err and "Traceback" not in err, err
    assert not (tmp_path / "m").exists()


def test_demo_command_lines_prefer_openblas(monkeypatch, capsys):
    # From the command line (argv None) a demo first offers to run again with OpenBLAS, as
    # generate does; --no-openblas is taken off before the parser sees it.
    from mlx_starflow.demo_common import training

    seen = []

    def prefer(argv):
        seen.append(list(argv))
        return [a for a in argv if a != "--no-openblas"]

    monkeypatch.setattr(training, "prefer_openblas", prefer)
    monkeypatch.setattr("sys.argv", ["demo_text", "grid", "--cols", "0", "--no-openblas"])
    with pytest.raises(SystemExit):
        cli.main()
    assert seen == [["grid", "--cols", "0", "--no-openblas"]]
    assert "argument --cols" in capsys.readouterr().err
