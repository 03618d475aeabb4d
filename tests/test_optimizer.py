"""AdamW by hand against optax (test-only oracle), and the learning-rate schedule."""
import dataclasses
import json
import shutil

import jax
import numpy as np
import optax
import pytest

import tinytpu as tt
from conftest import tiny_config, train


@pytest.mark.slow
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

    @jax.jit  # both steps compiled whole: op by op, compiling each op takes longer
    def ours_step(p, g, o):
        return tt.adamw_update(p, g, o, tt.lr_schedule(o['step'], c), c)

    @jax.jit
    def theirs_step(p, g, s):
        updates, s = oracle.update(g, s, p)
        return optax.apply_updates(p, updates), s

    for step in range(c.steps):
        grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(step), p.shape) * 0.1, params)
        ours, opt, norm = ours_step(ours, grads, opt)
        theirs, ostate = theirs_step(theirs, grads, ostate)
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


@pytest.mark.parametrize('shape', [(64, 160), (160, 64), (3, 48, 128)])
def test_newton_schulz_gives_the_polar_factors_directions(shape):
    """orthogonalize(g) against the exact polar factor U V^T from g's SVD: the same singular
    vectors (U^T x V is diagonal), and singular values in the quintic's band, about [0.68, 1.14],
    instead of g's spread."""
    g = np.asarray(jax.random.normal(jax.random.key(0), shape), np.float64)
    x = np.asarray(tt.orthogonalize(jax.numpy.asarray(g, np.float32)), np.float64)
    U, S, Vt = np.linalg.svd(g, full_matrices=False)
    M = np.swapaxes(U, -1, -2) @ x @ np.swapaxes(Vt, -1, -2)
    diag = np.diagonal(M, axis1=-2, axis2=-1)
    assert np.abs(M - diag[..., None] * np.eye(M.shape[-1])).max() < 1e-5            # the same directions
    assert 0.67 < diag.min() and diag.max() < 1.15 and S.max() / S.min() > 3           # equalized
    distance = np.linalg.svd(x - U @ Vt, compute_uv=False).max()                          # spectral norm
    assert distance < 0.33                                                                # near U V^T


def muon_reference(params, grads, state, step, c, lr):
    """One Muon step in float64 numpy, written from the published algorithm (Keller Jordan's
    Muon: Nesterov momentum, quintic Newton-Schulz on the normalized update, scaled by
    sqrt(max(1, fan_out / fan_in))), AdamW for the embedding. -> params, state"""
    a, b, cc = 3.4445, -4.7750, 2.0315

    def ns(G):
        X = G.T if G.shape[0] > G.shape[1] else G
        X = X / (np.linalg.norm(X) + 1e-7)
        for _ in range(5):
            A = X @ X.T
            X = a * X + (b * A + cc * A @ A) @ X
        return X.T if G.shape[0] > G.shape[1] else X

    def as_matrices(name, w):  # per layer: [(in, out) matrices], and how to put them back
        if name == 'qkv':
            N, K = c.n_head, c.n_kv_head
            return [w[:, :N].reshape(w.shape[0], -1), w[:, N:N + K].reshape(w.shape[0], -1),
                    w[:, N + K:].reshape(w.shape[0], -1)]
        return [w.reshape(-1, w.shape[-1])] if name == 'o' else [w]

    norm = np.sqrt(sum(np.sum(g ** 2) for g in jax.tree.leaves(grads)))
    clip = min(1.0, c.grad_clip / (norm + 1e-12))
    new, new_state = {'layers': {}}, {'mu': {'layers': {}}, 'nu': state['nu']}
    for name, p in params['layers'].items():
        g = grads['layers'][name] * clip
        m = c.momentum * state['mu']['layers'][name] + (1 - c.momentum) * g
        u = (1 - c.momentum) * g + c.momentum * m
        direction = np.zeros_like(p)
        for l in range(p.shape[0]):
            parts = [ns(G) * max(1, G.shape[1] / G.shape[0]) ** 0.5 for G in as_matrices(name, u[l])]
            if name == 'qkv':
                N, K, H = c.n_head, c.n_kv_head, p.shape[-1]
                direction[l] = np.concatenate([parts[0].reshape(-1, N, H), parts[1].reshape(-1, K, H),
                                               parts[2].reshape(-1, K, H)], axis=1)
            else:
                direction[l] = parts[0].reshape(p.shape[1:])
        new['layers'][name] = p - lr * c.matrix_lr / c.embed_lr * (direction + c.weight_decay * p)
        new_state['mu']['layers'][name] = m
    g = grads['embed'] * clip
    mu = c.beta1 * state['mu']['embed'] + (1 - c.beta1) * g
    nu = c.beta2 * state['nu']['embed'] + (1 - c.beta2) * g * g
    mh, nh = mu / (1 - c.beta1 ** step), nu / (1 - c.beta2 ** step)
    new['embed'] = params['embed'] - lr * (mh / (np.sqrt(nh) + c.eps) + c.weight_decay * params['embed'])
    new_state['mu']['embed'] = mu
    new_state['nu'] = {**state['nu'], 'embed': nu}
    return new, new_state


@pytest.mark.slow
def test_muon_matches_a_float64_reference_of_the_published_algorithm():
    with jax.enable_x64(True):
        c = tiny_config(optimizer='muon', dtype='float64', mlp='swiglu', n_head=4, n_kv_head=2, steps=6,
                        warmup_steps=2, lr=1e-2, matrix_lr=0.05, grad_clip=0.5, weight_decay=0.1)
        params = jax.tree.map(lambda x: np.asarray(x, np.float64), tt.init_params(c, jax.random.key(0)))
        opt = jax.tree.map(lambda x: np.asarray(x, np.float64), tt.adamw_init(params))
        opt['step'] = np.int32(0)
        ours, ref, ref_state = params, params, {'mu': opt['mu'], 'nu': opt['nu']}
        muon_update = jax.jit(tt.muon_update, static_argnames='c')  # compiled whole, not op by op
        for step in range(3):
            grads = jax.tree.map(lambda p: np.asarray(jax.random.normal(jax.random.key(step), p.shape), np.float64),
                                 params)
            lr = float(tt.lr_schedule(step, c))
            ours, opt, _ = muon_update(ours, grads, opt, lr, c=c)
            ref, ref_state = muon_reference(ref, grads, ref_state, step + 1, c, lr)
            for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(ref)):
                np.testing.assert_allclose(np.asarray(a), b, rtol=1e-9, atol=1e-12, err_msg=str(path))
        assert not np.allclose(ours['layers']['up'], params['layers']['up'])


def test_learning_rates_follow_the_width_and_presets_keep_their_own():
    """--lr and --matrix_lr are set for a model lr_width wide and scale as 1/width; beside Muon,
    AdamW's rate for the embedding (--embed_lr) does not (docs/optimizers.md's sweeps). Each
    preset's rates are its own at its own width."""
    peak = lambda c: float(tt.lr_schedule(c.warmup_steps, c))
    for width, lr, matrix_lr in [(64, 2e-3, 0.01), (128, 1e-3, 0.005), (256, 5e-4, 0.0025)]:
        c = tt.make_config({'d_model': width}, platform='cpu')
        assert tt.peak_lrs(c) == (lr, matrix_lr) and peak(c) == pytest.approx(lr, rel=1e-6)
        muon = tt.make_config({'d_model': width, 'optimizer': 'muon'}, platform='cpu')
        assert tt.peak_lrs(muon) == (2e-3, matrix_lr) and peak(muon) == pytest.approx(2e-3, rel=1e-6)
    for preset in ('gpt2', 'tpu'):
        c = tt.make_config({'preset': preset, 'optimizer': 'muon'})
        assert tt.peak_lrs(c) == (1e-3, 0.02) and tt.peak_lrs(dataclasses.replace(c, optimizer='adamw'))[0] == 1e-3
        wider = tt.make_config({'preset': preset, 'optimizer': 'muon', 'd_model': 2 * c.d_model})
        assert tt.peak_lrs(wider) == (1e-3, 0.01)


def test_a_checkpoint_from_before_lr_width_resumes_at_the_rate_it_trained_with(byte_data, tmp_path, capsys):
    """Before --lr_width, --lr was the rate at any width (and Muon's AdamW's): such a checkpoint reads
    as lr_width = its d_model (embed_lr = its lr), so the same rate resumes quietly, and today's
    default (lr_width 128, 4x the rate for this 32-wide model) is named as a change of schedule."""
    run = tmp_path / 'run'
    flags = dict(data=byte_data, out=str(run), lr=1e-2, steps=8, ckpt_every=4, keep_ckpts=3)
    train(tiny_config(**flags))
    shutil.rmtree(run / 'ckpt_00000008')
    meta_path = run / 'ckpt_00000004' / 'meta.json'
    meta = json.loads(meta_path.read_text())
    del meta['config']['lr_width'], meta['config']['embed_lr']
    meta_path.write_text(json.dumps(meta))
    old = tt.read_checkpoint_meta(str(run / 'ckpt_00000004'))['config']
    assert old['lr_width'] == 32 and old['embed_lr'] == 1e-2  # Muon's AdamW then trained at --lr
    capsys.readouterr()
    shutil.copytree(run, tmp_path / 'before')
    train(tiny_config(**flags, lr_width=128))
    assert 'the LR schedule changed (--lr_width 32 -> 128)' in capsys.readouterr().out
    flags['out'] = str(tmp_path / 'before')
    train(tiny_config(**flags))
    out = capsys.readouterr().out
    assert 'resuming from' in out and 'schedule changed' not in out


def test_lr_given_to_muon_says_which_rate_it_does_not_set(capsys):
    c = tt.make_config({'optimizer': 'muon', 'lr': 3e-3}, platform='cpu')
    assert tt.peak_lrs(c)[0] == c.embed_lr == 2e-3
    assert 'note: --lr is AdamW\'s rate when it trains every weight; beside Muon it trains the embedding and output ' \
           'at --embed_lr (now 0.002)' in capsys.readouterr().out
    tt.make_config({'optimizer': 'muon', 'lr': 3e-3, 'embed_lr': 3e-3}, platform='cpu')
    tt.make_config({'lr': 3e-3}, platform='cpu')
    assert capsys.readouterr().out == ''
