"""Prompts -> text embeddings, one API for the T5 encoder and Gemma models.

    enc = load_text_encoder("google/flan-t5-xl", txt_size=128)
    y = enc.encode(["a cat", ""])      # (2, 128, 2048), padding rows exactly zero
    enc.release()                      # free the weights before sampling

The family is read from the folder's config.json: `t5`, or `gemma`, `gemma2`,
`gemma3`, `gemma3_text`. Gemma models give their final normed hidden state
(mlx-lm's model classes, run layer by layer with the padding mask); with
mode="embed" they give STARFlow's token-embedding conditioning instead.
"""

import gc
import json
import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..models.t5 import T5Config, T5Encoder
from ..models.t5 import sanitize as t5_sanitize
from ..models.t5 import wanted as t5_wanted
from . import device
from .hub import download, is_repo_id, patterns
from .quant import quant_args, quantize_like, quantize_linear
from .safetensors_reader import load_safetensors
from .strict import WeightsError, load_checked
from .torch_reader import load_pth

GEMMA_TYPES = ("gemma", "gemma2", "gemma3", "gemma3_text")

# STARFlow's chat template for the Gemma token-embedding mode.
EMBED_TEMPLATE = "<start_of_turn>user\nPlease generate an image about: {prompt}<end_of_turn>\n<start_of_turn>model\n"

# transformers' Gemma3TextConfig defaults, for gemma3 configs that leave them out.
_GEMMA3_DEFAULTS = {
    "vocab_size": 262208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-6,
    "sliding_window": 4096,
    "max_position_embeddings": 131072,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
}


def _download(repo_id: str) -> Path:
    folder = download(repo_id, None, "text encoder")  # hub.PATTERNS: the files the engine reads
    if not any(folder.glob("model*.safetensors")):
        folder = download(repo_id, patterns("text encoder") + ["pytorch_model*.bin"], "text encoder")
    return folder


def _resolve(path):
    """(model folder, tokenizer folder) of a local folder or a Hugging Face repo id."""
    folder = Path(path)
    if not folder.exists():
        if not is_repo_id(str(path)):
            raise FileNotFoundError(f"{folder}: no such folder")
        folder = _download(str(path))
    if (folder / "config.json").exists():
        return folder, folder
    # Diffusers-style repos keep the encoder and its tokenizer in subfolders.
    if (folder / "text_encoder" / "config.json").exists():
        tok = folder / "tokenizer"
        return folder / "text_encoder", tok if tok.exists() else folder / "text_encoder"
    raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face model folder)")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model")


def has_tokenizer(folder) -> bool:
    return any((Path(folder) / f).exists() for f in TOKENIZER_FILES)


def _check_prompts(prompts):
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError('prompts is empty: give at least one prompt ("" is the unconditional one)')
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompt {i} is a {type(p).__name__}, not a string")


def _token(value):
    """A special token of tokenizer_config.json: a string, or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """A folder's tokenizer as transformers reads it, without transformers.

    tokenizer.json (FLAN-T5, Gemma) is run as it is by the `tokenizers` library, the
    engine of transformers' fast tokenizers. A folder with only a SentencePiece model
    (spiece.model: T5 v1.1 repos) is run by `sentencepiece`, the engine of its slow
    ones, with </s> appended for T5 and <bos> prepended for Gemma unless
    tokenizer_config.json's add_eos_token / add_bos_token say otherwise (special-token
    text inside a prompt is then not read as that token). tokenizer_config.json also
    gives the padding and truncation sides and the pad token.
    """

    def __init__(self, folder, family: str):
        folder = Path(folder)
        if not has_tokenizer(folder):
            raise FileNotFoundError(f"{folder}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins, as in transformers
            if (folder / name).is_file():
                config.update(json.loads((folder / name).read_text()))
        gemma = family != "t5"
        self.padding_side = config.get("padding_side") or ("left" if gemma else "right")
        self.truncation_side = config.get("truncation_side") or "right"
        self.pad = _token(config.get("pad_token")) or "<pad>"
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as Backend

            self._fast = Backend.from_file(str(folder / "tokenizer.json"))
            self._fast.no_padding()
            self._fast.no_truncation()
            self.pad_id = self._id(self.pad, folder)
        else:
            import sentencepiece

            model = next(folder / f for f in TOKENIZER_FILES if (folder / f).is_file())
            self._fast = None
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
            bos, eos = _token(config.get("bos_token")) or "<bos>", _token(config.get("eos_token")) or "</s>"
            self._start = [self._id(bos, model)] if config.get("add_bos_token", gemma) else []
            self._end = [self._id(eos, model)] if config.get("add_eos_token", not gemma) else []
            self.pad_id = self._id(self.pad, model)

    def _id(self, token: str, source) -> int:
        i = self._fast.token_to_id(token) if self._fast is not None else self._sp.piece_to_id(token)
        if i is None or (self._fast is None and self._sp.id_to_piece(i) != token):
            raise ValueError(f"{source}: the tokenizer has no token {token!r} (named in tokenizer_config.json)")
        return i

    def unknown_words(self, prompt: str) -> list:
        """The words of a prompt this tokenizer can only read as its unknown token (a
        word-level vocabulary, such as the text demo's), in order, each once; [] for
        tokenizers that read any text (byte fallback, SentencePiece)."""
        unk = getattr(self._fast.model, "unk_token", None) if self._fast is not None else None
        unk_id = self._fast.token_to_id(unk) if unk else None
        if unk_id is None:
            return []
        e = self._fast.encode(prompt)
        words = [prompt[a:b] for i, (a, b) in zip(e.ids, e.offsets) if i == unk_id]
        return list(dict.fromkeys(words))

    def encode(self, prompts) -> list:
        """Token ids of each prompt with its special tokens, neither padded nor truncated."""
        if self._fast is not None:
            return [e.ids for e in self._fast.encode_batch(list(prompts))]
        return [self._start + self._sp.encode(p) + self._end for p in prompts]

    def __call__(self, prompts, length: int):
        """(input_ids, attention_mask) int32 arrays (batch, length), padded and truncated
        as transformers does with padding="max_length", truncation=True: the text
        loses tokens on the truncation side, the special tokens stay."""
        if self._fast is not None:  # exactly what transformers asks of the same library
            self._fast.enable_truncation(length, direction=self.truncation_side)
            self._fast.enable_padding(
                direction=self.padding_side, pad_id=self.pad_id, pad_token=self.pad, length=length
            )
            try:
                out = self._fast.encode_batch(list(prompts))
            finally:
                self._fast.no_padding()
                self._fast.no_truncation()
            return (
                np.array([e.ids for e in out], dtype=np.int32),
                np.array([e.attention_mask for e in out], dtype=np.int32),
            )
        start, end = len(self._start), len(self._end)
        keep = max(length - start - end, 0)
        ids = np.full((len(prompts), length), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(prompts), length), dtype=np.int32)
        for i, p in enumerate(prompts):
            text = self._sp.encode(p)
            text = text[:keep] if self.truncation_side == "right" else text[len(text) - keep :]
            row = self._start + text + self._end
            cols = slice(0, len(row)) if self.padding_side == "right" else slice(length - len(row), length)
            ids[i, cols], mask[i, cols] = row, 1
        return ids, mask


def text_tokenizer(path):
    """The tokenizer of a local text-encoder folder (without its weights), or None
    when the path is not a local folder with tokenizer files (a repo id not yet
    downloaded): for checking prompts before anything heavy is loaded."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    try:
        folder, tok_folder = _resolve(folder)
        family = json.loads((folder / "config.json").read_text()).get("model_type", "gemma")
        if family == "t5":  # T5 reads any text (SentencePiece); the check is for language models' vocabularies
            return None
        return Tokenizer(tok_folder, family) if has_tokenizer(tok_folder) else None
    except (FileNotFoundError, ValueError, OSError):
        return None


def tokenize(tokenizer: Tokenizer, prompts, txt_size: int):
    """(input_ids, attention_mask) int32 arrays of shape (batch, txt_size).

    As the reference: padded to txt_size on the tokenizer's padding side and
    truncated, with a warning for every prompt that loses tokens.
    """
    _check_prompts(prompts)
    for i, ids in enumerate(tokenizer.encode(prompts)):
        if len(ids) > txt_size:
            warnings.warn(
                f"prompt {i} is {len(ids)} tokens long; truncated to txt_size={txt_size}, "
                f"{len(ids) - txt_size} tokens dropped",
                stacklevel=3,
            )
    return tokenizer(list(prompts), txt_size)


def _gemma_key(key: str) -> str:
    """Published Gemma key -> mlx-lm's name (`model.` + the decoder's own name)."""
    for prefix in ("language_model.model.", "model.language_model."):
        if key.startswith(prefix):
            return "model." + key[len(prefix) :]
    if key.startswith("language_model.lm_head."):
        return key[len("language_model.") :]
    if key.startswith(("embed_tokens.", "layers.", "norm.")):  # a bare GemmaModel
        return "model." + key
    return key


def sanitize(weights: dict, model) -> dict:
    """Published Gemma weights (a causal LM, a multimodal Gemma 3, a bare GemmaModel)
    in the names of `model`, mlx-lm's Gemma or the embedding alone."""
    weights = {_gemma_key(k): v for k, v in weights.items()}
    return model.sanitize(weights) if hasattr(model, "sanitize") else weights  # gemma3_text: no lm_head


def _load(model, folder: Path, config: dict, weights: dict, dtype, quantize):
    """Strict loading of sanitized Gemma weights, quantized as stored (mlx-community
    checkpoints), then as asked: Gemma's token embedding is a large share of its
    weights (256k rows), so it is quantized too."""
    if config.get("quantization"):
        quantize_like(model, weights, config["quantization"])
    load_checked(model, weights, folder, dtype)
    if quantize:
        quantize_linear(model, **quantize, embeddings=True)
    model.eval()
    mx.eval(model.parameters())


def _gemma_text_config(config: dict) -> dict:
    if config["model_type"] != "gemma3":
        return dict(config)
    text = dict(config.get("text_config") or {})
    for k, v in _GEMMA3_DEFAULTS.items():
        text.setdefault(k, v)
    if "vocab_size" in config:
        text["vocab_size"] = config["vocab_size"]
    text["model_type"] = "gemma3_text"
    return text


def _rope_params(text: dict, layer_type: str):
    """(theta, scaling config or None) of a layer, from either config format."""
    params = text.get("rope_parameters")
    if isinstance(params, dict) and layer_type in params:  # transformers 5, per layer type
        p = params[layer_type]
        scaling = p if p.get("rope_type", "default") != "default" else None
        return p["rope_theta"], scaling
    if isinstance(params, dict) and "rope_theta" in params:
        scaling = params if params.get("rope_type", "default") != "default" else None
        return params["rope_theta"], scaling
    if layer_type == "sliding_attention" and text["model_type"] == "gemma3_text":
        return text.get("rope_local_base_freq", 10_000.0), None
    return text.get("rope_theta", 10_000.0), text.get("rope_scaling")


def _layer_types(text: dict) -> list:
    n = text["num_hidden_layers"]
    if text.get("layer_types"):
        return list(text["layer_types"])
    if text["model_type"] == "gemma2":
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    if text["model_type"] == "gemma3_text":
        p = text.get("sliding_window_pattern") or text.get("_sliding_window_pattern") or 6
        return ["sliding_attention" if (i + 1) % p else "full_attention" for i in range(n)]
    return ["full_attention"] * n


class _TanhGeluMLP(nn.Module):
    # Gemma 1 uses the tanh GELU (transformers maps its legacy "gelu" to it);
    # mlx-lm's Gemma 1 MLP uses the exact one.
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)

    def __call__(self, x):
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


def _load_gemma(folder: Path, config: dict, dtype, quantize):
    """mlx-lm's Gemma model with the decoder weights; no lm_head."""
    from mlx_lm.models import gemma, gemma2, gemma3_text
    from mlx_lm.models.rope_utils import initialize_rope

    text = _gemma_text_config(config)
    if text.get("use_bidirectional_attention"):
        raise ValueError(f"{folder}: bidirectional Gemma models (EmbeddingGemma) are not supported")
    module = {"gemma": gemma, "gemma2": gemma2, "gemma3_text": gemma3_text}[text["model_type"]]
    types = _layer_types(text)
    args = dict(text)
    args["rope_theta"], _ = _rope_params(text, "full_attention")
    model = module.Model(module.ModelArgs.from_dict(args))

    if text["model_type"] == "gemma":
        act = text.get("hidden_activation") or text.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ("gelu", "gelu_pytorch_tanh", "gelu_new"):
            raise ValueError(f"{folder}: Gemma activation {act!r} is not supported")
        for layer in model.model.layers:
            layer.mlp = _TanhGeluMLP(text["hidden_size"], text["intermediate_size"])
    if text["model_type"] == "gemma3_text":
        # Rope per layer type as the config says (mlx-lm assumes a fixed pattern).
        for layer, t in zip(model.model.layers, types):
            theta, scaling = _rope_params(text, t)
            layer.self_attn.is_sliding = t == "sliding_attention"
            layer.self_attn.rope = initialize_rope(
                text["head_dim"],
                base=theta,
                traditional=False,
                scaling_config=scaling,
                max_position_embeddings=text.get("max_position_embeddings"),
            )

    def wanted(key):
        return _gemma_key(key).startswith(("model.embed_tokens.", "model.layers.", "model.norm."))

    _load(model, folder, config, sanitize(read_weights(folder, wanted), model), dtype, quantize)
    return model, text, types


class _Embedding(nn.Module):
    """Gemma's token embedding alone (STARFlow's embedding conditioning)."""

    def __init__(self, vocab_size, dims):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, dims)

    def sanitize(self, weights):
        return {k[len("model.") :]: v for k, v in weights.items()}


def _load_gemma_embedding(folder: Path, config: dict, dtype, quantize):
    text = _gemma_text_config(config)

    def wanted(key):
        return _gemma_key(key).startswith("model.embed_tokens.")

    weights = read_weights(folder, wanted)
    table = [v for k, v in weights.items() if _gemma_key(k) == "model.embed_tokens.weight"]
    if not table:
        raise ValueError(f"{folder}: no embed_tokens weight in the checkpoint")
    model = _Embedding(table[0].shape[0], text["hidden_size"])
    _load(model, folder, config, sanitize(weights, model), dtype, quantize)
    return model, text


class TextEncoder:
    """Prompts -> (batch, txt_size, width) embeddings; see load_text_encoder."""

    def __init__(self, family, mode, model, tok_folder, txt_size, width, text_config=None, layer_types=None):
        self.family = family  # "t5" or the Gemma model_type
        self.mode = mode  # "hidden" or "embed"
        self.model = model
        # A folder without tokenizer files still serves encode_ids.
        self.tokenizer = Tokenizer(tok_folder, family) if has_tokenizer(tok_folder) else None
        self._tok_folder = tok_folder
        self.txt_size = txt_size
        self.width = width
        self._text = text_config
        self._types = layer_types

    def encode(self, prompts) -> mx.array:
        """Embeddings of a list of prompts, padded or truncated to txt_size tokens."""
        _check_prompts(prompts)
        if self.tokenizer is None:
            raise FileNotFoundError(
                f"{self._tok_folder}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})"
            )
        if self.mode == "embed":
            prompts = [EMBED_TEMPLATE.format(prompt=p) for p in prompts]
        ids, mask = tokenize(self.tokenizer, prompts, self.txt_size)
        return self.encode_ids(ids, mask)

    def encode_ids(self, input_ids, attention_mask) -> mx.array:
        """Hidden states of given token ids, times the mask (padding rows zero).

        In "embed" mode this is `embed(ids) * sqrt(hidden)` unmasked, as the
        reference feeds it (the pad token's embedding stays in padding rows).
        """
        if self.model is None:
            raise RuntimeError("this text encoder was released; load it again to encode")
        ids = mx.array(np.asarray(input_ids), dtype=mx.int32)
        mask = mx.array(np.asarray(attention_mask), dtype=mx.int32)
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ValueError(
                f"input_ids {tuple(ids.shape)} and attention_mask {tuple(mask.shape)} must both be (batch, length)"
            )
        if self.mode == "embed":
            x = self.model.embed_tokens(ids)
            y = (x.astype(mx.float32) * (self.width**0.5)).astype(x.dtype)
        else:
            h = self.model(ids, mask) if self.family == "t5" else self._gemma_hidden(ids, mask)
            y = h * mask[..., None].astype(h.dtype)
        mx.eval(y)
        return y

    def _gemma_hidden(self, ids, mask):
        inner = self.model.model
        h = inner.embed_tokens(ids)
        # transformers rounds sqrt(hidden) to the hidden dtype (exact in float32).
        h = h * mx.array(self.width**0.5, dtype=h.dtype)
        L = ids.shape[1]
        q = mx.arange(L)[:, None]
        k = mx.arange(L)[None]
        keys = (mask != 0)[:, None, :]
        masks = {}
        for t in set(self._types):
            allowed = k <= q
            if t == "sliding_attention":
                allowed = allowed & (q - k < self._text.get("sliding_window", 4096))
            # Causal plus the padding of the keys (either side). Each row also sees
            # itself so a left-padding row is never empty; those rows become zero.
            masks[t] = ((allowed[None] & keys) | (k == q)[None])[:, None]
        for layer, t in zip(inner.layers, self._types):
            m = masks[t]
            if self.family == "gemma2" and layer.self_attn.repeats > 1:
                m = m[:, :, None]  # its GQA scores are (B, kv_heads, repeats, L, L)
            h = layer(h, m)
        return inner.norm(h)

    def release(self):
        """Drop the weights (the pipeline frees the encoder before sampling)."""
        self.model = None
        gc.collect()
        mx.clear_cache()


def load_text_encoder(path, txt_size: int, dtype=mx.float32, quantize=None, mode=None) -> TextEncoder:
    """Load a T5 or Gemma text encoder and its tokenizer.

    path: a Hugging Face folder (or repo id) with config.json, weights and tokenizer files.
    txt_size: tokens per prompt (128 for the 3B STARFlow model).
    dtype: mx.float32 or mx.bfloat16 (T5 refuses float16).
    quantize: None, or 8 (or 4) bits for the linear layers (and Gemma's token
        embedding), or {"bits", "group_size"} (quant.quant_args; group size 64 by
        default); layers whose input width is not a multiple of the group size stay
        as they are.
    mode: None (final hidden states) or "embed" (Gemma only: STARFlow's
        token-embedding conditioning, `embed(ids) * sqrt(hidden)` after its chat template).
    """
    if not isinstance(txt_size, int) or txt_size < 1:
        raise ValueError(f"txt_size must be a positive int, got {txt_size!r}")
    if mode not in (None, "hidden", "embed"):
        raise ValueError(f"mode must be None or 'embed', got {mode!r}")
    quantize = quant_args(quantize)  # refused before anything is read
    folder, tok_folder = _resolve(path)
    config = json.loads((folder / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in ("t5",) + GEMMA_TYPES:
        raise ValueError(
            f"{folder}: model_type {model_type!r} is not a supported text encoder "
            f"(supported: t5, {', '.join(GEMMA_TYPES)})"
        )
    mode = mode or "hidden"
    if model_type == "t5":
        if mode == "embed":
            raise ValueError("mode='embed' is for Gemma models; T5 gives its encoder's hidden states")
        model = device.prepare(load_t5(folder, dtype=dtype, quantize=quantize))
        return TextEncoder("t5", mode, model, tok_folder, txt_size, model.width)
    if mode == "embed":
        model, text = _load_gemma_embedding(folder, config, dtype, quantize)
        types = None
    else:
        model, text, types = _load_gemma(folder, config, dtype, quantize)
    device.prepare(model)
    return TextEncoder(text["model_type"], mode, model, tok_folder, txt_size, text["hidden_size"], text, types)


# -- the T5 encoder's weights ----------------------------------------------------------------


def _bin_files(folder: Path) -> list:
    index = folder / "pytorch_model.bin.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        # Shards holding only decoder weights are never opened.
        return sorted({folder / f for k, f in weight_map.items() if t5_wanted(k)})
    return [folder / "pytorch_model.bin"]


def read_weights(folder, wanted=t5_wanted) -> dict:
    """{name: mx.array} of the keys `wanted` accepts from a Hugging Face folder.

    Safetensors are loaded lazily by MLX, so the keys left out are never read.
    """
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({folder / f for k, f in weight_map.items() if wanted(k)})
    elif (folder / "model.safetensors").exists():
        files = [folder / "model.safetensors"]
    elif (folder / "pytorch_model.bin").exists() or (folder / "pytorch_model.bin.index.json").exists():
        weights = {}
        for f in _bin_files(folder):
            for k, v in load_pth(f).items():
                if wanted(k):
                    weights[k] = v if isinstance(v, mx.array) else mx.array(v)
        return weights
    else:
        raise FileNotFoundError(
            f"{folder}: no weights found (expected model.safetensors, "
            "model.safetensors.index.json with its shards, or pytorch_model.bin)"
        )
    weights = {}
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"{f}: shard named in {index.name} is missing")
        weights.update({k: v for k, v in load_safetensors(f).items() if wanted(k)})
    return weights


def check_dtype(dtype):
    if dtype == mx.float16:
        raise ValueError(
            "T5 overflows in float16 (its activations exceed the float16 range); use dtype=mx.bfloat16 or mx.float32"
        )
    if dtype not in (mx.float32, mx.bfloat16):
        raise ValueError(f"unsupported T5 dtype {dtype}; use mx.bfloat16 or mx.float32")


def load_t5(path, dtype=mx.float32, quantize=None) -> T5Encoder:
    """Load the T5 encoder of a Hugging Face folder.

    dtype: mx.float32 or mx.bfloat16 (float16 is refused: T5 overflows in it).
    quantize: None, the bits (8 or 4) for the linear layers, or {"bits", "group_size"}
        (quant.quant_args); the embeddings stay in full precision.
    """
    check_dtype(dtype)
    q = quant_args(quantize)
    folder = Path(path)
    config = json.loads((folder / "config.json").read_text())
    model = T5Encoder(T5Config.from_dict(config))
    try:
        weights = t5_sanitize(read_weights(folder))
    except ValueError as e:  # an unknown key, named by the model's sanitize
        raise WeightsError(f"{folder}: {e}") from None
    load_checked(model, weights, folder, dtype)
    if q:
        quantize_linear(model, **q)
    model.eval()
    mx.eval(model.parameters())
    return model
