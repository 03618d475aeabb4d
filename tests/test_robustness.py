"""Nothing lost: signals, crashes mid-save, corrupt checkpoints, divergence, bad inputs, unsafe
files. Every bad input gives one line naming the file or flag, a non-zero exit, and leaves the
output directory exactly as it was."""
import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import tinytpu as tt
from conftest import ROOT, run_cli, run_cli_many, run_main, save_checkpoint, tiny_config, train, write_shard

TINY = ['--n_layer=2', '--d_model=32', '--n_head=2', '--n_kv_head=1', '--seq_len=16', '--context=16',
        '--batch_size=4', '--eval_batches=2', '--log_every=1', '--eval_every=100000', '--ckpt_every=100000',
        '--cpu_devices=1']  # one device: a fifth less CPU than two for a model this small


def snapshot(directory):
    """{relative path: sha256} of every file below directory (empty if it does not exist), but
    the run lock (.lock, an empty file while no run holds it)."""
    out = {}
    for dirpath, _, files in os.walk(directory):
        for name in set(files) - {'.lock'}:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, directory)] = hashlib.sha256(open(path, 'rb').read()).hexdigest()
    return out


def final_state(out):
    step, path = tt.list_checkpoints(out)[-1]
    with np.load(os.path.join(path, 'state.npz'), allow_pickle=False) as f:
        return step, {k: f[k] for k in f.files}


def train_cli(data, out, steps, *extra):
    return [sys.executable, os.path.join(ROOT, 'tinytpu.py'), f'--data={data}', f'--out={out}',
            f'--steps={steps}', *TINY, *extra]


def interrupt(cmd, signals, delay):
    """Start training, wait until it has compiled and run, then send `signals` `delay` s apart."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    for line in p.stdout:
        if line.startswith('compiled') or 'nothing to do' in line:
            break
    time.sleep(delay)
    for s in signals:
        if p.poll() is None:
            p.send_signal(s)
    try:
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()  # a run that ignored its signals must not train on after a failed test
    return p.returncode, err


@pytest.mark.slow
def test_soak_random_preemptions_end_bitwise_equal(byte_data, tmp_path):
    """A run stopped by SIGTERM or Ctrl-C at random moments and resumed each time ends with
    exactly the params and optimizer state of an uninterrupted run."""
    steps = 500
    r = subprocess.run(train_cli(byte_data, tmp_path / 'whole', steps), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    rng = random.Random(0)
    codes = []
    for attempt in range(4):
        sig = rng.choice([signal.SIGTERM, signal.SIGINT])
        code, err = interrupt(train_cli(byte_data, tmp_path / 'pieces', steps), [sig], rng.uniform(0.0, 0.2))
        codes.append(code)
        if code == 0:
            break
        assert code == 128 + sig, err
        assert f'stopped by {sig.name} after step' in err and 'run the same command to resume' in err
    assert len([c for c in codes if c != 0]) >= 3, codes  # it really was interrupted several times
    r = subprocess.run(train_cli(byte_data, tmp_path / 'pieces', steps), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    (s1, a), (s2, b) = final_state(tmp_path / 'whole'), final_state(tmp_path / 'pieces')
    assert s1 == s2 == steps and a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_second_signal_stops_at_once(monkeypatch, capsys):
    """The first SIGINT/SIGTERM only sets a flag; a second stops at once (tt.interrupted: one line,
    exit code 130; checkpoints being atomic, the last one is intact). Whatever handlers the test
    inherited (`nohup ... &` starts it with SIGINT ignored) come back."""
    inherited = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    class AtOnce(Exception):
        pass

    def at_once(*args):
        raise AtOnce

    monkeypatch.setattr(tt, 'interrupted', at_once)  # the real one ends the process (tested below)
    with tt.StopSignal() as stop:
        signal.raise_signal(signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        with pytest.raises(AtOnce):
            signal.raise_signal(signal.SIGINT)
    assert {s: signal.getsignal(s) for s in inherited} == inherited  # handlers restored

    def interrupted(c, run=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(tt, 'train', interrupted)
    assert tt.main(['--steps=5']) == 130
    assert 'interrupted; the last checkpoint in --out is intact' in capsys.readouterr().err


def wait_until_jax_loads(p, timeout=60):
    """Until the child process maps JAX's compiled code (jaxlib's or numpy's libraries): it is then
    running tinytpu.py, whose Ctrl-C handler comes before `import jax`. Earlier, a Ctrl-C meets
    Python's own start-up, as in any Python program (on a loaded machine that can last past 0.3 s,
    which is how this test once failed). Where /proc is missing, wait a second instead."""
    if not os.path.exists(f'/proc/{p.pid}/maps'):
        time.sleep(1.0)
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and p.poll() is None:
        with contextlib.suppress(OSError), open(f'/proc/{p.pid}/maps') as f:
            if any('jaxlib' in line or 'numpy' in line for line in f):
                return
        time.sleep(0.002)
    raise AssertionError(f'the child never loaded JAX (exit code {p.poll()})')


@pytest.mark.parametrize('delay', [0.0, 0.7, 1.7, 3.2])
def test_a_ctrl_c_at_any_moment_stops_in_one_line_with_exit_130(byte_data, tmp_path, delay):
    """While JAX loads (delay 0 after it begins; the import takes ~1.3 s), while the program starts
    and compiles, or while it trains: a Ctrl-C ends it in one line with exit code 130 (before the
    fix: a traceback, a segmentation fault after the message, or a KeyboardInterrupt swallowed by
    JAX's callbacks and the run trained to its end)."""
    p = subprocess.Popen(train_cli(byte_data, tmp_path / 'run', 100_000), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        wait_until_jax_loads(p)
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()  # a run that ignored the signal must not train on after a failed test
    lines = [line for line in err.splitlines() if line.strip()]
    assert p.returncode == 130 and len(lines) == 1, (p.returncode, err)
    assert lines[0].startswith(('interrupted', 'stopped by SIGINT after step')), err


def test_the_ctrl_c_handler_comes_before_every_import_but_its_own():
    """A Ctrl-C 0.05-0.2 s after start landed in `import dataclasses` (8 tries of 15: a
    KeyboardInterrupt traceback): the handler is now set by the file's first statements, after
    importing only os, signal and sys (built into the interpreter). What is left is Python's own
    startup (its site imports), which runs before any line of a script."""
    import ast
    body = ast.parse(open(os.path.join(ROOT, 'tinytpu.py')).read()).body[1:]  # after the docstring
    first = next(i for i, node in enumerate(body) if not isinstance(node, ast.Import))
    assert {a.name for node in body[:first] for a in node.names} == {'os', 'signal', 'sys'}
    assert isinstance(body[first], ast.If) and 'signal.SIGINT' in ast.unparse(body[first].body[0])


def tiny_shape():
    return dict(n_layer=2, d_model=32, n_head=2, n_kv_head=1, seq_len=16, context=16, batch_size=4)


def template():
    c = tiny_config(**tiny_shape())
    params = tt.init_params(c, jax.random.key(0))
    return {'params': params, 'opt': tt.adamw_init(params)}


def make_checkpoints(out, steps=(1, 2)):
    c = tiny_config(out=str(out), **tiny_shape())
    state = template()
    for step in steps:
        state['opt']['step'] = np.int32(step)
        save_checkpoint(str(out), state, c, {'tokenizer': 'byte'})
    return c


def test_corrupt_latest_checkpoint_falls_back_with_warning(tmp_path, capsys):
    c = make_checkpoints(tmp_path)
    npz = tmp_path / 'ckpt_00000002' / 'state.npz'
    npz.write_bytes(npz.read_bytes()[:1000])  # truncated, as by a crash or a full disk
    state, path, _ = tt.restore(c, template())
    assert path.endswith('ckpt_00000001') and int(state['opt']['step']) == 1
    assert 'ckpt_00000002/state.npz: truncated or not matching' in capsys.readouterr().err
    (tmp_path / 'ckpt_00000001' / 'meta.json').write_text('{not json')  # and a garbage one
    with pytest.raises(tt.UserError, match='and no older checkpoint'):
        tt.restore(c, template())


@pytest.mark.slow
def test_damaged_newest_checkpoint_is_replaced_and_never_counted_as_kept(byte_data, tmp_path):
    """ckpt 8 damaged: the run resumes from 4, trains back to 8 and replaces it (before the fix
    it kept the damaged one, printed "saved", and deleted the good 4 as the older of two)."""
    c = tiny_config(data=byte_data, out=str(tmp_path), keep_ckpts=2, steps=8, **tiny_shape())
    train(c)
    assert [s for s, _ in tt.list_checkpoints(c.out)] == [4, 8]
    npz = tmp_path / 'ckpt_00000008' / 'state.npz'
    npz.write_bytes(npz.read_bytes()[:1000])
    train(c)
    assert [s for s, _ in tt.list_checkpoints(c.out)] == [4, 8]
    assert all(tt.checkpoint_is_whole(p) for _, p in tt.list_checkpoints(c.out))
    (tmp_path / 'ckpt_00000008' / 'meta.json').unlink()  # no meta.json: not listed, still replaced
    train(c)
    assert [s for s, _ in tt.list_checkpoints(c.out)] == [4, 8]
    assert tt.checkpoint_is_whole(str(tmp_path / 'ckpt_00000008'))


def test_retention_keeps_whole_checkpoints_only(tmp_path):
    c = make_checkpoints(tmp_path, steps=(1, 2, 3))  # keep_ckpts=2: 2 and 3
    npz = tmp_path / 'ckpt_00000003' / 'state.npz'
    npz.write_bytes(npz.read_bytes()[:1000])
    state = template()
    state['opt']['step'] = np.int32(4)
    save_checkpoint(str(tmp_path), state, c, {})
    assert [s for s, _ in tt.list_checkpoints(str(tmp_path))] == [2, 3, 4]  # 2 and 4 kept; 3 newer than 2
    state['opt']['step'] = np.int32(5)
    save_checkpoint(str(tmp_path), state, c, {})
    assert [s for s, _ in tt.list_checkpoints(str(tmp_path))] == [4, 5]


def test_sample_retries_when_the_checkpoint_it_reads_is_rotated_away(tmp_path, monkeypatch):
    """Training beside a reader saves step 3 and deletes step 2 (keep_ckpts=1) while the reader
    hashes step 2: the reader lists again and loads step 3."""
    c = make_checkpoints(tmp_path, steps=(2,))
    c = dataclasses.replace(c, keep_ckpts=1)
    real, calls = tt.file_sha256, []

    def hash_while_training_saves(path):
        calls.append(path)
        if len(calls) == 1:
            state = template()
            state['opt']['step'] = np.int32(3)
            save_checkpoint(str(tmp_path), state, c, {'tokenizer': 'byte'})
        return real(path)

    monkeypatch.setattr(tt, 'file_sha256', hash_while_training_saves)
    state, path, meta = tt.restore(c, template())
    assert path.endswith('ckpt_00000003') and int(state['opt']['step']) == 3 and meta['step'] == 3


@pytest.mark.slow
def test_one_run_per_output_directory(byte_data, tmp_path, capsys):
    """A second run on a locked --out is one line naming it, and touches nothing there (before
    the fix it deleted the first run's in-progress checkpoint). (flock's lock belongs to the open
    file, not the process: this process's second open of the lock meets it as another run's would.)"""
    out = tmp_path / 'out'
    out.mkdir()
    (out / '.tmp_ckpt_00000004_1').mkdir()  # the first run's checkpoint being written
    with open(out / '.lock', 'a+') as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write('4242\n')
        held.flush()
        r = run_main(capsys, f'--data={byte_data}', f'--out={out}', *TINY, '--steps=2')
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f'error: --out={out} is in use by another training run (pid 4242); wait for it to finish, stop it, '
        'or choose another --out'], r.stderr
    assert (out / '.tmp_ckpt_00000004_1').exists() and not (out / 'log.jsonl').exists()
    r = run_main(capsys, f'--data={byte_data}', f'--out={out}', *TINY, '--steps=2')  # released: runs
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_crash_mid_save_leaves_previous_checkpoint(byte_data, tmp_path, monkeypatch):
    """A full disk during a save: a one-line error, no partial checkpoint, the previous one
    intact. A temp directory left by a killed process is cleaned up by the next run."""
    make_checkpoints(tmp_path, steps=(1,))
    before = snapshot(tmp_path / 'ckpt_00000001')

    def disk_full(*a, **k):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(tt.np, 'savez', disk_full)
    with pytest.raises(tt.UserError, match='could not write the step-2 checkpoint .No space left on device.'):
        train(tiny_config(data=byte_data, out=str(tmp_path), steps=2, **tiny_shape()))
    assert snapshot(tmp_path / 'ckpt_00000001') == before
    assert [s for s, _ in tt.list_checkpoints(str(tmp_path))] == [1] and not glob.glob(str(tmp_path / '.tmp*'))
    monkeypatch.undo()
    (tmp_path / '.tmp_ckpt_00000003_999').mkdir()  # as left by SIGKILL mid-save
    (tmp_path / '.tmp_ckpt_00000003_999' / 'state.npz').write_bytes(b'half')
    train(tiny_config(data=byte_data, out=str(tmp_path), steps=3, **tiny_shape()))
    assert not (tmp_path / '.tmp_ckpt_00000003_999').exists()
    assert [s for s, _ in tt.list_checkpoints(str(tmp_path))] == [1, 3]


@pytest.mark.slow
def test_divergence_stops_with_advice_and_no_nan_checkpoint(byte_data, tmp_path, capsys):
    out = tmp_path / 'out'
    r = run_main(capsys, f'--data={byte_data}', f'--out={out}', '--steps=50', *TINY, '--ckpt_every=1', '--lr=1e30',
                '--warmup_steps=0')
    assert r.returncode == 3, r.stderr
    assert r.stderr.count('\n') == 1 and 'training diverged at step' in r.stderr and '--lr' in r.stderr
    saved = tt.list_checkpoints(str(out))
    assert saved  # the good ones before it are kept...
    for _, path in saved:  # ...and none holds a NaN or inf
        with np.load(os.path.join(path, 'state.npz')) as f:
            assert all(np.isfinite(f[k]).all() for k in f.files)


def test_muon_diverging_names_its_learning_rates_and_says_when_nothing_was_kept(byte_data, tmp_path, capsys):
    c = tiny_config(data=byte_data, out=str(tmp_path / 'out'), optimizer='muon', matrix_lr=1e6, warmup_steps=0,
                    grad_clip=0.0, steps=20, ckpt_every=1000, warmdown_frac=0.0, **tiny_shape())
    with pytest.raises(tt.Diverged) as e:
        train(c)
    assert tt.list_checkpoints(c.out) == [] and 'No checkpoint was written; run again with a lower --matrix_lr ' \
        '(now 1e+06) or --embed_lr (now 0.003)' in str(e.value) and 'is kept' not in str(e.value)


def test_a_checkpoint_holding_a_nan_is_not_resumed_even_with_its_hashes_recomputed(tmp_path, capsys):
    """Training never writes a NaN: one in a checkpoint whose size and SHA-256 were made to match
    is damage or forgery, skipped for the checkpoint before it."""
    c = make_checkpoints(tmp_path, steps=(1, 2))
    path = os.path.join(str(tmp_path), 'ckpt_00000002')
    with np.load(os.path.join(path, 'state.npz')) as f:
        arrays = {k: f[k] for k in f.files}
    arrays['params/layers/qkv'].flat[7] = np.nan
    np.savez(os.path.join(path, 'state.npz'), **arrays)
    meta = json.loads(open(os.path.join(path, 'meta.json')).read())
    meta.update(state_bytes=os.path.getsize(os.path.join(path, 'state.npz')),
                state_sha256=tt.file_sha256(os.path.join(path, 'state.npz')))
    open(os.path.join(path, 'meta.json'), 'w').write(json.dumps(meta))
    state, used, _ = tt.restore(c, template())
    assert used.endswith('ckpt_00000001') and int(state['opt']['step']) == 1
    assert 'ckpt_00000002/state.npz: params/layers/qkv holds NaN or infinity' in capsys.readouterr().err


def bad_data(tmp_path, kind):
    d = tmp_path / kind
    d.mkdir()
    tokens = np.arange(2000) % 250
    train, val = dict(), dict()
    if kind == 'magic':
        train = dict(magic=123)
    elif kind == 'version':
        val = dict(version=9)
    elif kind == 'size':
        train = dict(count=5000)
    elif kind == 'vocab':
        tokens = np.arange(2000) % 300
    if kind == 'short':
        tokens = tokens[:10]
    if kind != 'empty':
        write_shard(d / 'train_000000.bin', tokens, **train)
        if kind != 'noval':
            write_shard(d / 'val_000000.bin', tokens, **val)
        (d / 'meta.json').write_text(json.dumps({'tokenizer': 'byte', 'vocab_size': 257, 'eot_id': 256}))
    if kind == 'vocab1e9':
        (d / 'meta.json').write_text(json.dumps({'tokenizer': 'byte', 'vocab_size': 1e9}))
    elif kind == 'splits':
        (d / 'meta.json').write_text(json.dumps({'splits': {'train': {'shards': ['../x.bin']}}}))
    elif kind == 'listed':
        (d / 'meta.json').write_text(json.dumps({'splits': {'train': {'shards': ['train_000009.bin']}}}))
    elif kind == 'tokenizer':
        (d / 'meta.json').write_text(json.dumps({'tokenizer': 'foo', 'vocab_size': 257}))
    elif kind == 'meta_dir':
        (d / 'meta.json').unlink()
        (d / 'meta.json').mkdir()
    return d


@pytest.mark.parametrize('kind, message', [
    ('empty', 'no train shards (*train*.bin); create them with `python prepare.py'),
    ('noval', 'no val shards (*val*.bin)'),
    ('vocab1e9', 'meta.json: "vocab_size" is 1000000000.0, expected an integer from 2 to 2^32; re-create it'),
    ('splits', 'meta.json: "splits" is {"train": {"shards": ["../x.bin"]}}, expected per split'),
    ('listed', 'meta.json lists'),
    ('meta_dir', 'meta.json: unreadable: Is a directory'),
    ('tokenizer', 'meta.json: "tokenizer" is "foo", expected one of gpt2, '),
    ('magic', 'train_000000.bin: not a token shard (magic 123'),
    ('version', 'val_000000.bin: unsupported shard version 9'),
    ('size', 'train_000000.bin: header says 5000 tokens'),
    ('short', 'fewer tokens than one window of 17'),
    ('vocab', 'holds token id 299 but the vocabulary has 257 tokens'),
])
@pytest.mark.slow
def test_bad_data_is_one_line_and_changes_nothing(tmp_path, kind, message, capsys):
    out = tmp_path / 'out'
    make_checkpoints(out, steps=(1,))  # an existing run must stay untouched
    before = snapshot(out)
    r = run_main(capsys, f'--data={bad_data(tmp_path, kind)}', f'--out={out}', '--steps=5', *TINY)
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and message in r.stderr, r.stderr
    assert snapshot(out) == before


@pytest.mark.parametrize('damage, message', [
    ('truncate', 'state.npz: truncated or not matching its checksum; and no older'),
    ('garbage', 'meta.json: not a tinytpu checkpoint (not valid JSON); and no older'),
    ('types', 'meta.json: not a tinytpu checkpoint (its --n_layer is "2", expected an int); and no older'),
    ('shape', 'was trained with --d_model=64'),
])
def test_bad_checkpoints_are_one_line_and_change_nothing(byte_data, tmp_path, damage, message, capsys):
    out = tmp_path / 'out'
    make_checkpoints(out, steps=(1,))
    path = out / 'ckpt_00000001'
    if damage == 'truncate':
        (path / 'state.npz').write_bytes((path / 'state.npz').read_bytes()[:500])
    elif damage == 'garbage':
        (path / 'meta.json').write_text('this is not a checkpoint')
    elif damage == 'types':
        meta = json.loads((path / 'meta.json').read_text())
        meta['config']['n_layer'] = '2'
        (path / 'meta.json').write_text(json.dumps(meta))
    else:
        meta = json.loads((path / 'meta.json').read_text())
        meta['config']['d_model'] = 64
        (path / 'meta.json').write_text(json.dumps(meta))
    before = snapshot(out)
    r = run_main(capsys, f'--data={byte_data}', f'--out={out}', '--steps=5', *TINY)
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and message in r.stderr, r.stderr
    assert snapshot(out) == before
    r = run_main(capsys, 'sample', f'--out={out}', '--max_new_tokens=5')
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and str(path) in r.stderr, r.stderr


@pytest.mark.slow
def test_unwritable_output_and_bad_flags(byte_data, tmp_path, capsys):
    blocker = tmp_path / 'a_file'
    blocker.write_text('x')
    for args, message in [([f'--out={blocker}/out'], f'--out={blocker}/out: cannot create the directory'),
                          (['--steps=1.5'], '--steps=1.5: expected an int'),
                          (['--lr'], '--lr needs a value'),
                          (['--n_head=3'], 'not divisible')]:
        r = run_main(capsys, f'--data={byte_data}', f'--out={tmp_path / "o"}', *TINY, *args)
        assert r.returncode == 2 and r.stderr.count('\n') == 1 and message in r.stderr, r.stderr
    assert snapshot(tmp_path / 'o') == {}


def test_symlinked_checkpoints_are_refused(tmp_path):
    make_checkpoints(tmp_path / 'real', steps=(1,))
    (tmp_path / 'out').mkdir()
    os.symlink(tmp_path / 'real' / 'ckpt_00000001', tmp_path / 'out' / 'ckpt_00000005')
    with pytest.raises(tt.UserError, match='is a symbolic link; refusing'):
        tt.restore(tiny_config(out=str(tmp_path / 'out'), **tiny_shape()), template())
    os.unlink(tmp_path / 'out' / 'ckpt_00000005')
    (tmp_path / 'out' / 'ckpt_00000005').mkdir()
    os.symlink(tmp_path / 'real' / 'ckpt_00000001' / 'state.npz', tmp_path / 'out' / 'ckpt_00000005' / 'state.npz')
    os.symlink(tmp_path / 'real' / 'ckpt_00000001' / 'meta.json', tmp_path / 'out' / 'ckpt_00000005' / 'meta.json')
    with pytest.raises(tt.UserError, match='is a symbolic link'):
        tt.restore(tiny_config(out=str(tmp_path / 'out'), **tiny_shape()), template())


def test_checkpoints_hold_no_pickles(tmp_path):
    make_checkpoints(tmp_path, steps=(1,))
    with np.load(tmp_path / 'ckpt_00000001' / 'state.npz', allow_pickle=False) as f:
        assert all(f[k].dtype != object for k in f.files)


@pytest.mark.slow
def test_out_of_memory_mid_run_is_one_line_naming_grad_accum(byte_data, tmp_path, monkeypatch, capsys):
    """Running out of memory after compiling (XLA's RESOURCE_EXHAUSTED, as a GPU may) gets advice,
    not a traceback."""
    def oom(*args):
        raise jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate 34.5G.\nmore')

    oom.memory_analysis = lambda: None
    monkeypatch.setattr(tt, 'compile_step', lambda *args: oom)
    code = tt.main([f'--data={byte_data}', f'--out={tmp_path}', '--grad_accum=2', '--batch_size=4'])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and '--grad_accum=4, now 2' in err[0] and 'allocate 34.5G' in err[0]


def fake_device_memory(monkeypatch, limit):
    device = type('Device', (), {'memory_stats': lambda self: {'bytes_limit': limit}})()
    monkeypatch.setattr(tt.jax, 'local_devices', lambda: [device])


def compiled_need(c):
    """Bytes per device of c's compiled train step (what compile_step compares with the limit)."""
    mesh = tt.make_mesh(c)
    state = jax.jit(lambda: tt.fresh_state(c), out_shardings=tt.state_shardings(c, mesh))()
    m = tt.compile_step(state['params'], state['opt'], mesh, c).memory_analysis()
    return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes


@pytest.mark.slow
@pytest.mark.parametrize('how', ['device memory', 'compiler'])
def test_a_step_too_big_for_the_device_gets_smaller_microbatches(how, byte_data, tmp_path, monkeypatch, capsys):
    """A step that does not fit (beyond the memory a GPU or TPU reports, or refused by a TPU's
    compiler) is recompiled with twice the microbatches until it fits; the run is then exactly
    the run with that --grad_accum."""
    flags = dict(data=byte_data, batch_size=8, steps=4)
    if how == 'device memory':
        fake_device_memory(monkeypatch, compiled_need(tiny_config(**flags, grad_accum=4)))
    else:
        compile_step = tt.compile_step

        def refusing(params, opt, mesh, c):
            if c.grad_accum < 4:
                raise jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm.')
            return compile_step(params, opt, mesh, c)
        monkeypatch.setattr(tt, 'compile_step', refusing)
    fitted = train(tiny_config(**flags, out=str(tmp_path / 'fitted'), grad_accum=1))
    out = capsys.readouterr().out
    assert 'microbatches of 8 sequences: using --grad_accum=2' in out
    assert 'microbatches of 4 sequences: using --grad_accum=4' in out
    meta = json.load(open(tmp_path / 'fitted' / 'ckpt_00000004' / 'meta.json'))
    assert meta['config']['grad_accum'] == 4
    monkeypatch.undo()
    direct = train(tiny_config(**flags, out=str(tmp_path / 'direct'), grad_accum=4))
    for a, b in zip(jax.tree.leaves(fitted), jax.tree.leaves(direct)):
        assert np.array_equal(a, b)


def test_absurd_sizes_fail_fast_before_allocating(byte_data, tmp_path):
    """Before the fix, these ran until the kernel killed them (or hung compiling): in a process of
    their own, one after another, each a one-line refusal."""
    flags = ['--d_model=1000000', '--n_layer=100000', '--batch_size=100000000', '--eval_batches=1000000000']
    results = run_cli_many(*([f'--data={byte_data}', f'--out={tmp_path}/out', flag] for flag in flags), devices=2,
                           timeout=120)
    for flag, r in zip(flags, results):
        assert r.returncode == 2 and r.stderr.count('\n') == 1, (flag, r.stderr)
        assert 'need at least' in r.stderr and 'but this machine has' in r.stderr, (flag, r.stderr)


def test_the_memory_floor_is_checked_against_the_device(byte_data, tmp_path, monkeypatch):
    c = tiny_config(data=byte_data, out=str(tmp_path / 'out'))
    fake_device_memory(monkeypatch, tt.least_memory(c, tt.make_mesh(c)) - 1)
    with pytest.raises(tt.UserError, match=r'0.0M params .* need at least 0.5 MiB per device but cpu has 0.5 MiB'):
        train(c)
    assert not os.path.exists(c.out)


@pytest.mark.slow
def test_a_step_that_cannot_fit_stops_before_training(byte_data, tmp_path, monkeypatch):
    """Microbatches as small as the devices allow and still too big: one line, nothing written."""
    c = tiny_config(data=byte_data, out=str(tmp_path / 'out'), grad_accum=2)
    smallest = tt.make_mesh(c).size  # one sequence per device
    fake_device_memory(monkeypatch, tt.least_memory(c, tt.make_mesh(c)) + 1000)  # enough to get to compiling
    with pytest.raises(tt.UserError, match=rf'needs .* MiB per device with microbatches of {smallest} sequences, '
                                           r'but .* has 0.5 MiB; use more chips'):
        train(c)
    assert tt.list_checkpoints(c.out) == [] and not os.path.exists(os.path.join(c.out, 'log.jsonl'))


def test_a_step_that_cannot_fit_is_refused_before_the_state_is_allocated(byte_data, tmp_path, monkeypatch):
    """The steps are compiled for the state's shapes first: a model too big to train (there, a
    10,000-layer one took 58 s and 18.7 GB before the refusal) is refused before its params and
    optimizer state take any memory, and before a checkpoint is read."""
    monkeypatch.setattr(tt, 'step_bytes', lambda compiled: 10 ** 15)
    monkeypatch.setattr(tt, 'restore', lambda *a: pytest.fail('the state was read or made before the step was checked'))
    with pytest.raises(tt.UserError, match='but this machine has .*; use more chips'):
        train(tiny_config(data=byte_data, out=str(tmp_path / 'out')))


@pytest.mark.slow
def test_auto_microbatches_are_the_fewest_that_fit(byte_data, tmp_path, monkeypatch, capsys):
    """--grad_accum=0 searches both ways: with memory for microbatches of 4 sequences (not 8), it
    settles on 2 microbatches of 4, and the run is exactly the run with --grad_accum=2."""
    flags = dict(data=byte_data, batch_size=8, steps=4)
    fake_device_memory(monkeypatch, compiled_need(tiny_config(**flags, grad_accum=2)))
    fitted = train(tiny_config(**flags, out=str(tmp_path / 'fitted'), grad_accum=0))
    assert 'microbatches of 4 sequences (--grad_accum=2): the fewest that fit' in capsys.readouterr().out
    assert json.load(open(tmp_path / 'fitted' / 'ckpt_00000004' / 'meta.json'))['config']['grad_accum'] == 2
    monkeypatch.undo()
    direct = train(tiny_config(**flags, out=str(tmp_path / 'direct'), grad_accum=2))
    for a, b in zip(jax.tree.leaves(fitted), jax.tree.leaves(direct)):
        assert np.array_equal(a, b)


@pytest.mark.slow
def test_eval_step_counts_against_memory_with_the_optimizer_state(byte_data, tmp_path, monkeypatch):
    """The eval step shares the device with AdamW's moments, which it does not take as arguments:
    a limit that both compiled steps fit, but not eval plus the moments, is refused before
    training, naming the eval step."""
    c = tiny_config(data=byte_data, out=str(tmp_path / 'out'), batch_size=8, grad_accum=4)
    mesh = tt.make_mesh(c)
    state = jax.jit(lambda: tt.fresh_state(c), out_shardings=tt.state_shardings(c, mesh))()
    limit = 1 + max(tt.step_bytes(compile(state['params'], state['opt'], mesh, c))
                    for compile in (tt.compile_step, tt.compile_eval))
    fake_device_memory(monkeypatch, limit)
    real = tt.resident_bytes  # "moments" as large as the memory:
    monkeypatch.setattr(tt, 'resident_bytes', lambda tree: limit if 'mu' in tree else real(tree))
    with pytest.raises(tt.UserError, match='the eval step needs .* per device with microbatches of 1 sequences, but'):
        train(c)
    assert tt.list_checkpoints(c.out) == []


@pytest.mark.parametrize('flag, says', [
    ('--n_head=0', '--n_layer, --d_model, --n_head and --n_kv_head must be positive'),
    ('--n_kv_head=0', '--n_layer, --d_model, --n_head and --n_kv_head must be positive'),
    ('--d_head=-1', '--d_head and --d_ff must be >= 0'),
    ('--d_ff=-5', '--d_head and --d_ff must be >= 0'),
    ('--seed=-1', '--seed=-1 must be in 0 .. 2^32 - 1'),
    ('--seed=4294967296', '--seed=4294967296 must be in 0 .. 2^32 - 1 (JAX keys take 32 bits)'),
    ('--seed=9223372036854775808', '--seed=9223372036854775808: out of range'),
    ('--steps=99999999999999999999', '--steps=99999999999999999999: out of range'),
    ('--dtype=float64', "--dtype=float64: choose auto, float32 or bfloat16 (float64 is for the tests' oracles, with JAX_ENABLE_X64=1)"),
    ('--profile_steps=3000:3005', '--profile_steps=3000:3005: the run has 2000 steps'),
    ('--rope_theta=0', '--rope_theta=0.0 must be positive'),
    ('--lr=inf', '--lr=inf: must be a finite number'),
    ('--logit_softcap=nan', '--logit_softcap=nan: must be a finite number'),
    ('--temperature=inf', '--temperature=inf: must be a finite number'),
    ('--budget=inf', '--budget=inf: must be a finite number'),
])
def test_settings_that_cannot_work_are_one_line_before_anything_runs(flag, says, tmp_path, capsys):
    """Each is found before a check that would divide by it or train on it (exit 2, not a
    traceback, not a divergence reported later with exit 3)."""
    assert tt.main([flag, f'--out={tmp_path}']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and says in err[0]
    assert os.listdir(tmp_path) == []


def test_cpu_devices_zero_is_one_line(tmp_path, capsys):
    r = run_main(capsys, '--cpu_devices=0', f'--out={tmp_path}')
    assert r.returncode == 2 and r.stderr.strip() == 'error: --cpu_devices=0 must be at least 1'


def test_log_is_rewritten_whole_or_not_at_all(tmp_path, monkeypatch):
    """Resuming from step 2 drops later records by writing a new log beside the old and renaming
    it over: a failure (a kill, a full disk) before the rename leaves the old log as it was."""
    log = tmp_path / 'log.jsonl'
    history = ''.join(json.dumps({'step': s, 'loss': 1.0}) + '\n' for s in range(1, 6))
    log.write_text(history + '{"step": 6, "lo')  # and a line cut by a crash
    monkeypatch.setattr(tt.os, 'replace', lambda *a: (_ for _ in ()).throw(OSError(28, 'No space left on device')))
    with pytest.raises(tt.UserError, match='could not rewrite the log .No space left on device.; it is unchanged'):
        tt.trim_log(str(log), 2)
    assert log.read_text() == history + '{"step": 6, "lo' and os.listdir(tmp_path) == ['log.jsonl']
    monkeypatch.undo()
    tt.trim_log(str(log), 2)
    assert [json.loads(l)['step'] for l in log.read_text().splitlines()] == [1, 2]
    log.write_text('{"step": 1}')  # a last record without its newline: the next append must not join it
    tt.trim_log(str(log), 2)
    assert log.read_text() == '{"step": 1}\n'
    log.write_bytes(b'{"step": 1}\n\xff\xfe garbage\n{"step": "2"}\n[3]\n')  # damaged lines: dropped
    tt.trim_log(str(log), 2)
    assert log.read_text() == '{"step": 1}\n'


def test_log_through_a_symlink_is_refused(byte_data, tmp_path):
    target = tmp_path / 'elsewhere.txt'
    target.write_text('precious\n')
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'log.jsonl').symlink_to(target)
    with pytest.raises(tt.UserError, match='log.jsonl is a symbolic link; refusing to write the log through links'):
        train(tiny_config(data=byte_data, out=str(out)))
    assert target.read_text() == 'precious\n'


@pytest.mark.slow
@pytest.mark.parametrize('field, value', [('rope_theta', 500.0), ('logit_softcap', 15.0),
                                         ('optimizer', 'muon')])  # its state is the optimizer's own
def test_resume_refuses_settings_that_change_what_the_weights_compute(field, value, byte_data, tmp_path):
    c = tiny_config(data=byte_data, out=str(tmp_path), steps=4)
    train(c)
    with pytest.raises(tt.UserError, match=f'was trained with --{field}=.*, but this run has --{field}={value}'):
        train(tt.dataclasses.replace(c, steps=8, **{field: value}))


@pytest.mark.slow
def test_resume_refuses_data_of_another_tokenizer(byte_data, tmp_path):
    c = tiny_config(data=byte_data, out=str(tmp_path / 'out'), steps=4)
    train(c)
    meta = json.load(open(os.path.join(byte_data, 'meta.json')))
    with open(os.path.join(byte_data, 'meta.json'), 'w') as f:
        json.dump({**meta, 'tokenizer': 'cl100k_base'}, f)
    with pytest.raises(tt.UserError, match='trained on byte tokens, but --data=.* holds cl100k_base tokens'):
        train(tt.dataclasses.replace(c, steps=8))


@pytest.mark.slow
def test_output_piped_into_a_reader_that_stops_still_trains_to_the_end(byte_data, tmp_path):
    """python tinytpu.py | head: before the fix, BrokenPipeError aborted training unsaved."""
    out = tmp_path / 'out'
    p = subprocess.Popen(train_cli(byte_data, out, 30, '--ckpt_every=30'), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=ROOT)
    p.stdout.readline()
    p.stdout.close()  # as head does after its lines
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert [s for s, _ in tt.list_checkpoints(str(out))] == [15, 30] and b'Traceback' not in err  # 15: before the warmdown


@pytest.mark.parametrize('where, says', [
    ('out_is_file', 'cannot create the directory (File exists)'),
    ('data_is_file', 'data.txt: not a directory'),
    ('log_is_dir', 'log.jsonl: Is a directory'),
])
def test_a_file_where_a_directory_should_be_and_back_is_one_line(where, says, byte_data, tmp_path, capsys):
    out = tmp_path / 'out'
    data = byte_data
    if where == 'out_is_file':
        out.write_text('my notes')
    elif where == 'data_is_file':
        data = tmp_path / 'data.txt'
        data.write_text('not a directory')
    else:
        (out / 'log.jsonl').mkdir(parents=True)
    before = snapshot(tmp_path)
    r = run_main(capsys, f'--data={data}', f'--out={out}', *TINY, '--steps=2')
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and says in r.stderr, r.stderr
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------
# What outside testers found: each was a traceback, a silent wrong result or lost data.


def test_a_lock_or_log_that_is_a_link_is_refused_and_its_target_kept(byte_data, tmp_path):
    """Before the fix a .lock linking to a user's file emptied that file (rc 0)."""
    notes = tmp_path / 'notes.txt'
    for name in ('.lock', 'log.jsonl'):
        notes.write_text('notes')
        out = tmp_path / name.strip('.')
        out.mkdir()
        (out / name).symlink_to(notes)
        with pytest.raises(tt.UserError, match=f'{name} is a symbolic link; refusing to write'):
            train(tiny_config(data=byte_data, out=str(out), steps=2))
        assert notes.read_text() == 'notes'


def test_deep_models_compile_one_looped_block_unless_told_otherwise(capsys):
    """10,000 unrolled blocks took 12.9 GB while compiling and were killed; past 32 they scan."""
    c = tt.make_config(tt.parse_flags(['--n_layer=10000', '--d_model=64']), 'cpu')
    assert c.scan_layers and '--n_layer=10000: over 32 blocks are compiled once and looped' in capsys.readouterr().out
    assert not tt.make_config(tt.parse_flags(['--n_layer=32']), 'cpu').scan_layers
    assert not tt.make_config(tt.parse_flags(['--n_layer=40', '--scan_layers=false']), 'cpu').scan_layers


def rewrite_state(path, change, read=True):
    """Rewrite a checkpoint's state.npz as change(dict of arrays) says, with its size and hash
    recorded again in meta.json: damage a checksum cannot see."""
    npz = path / 'state.npz'
    if read:
        with np.load(npz) as f:
            arrays = {k: f[k] for k in f.files}
        change(arrays)
        with open(npz, 'wb') as f:
            np.savez(f, **arrays)
    meta = json.loads((path / 'meta.json').read_text())
    meta['state_bytes'], meta['state_sha256'] = npz.stat().st_size, hashlib.sha256(npz.read_bytes()).hexdigest()
    (path / 'meta.json').write_text(json.dumps(meta))


def huge_header(npz, name):
    """Replace array `name` by a .npy whose header claims 10^12 x 10^6 floats (4 EB)."""
    import io
    import zipfile
    with zipfile.ZipFile(npz) as z:
        members = {n: z.read(n) for n in z.namelist()}
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {'descr': '<f4', 'fortran_order': False, 'shape': (10**12, 10**6)})
    members[name + '.npy'] = header.getvalue() + b'\0' * 64
    with zipfile.ZipFile(npz, 'w') as z:
        for n, data in members.items():
            z.writestr(n, data)


@pytest.mark.parametrize('damage, says', [
    (lambda a: a.update({'params/embed': a['params/embed'].astype(np.int32)}),
     'array params/embed is int32[384, 32], but the model has float32[384, 32]'),
    (lambda a: a.update({'params/embed': np.array(['x'] * 4)}), 'array params/embed is <U1[4]'),
    (lambda a: a.pop('opt/nu/embed'), 'no array opt/nu/embed'),
    (lambda a: a.update({'opt/step': np.int32(-5)}), 'its optimizer step -5 is not the step of its meta.json (2)'),
    (lambda a: a.update({'opt/step': np.int32(2**31 - 1)}), 'its optimizer step 2147483647 is not the step'),
    ('huge', 'array params/embed is float32[1000000000000, 1000000]'),
])
def test_a_crafted_state_is_skipped_for_the_checkpoint_before_it(tmp_path, capsys, damage, says):
    """Arrays of another dtype were cast and trained on; a string array, a step of -5 and a header
    claiming 4 EB were tracebacks; a step of 2^31 - 1 was "nothing to do". Each is now read from
    its header, before anything is allocated, and the checkpoint before it is used."""
    c = make_checkpoints(tmp_path)
    path = tmp_path / 'ckpt_00000002'
    if damage == 'huge':
        huge_header(path / 'state.npz', 'params/embed')
        rewrite_state(path, lambda arrays: None, read=False)
    else:
        rewrite_state(path, damage)
    state, used, _ = tt.restore(c, template())
    assert used.endswith('ckpt_00000001') and int(state['opt']['step']) == 1
    err = capsys.readouterr().err
    assert says in err and 'using the previous checkpoint' in err, err


@pytest.mark.slow
def test_things_named_like_checkpoints_are_not_taken_for_them(byte_data, tmp_path, capsys):
    """ckpt_² (int('²') was a traceback) and a plain file ckpt_00000004 (resumed past it silently,
    then left .tmp_ckpt_old_... behind for ever)."""
    c = tiny_config(data=byte_data, out=str(tmp_path), steps=2, ckpt_every=2, **tiny_shape())
    train(c)
    (tmp_path / 'ckpt_²').mkdir()
    (tmp_path / 'ckpt_²' / 'meta.json').write_text((tmp_path / 'ckpt_00000002' / 'meta.json').read_text())
    (tmp_path / 'ckpt_00000004').write_text('not a checkpoint')
    assert [s for s, _ in tt.list_checkpoints(str(tmp_path))] == [1, 2]  # 1: before the warmdown
    capsys.readouterr()
    train(dataclasses.replace(c, steps=4))
    err = capsys.readouterr().err
    assert 'ckpt_00000004 is not a checkpoint' in err and 'ckpt_² is not a checkpoint' in err
    assert [s for s, _ in tt.list_checkpoints(str(tmp_path))] == [2, 4]
    assert not [n for n in os.listdir(tmp_path) if n.startswith('.tmp')]
    r = run_main(capsys, 'sample', f'--out={tmp_path}', '--max_new_tokens=3')
    assert r.returncode == 0, r.stderr
    r = run_main(capsys, 'export', f'--out={tmp_path}', f'--export_dir={tmp_path / "hf"}')  # ckpt_00000004's
    assert r.returncode == 0 and (tmp_path / 'hf' / 'model.safetensors').is_file(), r.stderr


@pytest.mark.slow
@pytest.mark.filterwarnings('ignore:os.fork')  # the child only sets a limit, then runs python
def test_a_full_disk_while_logging_is_one_line_and_exit_2(byte_data, tmp_path):
    """A real write error (the file size limit: EFBIG, as a full disk gives ENOSPC) in the log:
    before the fix the one line was followed by three chained tracebacks and exit code 1."""
    import resource
    train(tiny_config(data=byte_data, out=str(tmp_path), steps=4, **tiny_shape()))
    limit = (tmp_path / 'log.jsonl').stat().st_size + 10

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    before = snapshot(tmp_path / 'ckpt_00000004')
    env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}  # JAX's cache would fail too
    r = subprocess.run(train_cli(byte_data, tmp_path, 8, '--log_every=2', '--ckpt_every=4', '--eval_every=4'),
                       capture_output=True, text=True, cwd=ROOT, preexec_fn=small_files, env=env)
    assert r.returncode == 2 and r.stderr.count('\n') == 1, r.stderr
    assert 'log.jsonl: could not write the log (File too large); the last checkpoint is intact' in r.stderr
    assert snapshot(tmp_path / 'ckpt_00000004') == before


@pytest.mark.slow
def test_a_coordinator_whose_peers_never_come_says_so_in_one_line():
    """Before: a C++ check failure and an abort (exit 134) after the timeout, nothing said."""
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    r = run_cli(f'--coordinator=127.0.0.1:{port}', '--num_processes=2', '--process_id=0', '--coordinator_timeout=3',
                timeout=120)
    assert r.returncode == 2 and r.stderr.count('\n') == 1, r.stderr
    assert 'not all 2 processes joined within 3s (--coordinator_timeout)' in r.stderr


@pytest.mark.slow
def test_tokens_are_counted_across_a_resume_with_another_seq_len(byte_data, tmp_path):
    c = tiny_config(data=byte_data, out=str(tmp_path), steps=4, warmdown_frac=0.0, **tiny_shape())  # 4 x 16 a step
    train(c)
    train(dataclasses.replace(c, steps=8, seq_len=8))                          # 4 x 8
    logs = [json.loads(line) for line in open(tmp_path / 'log.jsonl')]
    assert [(r['step'], r['tokens']) for r in logs if 'loss' in r] == [(2, 128), (4, 256), (6, 320), (8, 384)]
    assert logs[-1]['summary']['tokens'] == 384
    assert json.loads((tmp_path / 'ckpt_00000008' / 'meta.json').read_text())['tokens'] == 384


def test_sample_with_a_context_too_large_for_memory_names_context(tmp_path, capsys):
    make_checkpoints(tmp_path, steps=(1,))
    r = run_main(capsys, 'sample', f'--out={tmp_path}', '--context=1000000000')
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and 'use a smaller --context' in r.stderr, r.stderr
    assert '--grad_accum' not in r.stderr and '--batch_size' not in r.stderr
