"""The sampler from outside: guided inversion is exact, steps drive everything."""

import mlx.core as mx
import numpy as np
import pytest
from helpers import rand, randomize
from test_flow import inputs, make, tiny_tarflow

from mlx_starflow.sample import Jacobi, invert, sample, sample_steps


def model_of(name):
    # Smaller random weights than test_flow's keep these untrained models as well
    # conditioned as trained ones (exp scales and guidance 3.6 amplify rounding).
    return randomize(make(name), 0, scale=0.05 if name == "no_sos_exp_r2l_text_everywhere" else 0.1)


def rel(a, b):
    a, b = np.array(a), np.array(b)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("name", ["t2i", "no_sos_exp_r2l_text_everywhere", "gemma_style"])
@pytest.mark.parametrize("w", [0.0, 1.0, 3.6])
def test_sampling_inverts_the_guided_inverse_exactly(name, w):
    model = model_of(name)
    x, y = inputs(model)
    y = mx.concatenate([y, rand(y.shape, 21)]) if w > 0 else y
    z = invert(model, x, y, w)
    assert rel(sample(model, z, y, w), x) < 1e-4
    noise = rand(x.shape, 4)
    assert rel(invert(model, sample(model, noise, y, w), y, w), noise) < 1e-4


@pytest.mark.parametrize("w", [0.0, 1.5])
def test_tarflow_guided_inverse(w):
    model = tiny_tarflow()
    x = rand((3, 8, 8, 3), 2) * 0.5
    labels = mx.array([0, 2, 1])
    z = invert(model, x, labels, w)
    assert rel(sample(model, z, labels, w), x) < 1e-4
    noise = rand(x.shape, 5)  # no SOS, exp scales, R2L
    assert rel(invert(model, sample(model, noise, labels, w), labels, w), noise) < 1e-4


def test_unguided_inverse_is_the_density_direction():
    model = make("t2i")
    x, y = inputs(model)
    z, _ = model(x, y)
    assert rel(invert(model, x, y, 0.0), z) < 1e-5


def test_jacobi_round_trip_within_its_threshold():
    model = make("t2i")
    x, y = inputs(model)
    y2 = mx.concatenate([y, rand(y.shape, 3)])
    z = invert(model, x, y2, 2.0)
    assert rel(sample(model, z, y2, 2.0, jacobi=Jacobi(4, 1e-8, 64)), x) < 1e-4


@pytest.mark.parametrize("overlap,compile_step", [(False, False), (True, True), (True, False)])
def test_loop_options_are_arguments_and_give_the_same_sample(overlap, compile_step):
    model = make("t2i")
    x, y = inputs(model)
    ref = sample(model, x, y)
    steps = list(sample_steps(model, x, y, overlap=overlap, compile_step=compile_step))
    assert steps[-1].x is not None and all(s.x is None for s in steps[:-1])
    np.testing.assert_allclose(np.array(steps[-1].x), np.array(ref), atol=1e-5)
