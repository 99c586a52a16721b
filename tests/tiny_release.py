"""A tiny complete release folder in the original formats, for tests that convert,
resolve or generate: a reference-format STARFlow .pth and YAML config, a T5 with its
tokenizer (text_encoder/) and a diffusers SD-style VAE (vae/) of any number of levels."""

from helpers import T2I_ARGS, randomize, save_reference

from mlx_starflow.models.config import starflow_config_from_args
from mlx_starflow.models.flow import Flow

T5_WIDTH = 48  # test_t5's gated-gelu config


def make_release(root, img_size=16, vae_channels=(8, 8), name="tiny_t2i", text_encoder=True, **args):
    """Write the release into `root`; returns (the flow as the reference built it, its arguments).

    The VAE has one level per entry of `vae_channels`, so 2 ** (levels - 1) pixels per
    latent: the default two levels give 16x16 images from 8x8 latents."""
    from test_vae import make_reference

    factor = 2 ** (len(vae_channels) - 1)
    a = {**T2I_ARGS, "img_size": img_size, "txt_size": 6, "learnable_self_denoiser": 0, **args}
    model = randomize(Flow(starflow_config_from_args(a, txt_dim=T5_WIDTH, vae_downsample=factor)))
    save_reference(model, a, root)
    (root / "model.pth").rename(root / f"{name}.pth")
    (root / "config.yaml").rename(root / f"{name}.yaml")
    if text_encoder:
        from test_t5 import make_t5
        from test_text import make_tokenizer

        make_t5(root / "text_encoder")
        make_tokenizer(root / "text_encoder", "t5")
    make_reference(root / "vae", block_out_channels=vae_channels, norm_num_groups=4)
    return model, a
