"""Part I stands on its own: its source alone, cut at the Part II banner, initializes a model, runs
the forward pass and the loss, takes a train step with AdamW and with Muon, and decodes with the KV
cache, using GPTConfig and nothing of Part II (a call into Part II would be a NameError here), and
gets what the whole module gets, to the bit."""
import json
import os
import shutil
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, run_cli_many, run_main
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
    token, cache = m.decode(params2, batch[0, :1, :8], m.init_cache(c, 1), 0, c)
    decoded = []
    for pos in range(8, 12):
        token, cache = m.decode(params2, jnp.argmax(token, -1)[:, None], cache, pos, c)
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
    for fn in (m.forward, m.hidden, m.block, m.loss_fn, m.batch_grads, m.train_step):
        code = getattr(fn, '__wrapped__', fn).__code__
        assert not {'gather', 'mesh', 'axis', 'whole'} & set(code.co_varnames[:code.co_argcount]), fn
    assert set(m.FUSED_ATTENTION) == set(), 'Part II registers the fused kernels'
    assert set(tt.FUSED_ATTENTION) == {'splash', 'cudnn'}


def test_part_one_trains_alone_resumes_and_is_the_program_on_one_device(byte_data, tmp_path, capsys):
    """Cut at the Part II banner, train(GPTConfig(data, out)) trains on one device with GPTConfig's
    defaults but the run's length: progress lines, validation loss, checkpoints and log.jsonl in out.
    Called again on a copy of its first checkpoint, it resumes and ends on the same weights. And it
    is the program: `python tinytpu.py` on one device takes the same steps on the same batches."""
    m = part_one()
    short = dict(steps=12, log_every=3, eval_every=6, eval_batches=4, ckpt_every=6)
    out = tmp_path / 'alone'
    params = m.train(m.GPTConfig(data=byte_data, out=str(out), **short))
    printed = capsys.readouterr().out
    assert 'step     12 | val loss' in printed and 'done: 12 steps' in printed, printed
    assert sorted(os.listdir(out)) == ['ckpt_00000006', 'ckpt_00000012', 'log.jsonl']
    log = [json.loads(line) for line in open(out / 'log.jsonl')]
    assert [r['step'] for r in log] == [3, 6, 9, 12] and 'val_loss' in log[1] and 'val_loss' in log[3]

    resumed = tmp_path / 'resumed'
    resumed.mkdir()
    shutil.copytree(out / 'ckpt_00000006', resumed / 'ckpt_00000006')
    again = m.train(m.GPTConfig(data=byte_data, out=str(resumed), **short))
    capsys.readouterr()
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    assert m.train(m.GPTConfig(data=byte_data, out=str(resumed), **short)) is not None
    assert 'already trained 12 steps' in capsys.readouterr().out

    program = tmp_path / 'program'
    flags = [f'--{k}={v}' for k, v in short.items()]
    r = run_main(capsys, f'--data={byte_data}', f'--out={program}', '--cpu_devices=1', *flags)
    assert r.returncode == 0, r.stderr
    whole = [json.loads(line) for line in open(program / 'log.jsonl')]
    assert [r['step'] for r in whole[:-1]] == [r['step'] for r in log]
    # The same steps, as XLA compiles them twice (its fusions may round a sum in another order: at
    # --lr=1e-3 some losses are ulps apart, and Adam's division carries such ulps into the weights).
    for ours, theirs in zip(whole, log):
        assert ours.get('loss') == pytest.approx(theirs.get('loss'), rel=1e-6, abs=0)
        assert ours.get('val_loss') == pytest.approx(theirs.get('val_loss'), rel=1e-6, abs=0)
    last = tt.read_checkpoint(str(program / 'ckpt_00000012'), {'params': params})['params']
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(last), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # a step's update is ~lr = 1e-4


READING_ORDER = ('train_step', 'batch_grads', 'loss_fn', 'hidden', 'block', 'attention', 'cross_entropy',
                 'optimizer_step', 'adamw_update', 'muon_update', 'lr_schedule', 'train', 'generate', 'sample_token')


def probed_copy(directory):
    """A copy of the program whose every function of the reading order first writes its name to
    $PROBE: the change a reader makes to Part I, made to all of them at once."""
    import ast
    source = open(os.path.join(ROOT, 'tinytpu.py'), encoding='utf-8').read()
    lines = source.splitlines(keepends=True)
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name in READING_ORDER:
            first = node.body[1] if ast.get_docstring(node) else node.body[0]  # after the docstring
            found[node.name] = first.lineno - 1
    assert set(found) == set(READING_ORDER), set(READING_ORDER) - set(found)
    for name, line in sorted(found.items(), key=lambda item: -item[1]):
        indent = lines[line][:len(lines[line]) - len(lines[line].lstrip())]
        lines.insert(line, f"{indent}open(os.environ['PROBE'], 'a').write('{name}\\n')\n")
    os.makedirs(directory)
    open(os.path.join(directory, 'tinytpu.py'), 'w', encoding='utf-8').write(''.join(lines))
    shutil.copy(os.path.join(ROOT, 'prepare.py'), directory)
    return os.path.join(directory, 'tinytpu.py')


@pytest.mark.slow
def test_a_change_to_any_function_of_the_reading_order_reaches_every_run(byte_data, tmp_path):
    """Each function a reader studies runs, changed, on the real paths: training on one device, on 8
    data parallel and on 8 with FSDP and Muon, bench, and sampling: no path compiles a copy of its own."""
    program = probed_copy(str(tmp_path / 'probed'))
    tiny = ['--n_layer=2', '--d_model=32', '--n_head=4', '--n_kv_head=2', '--context=16', '--seq_len=16', '--batch_size=8',
            '--steps=4', '--log_every=2', '--eval_every=2', '--eval_batches=2', '--ckpt_every=4', f'--data={byte_data}']
    step = {'train_step', 'batch_grads', 'loss_fn', 'hidden', 'block', 'attention', 'cross_entropy',
            'optimizer_step', 'lr_schedule'}
    runs = {'one device': (['--cpu_devices=1'], step | {'train', 'adamw_update'}),
            '8 devices, data parallel': (['--cpu_devices=8', '--fsdp=false'], step | {'train', 'adamw_update'}),
            '8 devices, FSDP, Muon': (['--cpu_devices=8', '--fsdp=true', '--optimizer=muon'],
                                      step | {'train', 'muon_update'}),
            'bench': (['bench', '--cpu_devices=8', '--bench_steps=1'], step | {'adamw_update'}),
            'sample': (['sample', '--max_new_tokens=3', '--prompt=ab'], {'generate', 'sample_token', 'hidden', 'block',
                                                                         'attention'})}
    results = run_cli_many(*([*flags, *tiny, f"--out={tmp_path / ('one device' if what == 'sample' else what)}"]
                             for what, (flags, _) in runs.items()),  # sample: the model trained on one device
                           program=os.path.dirname(program), envs=[{'PROBE': str(tmp_path / f'{what}.probe')} for what in runs],
                           fresh=True)  # each run traces Part I's functions itself, as in a process of its own
    for (what, (_, expected)), r in zip(runs.items(), results):
        assert r.returncode == 0, (what, r.stderr[-2000:])
        called = set((tmp_path / f'{what}.probe').read_text().split())
        assert expected <= called, (what, sorted(expected - called))
