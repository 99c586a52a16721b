import math

import mlx.core as mx
import numpy as np
import pytest
from helpers import TXT_DIM, rand, randomize, tiny_flow

from mlx_starflow.models.config import FlowConfig
from mlx_starflow.models.flow import Flow, IdentityBlock
from mlx_starflow.sample import Jacobi, guided, sample, sample_block, sample_steps

B = 2

VARIANTS = {
    # the released recipe in miniature (identity block included)
    "t2i": {},
    "gemma_style": {
        "use_swiglu": 1,
        "norm_type": "rms_norm",
        "use_qk_norm": 1,
        "use_post_norm": 1,
        "num_heads": 2,
        "num_kv_heads": 1,
        "use_bias": 0,
    },
    "no_sos_exp_r2l_text_everywhere": {
        "sos": 0,
        "use_softplus": 0,
        "seq_order": "R2L",
        "cond_top_only": 0,
        "soft_clip": 0,
        "use_final_norm": 0,
    },
    "learned_positions_unconditional": {"rope": 0, "txt_size": 0, "cond_top_only": 0},
    "rope_2d_unconditional": {"txt_size": 0, "cond_top_only": 0},
    "wider_top_block": {"top_block_channels": 48},
    "patch2_denoiser": {"patch_size": 2, "img_size": 64, "learnable_self_denoiser": 1, "conditional_denoiser": 1},
}


def make(name, seed=0):
    model, _ = tiny_flow(VARIANTS[name], seed=seed)
    return model


def inputs(model, seed=1):
    cfg = model.config
    x = rand((B, cfg.input_size, cfg.input_size, cfg.in_channels), seed)
    y = rand((B, cfg.txt_size, cfg.txt_dim), seed + 1) if cfg.txt_dim else None
    return x, y


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_then_reverse_is_identity(name):
    model = make(name)
    x, y = inputs(model)
    z, logdet = model(x, y)
    assert z.shape == x.shape and logdet.shape == (B,)
    back = sample(model, z, y)
    np.testing.assert_allclose(np.array(back), np.array(x), atol=2e-4)


@pytest.mark.parametrize("name", ["t2i", "no_sos_exp_r2l_text_everywhere"])
def test_each_block_inverts(name):
    model = make(name)
    x, y = inputs(model)
    tokens = model.patchify(x)
    h, w = model.grid(x)
    for block in model.blocks:
        if isinstance(block, IdentityBlock):
            continue
        t = y if block.has_text else None
        rope = model.rope(block.has_text, h, w, 0 if t is None else t.shape[1])
        z, _ = block(tokens, rope, t)
        np.testing.assert_allclose(np.array(sample_block(block, z, rope, t)), np.array(tokens), atol=1e-4)


def naive_sample(block, z, rope, text, guidance):
    """Sampling without a cache: recompute the whole sequence for every token."""
    if block.flip:
        z = z[:, ::-1]
    x = mx.zeros_like(z)
    first = 0 if block.sos else 1
    if not block.sos:
        x[:, 0] = z[:, 0]
    for t in range(first, z.shape[1]):
        a, b = block.affine(x, rope, text)
        s, mu = guided(block, a, b, guidance)
        if guidance > 0:
            s, mu = mx.concatenate([s, s]), mx.concatenate([mu, mu])
        x[:, t] = z[:, t] * s[:, t] + mu[:, t]
    return x[:, ::-1] if block.flip else x


@pytest.mark.parametrize("name,guidance", [("t2i", 3.0), ("no_sos_exp_r2l_text_everywhere", 2.0)])
def test_kv_cached_sampling_equals_recomputation(name, guidance):
    model = make(name)
    x, y = inputs(model)
    top = model.blocks[-1]
    h, w = model.grid(x)
    text = mx.concatenate([y, rand(y.shape, 7)])  # conditional rows, then unconditional
    rope = model.rope(True, h, w, y.shape[1])
    z = model.patchify(x)
    z = mx.concatenate([z, z])
    cached = sample_block(top, z, rope, text, guidance=guidance)
    naive = naive_sample(top, z, rope, text, guidance)
    np.testing.assert_allclose(np.array(cached), np.array(naive), atol=1e-4)


@pytest.mark.parametrize("name", ["t2i", "gemma_style"])
def test_jacobi_to_convergence_equals_sequential(name):
    model = make(name)
    x, y = inputs(model)
    y2 = mx.concatenate([y, rand(y.shape, 9)])
    seq = sample(model, x, y2, guidance=2.5)
    jac = sample(model, x, y2, guidance=2.5, jacobi=Jacobi(block_size=5, threshold=1e-12, max_iter=100))
    np.testing.assert_allclose(np.array(jac), np.array(seq), atol=1e-4)
    # One iteration per chunk is not convergence: the result differs.
    rough = sample(model, x, y2, guidance=2.5, jacobi=Jacobi(block_size=5, threshold=1e-12, max_iter=1))
    assert np.abs(np.array(rough) - np.array(seq)).max() > 1e-3


def test_guidance_with_equal_rows_equals_unguided_and_zero_weight_ignores_uncond_rows():
    model = make("t2i")
    x, y = inputs(model)
    plain = np.array(sample(model, x, y))
    same_rows = np.array(sample(model, x, mx.concatenate([y, y]), guidance=4.0))
    np.testing.assert_allclose(same_rows, plain, atol=1e-4)
    zero = np.array(sample(model, x, mx.concatenate([y, rand(y.shape, 5)]), guidance=0.0))
    np.testing.assert_allclose(zero, plain, atol=1e-6)
    guided = np.array(sample(model, x, mx.concatenate([y, rand(y.shape, 5)]), guidance=4.0))
    assert np.abs(guided - plain).max() > 1e-3


def test_guidance_rule():
    model = make("t2i")
    top = model.blocks[-1]
    a = rand((4, 3, 2), 3)
    b = rand((4, 3, 2), 4)
    w = 1.7
    s, mu = guided(top, a, b, w)
    assert s.shape == (2, 3, 2)
    sc, su = [np.log1p(np.exp(np.array(v) + 0.541324854612918)) for v in (a[:2], a[2:])]
    bc, bu = np.array(b[:2]), np.array(b[2:])
    r = np.minimum(sc / su, 1) ** 2
    np.testing.assert_allclose(np.array(s[:2]), sc / np.sqrt(1 + w - w * r), rtol=1e-5)
    np.testing.assert_allclose(np.array(mu[:2]), ((1 + w) * bc - w * r * bu) / (1 + w - w * r), rtol=1e-5, atol=1e-6)


def test_log_prob_and_score_step_match_finite_differences():
    model = make("t2i")
    x, y = inputs(model)
    lp = model.log_prob(x, y)
    assert lp.shape == (B,) and np.all(np.isfinite(np.array(lp)))
    # bits per dimension is the same quantity in other units
    D = math.prod(x.shape[1:])
    np.testing.assert_allclose(np.array(model.bits_per_dim(x, y)), -np.array(lp) / (D * math.log(2)), rtol=1e-6)
    s = 0.3
    out = model.denoise(x, y, s)
    d = rand(x.shape, 11)
    eps = 1e-2
    fd = (model.log_prob(x + eps * d, y).sum() - model.log_prob(x - eps * d, y).sum()) / (2 * eps)
    analytic = mx.sum((out - x) / (s * s) * d)
    np.testing.assert_allclose(float(analytic), float(fd), rtol=2e-2)
    # The score step recomputes layer activations in its backward pass: same gradient.
    kept = mx.grad(lambda v: model.log_prob(v, y).sum())(x)
    np.testing.assert_allclose(np.array(out), np.array(x + (s * s) * kept), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows", [None, 5, 64])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_score_step_layer_by_layer_is_the_gradient(name, rows):
    # Each layer differentiated alone, whole or a few query rows at a time (rows=5 splits
    # every sequence here, text prefix included, into uneven chunks): the gradient of the
    # whole graph.
    model = make(name)
    x, y = inputs(model)
    s = 0.3
    want = x + (s * s) * mx.grad(lambda v: model.log_prob(v, y).sum())(x)
    steps, out = [], model.denoise_steps(x, y, s, rows=rows)
    while True:
        try:
            steps.append(next(out))
        except StopIteration as stop:
            got = stop.value
            break
    # chunks sum the keys' and values' cotangents in another order: float32 rounding, 2e-6 of the largest
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=2e-6 * float(mx.abs(want).max()))
    # one step per shallow block's first pass, per layer forward and per layer backward
    blocks = [b for b in model.blocks if not isinstance(b, IdentityBlock)]
    total = len(blocks) - 1 + 2 * sum(len(b.attn_blocks) for b in blocks)
    assert steps == [(k + 1, total) for k in range(total)]


def test_learned_denoiser_uses_the_text():
    model = make("patch2_denoiser")
    x, y = inputs(model)
    a = model.learned_denoise(x, y)
    b = model.learned_denoise(x, rand(y.shape, 3))
    assert a.shape == x.shape
    assert np.abs(np.array(a) - np.array(b)).max() > 1e-4
    with pytest.raises(ValueError, match="no learnable self-denoiser"):
        make("t2i").learned_denoise(x[..., :4], y)


def test_identity_blocks_and_orders():
    cfg = tiny_flow(VARIANTS["t2i"])[0].config
    # L2R: the deep block keeps the order, the shallow ones alternate from a flip.
    assert [cfg.flipped(i) for i in range(cfg.num_blocks)] == [True, False, True, False]
    r2l = tiny_flow({"seq_order": "R2L"})[0].config
    assert [r2l.flipped(i) for i in range(4)] == [False, True, False, True]
    model = make("t2i")
    assert isinstance(model.blocks[1], IdentityBlock)


def tiny_tarflow(num_classes=3, seed=0):
    cfg = FlowConfig(
        model_type="tarflow",
        in_channels=3,
        input_size=8,
        patch_size=2,
        channels=16,
        top_channels=16,
        head_dim=8,
        num_heads=2,
        num_kv_heads=2,
        top_num_heads=2,
        top_num_kv_heads=2,
        layers_per_block=[1, 2, 1],
        pt_seq_len=4,
        num_classes=num_classes,
        noise_std=0.05,
    )
    return randomize(Flow(cfg), seed, scale=0.05)  # exp scales blow up with larger weights


def test_tarflow_roundtrip_guidance_and_mean_embedding():
    model = tiny_tarflow()
    x = rand((3, 8, 8, 3), 2)
    labels = mx.array([0, 2, -1])
    z, logdet = model(x, labels)
    np.testing.assert_allclose(np.array(sample(model, z[:2], labels[:2])), np.array(x[:2]), atol=1e-4)
    # apple/ml-tarflow's reverse indexes class_embed[y] as is: -1 samples the last class
    np.testing.assert_allclose(
        np.array(sample(model, z[2:], labels[2:])), np.array(sample(model, z[2:], mx.array([2]))), atol=1e-6
    )
    # a negative label means "no class": the mean class embedding
    z_none, _ = model(x[2:], None)
    np.testing.assert_allclose(np.array(z[2:]), np.array(z_none), atol=1e-6)
    g = np.array(sample(model, z, labels, guidance=1.5))
    assert np.all(np.isfinite(g)) and np.abs(g - np.array(x)).max() > 1e-3
    with pytest.raises(ValueError, match="SOS"):
        sample(model, z, labels, jacobi=Jacobi())


def test_steps_report_every_token_and_stopping_cancels():
    model = make("t2i")
    x, y = inputs(model)
    seen = [(st.block, st.done, st.total) for st in sample_steps(model, x, y)]
    # the deep block (3) first, then the shallow ones; 16 tokens each; block 1 is an identity
    assert [b for b, done, _ in seen if done == 1] == [3, 2, 0]
    assert seen[0] == (3, 1, 16) and seen[-1] == (0, 16, 16) and len(seen) == 3 * 16
    steps = sample_steps(model, x, y)
    for st in steps:
        if st.done == 3:
            preview = st.preview()
            break
    steps.close()  # stopping is cancelling: nothing else to call
    assert preview.shape == x.shape
    np.testing.assert_allclose(np.array(sample(model, x, y)), np.array(sample(model, x, y)))


def test_bad_inputs():
    model = make("t2i")
    x, y = inputs(model)
    with pytest.raises(ValueError, match="guidance"):
        sample(model, x, y, guidance=-1)
    with pytest.raises(ValueError, match=r"\(batch, height, width, 4\)"):
        sample(model, x[..., :3], y)
    with pytest.raises(ValueError, match="text embeddings"):
        sample(model, x, y[..., :5])
    with pytest.raises(ValueError, match="rows of text"):
        sample(model, x, y, guidance=2.0)  # guidance needs 2B rows
    with pytest.raises(ValueError, match="block size"):
        Jacobi(block_size=0)
    for bad in (float("nan"), float("inf"), "high"):
        with pytest.raises(ValueError, match="guidance must be >= 0 and finite"):
            sample(model, x, mx.concatenate([y, y]), guidance=bad)
    with pytest.raises(ValueError, match="threshold"):
        Jacobi(threshold=-1e-3)
    with pytest.raises(ValueError, match="threshold"):
        Jacobi(threshold=float("nan"))
    assert TXT_DIM == y.shape[-1]


@pytest.mark.parametrize("name", ["t2i", "gemma_style"])
def test_input_major_weights_give_the_same_model(name, tmp_path):
    """device.input_major holds the float32 linears input-major for a CPU BLAS:
    density, guided sampling and the score step are unchanged, and the parameters
    keep their names and shapes, so the model still saves and quantizes."""
    from mlx.utils import tree_flatten

    from mlx_starflow.loading.device import input_major

    model = make(name)
    x, y = inputs(model)
    y2 = mx.concatenate([y, rand(y.shape, 7)])
    before = [model.log_prob(x, y), sample(model, x, y2, guidance=1.5), model.denoise(x, y, 0.3)]
    shapes = {k: v.shape for k, v in tree_flatten(model.parameters())}
    n_linears = sum(
        k.endswith(".weight") and ".attn_blocks." in f".{k}" and v.ndim == 2
        for k, v in tree_flatten(model.parameters())
    )
    assert input_major(model) == n_linears > 0
    assert {k: v.shape for k, v in tree_flatten(model.parameters())} == shapes
    after = [model.log_prob(x, y), sample(model, x, y2, guidance=1.5), model.denoise(x, y, 0.3)]
    for a, b in zip(before, after):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-4)
    # saved and loaded back: the same numbers in the usual layout
    path = str(tmp_path / "w.safetensors")
    mx.save_safetensors(path, dict(tree_flatten(model.parameters())))
    again = make(name, seed=5)
    again.load_weights(path)
    np.testing.assert_allclose(np.array(again.log_prob(x, y)), np.array(before[0]), rtol=1e-4, atol=1e-4)

    # Other dtypes keep the usual layout.
    half = make(name)
    half.set_dtype(mx.bfloat16)
    assert input_major(half) == 0
