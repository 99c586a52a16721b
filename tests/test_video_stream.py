"""STARFlow-V frames streamed while sampling: with frame-local shallow blocks a frame goes
through the shallow blocks as soon as the deep block has finished it (video_sample's
`stream`), and the pipeline has a "preview" event for it before the deep block's next
token; the clip is the same as sampled block after block. Tiny random models."""

import mlx.core as mx
import numpy as np
import pytest
from helpers import randomize
from test_video_flow import ARGS, TXT_DIM, tiny_video
from test_video_pipeline import latent_flow, pixel_flow
from test_wan_vae import tiny_vae

from mlx_starflow.cli.generate import main
from mlx_starflow.cli.video import Progress
from mlx_starflow.loading.video import video_config_from_args
from mlx_starflow.models.video import VideoFlow
from mlx_starflow.sample import Jacobi, OptionError
from mlx_starflow.video import Cancelled, VideoOptions, VideoPipeline
from mlx_starflow.video_sample import sample_video_steps, streams

TOKENS = 16  # tokens a frame of pixel_flow (16x16 pixels, 4x4 patches) and of tiny_video (4x4 latents)


def clip_of(flow, noise, y, guidance, **kw):
    x = None
    for step in sample_video_steps(flow, noise, y, guidance, **kw):
        x = step.x if step.x is not None else x
    return np.array(x)


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("MLX_STARFLOW_CACHE", str(tmp_path / "cache"))


# -- the sampler -----------------------------------------------------------------------------


def test_streamed_clip_equals_the_blocks_in_turn():
    flow = tiny_video()
    assert streams(flow)
    noise = mx.random.normal((2, 3, 4, 4, 4), key=mx.random.key(1))
    y = mx.random.normal((4, 3, TXT_DIM), key=mx.random.key(2))
    for kw in ({}, {"jacobi": Jacobi(4, 1e-3, 8)}):
        one = clip_of(flow, noise, y, 2.0, stream=False, **kw)
        np.testing.assert_array_equal(clip_of(flow, noise, y, 2.0, stream=True, **kw), one)
    # sequential streams by default; each frame handed on is the clip's frame
    frames, x = {}, None
    for step in sample_video_steps(flow, noise, y, 2.0):
        if step.frame is not None:
            frames[step.frame] = np.array(step.frame_x[:, 0])
        x = step.x if step.x is not None else x
    np.testing.assert_array_equal(np.stack([frames[t] for t in range(3)], axis=1), np.array(x))


def test_jacobi_previews_are_close_to_the_clip():
    """With Jacobi a frame's chunks stop on its own change (the reference's rule is the change
    over all frames): the previews are within the iteration's tolerance of the clip's frames."""
    flow = tiny_video()
    noise = mx.random.normal((1, 3, 4, 4, 4), key=mx.random.key(3))
    y = mx.random.normal((2, 3, TXT_DIM), key=mx.random.key(4))
    frames, x = {}, None
    for step in sample_video_steps(flow, noise, y, 1.0, jacobi=Jacobi(2, 1e-4, 32), stream=True):
        if step.frame is not None:
            frames[step.frame] = np.array(step.frame_x[0, 0])
        x = step.x if step.x is not None else x
    x = np.array(x[0])
    assert sorted(frames) == [0, 1, 2]
    for t in range(3):
        assert np.abs(frames[t] - x[t]).max() < 1e-2 * max(1.0, np.abs(x[t]).max())


def test_whole_clip_shallow_blocks_keep_the_old_order():
    cfg, video = video_config_from_args({**ARGS, "shallow_block_local": 0}, txt_dim=TXT_DIM)
    flow = randomize(VideoFlow(cfg, video), 0)
    assert not streams(flow)
    noise = mx.random.normal((1, 3, 4, 4, 4), key=mx.random.key(1))
    y = mx.random.normal((1, 3, TXT_DIM), key=mx.random.key(2))
    blocks = [s.block for s in sample_video_steps(flow, noise, y)]
    assert blocks == sorted(blocks, reverse=True)  # the deep block, then each shallow block over the clip
    with pytest.raises(ValueError, match="not frame-local"):
        next(sample_video_steps(flow, noise, y, stream=True))


# -- the pipeline's events -------------------------------------------------------------------


def check_order(events, tokens, frames_per_latent):
    """Every preview of latent frame t comes after the deep block's last token of t and
    before any of its tokens of t + 1."""
    deep = 0
    for e in events:
        if e.stage == "deep":
            deep = e.done
        elif e.stage == "preview":
            t = 0 if e.index == 0 else 1 + (e.index - 1) // frames_per_latent
            assert deep == (t + 1) * tokens, (e.index, deep)


def test_a_preview_per_frame_before_the_next_frame_is_sampled():
    pipe = VideoPipeline(pixel_flow(), info={"model": "tiny"})
    events = list(
        pipe.generate_steps("red right", seed=3, guidance=1.0, denoise="none", sampler="sequential", preview=True)
    )
    previews = [e for e in events if e.stage == "preview"]
    assert [e.index for e in previews] == list(range(6)) and all(e.total == 6 for e in previews)
    check_order(events, TOKENS, 1)
    last_preview = max(i for i, e in enumerate(events) if e.stage == "preview")
    assert all(e.stage != "deep" and (e.stage != "shallow" or e.done == e.total) for e in events[last_preview + 1 :])
    # the denoising is off: the previews are the clip's frames
    result = events[-1].result
    np.testing.assert_array_equal(np.stack([e.frame for e in previews]), np.stack(result.frames))
    # the clip is the one sampled block after block
    old = VideoPipeline(pixel_flow(), info={"model": "tiny"})
    old.streamed = lambda opts: False
    again = old.generate("red right", seed=3, guidance=1.0, denoise="none", sampler="sequential")
    np.testing.assert_array_equal(np.stack(again.frames), np.stack(result.frames))
    # without preview=True the events say which frames are out, without pictures
    quiet = [e for e in pipe.generate_steps("red right", seed=3, sampler="sequential") if e.stage == "preview"]
    assert [e.index for e in quiet] == list(range(6)) and all(e.frame is None for e in quiet)


def test_latent_previews_decode_each_latent_frame_as_it_comes():
    pipe = VideoPipeline(latent_flow(), vae=tiny_vae(), info={"model": "tiny"})
    for sampler in ("sequential", "jacobi"):
        events = list(
            pipe.generate_steps("blue left", seed=5, guidance=1.0, denoise="none", sampler=sampler, preview=True)
        )
        previews = [e for e in events if e.stage == "preview"]
        assert [e.index for e in previews] == list(range(9))  # 1 + 4 + 4 video frames of 3 latent frames
        if sampler == "sequential":
            check_order(events, 4, 4)  # 2x2 latent tokens a frame
        result = events[-1].result
        got, want = np.stack([e.frame for e in previews]).astype(int), np.stack(result.frames).astype(int)
        # the same latents through the same causal decoder, one latent frame at a time
        assert np.abs(got - want).max() <= (0 if sampler == "sequential" else 2)
    # Jacobi without previews: no pass of its own for them, the old order
    events = list(pipe.generate_steps("blue left", seed=5, sampler="jacobi"))
    assert not any(e.stage == "preview" for e in events)


def test_stream_decoder_equals_the_whole_decode():
    vae = tiny_vae()
    z = mx.random.normal((1, 3, 2, 2, 3), key=mx.random.key(7))
    decoder = vae.stream_decoder()
    parts = [decoder(z[:, t : t + 1]) for t in range(3)]
    assert [p.shape[1] for p in parts] == [1, 4, 4]
    np.testing.assert_allclose(np.array(mx.concatenate(parts, axis=1)), np.array(vae.decode(z)), atol=1e-6)


def test_cancel_within_a_frame_then_the_pipeline_goes_on():
    pipe = VideoPipeline(pixel_flow(), info={"model": "tiny"})
    want = pipe.generate("red right", seed=1, denoise="none", sampler="sequential")
    steps = pipe.generate_steps("red right", seed=1, denoise="none", sampler="sequential", preview=True)
    seen = []
    for event in steps:
        seen.append(event.stage)
        if event.stage == "shallow" and "preview" in seen:  # frame 1 in the shallow blocks
            break
    steps.close()
    assert seen.count("preview") == 1
    again = pipe.generate("red right", seed=1, denoise="none", sampler="sequential")  # the lock was released
    np.testing.assert_array_equal(np.stack(again.frames), np.stack(want.frames))
    calls = []
    with pytest.raises(Cancelled):  # progress returning False cancels at that event
        pipe.generate(
            "red right", seed=1, sampler="sequential", progress=lambda s, d, t: calls.append(s) or s != "preview"
        )
    assert calls[-1] == "preview" and "denoise" not in calls


def test_preview_option_is_checked():
    pipe = VideoPipeline(pixel_flow(), info={"model": "tiny"})
    with pytest.raises(OptionError) as e:
        pipe.generate_steps("red right", preview="yes")
    assert e.value.option == "preview"


# -- the command line ------------------------------------------------------------------------


def test_progress_counts_the_frames_out():
    calls = []
    progress = Progress(lambda *a, **k: calls.append((a, k.get("note"))), True, 9)

    class E:
        def __init__(self, stage, done, total):
            self.stage, self.done, self.total = stage, done, total

    events = [E("text", 1, 1), E("deep", 4, 12), E("preview", 1, 9), E("shallow", 3, 8), E("deep", 12, 12)]
    for e in events + [E("shallow", 6, 8)]:  # after the deep block: the shallow blocks' own bar
        progress(e)
    assert calls[0] == (("text", 1, 1), None)
    assert calls[1:] == [
        (("sample", 4, 12), "0/9 frames sampled"),
        (("sample", 4, 12), "1/9 frames sampled"),
        (("sample", 4, 12), "1/9 frames sampled"),
        (("sample", 12, 12), "1/9 frames sampled"),
        (("shallow", 6, 8), None),
    ]


def test_command_writes_previews_of_the_demo_video_model(tmp_path, capsys):
    out, previews, frames = tmp_path / "clip.mp4", tmp_path / "previews", tmp_path / "frames"
    args = ["--model", "demo-video", "--prompt", "red circle moving right", "--seed", "2", "--denoise", "none"]
    args += ["--output", str(out), "--preview-dir", str(previews), "--frames-dir", str(frames), "--no-progress"]
    assert main(args) == 0
    names = sorted(p.name for p in previews.iterdir())
    assert names == [f"preview-{i:04d}.png" for i in range(8)]
    from PIL import Image

    for i in range(8):  # the denoising is off: each preview is the clip's frame
        a = np.array(Image.open(previews / f"preview-{i:04d}.png"))
        b = np.array(Image.open(frames / f"frame-{i:04d}.png"))
        np.testing.assert_array_equal(a, b)
    # previews already there are not replaced without --overwrite, and nothing is written
    assert main(args[:-7] + ["--output", str(tmp_path / "b.mp4"), "--preview-dir", str(previews)]) == 1
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "b.mp4").exists()


def test_previews_are_not_a_setting_of_the_clip():
    pipe = VideoPipeline(pixel_flow(), info={"model": "tiny"})
    opts = pipe.resolve_options(VideoOptions("red right", preview=True))
    assert "preview" not in pipe.params(opts)  # the MP4's metadata: the same clip with or without
