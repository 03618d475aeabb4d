"""Evaluation on multiple-choice tasks (HellaSwag's format): the scorer against hand-computed
choices and a float reference forward, a held-out task a trained model passes and an untrained
one does not, prepare.py hellaswag through a local HTTP server."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import prepare
import tinytpu as tt
from conftest import ROOT, SHAKESPEARE, run_cli, run_main

TEXT = open(SHAKESPEARE, encoding='utf-8').read()


def test_acc_picks_by_total_and_acc_norm_by_mean_per_token():
    # example 1: totals -10, -6, -9, -12 over 5, 2, 9, 4 tokens: means -2, -3, -1, -3
    # example 2 (label 0): totals -4, -8; means -4, -2
    logp = np.array([-10., -6., -9., -12., -4., -8.])
    counts = np.array([5, 2, 9, 4, 1, 4])
    r = tt.choice_accuracy(logp, counts, [(4, 1), (2, 0)])
    assert r == {'acc': 1.0, 'acc_norm': 0.0, 'examples': 2}
    r = tt.choice_accuracy(logp, counts, [(4, 2), (2, 1)])
    assert r == {'acc': 0.0, 'acc_norm': 1.0, 'examples': 2}
    # a tie, or a NaN, is no pick: before the fix argmax gave it to ending 0 (acc 1.0 with label 0)
    r = tt.choice_accuracy(np.array([-5., -5., np.nan, -1.]), np.ones(4), [(2, 0), (2, 0)])
    assert r == {'acc': 0.0, 'acc_norm': 0.0, 'examples': 2}


def test_rows_join_with_a_space_and_cut_from_the_left():
    enc = prepare.get_encoding('byte')
    rows = tt.task_rows([('abc', ['de', 'f'], 0), ('xy\n', ['zz'], 0), ('0123456789', ['abcdef'], 0)], enc, 8)
    assert rows[0] == (list(b'abc de'), 3)    # ' de' is scored: 3 tokens
    assert rows[1] == (list(b'abc f'), 3)
    assert rows[2] == (list(b'xy\nzz'), 3)    # the context ends in whitespace: no space added
    assert rows[3] == (list(b'89 abcdef'), 2)  # context 8: the last 9 tokens, all 7 ending tokens scored


@pytest.mark.slow
def test_batched_scores_equal_a_float64_forward_of_each_ending():
    """Sorted, padded to buckets, several batches, split over 2 devices, with a last partial
    batch: each ending's log-probability equals one unpadded float64 forward of its tokens. (In a
    process of its own: the tests' process has one device.)"""
    script = '''
import jax, jax.numpy as jnp, numpy as np, prepare, tinytpu as tt
tt.use_cpu_devices(2)
jax.config.update('jax_enable_x64', True)
c = tt.validate(tt.Config(n_layer=2, d_model=32, n_head=4, n_kv_head=2, vocab_size=257, context=24, seq_len=16,
                            dtype='float64'))
params = jax.tree.map(lambda x: x.astype(jnp.float64), tt.init_params(c, jax.random.key(3)))
rng = np.random.default_rng(0)
words = ['the', 'king', 'is', 'dead', 'long', 'live', 'queen', 'and', 'so', 'on']
examples = [(' '.join(rng.choice(words, rng.integers(1, 9))),
             [' '.join(rng.choice(words, rng.integers(1, 4))) for _ in range(4)], 0) for _ in range(5)]
rows = tt.task_rows(examples, prepare.get_encoding('byte'), c.context)
lengths = [len(ids) for ids, _ in rows]
assert max(lengths) == c.context + 1 and min(lengths) <= 17  # some cut from the left; two buckets
mesh = tt.device_mesh(jax.devices())
assert mesh.size == 2
got = tt.ending_logprob_sums(params, rows, c, mesh, tokens_per_device=32, what='test')
forward = jax.jit(tt.forward, static_argnames='c')  # compiled once per length: faster than op by op
for (ids, first), value in zip(rows, got):
    logits = forward(params, jnp.asarray([ids[:-1]]), c)[0]
    logp = jax.nn.log_softmax(logits, -1)[np.arange(len(ids) - 1), np.array(ids[1:])]
    want = float(jnp.sum(logp[first - 1:]))
    assert abs(value - want) <= 1e-9, (value, want)
print('ok', len(rows))
'''
    r = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith('ok'), r.stderr[-3000:]


@pytest.mark.slow(seconds=20)
def test_a_trained_model_finds_the_held_out_continuation_and_an_untrained_one_does_not(byte_data, tmp_path, capsys):
    """--task=choices's examples (make_choices) from text the model never saw (Shakespeare after the
    fixture's 70 KB): the rest of a line against its words in other orders."""
    task = tmp_path / 'choices.jsonl'
    task.write_text(''.join(json.dumps(e) + '\n' for e in tt.make_choices(TEXT[100_000:300_000], n=120)))
    out = str(tmp_path / 'run')
    r = run_cli('--preset=cpu', f'--data={byte_data}', f'--out={out}', '--steps=120', '--lr=3e-3', '--log_every=60',
                '--eval_every=120', '--hellaswag_every=60', f'--task_data={task}', '--task_limit=40', '--cpu_devices=1',
                optimized=True)
    assert r.returncode == 0, r.stderr
    logged = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]
    assert [x['step'] for x in logged if 'hellaswag_acc_norm' in x] == [60, 120]
    assert all(x['tokens'] == x['step'] * 12 * 64 for x in logged if 'summary' not in x)

    r = run_main(capsys, 'eval', f'--out={out}', '--task=choices', f'--task_data={task}')
    assert r.returncode == 0, r.stderr
    trained = json.loads(r.stdout.strip().splitlines()[-1])
    assert trained['task'] == 'choices' and trained['examples'] == 120 and trained['step'] == 120
    assert trained['acc_norm'] > 0.45, trained  # chance is 0.25; 0.508 after these 120 steps (0.542 after 200 at 1e-3)

    c = tt.validate(tt.make_config({'preset': 'cpu', 'out': out}))
    untrained = jax.jit(tt.init_params, static_argnums=0)(c, jax.random.key(0))  # compiled whole: faster
    mesh = tt.device_mesh(jax.devices()[:1])
    r = tt.score_task(untrained, tt.read_task(str(task)), prepare.get_encoding('byte'), c, mesh)
    assert 0.15 < r['acc_norm'] < 0.35, r


def test_eval_errors_are_one_line(tmp_path, byte_data, capsys, monkeypatch):
    r = run_main(capsys, 'eval', f'--out={tmp_path}/nothing', f'--task_data={tmp_path}/missing.jsonl')
    assert r.returncode == 2 and 'missing.jsonl: no such file' in r.stderr and len(r.stderr.splitlines()) == 1
    monkeypatch.chdir(tmp_path)
    r = run_main(capsys, 'eval', f'--out={tmp_path}/nothing', '--task=hellaswag')
    assert r.returncode == 2 and 'python prepare.py hellaswag' in r.stderr
    bad = tmp_path / 'bad.jsonl'
    bad.write_text('{"ctx": "a", "endings": ["b", "c"], "label": 1}\n{"ctx": "a", "endings": ["b"], "label": 3}\n')
    with pytest.raises(tt.UserError, match=r'bad.jsonl, line 2: "endings"'):
        tt.read_task(str(bad))
    bad.write_text('{"ctx": "a", "endings": ["b", "c"], "label": 2}\n')
    with pytest.raises(tt.UserError, match='line 1: "label" is 2, but there are 2 endings'):
        tt.read_task(str(bad))
    bad.write_text('{"ctx": "a", "endings": ["b", " "], "label": 0}\n')
    with pytest.raises(tt.UserError, match='line 1: an ending is empty'):
        tt.read_task(str(bad))


HELLASWAG = [{'ind': i, 'ctx_a': f'A man is {w}.', 'ctx_b': 'he', 'ctx': f'A man is {w}. he', 'label': i % 4,
              'endings': ['sits.', 'stands.', 'runs.', 'walks.']} for i, w in enumerate(['here', 'there', 'home'])]


def test_prepare_hellaswag_downloads_checks_and_records_it(hub, tmp_path, monkeypatch, capsys):
    url, files = hub
    files['hellaswag_val.jsonl'] = body = b''.join(json.dumps(e).encode() + b'\n' for e in HELLASWAG)
    files['moved'] = b'<html>not here</html>'
    monkeypatch.setitem(prepare.DATASETS, 'hellaswag', {'task': f'{url}/cdn/hellaswag_val.jsonl'})
    out = tmp_path / 'hs'
    assert prepare.main(['hellaswag', f'--out={out}', '--allow_http']) == 0
    assert (out / 'hellaswag_val.jsonl').read_bytes() == body
    meta = json.loads((out / 'meta.json').read_text())
    assert meta['examples'] == 3 and meta['sources'][0]['sha256'] == prepare.file_sha256(out / 'hellaswag_val.jsonl')
    assert tt.read_task(str(out / 'hellaswag_val.jsonl'))[1] == ('A man is there. he', HELLASWAG[1]['endings'], 1)
    assert prepare.main(['hellaswag', f'--out={out}', '--allow_http']) == 0
    assert 'already prepared' in capsys.readouterr().out

    # a page that is not the file: one line, nothing kept
    assert prepare.main(['hellaswag', f'--out={tmp_path}/x', '--allow_http', f'--input={url}/cdn/moved']) == 2
    assert 'line 1: not a JSON object' in capsys.readouterr().err
    assert not list((tmp_path / 'x').rglob('*.jsonl')) and not (tmp_path / 'x' / 'meta.json').exists()
    # a local copy; flags that do not apply
    assert prepare.main(['hellaswag', f'--out={tmp_path}/y', f'--input={out}/hellaswag_val.jsonl']) == 0
    assert (tmp_path / 'y' / 'hellaswag_val.jsonl').read_bytes() == body
    assert prepare.main(['hellaswag', f'--out={tmp_path}/z', '--tokenizer=byte']) == 2
    assert 'drop the flag' in capsys.readouterr().err
    assert prepare.main(['hellaswag', '--help']) == 0


def test_choices_are_made_from_the_held_out_text_of_the_run_s_data(tmp_path):
    """--task=choices: examples made from the data's val split, decoded (the last 10% of the text)."""
    data = str(tmp_path / 'd')
    assert prepare.main(['text', f'--input={SHAKESPEARE}', '--tokenizer=byte', f'--out={data}']) == 0
    c = tt.validate(tt.make_config({'preset': 'cpu', 'data': data, 'task': 'choices'}))
    examples, whence = tt.task_examples(c, prepare.get_encoding('byte'))
    assert examples == tt.task_examples(c, None)[0] and whence == f'the held-out text of {data}'  # deterministic
    held_out = TEXT[len(TEXT) * 9 // 10:]
    assert len(examples) == 1000
    for ctx, endings, label in examples:
        assert ctx + ' ' + endings[label] in held_out  # the true continuation, from the last 10%
        assert len(set(endings)) == 4 and all(sorted(e.split()) == sorted(endings[label].split()) for e in endings)
