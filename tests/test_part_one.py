"""Part I stands on its own: its source alone, cut at the Part II banner, initializes a model, runs
the forward pass and the loss, takes a train step with AdamW and with Muon, and decodes with the KV
cache, using GPTConfig and nothing of Part II (a call into Part II would be a NameError here), and
gets what the whole module gets, to the bit."""
import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT
import tinytpu as tt

PART_TWO = '\n# ' + '=' * 94 + '\n# Part II'


def part_one():
    source = open(os.path.join(ROOT, 'tinytpu.py'), encoding='utf-8').read()
    assert source.count(PART_TWO) == 1, 'the Part II banner moved'
    names = {'__name__': 'tinytpu_part_one'}
    exec(compile(source[:source.index(PART_TWO)], 'tinytpu.py, Part I', 'exec'), names)
    return SimpleNamespace(**names)


def steps(m, **settings):
    """init, forward, loss, one train step and four decoding steps with module m's names alone."""
    c = m.GPTConfig(n_layer=2, d_model=32, n_head=4, n_kv_head=2, context=16, seq_len=16, batch_size=4, **settings)
    state = m.fresh_state(c)  # init_params and AdamW's zeros
    batch = jax.random.randint(jax.random.key(1), (1, 4, 17), 0, c.vocab_size)
    logits = m.forward(state['params'], batch[0, :, :-1], c)
    loss = m.loss_fn(state['params'], batch[0], c)
    params2, opt, stats = m.train_step(state['params'], state['opt'], batch, c)  # donates the state
    token, cache = m.prefill(params2, batch[0, :1, :8], m.init_cache(c, 1), c)
    decoded = []
    for pos in range(8, 12):
        token, cache = m.decode_step(params2, jnp.argmax(token, -1), cache, pos, c)
        decoded.append(token)
    return {'logits': logits, 'loss': loss, 'params': params2, 'opt': opt, 'stats': stats, 'decoded': decoded,
            'val': m.eval_loss(params2, batch, c)}


@pytest.mark.parametrize('optimizer', ['adamw', 'muon'])
def test_part_one_runs_alone_and_matches_the_whole_module(optimizer):
    alone, whole = steps(part_one(), optimizer=optimizer), steps(tt, optimizer=optimizer)
    assert float(alone['loss']) == pytest.approx(np.log(257), abs=0.05)  # an untrained model: about uniform
    assert float(alone['stats']['loss']) == float(alone['loss'])
    for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(whole), strict=True):
        np.testing.assert_array_equal(a, b)


def test_part_one_names_no_device_or_fsdp_hook():
    """What a reader of Part I meets: no gather argument, no mesh in the model's signatures."""
    m = part_one()
    for fn in (m.forward, m.forward_cached, m.hidden, m.block, m.loss_fn, m.batch_grads, m.train_step):
        code = getattr(fn, '__wrapped__', fn).__code__
        assert not {'gather', 'mesh', 'axis', 'whole'} & set(code.co_varnames[:code.co_argcount]), fn
    assert set(m.FUSED_ATTENTION) == set(), 'Part II registers the fused kernels'
    assert set(tt.FUSED_ATTENTION) == {'splash', 'cudnn'}
