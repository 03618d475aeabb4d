"""--init_from: a new run starts from another run's weights (its newest checkpoint), with a fresh
optimizer at step 0 and its own schedule; the model is the source's shape and the data must use
its tokenizer; the log and every checkpoint say where the run started, and running it again
resumes it, never the source."""
import json
import os

import numpy as np
import pytest

import tinytpu as tt
from conftest import ROOT, byte_shards, run_main, write_shard

TINY = ['--n_layer=2', '--d_model=32', '--n_head=2', '--n_kv_head=1', '--seq_len=16', '--context=16',
        '--batch_size=4', '--eval_batches=2', '--log_every=2', '--eval_every=4', '--warmup_steps=1']


@pytest.fixture
def moby_data(tmp_path):
    """Byte-level Moby-Dick: the text to fine-tune on."""
    return byte_shards(tmp_path / 'moby', os.path.join(ROOT, 'tests', 'data', 'mobydick.txt'))


def params_of(out):
    c = tt.validate(tt.make_config({'out': out}))
    return tt.load_model(c, set())[1]


def records(out):
    return [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]


@pytest.mark.slow
def test_a_run_starts_from_another_run_s_weights_and_then_resumes_itself(byte_data, moby_data, tmp_path, capsys):
    source, tuned = str(tmp_path / 'source'), str(tmp_path / 'tuned')
    assert run_main(capsys, f'--data={byte_data}', f'--out={source}', '--steps=6', *TINY).returncode == 0
    flags = tt.parse_flags([f'--data={moby_data}', f'--out={tmp_path / "look"}', f'--init_from={source}',
                            '--optimizer=muon', '--steps=4', *TINY])
    with tt.TrainingRun(tt.validate(tt.make_config(flags))) as run:  # the state it trains from
        assert run.start == 0 and int(run.opt['step']) == 0 and not np.asarray(run.opt['mu']['embed']).any()
        for a, b in zip(tt.flatten(params_of(source)).values(), tt.flatten(run.params).values()):
            assert np.array_equal(a, np.asarray(b))  # the source's weights, bitwise
    assert 'starting from the weights of' in capsys.readouterr().out

    r = run_main(capsys, f'--data={moby_data}', f'--out={tuned}', f'--init_from={source}', '--steps=4', *TINY)
    assert r.returncode == 0, r.stderr
    first = records(tuned)[0]
    assert first == {'step': 0, 'tokens': 0, 'init_from': {'path': source, 'checkpoint': 'ckpt_00000006', 'step': 6}}
    for _, path in tt.list_checkpoints(tuned):
        assert tt.read_checkpoint_meta(path)['init_from']['path'] == source
    assert int(tt.read_checkpoint_meta(tt.list_checkpoints(tuned)[-1][1])['step']) == 4  # its own steps, from 0

    r = run_main(capsys, f'--data={moby_data}', f'--out={tuned}', f'--init_from={source}', '--steps=6', *TINY)
    assert r.returncode == 0, r.stderr
    assert 'resuming from' in r.stdout and 'starting from the weights' not in r.stdout
    log = records(tuned)
    assert sum('init_from' in x for x in log) == 1 and log[-1]['step'] == 6


@pytest.mark.slow
def test_what_cannot_start_from_a_run_is_one_line(byte_data, tmp_path, capsys):
    source = str(tmp_path / 'source')
    assert run_main(capsys, f'--data={byte_data}', f'--out={source}', '--steps=2', *TINY).returncode == 0
    gpt2 = tmp_path / 'gpt2'
    gpt2.mkdir()
    for split in ('train', 'val'):
        write_shard(gpt2 / f'{split}_000000.bin', np.arange(3000) % 50257)
    (gpt2 / 'meta.json').write_text('{"tokenizer": "gpt2", "vocab_size": 50257, "eot_id": 50256}')
    for flags, says in [
        ([f'--data={gpt2}'], 'was trained on byte tokens, but --data=' + str(gpt2) + ' holds gpt2 tokens; use data '
                             'prepared with --tokenizer=byte'),
        ([f'--data={byte_data}', '--n_layer=3'], f'--n_layer=3: --init_from={source} holds a model with --n_layer=2'),
        ([f'--data={byte_data}', f'--init_from={tmp_path}/nothing'], 'nothing: no such directory'),
        ([f'--data={byte_data}', f'--out={source}'], 'is --out; give the new run its own --out'),
    ]:
        out = str(tmp_path / 'new')
        args = [f'--init_from={source}', f'--out={out}', '--steps=2', *[a for a in TINY if not a.startswith('--n_layer')]]
        r = run_main(capsys, *args, *flags)
        assert r.returncode == 2 and r.stderr.count('\n') == 1 and says in r.stderr, (flags, r.stderr)
        assert not tt.list_checkpoints(out)


@pytest.mark.slow
def test_an_export_in_float32_comes_back_bitwise_and_trains_on(byte_data, moby_data, tmp_path, capsys):
    source, hf = str(tmp_path / 'source'), str(tmp_path / 'hf')
    assert run_main(capsys, f'--data={byte_data}', f'--out={source}', '--steps=4', '--mlp=relu2', '--tie_embed=false', *TINY).returncode == 0
    assert run_main(capsys, 'export', f'--out={source}', f'--export_dir={hf}', '--export_dtype=float32').returncode == 0
    flags = tt.parse_flags([f'--data={moby_data}', f'--out={tmp_path / "look"}', f'--init_from={hf}', '--steps=4', *TINY])
    c = tt.validate(tt.make_config(flags))
    assert (c.mlp, c.n_layer, c.d_model) == ('relu2', 2, 32)  # the export's model, not the preset's
    with tt.TrainingRun(c) as run:
        mine, theirs = tt.flatten(params_of(source)), tt.flatten(run.params)
        for name, x in mine.items():
            y = np.asarray(theirs[name])
            if name in ('embed', 'unembed'):  # the vocabulary's padding rows: dropped by export, zeros here
                y, x = (y, x) if name == 'embed' else (y.T, x.T)  # (padded V, D)
                assert np.array_equal(x[:257], y[:257]) and not y[257:].any() and len(y) > 257, name
            else:
                assert np.array_equal(x, y), name  # bitwise
    r = run_main(capsys, f'--data={moby_data}', f'--out={tmp_path / "tuned"}', f'--init_from={hf}', '--steps=2', *TINY)
    assert r.returncode == 0 and "model.safetensors, step 4" in r.stdout, r.stderr
    bf16 = str(tmp_path / 'hf16')  # a bfloat16 export is the same model, rounded: it loads too
    assert run_main(capsys, 'export', f'--out={source}', f'--export_dir={bf16}').returncode == 0
    r = run_main(capsys, f'--data={moby_data}', f'--out={tmp_path / "t16"}', f'--init_from={bf16}', '--steps=2', *TINY)
    assert r.returncode == 0, r.stderr
