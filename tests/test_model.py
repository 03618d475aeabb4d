"""Model: shapes, causality, padded vocab, gradients against float64 finite differences, KV cache."""
import dataclasses
import math
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tinytpu as tt
from conftest import OPTIMIZED, forward, tiny_config


@pytest.mark.parametrize('mlp, tie', [('relu2', True), ('swiglu', False)])
def test_forward_shapes_and_padded_vocab(mlp, tie):
    c = tiny_config(mlp=mlp, tie_embed=tie, logit_softcap=30.0)
    params = tt.init_params(c, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (3, 10), 0, c.vocab_size)
    logits = tt.forward(params, tokens, c)
    assert logits.shape == (3, 10, 384) and logits.dtype == jnp.float32  # 257 padded to 3 * 128
    assert jnp.all(jnp.isneginf(logits[..., c.vocab_size:]))               # padding never predicted
    assert jnp.all(jnp.isfinite(logits[..., :c.vocab_size]))
    assert jnp.all(jnp.abs(logits[..., :c.vocab_size]) <= c.logit_softcap)


def test_future_tokens_cannot_change_past_logits():
    c = tiny_config()
    params = tt.init_params(c, jax.random.key(0))
    a = jax.random.randint(jax.random.key(1), (2, 12), 0, c.vocab_size)
    b = a.at[:, 7:].set((a[:, 7:] + 1) % c.vocab_size)
    la, lb = tt.forward(params, a, c), tt.forward(params, b, c)
    np.testing.assert_allclose(la[:, :7], lb[:, :7], rtol=1e-6, atol=1e-6)
    assert not np.allclose(la[:, 7:], lb[:, 7:])


def test_scan_and_unrolled_layers_agree():
    c = tiny_config()
    params = tt.init_params(c, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, c.vocab_size)
    scanned = tt.forward(params, tokens, tt.validate(tt.Config(**{**c.__dict__, 'scan_layers': True})))
    np.testing.assert_allclose(tt.forward(params, tokens, c), scanned, rtol=1e-5, atol=1e-5)


# The model's loss and its gradients by the params, compiled whole (op by op, compiling each op
# takes longer than the test)
model_loss_and_grads = jax.jit(jax.value_and_grad(tt.loss_fn), static_argnames='c')


@pytest.mark.slow
@pytest.mark.parametrize('scan', [False, True])
@pytest.mark.parametrize('remat', ['full', 'dots'])
def test_remat_changes_memory_not_results(scan, remat):
    """--remat recomputes the block's forward in the backward pass: same loss, same gradients."""
    c = tiny_config(scan_layers=scan)
    params = tt.init_params(c, jax.random.key(0))
    batch = jax.random.randint(jax.random.key(1), (2, 13), 0, c.vocab_size)
    loss, grads = model_loss_and_grads(params, batch, c=c)
    loss_r, grads_r = model_loss_and_grads(params, batch, c=tt.dataclasses.replace(c, remat=remat))
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
        np.testing.assert_allclose(g_r, g, rtol=1e-5, atol=1e-7)


def test_initial_loss_is_uniform_guess():
    c = tiny_config()
    params = tt.init_params(c, jax.random.key(0))
    batch = jax.random.randint(jax.random.key(1), (4, 17), 0, c.vocab_size)
    assert abs(float(tt.loss_fn(params, batch, c)) - np.log(c.vocab_size)) < 0.05


@pytest.mark.slow
def test_gradient_matches_float64_finite_differences():
    """Directional derivatives of the loss (every parameter moved along a random direction) match
    central differences, all in float64, for a model with GQA, SwiGLU and untied embeddings."""
    with jax.enable_x64(True):
        c = tiny_config(dtype='float64', n_layer=2, d_model=16, n_head=4, n_kv_head=2, mlp='swiglu', tie_embed=False)
        params = jax.tree.map(lambda x: x.astype(jnp.float64) * 10, tt.init_params(c, jax.random.key(0)))
        batch = jax.random.randint(jax.random.key(1), (2, 9), 0, c.vocab_size)
        loss = jax.jit(lambda p: tt.loss_fn(p, batch, c))  # one compile, not each op's
        grads = jax.jit(jax.grad(loss))(params)
        for seed in range(3):
            leaves, tree = jax.tree.flatten(params)
            keys = jax.random.split(jax.random.key(100 + seed), len(leaves))
            direction = tree.unflatten([jax.random.normal(k, x.shape, jnp.float64) for k, x in zip(keys, leaves)])
            eps = 1e-5
            shifted = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, params, direction)
            numeric = (loss(shifted(1)) - loss(shifted(-1))) / (2 * eps)
            analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
            assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (numeric, analytic)


def test_kv_cache_decoding_matches_full_forward():
    c = tiny_config(n_kv_head=1)
    params = tt.init_params(c, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (1, 20), 0, c.vocab_size)
    full = tt.forward(params, tokens, c)
    logits, cache = tt.decode(params, tokens[:, :8], tt.init_cache(c, 1), 0, c)
    np.testing.assert_allclose(logits, full[:, 7], rtol=1e-5, atol=1e-5)
    for pos in range(8, 20):
        logits, cache = tt.decode(params, tokens[:, pos, None], cache, pos, c)
        np.testing.assert_allclose(logits, full[:, pos], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('prompt_len', [5, 16, 23])  # shorter than, equal to, longer than the context
def test_generated_logits_are_a_full_forward_over_the_kept_window(prompt_len, monkeypatch):
    """Every logits vector generate() samples from equals a full forward over exactly the window
    its policy keeps: the last `context` tokens at first; once the cache is full and a token
    comes, the last context/2 (new token included). Before the fix, prompts of >= context tokens
    wrote every new token onto the cache's last slot, and a full cache threw away the logits
    that had seen the whole window."""
    c = tiny_config(n_kv_head=1, context=16, max_new_tokens=40, temperature=0.0)
    params = tt.init_params(c, jax.random.key(0))
    prompt = [int(t) for t in jax.random.randint(jax.random.key(1), (prompt_len,), 0, c.vocab_size)]
    seen = []

    def record(logits, key, c):
        seen.append(np.asarray(logits[0]))
        return jnp.argmax(logits, -1)

    monkeypatch.setattr(tt, 'sample_token', record)
    new = list(tt.generate(params, prompt, c))
    assert len(new) == len(seen) == 40
    tokens, start = prompt, max(0, prompt_len - c.context)
    for i, logits in enumerate(seen):
        window = tokens[start:start + c.context] if i == 0 else tokens[start:]
        assert len(window) <= c.context
        padded = window + [0] * (c.context - len(window))  # causal: what follows cannot change it (one compile)
        full = forward(params, jnp.asarray([padded], jnp.int32), c)[0, len(window) - 1]
        np.testing.assert_allclose(logits, full, rtol=1e-4, atol=1e-4)
        tokens = tokens + [new[i]]
        if len(tokens) - start > c.context:  # one token too many: keep the last half
            start = len(tokens) - c.context // 2


def test_sampling_filters():
    c = tiny_config(temperature=1.0, top_k=2)
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05, 0.0]]))
    draws = {int(tt.sample_token(logits, jax.random.key(i), c)[0]) for i in range(200)}
    assert draws == {0, 1}
    c = tiny_config(temperature=1.0, top_p=0.7)  # smallest set reaching 0.7: tokens 0 and 1
    draws = {int(tt.sample_token(logits, jax.random.key(i), c)[0]) for i in range(200)}
    assert draws == {0, 1}
    assert int(tt.sample_token(logits, jax.random.key(0), tiny_config(temperature=0))[0]) == 0
    big = jnp.array([[3.0, 5.0, 4.0, -jnp.inf]])  # a tiny temperature is greedy (it overflowed to inf ties)
    assert int(tt.sample_token(big, jax.random.key(0), tiny_config(temperature=1e-40))[0]) == 1


def test_flops_per_token_formula():
    c = tiny_config(n_layer=2, d_model=32, n_head=4, n_kv_head=2, seq_len=16)
    H, F, V = 8, 128, 384
    matmul_params = 2 * (32 * (4 + 2 * 2) * H + 4 * H * 32 + 2 * 32 * F) + 32 * V
    assert tt.flops_per_token(c) == 6 * matmul_params + 12 * 2 * 4 * H * 16


@pytest.mark.parametrize('preset', ['gpt2', 'tpu'])
def test_large_presets_trace(preset):
    """The accelerator presets build, train and decode (traced with eval_shape: no compute)."""
    kernel = {'tpu': 'splash', 'gpt2': 'xla'}[preset]  # what auto picks on a TPU (cuDNN needs a GPU)
    c = tt.validate(tt.make_config({'preset': preset, 'batch_size': 8, 'grad_accum': 1, 'attention': kernel}, 'cpu'))
    state = jax.eval_shape(lambda: tt.fresh_state(c))
    batch = jax.ShapeDtypeStruct((1, 8, c.seq_len + 1), jnp.int32)
    params, opt, stats = jax.eval_shape(lambda s, b: tt.train_step.__wrapped__(s['params'], s['opt'], b, c), state, batch)
    assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(lambda x: x.shape, state['params'])
    logits, cache = jax.eval_shape(lambda p: tt.forward(p, jnp.zeros((1, 1), jnp.int32), c, tt.init_cache(c, 1), 5),
                                   params)
    assert logits.shape == (1, 1, 50304) and cache[0].shape == (c.n_layer, 1, c.n_kv_head, c.context, tt.head_dim(c))


def test_the_embedding_gradient_sums_repeated_tokens_in_fp32():
    """A bf16 table, 2 x 4,096 lookups of rows 1 and 3 (row 3 three times as often; rows 0, 2, 4 never):
    each row's gradient is the fp32 sum of its tokens' rows, rounded once to bf16 (JAX's own bf16
    scatter-add drifts: each add rounds); rows never looked up get exactly zero."""
    tokens = jnp.where(jnp.arange(2 * 4096).reshape(2, 4096) % 4 == 0, 1, 3)
    g = (1 + jnp.arange(2 * 4096 * 8).reshape(2, 4096, 8) % 7 / 1000).astype(jnp.bfloat16)
    table = jnp.zeros((5, 8), jnp.bfloat16)
    ours = jax.jit(jax.grad(lambda t: jnp.sum(tt.lookup(t, tokens).astype(jnp.bfloat16).astype(jnp.float32) * g)))(table)
    rows = g.astype(jnp.float32).reshape(-1, 8)
    exact = jnp.stack([jnp.sum(jnp.where(tokens.reshape(-1, 1) == i, rows, 0), 0) for i in range(5)])
    np.testing.assert_array_equal(ours.astype(jnp.float32), exact.astype(jnp.bfloat16).astype(jnp.float32))
    assert not np.any(ours[jnp.array([0, 2, 4])])
    theirs = jax.jit(jax.grad(lambda t: jnp.sum(t[tokens].astype(jnp.float32) * g)))(table)
    assert not np.array_equal(theirs[3].astype(jnp.float32), exact[3].astype(jnp.bfloat16).astype(jnp.float32))


@pytest.mark.slow
def test_bf16_loss_is_the_fp32_loss_within_bf16_rounding():
    c = tiny_config(dtype='float32')
    params = tt.init_params(c, jax.random.key(0))
    batch = jax.random.randint(jax.random.key(1), (4, 17), 0, c.vocab_size)
    loss32, grads32 = model_loss_and_grads(params, batch, c=c)
    loss16, grads16 = model_loss_and_grads(params, batch, c=dataclasses.replace(c, dtype='bfloat16'))
    assert abs(float(loss16) - float(loss32)) <= 1e-2 * float(loss32)
    for a, b in zip(jax.tree.leaves(grads16), jax.tree.leaves(grads32)):
        assert a.dtype == jnp.float32
        assert float(jnp.linalg.norm(a - b)) <= 0.05 * float(jnp.linalg.norm(b))


def test_top_k_beyond_the_vocabulary_means_all_tokens():
    c = tiny_config(temperature=1.0)
    logits = jax.random.normal(jax.random.key(0), (1, tt.padded_vocab(c)))
    key = jax.random.key(1)
    all_tokens = tt.sample_token(logits, key, c)
    assert tt.sample_token(logits, key, tt.dataclasses.replace(c, top_k=10 ** 6)) == all_tokens


def large_fp32_matmuls(preset, platform):
    """The dot_generals of a preset's train step, lowered for a platform (no device needed), whose
    output has more than 2^20 elements and that take an fp32 operand."""
    c = tt.validate(tt.make_config({'preset': preset, 'batch_size': 8, 'grad_accum': 1, 'attention': 'xla',
                                    'dtype': 'bfloat16', 'scan_layers': True}, 'cpu'))
    state = jax.eval_shape(lambda: tt.fresh_state(c))
    batch = jax.ShapeDtypeStruct((1, 8, c.seq_len + 1), jnp.int32)
    text = tt.train_step.trace(state['params'], state['opt'], batch, c).lower(lowering_platforms=(platform,)).as_text()
    found = re.findall(r'stablehlo\.dot_general[^\n]*?:\s*\((tensor<[^>]*>),\s*(tensor<[^>]*>)\)\s*->\s*tensor<([\dx]*)x\w+>', text)
    assert found, 'no dot_general found: the pattern no longer matches the lowering'
    scores = f'x{c.seq_len}x{c.seq_len}'  # XLA attention's T x T scores: in fp32, the textbook form
    return [(a, b, out) for a, b, out in found if math.prod(map(int, out.split('x'))) > 2**20 and 'f32' in a + b
            and not any(scores in t for t in (a, b, out))]


@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
@pytest.mark.parametrize('preset', ['gpt2', 'tpu'])
def test_no_large_matmul_takes_an_fp32_operand(preset, platform):
    """Lowered for a GPU and a TPU: every large matmul, forward and backward, multiplies bf16 (the
    logit gradients were fp32 x fp32 before the loss had its own backward), except the XLA
    attention's T x T scores, whose gradient JAX computes in fp32: on a TPU or GPU the presets run
    splash or cuDNN instead."""
    assert large_fp32_matmuls(preset, platform) == []


@pytest.mark.parametrize('softcap', [0.0, 5.0])
def test_the_loss_is_the_mean_negative_log_probability_of_the_targets(softcap):
    """loss_fn's last two steps, output_logits and cross_entropy, in float64 against numpy's
    -log softmax, with padded vocabulary entries (vocab 50 of 64) that get no probability and no
    gradient, and the soft-cap."""
    with jax.enable_x64(True):
        c = tiny_config(vocab_size=50, logit_softcap=softcap)
        x = jax.random.normal(jax.random.key(0), (2, 7, 16), jnp.float64)
        w = jax.random.normal(jax.random.key(1), (16, 64), jnp.float64)
        y = jax.random.randint(jax.random.key(2), (2, 7), 0, 50)
        loss, dw = jax.value_and_grad(lambda w: tt.cross_entropy(tt.output_logits(x, w, c), y))(w)
        z = np.einsum('btd,dv->btv', np.asarray(x), np.asarray(w))[..., :50]
        z = softcap * np.tanh(z / softcap) if softcap else z
        logp = z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
        np.testing.assert_allclose(loss, -np.take_along_axis(logp, np.asarray(y)[..., None], -1).mean(), rtol=1e-13)
        assert not np.any(dw[:, 50:]) and np.all(np.isfinite(dw))  # the padded entries


@pytest.mark.slow
def test_bf16_logits_move_the_loss_within_the_stated_bound():
    """With the compute dtype bf16 output_logits rounds the logits to bf16 (the matmul still
    accumulates in fp32), as PyTorch's autocast does. On GPT-2's vocabulary, logits spread like a
    trained model's (std 6, up to 34) and targets drawn from them (a loss of ~2.2), the loss moves
    by at most 0.0015 and its gradient by 1.3% against fp32 logits (docs/tpu-estimates.md)."""
    c = tiny_config(vocab_size=50257, d_model=256)
    V = tt.padded_vocab(c)

    @partial(jax.jit, compiler_options=OPTIMIZED)  # 4 x 256 x 50,304 logits: run, not compiled, is the time
    def losses_and_grads():
        x = jax.random.normal(jax.random.key(0), (4, 256, 256)).astype(jnp.bfloat16)
        w = (jax.random.normal(jax.random.key(1), (256, V)) * 6 / 16).astype(jnp.bfloat16)
        z = jnp.einsum('BTD,DV->BTV', x, w, preferred_element_type=jnp.float32)
        y = jax.random.categorical(jax.random.key(2), jnp.where(jnp.arange(V) < c.vocab_size, z, -jnp.inf))
        ours = jax.value_and_grad(lambda x, w: tt.cross_entropy(tt.output_logits(x, w, c), y), argnums=(0, 1))
        wide = jax.value_and_grad(lambda x, w: tt.cross_entropy(jnp.where(
            jnp.arange(V) < c.vocab_size, jnp.einsum('BTD,DV->BTV', x, w, preferred_element_type=jnp.float32), -jnp.inf),
            y), argnums=(0, 1))
        (loss, grads), (ref_loss, ref_grads) = ours(x, w), wide(x, w)
        errors = [jnp.linalg.norm(g.astype(jnp.float32) - r.astype(jnp.float32)) / jnp.linalg.norm(r.astype(jnp.float32))
                  for g, r in zip(grads, ref_grads)]
        return jnp.std(z), loss, ref_loss, errors

    z_std, loss, ref_loss, errors = losses_and_grads()
    assert 5 < float(z_std) < 7 and 2 < float(ref_loss) < 2.5
    assert abs(float(loss) - float(ref_loss)) <= 0.0016
    for error in errors:
        assert float(error) <= 0.014
