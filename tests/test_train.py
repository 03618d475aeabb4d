"""Train step, data, checkpoints, resume, config and the command line."""
import glob
import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tinytpu as tt
from conftest import (ROOT, SHAKESPEARE, byte_shards, load_checkpoint, run_cli, run_cli_many, run_main, save_checkpoint,
                      tiny_config, train, write_shard)


@pytest.mark.slow
@pytest.mark.parametrize('optimizer', ['adamw', 'muon'])
def test_grad_accumulation_equals_one_big_batch(optimizer):
    """4 microbatches of 2 give the update of one batch of 8. With eps=1 the first AdamW step
    is ~lr * g (not sign(g), which would amplify rounding in near-zero gradients)."""
    kw = dict(batch_size=8, eps=1.0, lr=1.0, weight_decay=0.0, grad_clip=0.0, warmup_steps=0, optimizer=optimizer,
              matrix_lr=0.02)
    c1, c4 = tiny_config(grad_accum=1, **kw), tiny_config(grad_accum=4, **kw)
    params = tt.init_params(c1, jax.random.key(0))
    batch = np.asarray(jax.random.randint(jax.random.key(1), (8, 17), 0, c1.vocab_size))
    copy = lambda t: jax.tree.map(jnp.array, t)
    p1, _, s1 = tt.train_step(copy(params), tt.adamw_init(params), batch.reshape(1, 8, 17), c1)
    p4, _, s4 = tt.train_step(copy(params), tt.adamw_init(params), batch.reshape(4, 2, 17), c4)
    np.testing.assert_allclose(s1['loss'], s4['loss'], rtol=1e-6)
    np.testing.assert_allclose(s1['grad_norm'], s4['grad_norm'], rtol=1e-5)
    for before, a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p1), jax.tree.leaves(p4)):
        step1, step4 = np.asarray(a - before), np.asarray(b - before)
        np.testing.assert_allclose(step1, step4, rtol=0, atol=1e-5 * np.abs(step1).max())


def test_batches_are_a_pure_function_of_seed_and_step(byte_data):
    c = tiny_config(data=byte_data)
    train, val, meta = tt.load_data(c)
    assert meta['tokenizer'] == 'byte' and train.count == 60000 - 16
    a, b = tt.train_indices(train, c, 5), tt.train_indices(train, c, 5)
    assert a.shape == (1, 4) and np.array_equal(a, b)
    assert not np.array_equal(a, tt.train_indices(train, c, 6))
    assert not np.array_equal(a, tt.train_indices(train, tiny_config(data=byte_data, seed=1), 5))
    v = tt.val_indices(val, c)
    assert v.shape == (2, 4) and np.array_equal(v, tt.val_indices(val, c)) and v.max() == val.count - 1
    mesh = tt.make_mesh(c)
    batch = tt.put_batch(tt.local_blocks(train, a, mesh, c, 'test'), (1, 4, 17), mesh)
    assert batch.shape == (1, 4, 17) and batch.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(batch)[0], train.get(a[0]))


def test_windows_never_cross_shards(tmp_path):
    write_shard(tmp_path / 'a.bin', np.arange(10))
    write_shard(tmp_path / 'b.bin', np.arange(100, 106))
    w = tt.TokenWindows([str(tmp_path / 'a.bin'), str(tmp_path / 'b.bin')], 5)
    assert w.count == 6 + 2
    np.testing.assert_array_equal(w.get(np.array([0, 5, 6, 7])),
                                  [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [100, 101, 102, 103, 104], [101, 102, 103, 104, 105]])


def test_uint32_shards(tmp_path):
    write_shard(tmp_path / 'x.bin', [70000, 1, 2], magic=20240801, version=7, dtype=np.uint32)
    np.testing.assert_array_equal(tt.open_shard(str(tmp_path / 'x.bin')), [70000, 1, 2])


@pytest.mark.parametrize('kw, message', [
    (dict(magic=1234), 'not a token shard'),
    (dict(version=2), 'unsupported shard version'),
    (dict(count=999), 'header says 999 tokens'),
])
def test_bad_shard_headers_are_rejected(tmp_path, kw, message):
    write_shard(tmp_path / 'x.bin', np.arange(50), **kw)
    with pytest.raises(tt.UserError, match=message):
        tt.open_shard(str(tmp_path / 'x.bin'))


def test_short_shard_and_too_little_data(tmp_path):
    (tmp_path / 'x.bin').write_bytes(b'abc')
    with pytest.raises(tt.UserError, match='shorter than a shard header'):
        tt.open_shard(str(tmp_path / 'x.bin'))
    write_shard(tmp_path / 'y.bin', np.arange(5))
    with pytest.raises(tt.UserError, match='fewer tokens than one window'):
        tt.TokenWindows([str(tmp_path / 'y.bin')], 17)


@pytest.mark.parametrize('flags, message', [
    (['--d_model=30'], 'not divisible by --n_head'),
    (['--n_kv_head=3'], 'not a multiple of --n_kv_head'),
    (['--lr=-1'], '--lr=-1.0 must be positive'),
    (['--embed_lr=0'], '--embed_lr=0.0 must be positive'),
    (['--lr_width=0'], '--lr_width=0 must be at least 1'),
    (['--seq_len=128'], 'must be between 1 and the model context'),
    (['--batch_size=12', '--grad_accum=5'], 'multiple of --grad_accum'),
    (['--warmdown=step'], 'choose linear or cosine'),
    (['--mlp=gelu'], 'choose relu2 or swiglu'),
])
def test_invalid_config_is_one_line(flags, message):
    with pytest.raises(tt.UserError, match=message):
        tt.validate(tt.make_config(tt.parse_flags(flags), 'cpu'))


def test_flags_presets_and_types():
    c = tt.make_config(tt.parse_flags(['--preset=gpt2', '--lr=3e-4', '--tie_embed=false', '--scan_layers']), 'cpu')
    assert (c.preset, c.n_layer, c.lr, c.tie_embed, c.scan_layers) == ('gpt2', 12, 3e-4, False, True)
    assert tt.make_config({}, 'tpu').preset == 'tpu' and tt.make_config({}, 'gpu').preset == 'gpt2'
    for bad, message in [(['--nope=1'], 'unknown flag'), (['--steps=ten'], 'expected an int'),
                         (['--steps'], 'needs a value'), (['--tie_embed=maybe'], 'expected true or false')]:
        with pytest.raises(tt.UserError, match=message):
            tt.parse_flags(bad)
    with pytest.raises(tt.UserError, match='unknown preset'):
        tt.make_config({'preset': 'huge'}, 'cpu')


def test_checkpoint_round_trip_and_retention(tmp_path):
    c = tiny_config(keep_ckpts=2)
    params = tt.init_params(c, jax.random.key(0))
    opt = tt.adamw_init(params)
    for step in (1, 2, 3):
        opt = {**opt, 'step': jnp.array(step, jnp.int32)}
        save_checkpoint(str(tmp_path), {'params': params, 'opt': opt}, c, {'tokenizer': 'byte'})
    assert [s for s, _ in tt.list_checkpoints(str(tmp_path))] == [2, 3]
    path = tt.list_checkpoints(str(tmp_path))[-1][1]
    assert not [f for f in os.listdir(tmp_path) if f.startswith('.tmp')]
    state = load_checkpoint(path, {'params': params, 'opt': opt})
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves({'params': params, 'opt': opt})):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    meta = tt.read_checkpoint_meta(path)
    assert meta['step'] == 3 and meta['config']['n_layer'] == c.n_layer and meta['tokenizer'] == 'byte'
    with pytest.raises(tt.UserError, match='trained with --d_model=32'):
        tt.check_compatible(meta, tiny_config(d_model=64), path)
    with open(os.path.join(path, 'state.npz'), 'r+b') as f:  # flip a byte: detected
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(tt.UserError, match='checksum'):
        load_checkpoint(path, {'params': params, 'opt': opt})


@pytest.mark.slow
@pytest.mark.parametrize('optimizer', ['adamw', 'muon'])
def test_training_lowers_loss_and_resume_is_bitwise_exact(byte_data, tmp_path, monkeypatch, optimizer):
    """Train 8 steps in one go; then train the same run, crash it in step 6 (after the step-4
    checkpoint) and re-run it: the logged losses and the final params are bitwise equal."""
    flags = dict(data=byte_data, steps=8, ckpt_every=4, log_every=1, eval_every=4, lr=1e-2, optimizer=optimizer)
    full = train(tiny_config(**flags, out=str(tmp_path / 'full')))
    compile_step, calls = tt.compile_step, []

    def crashing_compile(*args):
        step = compile_step(*args)

        def crashing_step(*args):
            calls.append(1)
            if len(calls) == 6:
                raise KeyboardInterrupt
            return step(*args)
        crashing_step.memory_analysis = step.memory_analysis
        return crashing_step

    monkeypatch.setattr(tt, 'compile_step', crashing_compile)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(**flags, out=str(tmp_path / 'split')))
    monkeypatch.undo()
    assert [s for s, _ in tt.list_checkpoints(str(tmp_path / 'split'))] == [4]
    resumed = train(tiny_config(**flags, out=str(tmp_path / 'split')))
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        assert np.array_equal(a, b)
    logs = [[json.loads(l) for l in open(tmp_path / run / 'log.jsonl')] for run in ('full', 'split')]
    losses = [[r['loss'] for r in log if 'loss' in r] for log in logs]
    assert losses[0] == losses[1] and len(losses[0]) == 8
    assert losses[0][-1] < losses[0][0] - 1.0  # it learns: from ~5.5 nats
    assert {'step', 'loss', 'lr', 'ms_per_step', 'tokens_per_sec', 'grad_norm', 'mfu'} <= set(logs[0][0])
    assert [r['step'] for r in logs[0] if 'val_loss' in r] == [4, 8]
    assert [s for s, _ in tt.list_checkpoints(str(tmp_path / 'full'))] == [4, 8]


@pytest.mark.slow
def test_training_further_continues_from_before_the_warmdown_bitwise(byte_data, tmp_path, capsys):
    """--steps raised after a finished run: before the fix it resumed from the last checkpoint,
    whose LR had decayed to min_lr, warmed it back up and the loss jumped, silently. Now it trains
    on from the checkpoint kept before the warmdown, says so, and ends bitwise equal to a run
    planned that long from the start."""
    flags = dict(data=byte_data, ckpt_every=100, log_every=1, eval_every=100, lr=1e-2, keep_ckpts=1)
    planned = train(tiny_config(**flags, steps=12, out=str(tmp_path / 'planned')))
    train(tiny_config(**flags, steps=8, out=str(tmp_path / 'further')))
    assert [s for s, _ in tt.list_checkpoints(str(tmp_path / 'further'))] == [4, 8]  # 4: before the warmdown, kept
    capsys.readouterr()
    further = train(tiny_config(**flags, steps=12, out=str(tmp_path / 'further')))
    out = capsys.readouterr().out
    assert f'the LR schedule changed (--steps 8 -> 12): training further from {tmp_path / "further" / "ckpt_00000004"}' in out
    for a, b in zip(jax.tree.leaves(planned), jax.tree.leaves(further)):
        assert np.array_equal(a, b)
    train(tiny_config(**{**flags, 'lr': 5e-3}, steps=16, out=str(tmp_path / 'further')))  # none follows this one
    assert 'note: the LR schedule changed (--steps 12 -> 16, --lr 0.01 -> 0.005) and no checkpoint' in \
        capsys.readouterr().out


def test_resuming_a_run_trained_further_does_not_say_the_schedule_changed_again(byte_data, tmp_path, monkeypatch,
                                                                                 capsys):
    """--steps 8 -> 12, stopped at step 6 by a signal (its checkpoint beside the 8-step run's last),
    then the same command: it resumes from step 6, its own, and does not call that a change."""
    flags = dict(data=byte_data, ckpt_every=100, log_every=1, eval_every=100, lr=1e-2, keep_ckpts=1, out=str(tmp_path))
    train(tiny_config(**flags, steps=8))
    calls = []

    def stop_at_six(self):
        calls.append(1)
        self.stopping = 15 if len(calls) == 2 else 0  # after step 6: the run resumes at 4 and stops after 6
        return self.stopping
    with monkeypatch.context() as m:
        m.setattr(tt.TrainingRun, 'stop_requested', stop_at_six)
        with pytest.raises(tt.Preempted):
            train(tiny_config(**flags, steps=12))
    assert [s for s, _ in tt.list_checkpoints(str(tmp_path))] == [6, 8]
    capsys.readouterr()
    train(tiny_config(**flags, steps=12))
    out = capsys.readouterr().out
    assert f'{tmp_path / "ckpt_00000008"} is of the run before, with --steps 8 (now 12); this run goes on from its ' \
           'own newest, ckpt_00000006, and replaces ckpt_00000008' in out and 'the LR schedule changed' not in out
    assert f'resuming from {tmp_path / "ckpt_00000006"}' in out


@pytest.mark.slow
def test_cli_trains_then_samples(byte_data, tmp_path, capsys):
    out = str(tmp_path / 'out')
    common = ['--n_layer=2', '--d_model=32', '--n_head=2', '--n_kv_head=1', f'--out={out}']
    sample = ['sample', f'--out={out}', '--prompt=ROMEO:', '--max_new_tokens=80', '--seed=3']
    r, r1, r2 = run_cli_many(['--steps=20', '--log_every=10', '--eval_every=20', f'--data={byte_data}', *common],
                             sample, sample, devices=2)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith('tinytpu | preset cpu | cpu')
    assert 'step     20 | val loss' in r.stdout and os.path.isdir(os.path.join(out, 'ckpt_00000020'))
    assert r1.returncode == 0, r1.stderr
    assert r1.stdout.startswith('ROMEO:') and len(r1.stdout) > 40
    assert r2.stdout == r1.stdout  # same seed, same text
    r = run_main(capsys, '--steps=20', f'--data={byte_data}', *common[:-1], '--d_model=64', f'--out={out}')
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and 'trained with --d_model=32' in r.stderr


@pytest.mark.parametrize('args, message', [
    (['--data=/nonexistent'], 'python prepare.py'),
    (['--bogus=1'], 'unknown flag'),
    (['--n_head=3'], 'not divisible'),
    (['fly'], 'unknown command'),
    (['sample', '--out=/nonexistent'], 'no checkpoint found'),
])
def test_cli_errors_are_one_line(args, message, capsys):
    r = run_main(capsys, *args)
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and message in r.stderr, r.stderr


def test_help_lists_every_setting_aligned_without_loading_jax():
    """--help took 5.3 s (it loaded JAX) and ran to 221 columns; it is read from the file's text."""
    r = subprocess.run([sys.executable, '-X', 'importtime', os.path.join(ROOT, 'tinytpu.py'), '--help'],
                       capture_output=True, text=True)
    assert r.returncode == 0
    assert not [line for line in r.stderr.splitlines() if line.rstrip().endswith(('| jax', '| numpy'))]
    lines = r.stdout.splitlines()
    assert max(map(len, lines)) <= 100
    for command, text in tt.COMMANDS.items():
        assert f'  {command:<8}{text}' in lines
    for f in tt.dataclasses.fields(tt.Config):
        flag = [line for line in lines if line.startswith(f'  --{f.name}=')]
        assert len(flag) == 1, f.name
        text = ' '.join(line.strip() for line in lines[lines.index(flag[0]):][:4])
        assert f.metadata['help'].split()[0] in text
    described = [line for line in lines if line.startswith('  --') and len(line) > 34]
    assert all(line[33] == ' ' and line[34] != ' ' for line in described if len(line[:34].rstrip()) < 33)
    assert tt.main(['--help']) == 0  # in-process too


def test_readme_line_maps_cover_the_file_section_by_section():
    """README's "Reading tinytpu.py" maps both parts: each row's range starts at that section's
    banner and ends where the next section begins; together Part I's rows cover Part I and Part
    II's the rest of the file, every section listed once, in order."""
    root = os.path.dirname(tt.__file__)
    readme = open(os.path.join(root, 'README.md')).read()
    lines = open(os.path.join(root, 'tinytpu.py')).read().split('\n')
    rows = [(name, int(a), int(b)) for name, a, b in re.findall(r'^\| ([^|`]+?) \| (\d+)–(\d+) \|', readme, re.M)]
    banners = [i + 1 for i, line in enumerate(lines) if line.startswith('# ----') and i + 1 < len(lines)]
    part_two = next(i + 1 for i, line in enumerate(lines) if line.startswith('# Part II'))
    assert [start for _, start, _ in rows] == banners  # every section, in the file's order
    for (name, start, end), after in zip(rows, rows[1:] + [(None, len(lines) + 1, None)]):
        assert lines[start].startswith(f'# {name}'), (name, lines[start])
        gap = lines[end:after[1] - 1]  # between this section's end and the next banner: blank, or Part II's banner
        assert end >= start and all(not line or line.startswith('# ====') or line.startswith('# Part II')
                                    or line.startswith('# ') and start < part_two < after[1] for line in gap), (name, end)
        assert lines[end - 1].strip(), (name, end, 'ends on a blank line')
    part_one = [name for name, start, _ in rows if start < part_two]
    assert part_one == ['Config', 'Model', 'Loss', 'Optimizers', 'Train step', 'Data', 'Checkpoints',
                        'Training loop', 'Sampling']
    banner = next(i for i, line in enumerate(lines) if line.startswith('# Part I:')) - 1
    assert (part_two - 2) - banner <= 750  # Part I, banner to Part II's banner, stays short (issue 33)


@pytest.mark.slow
def test_bench_reports_timing_flops_and_memory(tmp_path):
    r = run_cli('bench', '--n_layer=2', '--d_model=32', '--n_head=2', '--n_kv_head=1', '--seq_len=16',
                '--context=16', '--batch_size=4', '--bench_steps=5', '--peak_flops=1e12',
                '--price_per_hour=3.6', f'--out={tmp_path}')
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.splitlines()[-1])
    c = tiny_config(n_layer=2, d_model=32, n_head=2, n_kv_head=1, seq_len=16, context=16, batch_size=4)
    assert result['flops_per_token'] == tt.flops_per_token(c) and result['tokens_per_step'] == 64
    assert 0 < result['ms_min'] <= result['ms_per_step'] <= result['ms_max'] and result['compile_s'] > 0
    assert result['peak_flops'] == 1e12 * result['devices']
    assert abs(result['mfu'] - result['achieved_flops'] / result['peak_flops']) < 1e-12
    assert result['peak_memory_bytes'] > 0 and 'ms/step, median of 5' in r.stdout
    assert result['temp_bytes'] > 0 and result['argument_bytes'] > 0 and 'XLA buffers per device' in r.stdout
    # $3.6 per machine-hour is $0.001 per second: a million tokens take 1e6 / tokens_per_sec seconds
    assert abs(result['dollars_per_million_tokens'] - 1e3 / result['tokens_per_sec']) < 1e-9
    assert json.loads((tmp_path / 'bench.jsonl').read_text()) == result  # what `plan` reads


@pytest.mark.slow
def test_profile_steps_writes_a_trace(byte_data, tmp_path):
    train(tiny_config(data=byte_data, out=str(tmp_path), steps=5, profile_steps='2:4'))
    traces = glob.glob(str(tmp_path / 'profile' / '**' / '*.trace.json.gz'), recursive=True)
    assert len(traces) == 1
    for bad in ('5', '4:2', 'a:b'):
        with pytest.raises(tt.UserError, match='expected A:B'):
            tiny_config(profile_steps=bad)


@pytest.mark.slow
def test_training_with_the_splash_kernel_matches_xla(byte_data, tmp_path):
    """The TPU attention kernel (interpreted on CPU), run per device under shard_map on the two
    virtual devices of a CLI run, trains to the losses of the reference attention."""
    shape = ['--n_layer=1', '--d_model=64', '--n_head=2', '--n_kv_head=1', '--d_head=128', '--seq_len=128',
             '--context=128', '--batch_size=4', '--steps=3', '--log_every=1', '--eval_batches=1', f'--data={byte_data}']
    losses = {}
    results = run_cli_many(*([*shape, f'--attention={kernel}', f'--out={tmp_path / kernel}'] for kernel in ('xla', 'splash')),
                           devices=2)
    for kernel, r in zip(('xla', 'splash'), results):
        assert r.returncode == 0, r.stderr
        assert 'cpu x2 (cpu) | 0.' in r.stdout and f'| attention {kernel} |' in r.stdout
        losses[kernel] = [json.loads(line).get('loss') for line in open(tmp_path / kernel / 'log.jsonl')]
    np.testing.assert_allclose(losses['splash'][:3], losses['xla'][:3], rtol=1e-5)


def test_eval_in_microbatches_gives_the_same_loss(byte_data):
    """The validation set is evaluated in training's microbatches (memory of one microbatch), and
    the mean over them is the mean over the whole set."""
    losses = []
    for accum in (1, 2, 4):
        c = tiny_config(data=byte_data, batch_size=8, grad_accum=accum)
        _, val, _ = tt.load_data(c)
        idx = tt.val_indices(val, c)
        assert idx.shape == (c.eval_batches * accum, 8 // accum)
        params = tt.init_params(c, jax.random.key(0))
        losses.append(float(tt.eval_loss(params, jnp.asarray(val.get(idx.ravel()).reshape(idx.shape + (-1,))), c)))
    np.testing.assert_allclose(losses, losses[0], rtol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None, reason='libtpu is not installed: nothing to quiet')
def test_no_libtpu_noise_on_a_machine_without_a_tpu(tmp_path):
    """With libtpu installed (the test extra), every command started with ~5 lines of libtpu
    errors on a CPU machine. JAX_PLATFORMS unset, as a user has it."""
    env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'tinytpu.py'), 'plan', '--budget=5', '--hardware=v6e',
                        f'--out={tmp_path}'], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stderr == '', r.stderr


@pytest.mark.slow
def test_training_says_when_it_will_see_its_data_more_than_once(byte_data, tmp_path, capsys):
    train(tiny_config(data=byte_data, out=str(tmp_path / 'a'), steps=2))     # 2 x 4 x 16 tokens of 60,000
    assert 'sees its data more than once' not in capsys.readouterr().out
    small = byte_shards(tmp_path / 'small', SHAKESPEARE, train_bytes=900, val_bytes=900)
    train(tiny_config(data=small, out=str(tmp_path / 'b'), steps=2, batch_size=32, eval_batches=1))
    assert ('note: 2 steps of 32 x 16 tokens read 1,024 tokens, 1.1 times the 900 training tokens in '
            f'{small}: the model sees its data more than once') in capsys.readouterr().out


def test_the_default_out_follows_the_data():
    """A new user's second dataset gets its own run: --out defaults to out/<the data's name>,
    unless --out is given or the preset names its own."""
    assert tt.make_config({}, 'cpu').out == 'out/shakespeare_byte'
    assert tt.make_config({'data': 'data/tinystories/'}, 'cpu').out == 'out/tinystories'
    assert tt.make_config({'data': 'gs://b/data/fineweb10B'}, 'cpu').out == 'out/fineweb10B'
    assert tt.make_config({'data': 'data/x', 'out': 'runs/y'}, 'cpu').out == 'runs/y'
    assert tt.make_config({'preset': 'gpt2'}, 'cpu').out == 'out/gpt2'


def test_the_lines_name_the_optimizer_and_the_progress_line_its_learning_rates_and_an_eta(byte_data, tmp_path,
                                                                                        capsys):
    train(tiny_config(data=byte_data, out=str(tmp_path), optimizer='muon', steps=4, log_every=2))
    out = capsys.readouterr().out
    assert '| muon: matrices 0.005, embedding 0.003 | dtype' in out and 'params, gradients and Muon (matrices) and AdamW' in out
    train(tiny_config(data=byte_data, out=str(tmp_path / 'wide'), steps=1, d_model=64, lr_width=32, lr=1e-3))
    assert '| adamw: lr 0.0005 (--lr=0.001 x 32/64) | dtype' in capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith('step      2 | loss'))
    assert ' (matrices ' in line and ' (ETA 0:00:0' in line, line
    assert tt.progress_text({'step': 1, 'loss': 1.0, 'lr': 1e-3, 'grad_norm': 1.0, 'ms_per_step': 1.0,
                             'tokens_per_sec': 1.0, 'elapsed': 3725.2, 'eta': 61}).endswith('| 1:02:05 (ETA 0:01:01)')
