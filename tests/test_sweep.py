"""Sweeps and tables of runs: `sweep` trains an ordinary run for each point of a grid, names the
best, prints the hero run's command and draws loss against the swept setting; the same command
again trains nothing finished and continues what was cut; `plot --out=A,B` tabulates the runs."""
import importlib.util
import json
import os

import pytest

import tinytpu as tt
from conftest import run_main

TINY = ['--n_layer=2', '--d_model=32', '--n_head=2', '--n_kv_head=1', '--seq_len=16', '--context=16',
        '--batch_size=4', '--eval_batches=2', '--log_every=3', '--eval_every=6', '--steps=6', '--warmup_steps=2']


def val_loss(out):
    """The run's final validation loss, read from its log as a user would."""
    records = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]
    return [r for r in records if 'summary' in r][-1]['summary']['val_loss']


@pytest.mark.slow
def test_a_sweep_names_the_point_separate_runs_find_best_and_trains_nothing_twice(byte_data, tmp_path, capsys):
    root = tmp_path / 'lr'
    args = ['sweep', f'--data={byte_data}', f'--out={root}', '--lr=1e-3,1e-2', *TINY]
    r = run_main(capsys, *args)
    assert r.returncode == 0, r.stderr
    assert 'sweep: point 1 of 2, lr=1e-3' in r.stdout and 'sweep: point 2 of 2, lr=1e-2 (ETA ' in r.stdout
    losses = {lr: val_loss(root / f'lr={lr}') for lr in ('1e-3', '1e-2')}  # each point an ordinary run
    best = min(losses, key=losses.get)
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report['best'] == f'lr={best}' and [p['val_loss'] for p in report['points']] == list(losses.values())
    assert report['hero'] == f'python tinytpu.py --data={byte_data} {" ".join(TINY)} --lr={best}'
    table = r.stdout.split('lr    val loss')[1].splitlines()
    assert table[1].split()[:2] == ['1e-3', f"{losses['1e-3']:.4f}"] and table[2].split()[:2] == ['1e-2', f"{losses['1e-2']:.4f}"]
    if _has_matplotlib():
        assert (root / 'sweep.svg').is_file() and 'lr=' in r.stdout

    r = run_main(capsys, *args)  # again: nothing to train, the same report
    assert r.returncode == 0, r.stderr
    assert r.stdout.count('finished before') == 2 and 'compiled' not in r.stdout
    assert json.loads(r.stdout.strip().splitlines()[-1])['best'] == f'lr={best}'
    for lr in ('1e-3', '1e-2'):
        assert sum('summary' in line for line in open(root / f'lr={lr}' / 'log.jsonl')) == 1

    r = run_main(capsys, 'plot', f'--out={root}/lr=1e-3,{root}/lr=1e-2', f'--plot_file={tmp_path}/both.svg')
    assert r.returncode == 0 or 'matplotlib' in r.stderr, r.stderr
    if r.returncode == 0:  # a table of the runs: the setting they differ in, and what they ended at
        lines = r.stdout.splitlines()
        header = next(i for i, line in enumerate(lines) if line.startswith('run '))
        assert lines[header].split()[:3] == ['run', 'lr', 'val']
        assert lines[header + 1].split()[1:3] == ['0.001', f"{losses['1e-3']:.4f}"]


def _has_matplotlib():
    return importlib.util.find_spec('matplotlib') is not None


@pytest.mark.slow
def test_a_sweep_cut_during_its_second_point_finishes_it_without_retraining_the_first(byte_data, tmp_path, capsys,
                                                                                      monkeypatch):
    root = tmp_path / 'cut'
    args = ['sweep', f'--data={byte_data}', f'--out={root}', '--lr=1e-3,1e-2', '--ckpt_every=3', *TINY]
    save = tt.TrainingRun.save

    def save_then_cut(self, params, opt, done):
        save(self, params, opt, done)
        if self.c.out.endswith('lr=1e-2') and done == 3:
            raise KeyboardInterrupt  # Ctrl-C (or a lost machine) after point 2's step-3 checkpoint

    monkeypatch.setattr(tt.TrainingRun, 'save', save_then_cut)
    assert run_main(capsys, *args).returncode == 130
    monkeypatch.setattr(tt.TrainingRun, 'save', save)
    first = (root / 'lr=1e-3' / 'log.jsonl').read_bytes()
    r = run_main(capsys, *args)
    assert r.returncode == 0, r.stderr
    assert 'point 1 of 2, lr=1e-3: finished before' in r.stdout and 'resum' in r.stdout.lower()
    assert (root / 'lr=1e-3' / 'log.jsonl').read_bytes() == first  # not trained again
    whole = tmp_path / 'whole'  # the second point's settings, trained in one go
    assert run_main(capsys, f'--data={byte_data}', f'--out={whole}', '--lr=1e-2', '--ckpt_every=3', *TINY).returncode == 0
    assert val_loss(root / 'lr=1e-2') == val_loss(whole)  # resumed bitwise


def test_the_eta_weighs_the_points_left_by_their_work(byte_data, tmp_path, capsys, monkeypatch):
    """A point of twice the steps (or FLOPs per step) takes about twice as long, plus what every
    point costs (start, compile): the ETA says so, where the mean time of the points so far would
    say 2:10 and then 1:35."""
    clock = [1e9]
    monkeypatch.setattr(tt.time, 'time', lambda: clock[0])
    monkeypatch.setattr(tt, 'TrainingRun', lambda c: None)
    monkeypatch.setattr(tt, 'train', lambda c, run: clock.__setitem__(0, clock[0] + 5 + 10 * c.steps))
    flags = [a for a in TINY if not a.startswith('--steps=')]
    r = run_main(capsys, 'sweep', f'--data={byte_data}', f'--out={tmp_path / "s"}', '--steps=6,12,24', *flags)
    assert 'point 1 of 3, steps=6\n' in r.stdout, r.stdout
    assert 'point 2 of 3, steps=12 (ETA 0:06:30)' in r.stdout  # 65 s for 6 steps, 36 steps left: in proportion
    assert 'point 3 of 3, steps=24 (ETA 0:04:05)' in r.stdout  # 65 s and 125 s: 5 s + 10 s a step


@pytest.mark.parametrize('flags, says', [
    (['--lr=1e-3'], 'sweep: give at least one setting a comma-separated list'),
    (['--lr=1e-3,1e-3'], '--lr=1e-3,1e-3: give a setting one list of distinct values'),
    (['--lr=1e-3,x'], '--lr=x: expected a number'),
    (['--lr=1e-3,2e-3', '--optimizer=adamw,sgd'], '--optimizer=sgd'),
])
def test_a_bad_grid_is_one_line_before_anything_trains(byte_data, tmp_path, capsys, flags, says):
    r = run_main(capsys, 'sweep', f'--data={byte_data}', f'--out={tmp_path / "s"}', *flags, *TINY)
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and says in r.stderr, r.stderr
    assert not (tmp_path / 's').exists()
