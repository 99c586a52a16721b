"""Prompts -> embeddings for T5 and Gemma, against transformers run as the reference does."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from test_t5 import make_t5
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoTokenizer,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GemmaModel,
    PreTrainedTokenizerFast,
)

from mlx_starflow.loading.device import CPUQuantizedLinear as QuantizedLinear  # the loader prepares for the CPU
from mlx_starflow.loading.text import EMBED_TEMPLATE, load_text_encoder
from mlx_starflow.loading.text import Tokenizer as PromptTokenizer

ROOT = Path(__file__).resolve().parents[1]
CORPUS = [
    "a photo of a cat sitting on a red chair",
    "an oil painting of a lighthouse at night with stars",
    "please generate an image about a dog in the snow",
    "user model the quick brown fox jumps over the lazy dog",
] * 4
SPECIALS = ["<pad>", "</s>", "<unk>", "<bos>", "<start_of_turn>", "<end_of_turn>"]


def make_tokenizer(folder, family):
    """A tiny word-level tokenizer saved as transformers does: T5 style (append
    </s>, pad right) or Gemma style (prepend <bos>, pad left)."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    if family == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    else:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 3)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="<bos>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        padding_side="right" if family == "t5" else "left",
    )
    fast.save_pretrained(folder)
    assert fast.vocab_size <= 64
    return fast


SP_CORPUS = (
    CORPUS
    + [
        "Café crème, naïve façade — über straße!",
        "numbers 123 4567 and symbols #@% (in brackets)",
        "A PHOTO OF A CAT, sitting; on a red chair.",
    ]
    * 3
)
PROMPTS = [
    "a photo of a cat sitting on a red chair",
    "",
    "  leading and trailing spaces  ",
    "double  spaces\there",
    "Café crème — naïve über straße",
    "an oil painting of a lighthouse at night with stars and a dog in the snow",
    "unseen words: zebra quokka 98765",
    "A PHOTO, OF A CAT!",
]


def make_sentencepiece(folder, family):
    """A tiny SentencePiece model made as T5's (unigram; pad 0, </s> 1, <unk> 2) or
    Gemma's (BPE without a dummy prefix or whitespace folding; pad 0, </s> 1, <bos> 2,
    <unk> 3, and a tokenizer_config.json asking for <bos> as Gemma repos do)."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    if family == "t5":
        kind = dict(model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    else:
        kind = dict(
            model_type="bpe",
            pad_id=0,
            eos_id=1,
            bos_id=2,
            unk_id=3,
            bos_piece="<bos>",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
        )
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_CORPUS),
        model_writer=buf,
        vocab_size=90,
        character_coverage=1.0,
        minloglevel=2,
        **kind,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ("spiece.model" if family == "t5" else "tokenizer.model")).write_bytes(buf.getvalue())
    if family != "t5":
        (folder / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "GemmaTokenizer",
                    "add_bos_token": True,
                    "add_eos_token": False,
                    "padding_side": "left",
                }
            )
        )


@pytest.mark.parametrize("family", ["t5", "gemma"])
def test_tokenizer_ids_match_transformers(tmp_path, family):
    # The released T5 ships tokenizer.json (run by `tokenizers`), T5 v1.1 repos only
    # spiece.model (run by `sentencepiece`); both give transformers' ids, padding and
    # truncation, without importing transformers (test_no_torch_at_runtime checks that).
    from transformers import GemmaTokenizer, T5Tokenizer

    cls = T5Tokenizer if family == "t5" else GemmaTokenizer
    make_sentencepiece(tmp_path / "spm", family)
    cls.from_pretrained(tmp_path / "spm").save_pretrained(tmp_path / "json")
    assert (tmp_path / "json" / "tokenizer.json").is_file()
    for folder in ("spm", "json"):
        ref = cls.from_pretrained(tmp_path / folder)
        ours = PromptTokenizer(tmp_path / folder, family)
        assert ours.encode(PROMPTS) == ref(PROMPTS)["input_ids"], folder
        for length in (4, 16):  # truncated, padded
            ids, mask = ours(PROMPTS, length)
            want = ref(PROMPTS, padding="max_length", truncation=True, max_length=length, return_tensors="np")
            np.testing.assert_array_equal(ids, want["input_ids"], err_msg=f"{folder} {length}")
            np.testing.assert_array_equal(mask, want["attention_mask"], err_msg=f"{folder} {length}")


def reference_encode(model, folder, prompts, txt_size):
    """The reference's encode_text: tokenizer -> last_hidden_state * mask."""
    tok = AutoTokenizer.from_pretrained(folder)
    t = tok(prompts, padding="max_length", truncation=True, return_tensors="pt", max_length=txt_size)
    with torch.no_grad():
        h = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).last_hidden_state
    return (h * t["attention_mask"][..., None]).numpy()


def rel_err(a, b):
    return np.abs(np.array(a, dtype=np.float32) - b).max() / max(1.0, np.abs(b).max())


def test_t5_encode_prompts(tmp_path):
    ref = make_t5(tmp_path, vocab_size=64)
    make_tokenizer(tmp_path, "t5")
    enc = load_text_encoder(tmp_path, txt_size=8)
    assert (enc.width, enc.txt_size) == (48, 8)
    prompts = ["a cat on a red chair", "", "the quick brown fox jumps over the lazy dog"]
    with pytest.warns(UserWarning, match=r"prompt 2 is 10 tokens long.*2 tokens dropped"):
        y = enc.encode(prompts)
    assert y.shape == (3, 8, 48)
    want = reference_encode(ref.encoder, tmp_path, prompts, 8)
    assert rel_err(y, want) < 1e-5
    y = np.array(y)
    assert np.all(y[0, 7:] == 0) and np.any(y[0, 6] != 0)  # 6 words + </s>, then padding
    assert np.all(y[1, 1:] == 0) and np.any(y[1, 0] != 0)  # "" is just </s>
    assert np.all(y[2] != 0)


def test_bad_prompts(tmp_path):
    make_t5(tmp_path, vocab_size=64)
    make_tokenizer(tmp_path, "t5")
    enc = load_text_encoder(tmp_path, txt_size=8)
    for bad in ([], "a cat", ["a cat", None], [3]):
        with pytest.raises(ValueError):
            enc.encode(bad)
    enc.release()
    with pytest.raises(RuntimeError, match="released"):
        enc.encode(["a cat"])


def test_bad_folders(tmp_path):
    make_t5(tmp_path / "t5")
    (tmp_path / "t5" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"t5.*model\.safetensors"):
        load_text_encoder(tmp_path / "t5", txt_size=8)
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="llama"):
        load_text_encoder(tmp_path / "llama", txt_size=8)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_text_encoder(tmp_path, txt_size=8)
    make_t5(tmp_path / "t5b")
    with pytest.raises(ValueError, match="bfloat16"):
        load_text_encoder(tmp_path / "t5b", txt_size=8, dtype=mx.float16)
    enc = load_text_encoder(tmp_path / "t5b", txt_size=8)  # no tokenizer: ids still work
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        enc.encode(["a cat"])


GEMMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=4, head_dim=8)


def make_gemma(folder, kind, seed=0):
    torch.manual_seed(seed)
    if kind == "gemma":
        model = GemmaForCausalLM(GemmaConfig(**GEMMA, num_hidden_layers=2, num_key_value_heads=1))
    elif kind == "gemma2":
        # A 4-token sliding window, so the window mask matters on 10 tokens.
        config = Gemma2Config(
            **GEMMA, num_hidden_layers=2, num_key_value_heads=2, sliding_window=4, query_pre_attn_scalar=8
        )
        model = Gemma2ForCausalLM(config)
    elif kind == "gemma3":
        config = Gemma3TextConfig(
            **GEMMA,
            num_hidden_layers=3,
            num_key_value_heads=2,
            sliding_window=4,
            query_pre_attn_scalar=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        )
        model = Gemma3ForCausalLM(config)
    with torch.no_grad():  # norm weights away from zero, so they matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 * torch.randn_like(p))
    model.eval().save_pretrained(folder)
    return model


def padded_inputs(side, length=10, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, 64, (3, length))
    mask = np.ones_like(ids)
    n = [length, 6, 1]
    for i, k in enumerate(n):
        mask[i] = 0
        mask[i, :k] = 1
        if side == "left":
            mask[i] = mask[i, ::-1]
    ids[mask == 0] = 0
    return ids, mask


def gemma_reference(model, ids, mask):
    with torch.no_grad():
        out = model.model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    return (out.last_hidden_state * torch.tensor(mask)[..., None]).numpy()


@pytest.mark.parametrize("kind", ["gemma", "gemma2", "gemma3"])
def test_gemma_matches_transformers(tmp_path, kind):
    ref = make_gemma(tmp_path, kind)
    ref.config._attn_implementation = "eager"
    enc = load_text_encoder(tmp_path, txt_size=10)
    assert enc.width == 32
    for side in ("right", "left"):
        ids, mask = padded_inputs(side)
        y = enc.encode_ids(ids, mask)
        assert rel_err(y, gemma_reference(ref, ids, mask)) < 1e-5, side
        assert np.all(np.array(y)[mask == 0] == 0)


def test_gemma3_multimodal_checkpoint(tmp_path):
    text = dict(GEMMA, num_hidden_layers=2, num_key_value_heads=2, query_pre_attn_scalar=8)
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=63,
        boi_token_index=61,
        eoi_token_index=62,
    )
    torch.manual_seed(0)
    ref = Gemma3ForConditionalGeneration(config).eval()
    ref.save_pretrained(tmp_path)
    enc = load_text_encoder(tmp_path, txt_size=10)
    ids, mask = padded_inputs("right")
    with torch.no_grad():
        h = ref.model.language_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    want = (h.last_hidden_state * torch.tensor(mask)[..., None]).numpy()
    assert rel_err(enc.encode_ids(ids, mask), want) < 1e-5


def test_gemma_encode_prompts_left_padded(tmp_path):
    ref = make_gemma(tmp_path, "gemma2")
    make_tokenizer(tmp_path, "gemma")
    enc = load_text_encoder(tmp_path, txt_size=8)
    prompts = ["a photo of a cat", ""]
    y = enc.encode(prompts)
    assert rel_err(y, reference_encode(ref.model, tmp_path, prompts, 8)) < 1e-5
    y = np.array(y)
    assert np.all(y[0, :2] == 0) and np.all(y[0, 2:] != 0)  # <bos> + 5 words, left padded
    assert np.all(y[1, :7] == 0) and np.all(y[1, 7] != 0)  # "" is just <bos>


def test_gemma_embed_mode(tmp_path):
    ref = make_gemma(tmp_path, "gemma3")
    make_tokenizer(tmp_path, "gemma")
    enc = load_text_encoder(tmp_path, txt_size=24, mode="embed")
    prompts = ["a dog in the snow", ""]
    y = np.array(enc.encode(prompts))
    # The reference's TextEmbedder: template, tokenizer, embedding * sqrt(hidden), no mask.
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = [EMBED_TEMPLATE.format(prompt=p) for p in prompts]
    t = tok(text, padding="max_length", truncation=True, return_tensors="pt", max_length=24)
    tokens = tok.convert_ids_to_tokens(t["input_ids"][1])
    assert tokens.count("<start_of_turn>") == 2 and "<end_of_turn>" in tokens
    assert np.array_equal(np.array(enc.tokenizer.encode(text)[1]), t["input_ids"][1][t["attention_mask"][1] == 1])
    want = (ref.model.embed_tokens.weight[t["input_ids"]] * 32**0.5).detach().numpy()
    assert rel_err(y, want) < 1e-6
    assert y.shape == (2, 24, 32)


def test_gemma_bfloat16(tmp_path):
    ref = make_gemma(tmp_path, "gemma2")
    ids, mask = padded_inputs("right")
    want = gemma_reference(ref, ids, mask)
    enc = load_text_encoder(tmp_path, txt_size=10, dtype=mx.bfloat16)
    y = enc.encode_ids(ids, mask)
    assert y.dtype == mx.bfloat16
    assert rel_err(y.astype(mx.float32), want) < 5e-2


def test_gemma_quantized_layers(tmp_path):
    torch.manual_seed(0)
    config = GemmaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=2,
        head_dim=32,
        num_hidden_layers=1,
        num_key_value_heads=1,
    )
    ref = GemmaForCausalLM(config).eval()
    ref.save_pretrained(tmp_path)
    enc = load_text_encoder(tmp_path, txt_size=10, quantize=8)
    layer = enc.model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, QuantizedLinear)  # float32 products on the CPU
    assert isinstance(enc.model.model.embed_tokens, nn.QuantizedEmbedding)
    assert not isinstance(layer.mlp.down_proj, nn.QuantizedLinear)  # input 96
    ids, mask = padded_inputs("right")
    y = enc.encode_ids(ids, mask)
    assert rel_err(y, gemma_reference(ref, ids, mask)) < 3e-2

    # An mlx-community style checkpoint: quantized weights plus "quantization" in config.json.
    saved = tmp_path / "mlx"
    saved.mkdir()
    mx.save_safetensors(str(saved / "model.safetensors"), dict(tree_flatten(enc.model.parameters())))
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization"] = {"group_size": 64, "bits": 8}
    (saved / "config.json").write_text(json.dumps(config))
    again = load_text_encoder(saved, txt_size=10)
    assert isinstance(again.model.model.layers[0].self_attn.q_proj, QuantizedLinear)
    assert np.array_equal(np.array(again.encode_ids(ids, mask)), np.array(y))


def test_gemma_strict_loading(tmp_path):
    # One strict loader and one error for every model (weights.load_checked, WeightsError).
    from safetensors.numpy import load_file, save_file

    from mlx_starflow.loading.weights import WeightsError

    make_gemma(tmp_path, "gemma2")
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match="missing 1 tensors the model needs: model.layers.1.mlp.up_proj.weight"):
        load_text_encoder(tmp_path, txt_size=8)
    with pytest.raises(ValueError, match="4 or 8 bits"):
        load_text_encoder(tmp_path, txt_size=8, quantize=3)


def test_diffusers_layout_bare_gemma_model(tmp_path):
    # Lumina-style repos: text_encoder/ holds a bare GemmaModel (no "model." prefix)
    # and tokenizer/ its tokenizer.
    torch.manual_seed(0)
    ref = GemmaModel(GemmaConfig(**GEMMA, num_hidden_layers=2, num_key_value_heads=1)).eval()
    ref.save_pretrained(tmp_path / "text_encoder")
    make_tokenizer(tmp_path / "tokenizer", "gemma")
    enc = load_text_encoder(tmp_path, txt_size=8)
    prompts = ["a dog in the snow", ""]
    assert rel_err(enc.encode(prompts), reference_encode(ref, tmp_path / "tokenizer", prompts, 8)) < 1e-5


def test_no_torch_at_runtime(tmp_path):
    # Gemma goes through mlx-lm, whose package import pulls in transformers'
    # AutoTokenizer and so torch when it is installed; the T5 path never does, and
    # its tokenizer needs only `tokenizers` (or `sentencepiece`), not transformers.
    make_t5(tmp_path, vocab_size=64)
    make_tokenizer(tmp_path, "t5")
    code = (
        "import sys; import mlx_starflow.loading.text as t\n"
        "assert 'torch' not in sys.modules, 'importing mlx_starflow.text imported torch'\n"
        f"t.load_text_encoder({str(tmp_path)!r}, txt_size=8).encode(['a cat', ''])\n"
        "assert 'torch' not in sys.modules, 'encoding with T5 imported torch'\n"
        "assert 'transformers' not in sys.modules, 'encoding with T5 imported transformers'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
