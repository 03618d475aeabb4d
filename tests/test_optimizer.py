"""AdamW by hand against optax (test-only oracle), and the learning-rate schedule."""
import jax
import numpy as np
import optax
import pytest

import tinytpu as tt
from conftest import tiny_config


@pytest.mark.parametrize('warmdown', ['linear', 'cosine'])
def test_adamw_matches_optax(warmdown):
    c = tiny_config(steps=6, warmup_steps=2, warmdown_frac=0.5, warmdown=warmdown, grad_clip=0.05,
                    weight_decay=0.1, lr=1e-2)
    params = tt.init_params(c, jax.random.key(0))  # every weight a matrix: every weight decays
    oracle = optax.chain(optax.clip_by_global_norm(c.grad_clip),
                         optax.adamw(lambda n: tt.lr_schedule(n, c), b1=c.beta1, b2=c.beta2, eps=c.eps,
                                     weight_decay=c.weight_decay))
    ostate, opt = oracle.init(params), tt.adamw_init(params)
    ours = theirs = params
    for step in range(c.steps):
        grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(step), p.shape) * 0.1, params)
        ours, opt, norm = tt.adamw_update(ours, grads, opt, tt.lr_schedule(opt['step'], c), c)
        updates, ostate = oracle.update(grads, ostate, theirs)
        theirs = optax.apply_updates(theirs, updates)
        np.testing.assert_allclose(norm, np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads))), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert int(opt['step']) == c.steps
    assert not np.allclose(ours['embed'], params['embed'])  # it did move


def test_lr_schedule_shape():
    c = tiny_config(steps=100, lr=1.0, warmup_steps=10, warmdown_frac=0.2, min_lr_frac=0.1, warmdown='linear')
    lr = np.array([float(tt.lr_schedule(s, c)) for s in range(100)])
    np.testing.assert_allclose(lr[:10], np.arange(1, 11) / 10)         # 1) linear warmup to lr
    assert np.all(lr[10:80] == 1.0)                                   # 2) constant
    assert np.all(np.diff(lr[80:]) < 0) and abs(lr[80] - (1 - 0.9 / 20)) < 1e-6  # 3) linear warmdown,
    assert abs(lr[99] - 0.1) < 1e-6                 # whose last update (of 100: number 99) uses min_lr_frac * lr
    cos = tiny_config(**{**c.__dict__, 'warmdown': 'cosine'})
    assert abs(float(tt.lr_schedule(89, cos)) - 0.55) < 1e-6         # cosine: halfway is the midpoint
    none = tiny_config(**{**c.__dict__, 'warmdown_frac': 0.0})
    assert float(tt.lr_schedule(99, none)) == 1.0                       # no warmdown: lr to the end
