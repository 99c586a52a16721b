"""The pipeline runs a use_pretrained_lm model: the prompt is the LM's token embeddings."""

import http.client
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import randomize
from mlx.utils import tree_flatten
from mlx_lm.models import gemma3_text
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from mlx_starflow import Pipeline
from mlx_starflow.cli import server as server_module
from mlx_starflow.cli.server import Server
from mlx_starflow.loading.text import EMBED_TEMPLATE
from mlx_starflow.loading.weights import save_model
from mlx_starflow.models.config import FlowConfig
from mlx_starflow.models.flow import Flow

WORDS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", ":", ","]
WORDS += "user please generate an image about model a red blue circle square in the top left".split()
HIDDEN = 32


def _lm_folder(folder, embed_only=False):
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(WORDS[:6])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    args = dict(
        model_type="gemma3_text",
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        intermediate_size=48,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=len(WORDS),
        rope_theta=10000.0,
        rope_local_base_freq=10000.0,
        query_pre_attn_scalar=16,
        sliding_window=4096,
    )
    lm = randomize(gemma3_text.Model(gemma3_text.ModelArgs(**args)), 3, scale=0.3)
    weights = dict(tree_flatten(lm.parameters()))
    if embed_only:
        weights = {k: v for k, v in weights.items() if "embed_tokens" in k}
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(args))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>", "padding_side": "left"}))
    return lm, tok


def _flow_folder(folder, with_text=True):
    cfg = FlowConfig(
        model_type="starflow",
        in_channels=3,
        input_size=8,
        patch_size=2,
        channels=32,
        top_channels=HIDDEN,
        head_dim=16,
        num_heads=2,
        num_kv_heads=2,
        top_num_heads=2,
        top_num_kv_heads=1,
        top_head_dim=16,
        top_mlp_dim=48,
        layers_per_block=[1, 2],
        expansion=2,
        rope=True,
        pt_seq_len=4,
        sos=True,
        seq_order="L2R",
        use_softplus=True,
        cond_top_only=True,
        txt_size=24,
        txt_dim=HIDDEN,
        noise_std=0.1,
        pretrained_lm="gemma3_1b",
        text_encoder="gemma3_1b",
        image_size=8,
    )
    flow = randomize(Flow(cfg), 1, scale=0.05)
    save_model(folder, cfg, dict(tree_flatten(flow.parameters())))
    if with_text:
        _lm_folder(folder / "text_encoder", embed_only=True)
    return flow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm_model") / "model"
    _flow_folder(folder)
    return folder


def test_conditioning_is_the_lm_token_embeddings_after_the_template(model_dir):
    pipe = Pipeline.from_pretrained(str(model_dir), dtype="float32")
    y, _ = pipe.conditioning(["a red circle", "blue square in the top left"], "", guided=True)
    assert y.shape == (4, 24, HIDDEN)
    tok = Tokenizer.from_file(str(model_dir / "text_encoder" / "tokenizer.json"))
    table = np.array(mx.load(str(model_dir / "text_encoder" / "model.safetensors"))["model.embed_tokens.weight"])
    for row, prompt in zip(np.array(y), ["a red circle", "blue square in the top left", "", ""]):
        ids = tok.encode(EMBED_TEMPLATE.format(prompt=prompt)).ids
        want = table[ids] * HIDDEN**0.5
        np.testing.assert_allclose(row[-len(ids) :], want, rtol=1e-6)  # left padded
        np.testing.assert_allclose(row[: -len(ids)], np.broadcast_to(table[0] * HIDDEN**0.5, row[: -len(ids)].shape))


def test_generate_end_to_end_with_guidance_sequential_and_jacobi(model_dir):
    pipe = Pipeline.from_pretrained(str(model_dir), dtype="float32")
    seq = pipe.generate(["a red circle", "a blue square"], seed=3, guidance=2.0, sampler="sequential", denoise="none")
    assert [im.size for im in seq.images] == [(8, 8), (8, 8)]
    jac = pipe.generate(
        ["a red circle", "a blue square"],
        seed=3,
        guidance=2.0,
        sampler="jacobi",
        jacobi_block_size=4,
        jacobi_threshold=0.0,
        jacobi_max_iter=4,
        denoise="none",
    )
    np.testing.assert_allclose(np.array(jac.latents), np.array(seq.latents), atol=1e-4)
    # The prompt matters, and guidance changes the image.
    assert not np.allclose(np.array(seq.latents[0]), np.array(seq.latents[1]))
    plain = pipe.generate(["a red circle"], seed=3, guidance=0.0, sampler="sequential", denoise="none")
    assert not np.allclose(np.array(plain.latents[0]), np.array(seq.latents[0]))
    scored = pipe.generate(["a red circle"], seed=3, guidance=1.0, sampler="sequential", denoise="score")
    assert np.all(np.isfinite(np.array(scored.latents)))


def test_unknown_words_are_named(model_dir):
    pipe = Pipeline.from_pretrained(str(model_dir), dtype="float32")
    with pytest.raises(ValueError, match='the demo does not know: "green", "triangle"'):
        pipe.generate(["a green triangle in the top left"], seed=0)
    with pytest.raises(ValueError, match='does not know: "cat"'):
        pipe.generate(["a red circle"], negative_prompt="cat", guidance=1.0, seed=0)


def test_text_encoder_from_an_mlx_lm_folder(tmp_path):
    _flow_folder(tmp_path / "model", with_text=False)
    with pytest.raises(ValueError, match="--text-encoder"):
        Pipeline.from_pretrained(str(tmp_path / "model"), dtype="float32")
    _lm_folder(tmp_path / "lm")  # a whole mlx-lm folder: the embedding table is read from it
    pipe = Pipeline.from_pretrained(str(tmp_path / "model"), text_encoder=str(tmp_path / "lm"), dtype="float32")
    r = pipe.generate(["a red circle"], seed=1, guidance=1.0, sampler="sequential", denoise="none")
    assert r.images[0].size == (8, 8)
    # The same table beside the model gives the same image.
    _lm_folder(tmp_path / "model" / "text_encoder", embed_only=True)
    again = Pipeline.from_pretrained(str(tmp_path / "model"), dtype="float32")
    r2 = again.generate(["a red circle"], seed=1, guidance=1.0, sampler="sequential", denoise="none")
    np.testing.assert_array_equal(np.array(r.latents), np.array(r2.latents))


def test_score_ranks_captions(model_dir):
    pipe = Pipeline.from_pretrained(str(model_dir), dtype="float32")
    r = pipe.generate(["a red circle"], seed=2, guidance=0.0, sampler="sequential", denoise="none")
    s = pipe.score(r.images, ["a red circle", "a blue square", "a red square"])
    assert s.bits_per_dim.shape == (1, 3) and np.all(np.isfinite(s.bits_per_dim))


def test_the_server_card_offers_a_text_models_examples(tmp_path):
    _flow_folder(tmp_path / "model")
    (tmp_path / "model" / "examples.txt").write_text("a red circle\n\nblue square in the top left\n")
    pipe = Pipeline.from_pretrained(str(tmp_path / "model"), dtype="float32")
    assert pipe.examples == ["a red circle", "blue square in the top left"]
    s = Server(pipe, port=0, quiet=True).start()
    try:
        host, port = s.server_address[:2]
        conn = http.client.HTTPConnection(host, port, timeout=20)
        conn.request("GET", "/v1/models")
        card = json.loads(conn.getresponse().read())["data"][0]
        conn.close()
    finally:
        s.close()
    assert card["examples"] == pipe.examples and card["prompts"] is None
    page = (Path(server_module.__file__).parent / "web" / "index.html").read_text()
    assert "model.examples" in page  # the page shows them as chips beside the free prompt box
