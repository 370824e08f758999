"""Distillation losses against direct numpy (float64) computations, with temperature, masking and top-k."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kslm_jax.objectives import distill

B, T, V, K = 2, 5, 11, 4


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_kl(p, q):
    return np.sum(p * (np.log(p) - np.log(q)), -1)


def _np_divergence(pt, ps, kind, beta):
    if kind == "forward_kl":
        return _np_kl(pt, ps)
    if kind == "reverse_kl":
        return _np_kl(ps, pt)
    m = beta * pt + (1 - beta) * ps
    if kind == "jsd":
        return beta * _np_kl(pt, m) + (1 - beta) * _np_kl(ps, m)
    return _np_kl(pt, m)  # skew_kl


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(B, T, V)) * 3
    t = rng.normal(size=(B, T, V)) * 3
    mask = np.ones((B, T), bool)
    mask[0, 3:] = False   # padding at the end of a row
    mask[1, 0] = False    # a position outside the loss (e.g. an SFT prompt token)
    return s, t, mask


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1),
                                       ("skew_kl", 0.1), ("skew_kl", 0.0)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_full_vocabulary_matches_numpy(data, kind, beta, temperature):
    s, t, mask = data
    want = _np_divergence(_np_softmax(t / temperature), _np_softmax(s / temperature), kind, beta) * temperature ** 2
    want = np.where(mask, want, 0.0)
    got = distill.kd_full(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), mask, kind, beta, temperature)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-6)
    assert np.all(np.asarray(got)[~mask] == 0.0)
    assert np.all(np.asarray(got)[mask] > 0.0)


def test_divergences_vanish_when_student_equals_teacher(data):
    _, t, mask = data
    for kind in distill.LOSSES:
        got = distill.kd_full(jnp.asarray(t), jnp.asarray(t), mask, kind, 0.3, 2.0)
        np.testing.assert_allclose(np.asarray(got), 0.0, atol=1e-5)


def test_forward_kl_gradient_is_temperature_times_prob_gap(data):
    """d/ds [T^2 KL(p_t || p_s)] = T (p_s - p_t): the T^2 factor keeps the gradient scale of soft targets."""
    s, t, mask = data
    temp = 3.0
    grad = jax.grad(lambda x: distill.kd_full(x, jnp.asarray(t), mask, "forward_kl", 0.5, temp).sum())(
        jnp.asarray(s, jnp.float32))
    want = temp * (_np_softmax(s / temp) - _np_softmax(t / temp)) * mask[..., None]
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(grad)[~mask] == 0.0)  # masked positions send no gradient


def test_teacher_gets_no_gradient(data):
    s, t, mask = data
    g = jax.grad(lambda x: distill.kd_full(jnp.asarray(s), x, mask, "reverse_kl").sum())(jnp.asarray(t, jnp.float32))
    assert np.all(np.asarray(g) == 0.0)


@pytest.mark.parametrize("kind", distill.LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_matches_numpy_renormalized(data, kind, temperature):
    s, t, mask = data
    logp_t, ids = distill.teacher_topk(jnp.asarray(t, jnp.float32), K)
    order = np.argsort(-t, axis=-1, kind="stable")[..., :K]
    np.testing.assert_array_equal(np.asarray(ids), order)
    full_logp = np.log(_np_softmax(t))
    np.testing.assert_allclose(np.asarray(logp_t), np.take_along_axis(full_logp, order, -1), rtol=1e-5, atol=1e-6)
    # Both sides restricted to the teacher's top-k tokens and renormalized there, then softened.
    tk = np.take_along_axis(t, order, -1)
    sk = np.take_along_axis(s, order, -1)
    want = _np_divergence(_np_softmax(tk / temperature), _np_softmax(sk / temperature), kind, 0.3) * temperature ** 2
    want = np.where(mask, want, 0.0)
    got = distill.kd_topk(jnp.asarray(s, jnp.float32), logp_t, ids, mask, kind, 0.3, temperature)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-6)


def test_topk_over_the_whole_vocabulary_is_the_full_loss(data):
    s, t, mask = data
    logp_t, ids = distill.teacher_topk(jnp.asarray(t, jnp.float32), V)
    for kind in distill.LOSSES:
        a = distill.kd_topk(jnp.asarray(s), logp_t, ids, mask, kind, 0.4, 1.7)
        b = distill.kd_full(jnp.asarray(s), jnp.asarray(t), mask, kind, 0.4, 1.7)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_topk_from_half_precision_cache_is_close(data):
    s, t, mask = data
    logp_t, ids = distill.teacher_topk(jnp.asarray(t, jnp.float32), K)
    exact = distill.kd_topk(jnp.asarray(s), logp_t, ids, mask, "forward_kl")
    half = distill.kd_topk(jnp.asarray(s), logp_t.astype(jnp.float16), ids, mask, "forward_kl")
    assert half.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(half), np.asarray(exact), atol=5e-3)


def test_top1_agreement_and_mixing(data):
    s, t, mask = data
    s2 = s.copy()
    s2[0, 0] = t[0, 0]  # one position where the student copies the teacher
    agree = distill.top1_agreement(jnp.asarray(s2), jnp.argmax(jnp.asarray(t), -1).astype(jnp.int32), mask)
    want = (np.argmax(s2, -1) == np.argmax(t, -1)) & mask
    np.testing.assert_array_equal(np.asarray(agree), want.astype(np.float32))
    assert want[0, 0]
    loss = distill.mixed(jnp.float32(6.0), jnp.float32(2.0), jnp.float32(0.5), 0.25)
    assert float(loss) == pytest.approx(0.25 * 2.0 + 0.75 * 6.0 + 0.5)  # a sum: the step divides by the tokens
