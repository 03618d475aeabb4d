"""Scale-out on CPU: 8 virtual devices (data parallel and FSDP) and two real processes joined by
jax.distributed over 127.0.0.1 give the losses of one device; checkpoints move between
topologies. Device counts are fixed when JAX starts: the runs compared run one after another in a
process of 8 CPU devices (conftest.run_cli_many), each on the first --cpu_devices of them."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

import tinytpu as tt
from conftest import ROOT, run_cli_many, run_main, tiny_config

FLAGS = ['--n_layer=2', '--d_model=32', '--n_head=4', '--n_kv_head=2', '--seq_len=16', '--context=16',
         '--batch_size=8', '--eval_batches=2', '--log_every=1', '--eval_every=100000', '--lr=3e-3',
         '--warmup_steps=2', '--warmdown_frac=0']  # no warmdown: the lr of a step does not depend on --steps


def run(data, out, steps, *extra, env=None):
    cmd = [sys.executable, os.path.join(ROOT, 'tinytpu.py'), *cli(data, out, steps, *extra)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def cli(data, out, steps, *extra):
    return [f'--data={data}', f'--out={out}', f'--steps={steps}', *FLAGS, *extra]


def finish(p):
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    return out


def runs(*argvs):
    """Runs of the program in one process of 8 CPU devices (run_cli_many), each on its
    --cpu_devices of them. -> their printed output"""
    results = run_cli_many(*argvs, devices=8)
    for r in results:
        assert r.returncode == 0, r.stderr
    return [r.stdout for r in results]


def losses(out):
    return {r['step']: r['loss'] for r in map(json.loads, open(os.path.join(out, 'log.jsonl'))) if 'loss' in r}


def assert_close(a, b):
    assert a.keys() == b.keys(), (a.keys(), b.keys())
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])


@pytest.mark.slow(seconds=30)
def test_eight_devices_match_one_with_adamw_and_muon(byte_data, tmp_path):
    """12 steps on 8 devices, data parallel and FSDP: the losses of one device. With Muon too:
    its Newton-Schulz needs whole matrices, and each device orthogonalizes a share of the layers
    (Part I's shard annotation): the compiler moves FSDP's shards, or data parallel's whole
    matrices, there and the results back; 2 layers over 8 devices leaves some with none."""
    muon = ['--optimizer=muon', '--matrix_lr=0.02']
    shapes = ((8, 'false'), (8, 'true'), (2, 'false'))  # 2: a layer each, evenly
    printed = runs(cli(byte_data, tmp_path / 'one', 12, '--cpu_devices=1'),
                   *(cli(byte_data, tmp_path / f'eight_{fsdp}', 12, '--cpu_devices=8', f'--fsdp={fsdp}')
                     for fsdp in ('false', 'true')),
                   cli(byte_data, tmp_path / 'one_muon', 12, '--cpu_devices=1', *muon),
                   *(cli(byte_data, tmp_path / f'muon_{n}_{fsdp}', 12, f'--cpu_devices={n}', f'--fsdp={fsdp}', *muon)
                     for n, fsdp in shapes))
    assert 'cpu x1' in printed[0]
    assert 'cpu x8' in printed[1] and 'data parallel over 8 devices' in printed[1]
    assert 'cpu x8' in printed[2] and 'FSDP over 8 devices' in printed[2]
    for fsdp in ('false', 'true'):
        assert_close(losses(tmp_path / f'eight_{fsdp}'), losses(tmp_path / 'one'))
    for n, fsdp in shapes:
        assert_close(losses(tmp_path / f'muon_{n}_{fsdp}'), losses(tmp_path / 'one_muon'))
    assert losses(tmp_path / 'one_muon') != losses(tmp_path / 'one')  # really another optimizer


@pytest.mark.slow
def test_fsdp_really_shards_every_weight():
    """Each of 8 devices holds 1/8 of every weight and of its AdamW moments, before and after a
    train step, and the per-device state is 1/8 of the replicated one."""
    script = '''
import jax, numpy as np, tinytpu as tt
tt.use_cpu_devices(8)
c = tt.validate(tt.Config(n_layer=2, d_model=32, n_head=4, n_kv_head=2, seq_len=16, context=16, batch_size=8, fsdp='true',
                          cpu_devices=8))
mesh = tt.make_mesh(c)
state = jax.jit(lambda: tt.fresh_state(c), out_shardings=tt.state_shardings(c, mesh))()
batch = tt.put_batch([(d, np.ones((1, 1, 17), np.int32)) for d in mesh.devices.flat], (1, 8, 17), mesh)
specs = jax.tree.leaves(tt.param_specs(c), is_leaf=lambda w: isinstance(w, tt.Weight))
def check(tree):
    for w, x in zip(specs, jax.tree.leaves(tree)):
        shape = w.shape
        local = list(shape); local[w.fsdp_axis] //= 8
        assert len(x.addressable_shards) == 8, x.sharding
        assert all(s.data.shape == tuple(local) for s in x.addressable_shards), (shape, x.sharding)
check(state['params'])
with jax.set_mesh(mesh):  # the mesh Part I's shard() statements name
    params, opt, _ = tt.train_step(state['params'], state['opt'], batch, c)  # donates the old state
for tree in (params, opt['mu'], opt['nu']):
    check(tree)
fsdp = tt.state_bytes_per_device(c, mesh)
replicated = tt.state_bytes_per_device(tt.Config(**{**c.__dict__, 'fsdp': 'false'}), mesh)
assert (fsdp - 4) * 8 + 4 == replicated, (fsdp, replicated)  # all but the 4-byte step counter is split
odd = tt.validate(tt.Config(**{**c.__dict__, 'd_model': 36, 'n_head': 2, 'n_kv_head': 1}))  # 36 does not split 8 ways
try:
    tt.state_shardings(odd, mesh)
    raise SystemExit('no error for a weight that does not split evenly')
except tt.UserError as e:
    assert 'cannot be split evenly over 8 devices' in str(e), e
print('ok')
'''
    r = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == 'ok', r.stderr


@pytest.mark.slow
def test_what_moves_between_devices_is_weights_and_gradients_never_activations():
    """Part I's train_step compiled for 8 virtual devices, 2 microbatches per step, AdamW and
    Muon: data parallel sums the gradients once, after the microbatch loop (inside it only the
    loss), and gathers only Muon's orthogonalized updates; FSDP all-gathers weights (one layer's or
    the embedding's, whole) and sums their gradients back. Either way the tied embedding's two
    gradients (lookup, output layer) are added on each device and summed over the devices once.
    No collective moves an activation: none has the sequence length (24, which no weight has)."""
    script = '''
import math, re, jax, tinytpu as tt
tt.use_cpu_devices(8)
for fsdp in ('false', 'true'):
    for opt in ('adamw', 'muon'):
        c = tt.validate(tt.Config(n_layer=2, d_model=32, n_head=4, n_kv_head=2, seq_len=24, context=24, batch_size=16,
                                  grad_accum=2, fsdp=fsdp, optimizer=opt, cpu_devices=8))
        mesh = tt.make_mesh(c)
        state = tt.state_shapes(c, mesh)
        with jax.set_mesh(mesh):
            hlo = tt.compile_step(state['params'], state['opt'], mesh, c).as_text()
        comps, _ = tt.hlo_computations(hlo)
        loops = {body for ops in comps.values() for *_, text in ops for body in re.findall(r'body=%([\\w.\\-]+)', text)}
        found = [(op.removesuffix('-start'), [tuple(int(d) for d in dims.split(',') if d) for dims in re.findall(r'\\[([\\d,]*)\\]', t)], name in loops)
                 for name, ops in comps.items() for _, t, op, _ in ops if op.removesuffix('-start') in tt.COLLECTIVES]
        assert found, (fsdp, opt)
        assert not [f for f in found if any(24 in shape or 25 in shape for shape in f[1])], ('an activation moves', found)
        if fsdp == 'false':
            assert [f for f in found if f[2]] and all(shape == () for f in found if f[2] for shape in f[1]), found
        embed = tt.param_specs(c)['embed'].shape
        assert sum(s in (embed, (embed[0] // 8, embed[1])) for op, shapes, _ in found if op != 'all-gather' for s in shapes) == 1, found
        weights = {w.shape[1:] for w in jax.tree.leaves(tt.param_specs(c)['layers'], is_leaf=lambda w: isinstance(w, tt.Weight))} \\
            | {tt.param_specs(c)['embed'].shape}
        gathered = [s[1:] if s[0] == 1 else s for op, shapes, _ in found if op == 'all-gather' for s in shapes]
        if fsdp == 'false' and opt == 'muon':  # each device's share of the layers (2, padded to 8), orthogonalized
            weights = {(8, *w[-2:]) for w in [(32, 32), (32, 16), (32, 128), (128, 32)]}
        assert bool(gathered) == (fsdp == 'true' or opt == 'muon') and set(gathered) <= weights, (fsdp, gathered, weights)
        summed = [s for op, shapes, _ in found if op in ('all-reduce', 'reduce-scatter') for s in shapes]
        assert sum(map(math.prod, summed)) >= tt.count_params(state['params']) // 8, (fsdp, opt, summed)
print('ok')
'''
    r = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == 'ok', r.stderr[-3000:]


@pytest.mark.slow
def test_checkpoints_move_between_topologies(byte_data, tmp_path):
    """6 steps on 8 devices (FSDP), resumed on 1 device; and 6 on 1, resumed on 8: the losses of
    steps 7-12 are those of the uninterrupted single-device run."""
    moves = [('8', '1', 'a'), ('1', '8', 'b')]
    printed = runs(cli(byte_data, tmp_path / 'one', 12, '--cpu_devices=1'),
                   *(cli(byte_data, tmp_path / f'move_{name}', steps, f'--cpu_devices={n}', '--fsdp=true')
                     for first, then, name in moves for n, steps in ((first, 6), (then, 12))))
    for i, (first, then, name) in enumerate(moves):
        text = printed[2 + 2 * i]
        assert 'resuming from' in text and 'ckpt_00000006' in text and f'cpu x{then}' in text
        assert_close(losses(tmp_path / f'move_{name}'), losses(tmp_path / 'one'))


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_and_write_one_checkpoint(byte_data, tmp_path):
    """Two real processes of 2 CPU devices each, joined by jax.distributed (gloo collectives) on
    127.0.0.1, each reading only its half of every batch: the losses of one device, exactly one
    checkpoint (written by process 0), which a single process then resumes."""
    out, port = tmp_path / 'two', free_port()
    procs = [run(byte_data, out, 6, '--cpu_devices=2', f'--coordinator=127.0.0.1:{port}', '--num_processes=2',
                 f'--process_id={i}') for i in range(2)]
    outputs = [finish(p) for p in procs]
    assert 'cpu x4' in outputs[0] and '2 hosts' in outputs[0] and 'saved' in outputs[0]
    ours = ('tinytpu |', 'compiled', 'step ', 'saved', 'resuming')  # gloo's own C++ logging aside,
    assert not any(marker in outputs[1] for marker in ours), outputs[1]  # only process 0 prints
    assert sorted(os.listdir(out)) == ['.lock', 'ckpt_00000006', 'log.jsonl']
    two = losses(out)
    runs(cli(byte_data, tmp_path / 'one', 12, '--cpu_devices=1'), cli(byte_data, out, 12, '--cpu_devices=1'))
    reference = losses(tmp_path / 'one')
    assert_close(two, {s: l for s, l in reference.items() if s <= 6})
    assert_close(losses(out), reference)


def test_microbatches_split_evenly_over_several_chips(monkeypatch, capsys):
    """The tpu preset's 32 microbatches of 2 sequences cannot split over 8 chips: 8 microbatches
    of 8 (one sequence per chip) can, and use less memory per chip than 2 did on one."""
    monkeypatch.setattr(tt.jax, 'default_backend', lambda: 'tpu')
    monkeypatch.setattr(tt.jax, 'devices', lambda: [object()] * 8)
    c = tt.validate(tt.make_config({'preset': 'tpu', 'grad_accum': 32}, 'tpu'))
    assert c.batch_size == 64
    assert tt.split_evenly(c).grad_accum == 8
    assert 'do not split over 8 devices: using --grad_accum=8' in capsys.readouterr().out
    assert tt.split_evenly(tt.dataclasses.replace(c, grad_accum=4)).grad_accum == 4  # 16 per microbatch: even
    monkeypatch.setattr(tt.jax, 'devices', lambda: [object()] * 6)
    assert tt.split_evenly(c) is c  # 64 sequences never split over 6: make_mesh says so


@pytest.mark.parametrize('flags, says', [
    (['--coordinator=nohost', '--num_processes=2', '--process_id=1'], 'expected HOST:PORT'),
    (['--coordinator=127.0.0.1:99999', '--num_processes=2', '--process_id=1'], 'expected HOST:PORT'),
    (['--coordinator=127.0.0.1:1234', '--num_processes=2', '--process_id=2'], '--process_id in 0 .. num_processes - 1'),
    (['--coordinator={free}', '--num_processes=2', '--process_id=1', '--coordinator_timeout=2'],
     'nothing listening there after 2s; start process 0'),
    (['--coordinator={busy}', '--num_processes=2', '--process_id=0', '--coordinator_timeout=2'],
     'cannot listen on port'),
])
def test_coordinator_problems_are_one_line(flags, says, tmp_path, capsys):
    """Before the fix: an IndexError traceback, or JAX waiting 5 minutes and aborting in C++. Each is
    refused before JAX is asked to join anything, so this process can ask."""
    with socket.socket() as busy:
        busy.bind(('127.0.0.1', 0))
        busy.listen()
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            free = s.getsockname()[1]
        flags = [f.format(free=f'127.0.0.1:{free}', busy=f'127.0.0.1:{busy.getsockname()[1]}') for f in flags]
        t = time.time()
        r = run_main(capsys, f'--out={tmp_path}/out', *flags)
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and says in r.stderr, r.stderr
    assert time.time() - t < 30


def test_fsdp_auto_is_fsdp_on_several_tpus_and_by_memory_on_gpus(monkeypatch):
    """--fsdp=auto: on TPUs FSDP (estimated faster, and the first log line says why); on GPUs data
    parallel while the replicated state takes at most half a device, FSDP beyond."""
    class Mesh:
        size = 8
    c = tiny_config(fsdp='auto')
    monkeypatch.setattr(tt, 'device_memory', lambda c: 32 * 2**30)
    monkeypatch.setattr(tt, 'backend', lambda c: 'tpu')
    chosen, note = tt.choose_fsdp(c, Mesh)
    assert chosen.fsdp == 'true' and note.startswith('FSDP over 8 devices') and 'on TPUs the faster' in note
    assert tt.choose_fsdp(tiny_config(fsdp='false'), Mesh)[0].fsdp == 'false'  # asked for, kept
    monkeypatch.setattr(tt, 'backend', lambda c: 'gpu')
    chosen, note = tt.choose_fsdp(c, Mesh)
    assert chosen.fsdp == 'false' and note.startswith('data parallel over 8 devices')
    monkeypatch.setattr(tt, 'device_memory', lambda c: 1.5 * 16 * tt.param_count(c))  # over half of it
    chosen, note = tt.choose_fsdp(c, Mesh)
    assert chosen.fsdp == 'true' and note.endswith('replicated, over half)')
