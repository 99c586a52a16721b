"""STARFlow-V end to end: the video application API (video.VideoPipeline) on tiny random
models (pixel space, and latent with a tiny Wan2.2 VAE), MP4 files (videos.py), the
command line (generate --frames ...), --from-video, and bad input."""

import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import randomize
from mlx.utils import tree_flatten
from test_video_flow import ARGS
from test_wan_vae import tiny_vae

from mlx_starflow import videos
from mlx_starflow.cli.generate import main
from mlx_starflow.loading.video import FORMAT, video_config_from_args
from mlx_starflow.loading.wan_vae import save_wan_vae
from mlx_starflow.loading.weights import save_model
from mlx_starflow.models.video import VideoConfig, VideoFlow
from mlx_starflow.sample import OptionError
from mlx_starflow.video import VideoOptions, VideoPipeline, aspect_size, video_prompt
from mlx_starflow.video_sample import sample_video

CLASSES = ["red right", "blue left"]


def pixel_flow(frames=6, fps=8, seed=0):
    """A class-conditional pixel-space video flow: 16x16 RGB frames, 4x4 patches."""
    a = {**ARGS, "img_size": 16, "channel_size": 3, "patch_size": 4, "txt_size": 1, "vid_size": f"{frames}:{fps}"}
    cfg, video = video_config_from_args(a, txt_dim=len(CLASSES) + 1, vae_downsample=1)
    cfg = replace(cfg, vae=None, class_names=CLASSES, text_encoder=None)
    return randomize(VideoFlow(cfg, video), seed, 0.05)


def latent_flow(seed=0):
    """A latent video flow for the tiny Wan VAE (3 channels, 8x spatial, 4x temporal): 9 frames of 16x16."""
    a = {**ARGS, "img_size": 16, "channel_size": 3, "txt_size": 1, "vid_size": "9:16"}
    cfg, video = video_config_from_args(a, txt_dim=len(CLASSES) + 1, vae_downsample=8)
    return randomize(VideoFlow(replace(cfg, class_names=CLASSES), video), seed, 0.05)


def save_folder(flow, out: Path, vae=None) -> Path:
    weights = dict(tree_flatten(flow.parameters()))
    save_model(out, flow.config, weights, extra={"format": FORMAT, "video": flow.video.to_dict()})
    if vae is not None:
        save_wan_vae(vae, out / "vae")
    return out


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("MLX_STARFLOW_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def pixel_folder(tmp_path_factory):
    return save_folder(pixel_flow(), tmp_path_factory.mktemp("models") / "pixel-video")


@pytest.fixture(scope="module")
def latent_folder(tmp_path_factory):
    return save_folder(latent_flow(), tmp_path_factory.mktemp("models") / "latent-video", tiny_vae())


# -- text and sizes as the reference prepares them -------------------------------------------


def test_video_prompt_follows_the_reference_templates():
    cfg, video = video_config_from_args({**ARGS, "fps_cond": 1, "cond_noise_level": 1}, txt_dim=12)
    assert video_prompt("a corgi", cfg, video, 16, "16:9") == (
        "Noise Level 500:\nA video with 16 fps:\na corgi\n\n in a 16:9 aspect ratio.\n"
    )
    assert video_prompt("", cfg, video, 16, None) == "Noise Level 500:\nA video with 16 fps:\n\n"
    plain = VideoConfig()
    assert video_prompt("a corgi", cfg, plain, 16, None) == "a corgi"


def test_aspect_sizes_are_the_reference_ones():
    assert aspect_size(640, "16:9", 16) == (480, 848)
    assert aspect_size(640, "9:16", 16) == (848, 480)
    assert aspect_size(640, "1:1", 16) == (640, 640)
    assert aspect_size(640, None, 16) == (640, 640)


# -- the API ------------------------------------------------------------------------------


def test_pixel_clip_one_event_per_frame_straight_from_the_flow():
    flow = pixel_flow()
    pipe = VideoPipeline(flow, info={"model": "tiny"})
    events = list(pipe.generate_steps("red right", seed=3, guidance=1.0, denoise="none", sampler="sequential"))
    frames = [e for e in events if e.stage == "frame"]
    assert [e.index for e in frames] == list(range(6))
    assert [e.done for e in frames] == list(range(1, 7)) and all(e.total == 6 for e in frames)
    assert frames[0].preview().size == (16, 16)
    assert any(e.stage == "deep" for e in events) and any(e.stage == "shallow" for e in events)
    result = events[-1].result
    assert result is not None and len(result.frames) == 6 and result.size == (16, 16)
    assert result.params["frames"] == 6 and result.params["fps"] == 8 and result.seed == 3
    # the frames are the flow's own output in [-1, 1], as 8-bit
    noise = mx.random.normal((1, 6, 16, 16, 3), key=mx.random.key(3))
    y = pipe.classes.encode(["red right", ""])
    x = sample_video(flow, noise, y, 1.0)
    want = np.round((np.clip(np.array(x[0]), -1, 1) + 1) * 127.5).astype(np.uint8)
    np.testing.assert_array_equal(np.stack(result.frames), want)


def test_latent_clip_decodes_frame_by_frame_with_the_temporal_scale():
    vae = tiny_vae()
    pipe = VideoPipeline(latent_flow(), vae=vae, info={"model": "tiny"})
    events = list(pipe.generate_steps("blue left", seed=5, guidance=1.0))
    assert any(e.stage == "denoise" for e in events)  # the learned self-denoiser
    frames = [e for e in events if e.stage == "frame"]
    assert len(frames) == 9  # 3 latent frames: 1 + 4 + 4
    result = events[-1].result
    z = result.latents
    assert z.shape == (1, 3, 2, 2, 3)
    video = vae.decode(mx.concatenate([z[:, :1], z[:, 1:] / 0.6], axis=1))
    want = np.round((np.clip(np.array(video[0]), -1, 1) + 1) * 127.5).astype(np.uint8)
    np.testing.assert_array_equal(np.stack(result.frames), want)


def test_cancel_mid_clip_then_the_pipeline_goes_on():
    pipe = VideoPipeline(pixel_flow(), info={"model": "tiny"})
    steps = pipe.generate_steps("red right", seed=1)
    for event in steps:
        if event.stage == "deep":
            break
    steps.close()
    seen = []
    for event in pipe.generate_steps("red right", seed=1, denoise="none"):
        if event.stage == "frame":
            seen.append(event.index)
            if len(seen) == 2:
                break
    assert seen == [0, 1]
    result = pipe.generate("blue left", seed=1, denoise="none")  # the lock was released
    assert len(result.frames) == 6


def test_bad_options_name_the_option():
    pipe = VideoPipeline(pixel_flow(), info={"model": "tiny"})
    for kw, name in [
        ({"frames": 0}, "frames"),
        ({"frames": 5000}, "frames"),
        ({"fps": 0}, "fps"),
        ({"guidance": -1.0}, "guidance"),
        ({"aspect_ratio": "16:9"}, "aspect_ratio"),
        ({"context_length": 2}, "context_length"),
    ]:
        with pytest.raises(OptionError) as e:
            pipe.generate_steps("red right", **kw)
        assert e.value.option == name, (kw, str(e.value))
    with pytest.raises(ValueError, match="unknown prompt"):
        pipe.generate_steps("green up")
    with pytest.raises(TypeError, match="unknown video option"):
        pipe.generate_steps("red right", num_images=2)
    latent = VideoPipeline(latent_flow(), vae=tiny_vae())
    with pytest.raises(OptionError, match=r"1 \+ 4k.*try 5 or 9"):
        latent.generate_steps("red right", frames=8)


def test_past_the_training_length_uses_a_local_window():
    pipe = VideoPipeline(pixel_flow(), info={"model": "tiny"})
    opts = pipe.resolve_options(VideoOptions("red right", frames=9, seed=0))
    assert opts.local_attn_window == 6  # the training length, as the reference's target_length
    with pytest.raises(OptionError, match="Jacobi only"):
        pipe.resolve_options(VideoOptions("red right", frames=9, sampler="sequential"))
    result = pipe.generate(opts)
    assert len(result.frames) == 9 and result.params["local_attn_window"] == 6


# -- MP4 -------------------------------------------------------------------------------------


def test_mp4_round_trip_and_nothing_half_written(tmp_path):
    yy, xx = np.mgrid[0:32, 0:48]
    frames = [np.stack([xx * 5 + 10 * t, yy * 7, 255 - xx * 5], -1).clip(0, 255).astype(np.uint8) for t in range(7)]
    path = videos.write_mp4(tmp_path / "a.mp4", frames, 12, {"prompt": "x é", "seed": 4})
    back, fps, meta = videos.read_video(path)
    assert len(back) == 7 and back[0].shape == (32, 48, 3) and fps == 12
    assert meta == {"prompt": "x é", "seed": 4}
    assert np.abs(back[3].astype(int) - frames[3]).mean() < 3  # lossy, but the same pictures
    with pytest.raises(RuntimeError):
        with videos.Mp4Writer(tmp_path / "b.mp4", 12) as w:
            w.add(frames[0])
            raise RuntimeError("stopped")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4"]
    with pytest.raises(ValueError, match="even frame size"):
        videos.write_mp4(tmp_path / "c.mp4", [np.zeros((5, 8, 3), np.uint8)], 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4"]


# -- the command line ----------------------------------------------------------------------


def run(folder, out, *args):
    return main(["--model", str(folder), "--prompt", "red right", "--output", str(out), "--no-progress", *args])


def test_command_writes_a_clip_and_replays_it(pixel_folder, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    assert run(pixel_folder, out, "--frames", "6", "--fps", "8", "--seed", "3", "--cfg", "1.0") == 0
    assert capsys.readouterr().out.strip() == str(out)
    frames, fps, meta = videos.read_video(out)
    assert len(frames) == 6 and frames[0].shape == (16, 16, 3) and fps == 8
    assert meta["prompt"] == "red right" and meta["seed"] == 3 and meta["frames"] == 6 and meta["guidance"] == 1.0
    assert "engine" in meta and str(pixel_folder) not in json.dumps({k: v for k, v in meta.items() if k != "model"})
    again = tmp_path / "again.mp4"
    assert main(["--from-video", str(out), "--model", str(pixel_folder), "--output", str(again), "--no-progress"]) == 0
    back, _, meta2 = videos.read_video(again)
    np.testing.assert_array_equal(np.stack(back), np.stack(frames))
    assert {k: v for k, v in meta2.items()} == meta
    other = tmp_path / "other.mp4"
    assert main(["--from-video", str(out), "--model", str(pixel_folder), "--seed", "4", "--output", str(other)]) == 0
    assert videos.read_metadata(other)["seed"] == 4


def test_command_latent_model_and_frames_as_pngs(latent_folder, tmp_path):
    out, pngs = tmp_path / "clip.mp4", tmp_path / "frames"
    assert run(latent_folder, out, "--frames", "9", "--seed", "1", "--frames-dir", str(pngs)) == 0
    frames, fps, meta = videos.read_video(out)
    assert len(frames) == 9 and frames[0].shape == (16, 16, 3) and fps == 16
    names = sorted(p.name for p in pngs.iterdir())
    assert names == [f"frame-{i:04d}.png" for i in range(9)]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--frames", "0"], "--frames"),
        (["--frames", "1025"], "--frames"),
        (["--fps", "0"], "--fps"),
        (["--fps", "500"], "--fps"),
        (["--cfg", "-2"], "--cfg"),
    ],
)
def test_command_bad_input_is_one_line_and_writes_nothing(pixel_folder, tmp_path, capsys, args, words):
    assert run(pixel_folder, tmp_path / "x.mp4", *args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_command_video_model_asked_for_an_image_and_the_reverse(pixel_folder, latent_folder, tmp_path, capsys):
    assert main(["--model", str(pixel_folder), "--prompt", "red right", "--output", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert "is a video model" in err and ".mp4" in err and len(err.splitlines()) == 1
    assert (
        main(["--model", "demo", "--prompt", "red circle", "--frames", "9", "--output", str(tmp_path / "x.mp4")]) == 1
    )
    err = capsys.readouterr().err.strip()
    assert "is an image model" in err and len(err.splitlines()) == 1
    assert run(latent_folder, tmp_path / "x.mp4", "--frames", "8") == 1
    err = capsys.readouterr().err.strip()
    assert "--frames" in err and "1 + 4k" in err and len(err.splitlines()) == 1
    assert run(pixel_folder, tmp_path / "x.mkv", "--frames", "6") == 1
    assert "name it .mp4" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_command_missing_codec_is_one_line(pixel_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(videos, "av", None)
    assert run(pixel_folder, tmp_path / "x.mp4", "--frames", "6") == 1
    err = capsys.readouterr().err.strip()
    assert "PyAV" in err and "pip install" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_from_video_errors(tmp_path, pixel_folder, capsys):
    assert main(["--from-video", str(tmp_path / "none.mp4"), "--model", str(pixel_folder)]) == 1
    assert "no such file" in capsys.readouterr().err
    foreign = videos.write_mp4(tmp_path / "f.mp4", [np.zeros((8, 8, 3), np.uint8)] * 2, 8)
    assert main(["--from-video", str(foreign), "--model", str(pixel_folder)]) == 1
    assert "no prompt and seed" in capsys.readouterr().err


# -- the server: OpenAI's video API --------------------------------------------------------


@pytest.fixture(scope="module")
def video_server():
    from mlx_starflow.cli.server import Server

    s = Server(VideoPipeline(pixel_flow(), info={"model": "tiny-video"}), port=0, quiet=True).start()
    yield s
    s.close()


def wait_for(client, job_id, limit=120):
    for _ in range(limit * 10):  # at most `limit` seconds
        job = client.videos.retrieve(job_id)
        if job.status in ("completed", "failed"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"video {job_id} not done in {limit} s: {job}")


@pytest.mark.filterwarnings("ignore:The Sora API")  # the client's notice about OpenAI's own service
def test_server_videos_with_the_official_client(video_server, tmp_path):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=video_server.url + "/v1", api_key="unused", timeout=30, max_retries=0)
    card = client.models.list().data[0].model_dump()
    assert card["video"] is True and card["frames"] == 6 and card["fps"] == 8 and card["sizes"] == ["16x16"]
    job = client.videos.create(prompt="red right", size="16x16", extra_body={"frames": 6, "seed": 3, "guidance": 1.0})
    assert job.object == "video" and job.status in ("queued", "in_progress", "completed") and job.size == "16x16"
    done = wait_for(client, job.id)
    assert done.status == "completed" and done.progress == 100
    path = tmp_path / "served.mp4"
    path.write_bytes(client.videos.download_content(job.id).read())
    frames, fps, meta = videos.read_video(path)
    assert len(frames) == 6 and frames[0].shape == (16, 16, 3) and fps == 8
    assert meta["prompt"] == "red right" and meta["seed"] == 3 and meta["frames"] == 6
    # `seconds` as OpenAI's clients give it: frames = seconds x fps for a pixel model
    job = client.videos.create(prompt="blue left", seconds="1", extra_body={"seed": 1, "denoise": "none"})
    assert wait_for(client, job.id).status == "completed"
    assert client.videos.retrieve(job.id).model_dump()["frames"] == 8
    client.videos.delete(job.id)
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(job.id)


@pytest.mark.filterwarnings("ignore:The Sora API")
@pytest.mark.parametrize(
    "extra, param",
    [
        ({"frames": 0}, "frames"),
        ({"frames": 5000}, "frames"),
        ({"fps": 0}, "fps"),
        ({"guidance": "lots"}, "guidance"),
        ({"size": "640x480"}, "size"),
        ({"prompt": "green up"}, "prompt"),
        ({"num_frames": 3}, "num_frames"),
        ({"kv_bits": 3}, "kv_bits"),
    ],
)
def test_server_bad_video_requests_name_the_parameter(video_server, extra, param):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=video_server.url + "/v1", api_key="unused", timeout=30, max_retries=0)
    body = {"prompt": "red right", **extra}
    with pytest.raises(openai.BadRequestError) as e:
        client.post("/videos", body=body, cast_to=object)
    assert e.value.body["param"] == param, e.value.body
    with pytest.raises(openai.BadRequestError) as e:  # an image request to a video model
        client.images.generate(prompt="red right")
    assert "POST /v1/videos" in e.value.body["message"]


# -- the web page plays the clip ------------------------------------------------------------

CHROMIUM = os.environ.get("MLX_STARFLOW_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def test_the_page_plays_the_clip_in_chromium(video_server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the page test needs playwright")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium or point MLX_STARFLOW_CHROMIUM at one")
    timeout = 60_000  # ms, for any one wait in the browser
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], timeout=timeout)
        try:
            page = browser.new_page()
            problems = []
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.goto(video_server.url + "/", timeout=timeout)
            page.wait_for_selector("#clip:not([hidden])", timeout=timeout)  # frames and fps for a video model
            assert page.input_value("#frames") == "6" and page.input_value("#fps") == "8"
            page.fill("#prompt", "blue left")
            page.fill("#seed", "2")
            page.click("#generate")
            page.wait_for_selector("#grid video", timeout=timeout)
            # the browser decodes the H.264 clip and plays it: its size, duration and moving clock
            page.wait_for_function(
                "() => { const v = document.querySelector('#grid video');"
                " return v && v.readyState >= 2 && v.currentTime > 0; }",
                timeout=timeout,
            )
            info = page.evaluate(
                "() => { const v = document.querySelector('#grid video');"
                " return {w: v.videoWidth, h: v.videoHeight, d: v.duration, error: v.error && v.error.code}; }"
            )
            assert info["w"] == 16 and info["h"] == 16 and info["error"] is None
            assert abs(info["d"] - 6 / 8) < 0.1
            assert "6 frames at 8 fps" in page.text_content("#grid .meta")
            assert page.get_attribute("#grid a", "download") == "starflow-v-2.mp4"
            assert problems == []
        finally:
            browser.close()
