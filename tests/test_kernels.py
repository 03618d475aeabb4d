"""Part II's attention kernels: splash (the Pallas TPU kernel, run by Pallas's interpreter here)
and the cuDNN wrapper against Part I's reference attention, and how --attention is resolved."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tinytpu as tt
from conftest import tiny_config


def random_qkv(B, N, K, T, H, dtype=jnp.float32):
    q, k, v = (jax.random.normal(jax.random.key(i), (B, heads, T, H), dtype) for i, heads in enumerate((N, K, K)))
    return q, k, v


def reference_and_kernel(kernel, q, k, v):
    """Outputs and gradients (of a loss that weights every output differently) of the reference
    attention and of a kernel, for the same inputs."""
    T = q.shape[2]
    weights = jnp.cos(jnp.arange(q.size).reshape(q.shape))
    reference = lambda q, k, v: tt.attention(q, k, v, jnp.arange(T), jnp.arange(T))
    results = []
    for fn in (reference, kernel):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v) * weights)
        results.append(jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v))
    return results  # each compiled whole: op by op, compiling each op takes longer


@pytest.mark.slow
@pytest.mark.parametrize('N, K, T, H', [(4, 2, 256, 128), (2, 1, 384, 128),  # GQA, MQA; blocks of 256, 128
                                        (4, 1, 512, 256),                    # the tpu preset's heads
                                        (1, 1, 2048, 128)])                  # two blocks of 1024
def test_splash_kernel_matches_reference_attention(N, K, T, H):
    """The Pallas TPU kernel, run by Pallas's interpreter on CPU."""
    (out, grads), (out_k, grads_k) = reference_and_kernel(tt.splash_attention, *random_qkv(2, N, K, T, H))
    np.testing.assert_allclose(out_k, out, atol=2e-5)
    for g, g_k in zip(grads, grads_k):
        np.testing.assert_allclose(g_k, g, atol=1e-4 * np.abs(g).max())


@pytest.mark.slow
def test_cudnn_wrapper_matches_reference_attention():
    """jax.nn.dot_product_attention's layout and GQA handling, through its XLA implementation
    here; on a GPU also through cuDNN itself, in bf16."""
    qkv = random_qkv(2, 4, 2, 64, 32)
    (out, grads), (out_k, grads_k) = reference_and_kernel(partial(tt.cudnn_attention, implementation='xla'), *qkv)
    np.testing.assert_allclose(out_k, out, atol=2e-5)
    for g, g_k in zip(grads, grads_k):
        np.testing.assert_allclose(g_k, g, atol=1e-4 * np.abs(g).max())
    if jax.default_backend() == 'gpu':
        qkv16 = [x.astype(jnp.bfloat16) for x in qkv]
        (out, _), (out_k, _) = reference_and_kernel(tt.cudnn_attention, *qkv16)
        np.testing.assert_allclose(out_k.astype(np.float32), out.astype(np.float32), atol=2e-2)


def test_pick_attention_on_cpu():
    c, note = tt.pick_attention(tiny_config())
    assert c.attention == 'xla' and note == 'xla'
    with pytest.raises(tt.UserError, match='--attention=cudnn: needs a GPU'):
        tt.pick_attention(tiny_config(attention='cudnn'))
    with pytest.raises(tt.UserError, match=r'--attention=splash: needs a TPU, and --seq_len \(16\)'):
        tt.pick_attention(tiny_config(attention='splash'))
    c, note = tt.pick_attention(tiny_config(attention='splash', n_head=2, n_kv_head=1, d_head=128, seq_len=128,
                                            context=128))
    assert c.attention == 'splash' and note == 'splash'  # compiles in interpret mode
