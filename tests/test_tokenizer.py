"""Tokenizers trained on the corpus (prepare.py --tokenizer=bpe:N) and FineWeb-edu as text
(nanochat's parquet shards), offline: the tokenizer is deterministic and byte-level, goes with the
data and the run (sample, eval, export, resume, a bucket), and transformers tokenizes as tiktoken
does with the exported files; parquet shards come from a local stand-in for the Hub, resumed
after a kill."""
import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import prepare
import tinytpu as tt
from conftest import HubHandler, ROOT, SHAKESPEARE, tiny_config, train

pytest.importorskip('rustbpe', reason='rustbpe trains the tokenizers (pip install rustbpe)')
TEXT = open(SHAKESPEARE, 'rb').read()


def prepare_bpe(out, *flags, n=1024):
    assert prepare.main(['text', f'--input={SHAKESPEARE}', f'--tokenizer=bpe:{n}', f'--out={out}', *flags]) == 0
    return str(out)


def tokens(path):
    return np.asarray(tt.open_shard(str(path)))


@pytest.fixture(scope='module')
def bpe_data(tmp_path_factory):
    return prepare_bpe(tmp_path_factory.mktemp('bpe') / 'data')


def test_a_trained_tokenizer_is_deterministic_byte_level_and_named_in_meta(bpe_data, tmp_path):
    again = prepare_bpe(tmp_path / 'again', '--workers=1')  # another process count: the same bytes
    for name in ('tokenizer.tiktoken', 'train_000000.bin', 'val_000000.bin'):
        assert open(os.path.join(bpe_data, name), 'rb').read() == open(os.path.join(again, name), 'rb').read(), name
    meta = json.load(open(os.path.join(bpe_data, 'meta.json')))
    path = os.path.join(bpe_data, 'tokenizer.tiktoken')
    assert (meta['tokenizer'], meta['vocab_size'], meta['eot_id'], meta['tokenizer_file']) == \
        ('bpe:1024', 1024, 1023, 'tokenizer.tiktoken')
    assert meta['tokenizer_sha256'] == hashlib.sha256(open(path, 'rb').read()).hexdigest()
    assert meta['tokenizer_pattern'] == prepare.BPE_PATTERN and meta['tokenizer_trained_on']['bytes'] == 1_003_854
    enc = prepare.load_encoding(meta, bpe_data)
    lines = open(path, 'rb').read().splitlines()  # tiktoken's own file format, in rank order
    assert len(lines) == 1023 and lines[:2] == [b'AA== 0', b'AQ== 1'] and lines[-1].endswith(b' 1022')
    assert base64.b64decode(lines[300].split()[0]) == enc.decode_single_token_bytes(300)
    # every byte is a token of its own; any bytes, valid UTF-8 or not, round-trip
    assert [enc.decode_single_token_bytes(i) for i in range(256)] == [bytes([b]) for b in range(256)]
    for data in (bytes(range(256)), b'\xff\xfe half \xe2\x82 a character', 'naïve café ünïcödé 日本語 🙂'.encode()):
        assert enc.decode_bytes(enc._encode_bytes(data)) == data
    assert enc.encode('<|endoftext|>', allowed_special='all') == [1023]  # end-of-text: one token, the last
    # the shards are the text: end-of-text, then the training split's tokens, which decode to its bytes
    train, val = tokens(os.path.join(bpe_data, 'train_000000.bin')), tokens(os.path.join(bpe_data, 'val_000000.bin'))
    assert train[0] == val[0] == 1023 and 1023 not in train[1:]
    assert enc.decode_bytes(train[1:].tolist()) + enc.decode_bytes(val[1:].tolist()) == TEXT
    assert meta['bytes_per_token'] == meta['splits']['val']['bytes'] / len(val) > 2  # byte tokens: 1


def test_the_sample_is_bounded_and_spread_over_the_training_text():
    pieces = [(bytes([65 + i % 26]) * 10, True, ('f', 10 * i)) for i in range(100)]
    kept = list(prepare.spread(iter(pieces), 1000, 200))
    assert len(kept) == 20 and [k[0] for k in kept] == [chr(65 + i % 26) for i in range(4, 100, 5)]
    assert len(list(prepare.spread(iter(pieces), 1000, 5000))) == 100  # all of a small text
    assert [k[0] for k in prepare.spread(iter(pieces), None, 30)] == ['A', 'B', 'C']  # the first (a shuffled source)
    bad = [(b'ok', True, ('f', 0)), (b'\xff', False, ('f', 2))]
    with pytest.raises(prepare.PrepareError, match='f: not UTF-8 at byte 2'):
        list(prepare.spread(iter(bad), 3, 10))


def test_tokenizer_bytes_bounds_what_it_learns_from(tmp_path):
    out = prepare_bpe(tmp_path / 'small', '--tokenizer_bytes=200000', n=600)
    meta = json.load(open(os.path.join(out, 'meta.json')))
    assert 150_000 < meta['tokenizer_trained_on']['bytes'] <= 200_000 and meta['request']['tokenizer_bytes'] == 2e5


@pytest.mark.slow
def test_the_tokenizer_goes_with_the_run_sample_eval_export_and_resume(bpe_data, tmp_path, capsys):
    transformers = pytest.importorskip('transformers')
    out = str(tmp_path / 'run')
    meta = json.load(open(os.path.join(bpe_data, 'meta.json')))
    c = tiny_config(data=bpe_data, out=out, mlp='swiglu', logit_softcap=0.0, steps=4)
    train(c)
    copy = os.path.join(out, 'tokenizer.tiktoken')  # the run keeps its tokenizer beside its checkpoints
    assert open(copy, 'rb').read() == open(os.path.join(bpe_data, 'tokenizer.tiktoken'), 'rb').read()
    ckpt = json.load(open(os.path.join(tt.list_checkpoints(out)[-1][1], 'meta.json')))
    assert (ckpt['tokenizer'], ckpt['tokenizer_sha256']) == ('bpe:1024', meta['tokenizer_sha256'])
    moved = str(tmp_path / 'moved')  # the data directory is gone: the run's own copy is used
    shutil.move(bpe_data, moved)
    try:
        assert tt.main(['sample', f'--out={out}', '--prompt=ROMEO:', '--max_new_tokens=8', '--temperature=0']) == 0
        assert capsys.readouterr().out.strip().splitlines()[-1].startswith('ROMEO:')
        assert tt.main(['export', f'--out={out}', f'--export_dir={tmp_path / "hf"}']) == 0
        hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'hf'))
        enc = prepare.load_encoding(meta, moved)
        text = TEXT[-20000:].decode() + ' 1234567 naïve 日本語\n\n\t x  '
        assert hf(text)['input_ids'] == enc.encode_ordinary(text)
        assert hf.eos_token == '<|endoftext|>' and hf.convert_tokens_to_ids('<|endoftext|>') == 1023
        assert 'tokenizer `bpe:1024`' in open(tmp_path / 'hf' / 'README.md').read()
        task = tmp_path / 'task.jsonl'
        task.write_text(''.join(json.dumps(e) + '\n' for e in tt.make_choices(TEXT[-100_000:].decode(), n=50)))
        capsys.readouterr()
        assert tt.main(['eval', f'--out={out}', '--task=choices', f'--task_data={task}',
                        '--task_limit=20']) == 0  # scored with the model's own tokenizer
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])['examples'] == 20
        with open(copy, 'ab') as f:  # a tokenizer that is not the one the model learned: refused in one line
            f.write(b'AAAA 1023\n')
        with pytest.raises(tt.PrepareError, match='tokenizer.tiktoken: not the tokenizer .* was made with'):
            tt.load_model(tt.validate(tt.make_config({'out': out})), set())
        os.remove(copy)
        with pytest.raises(tt.PrepareError, match='tokenizer.tiktoken: missing; .* copy it back'):
            tt.load_model(tt.validate(tt.make_config({'out': out})), set())
    finally:
        shutil.move(moved, bpe_data)
    _, _, _, enc = tt.load_model(tt.validate(tt.make_config({'out': out})), set())  # else the data's, checked
    assert enc.name == 'bpe:1024' and enc.n_vocab == 1024


@pytest.mark.slow
def test_data_of_another_trained_tokenizer_is_refused_and_dir_reuses_one(bpe_data, tmp_path):
    out = str(tmp_path / 'run')
    train(tiny_config(data=bpe_data, out=out, steps=2))
    other = prepare_bpe(tmp_path / 'other', '--tokenizer_bytes=300000')  # bpe:1024 too, learned from less text
    with pytest.raises(tt.UserError, match=r'trained on bpe:1024 \(tokenizer.tiktoken SHA-256 [0-9a-f]{12}\) tokens, '
                                           r'but --data=.* holds bpe:1024 \(tokenizer.tiktoken SHA-256'):
        train(tiny_config(data=other, out=out, steps=4))
    # --tokenizer=DIR: the tokenizer of bpe_data, for other text: the run may go on with it
    moby = os.path.join(ROOT, 'tests', 'data', 'mobydick.txt')
    same = tmp_path / 'same'
    assert prepare.main(['text', f'--input={moby}', f'--tokenizer={bpe_data}', f'--out={same}']) == 0
    assert (same / 'tokenizer.tiktoken').read_bytes() == open(os.path.join(bpe_data, 'tokenizer.tiktoken'), 'rb').read()
    assert 'tokenizer_trained_on' in json.load(open(same / 'meta.json'))
    train(tiny_config(data=str(same), out=out, steps=4))
    assert tt.list_checkpoints(out)[-1][0] == 4
    os.remove(same / 'tokenizer.tiktoken')  # data whose tokenizer is gone is refused before training, not after
    with pytest.raises(tt.PrepareError, match='tokenizer.tiktoken: missing'):
        train(tiny_config(data=str(same), out=str(tmp_path / 'run2'), steps=2))


@pytest.mark.parametrize('flag, says', [('--tokenizer=bpe:12', 'say bpe:N with N, the vocabulary size, from 258'),
                                        ('--tokenizer=bpe:32k', 'say bpe:N with N'),
                                        ('--tokenizer=no/such/dir', 'unknown (choose gpt2'),
                                        ('--tokenizer_bytes=0', 'at least 1')])
def test_bad_tokenizer_flags_are_one_line_before_anything_is_written(flag, says, tmp_path, capsys):
    assert prepare.main(['text', f'--input={SHAKESPEARE}', flag, f'--out={tmp_path / "o"}']) == 2
    err = capsys.readouterr().err
    assert says in err and err.count('\n') == 1 and not (tmp_path / 'o').exists()


def test_without_rustbpe_one_line_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'rustbpe', None)
    assert prepare.main(['text', f'--input={SHAKESPEARE}', '--tokenizer=bpe:300', f'--out={tmp_path / "o"}']) == 2
    assert capsys.readouterr().err == 'error: --tokenizer=bpe:N trains a tokenizer with rustbpe: pip install rustbpe\n'


# ----------------------------------------------------------------------------------------------
# FineWeb-edu as text: parquet shards from a stand-in for the Hub.

def parquet_bytes(docs, tmp_path, name):
    pa = pytest.importorskip('pyarrow', reason='fineweb-edu reads parquet with pyarrow (pip install pyarrow)')
    import pyarrow.parquet as pq
    path = tmp_path / name
    pq.write_table(pa.table({'text': docs, 'id': list(range(len(docs)))}), path, row_group_size=50)
    return path.read_bytes()


@pytest.fixture
def fineweb(tmp_path, hub, monkeypatch):
    """Three small shards of Shakespeare's lines as documents, under nanochat's names: two for
    training, and the dataset's last one (validation), on a stand-in Hub (HF_ENDPOINT for a new
    process). -> (hub URL, {shard: docs})"""
    lines = [l for l in TEXT.decode().split('\n\n') if l.strip()]
    docs = {'shard_00000.parquet': lines[:300], 'shard_00001.parquet': lines[300:600],
            'shard_01822.parquet': lines[600:700] + ['naïve 日本語 🙂']}
    url, files = hub
    files.update({name: parquet_bytes(d, tmp_path, name) for name, d in docs.items()})
    spec = prepare.DATASETS['fineweb-edu']
    monkeypatch.setitem(prepare.DATASETS, 'fineweb-edu', {**spec, 'parquet': spec['parquet'].replace(
        'https://huggingface.co', url)})
    return url, docs


def as_byte_tokens(docs):
    return np.concatenate([np.array([256] + list(d.encode()), np.uint16) for d in docs])


def test_fineweb_edu_downloads_go_on_after_a_kill_and_give_the_documents(fineweb, tmp_path):
    url, docs = fineweb
    out = tmp_path / 'edu'
    cmd = [sys.executable, os.path.join(ROOT, 'prepare.py'), 'fineweb-edu', '--shards=2', '--tokenizer=byte',
           '--allow_http', f'--out={out}']
    env = dict(os.environ, HF_ENDPOINT=url)
    release = threading.Event()
    HubHandler.hold = ('shard_00001.parquet', release)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, env=env)
    half = len(HubHandler.files['shard_00001.parquet']) // 2
    deadline = time.time() + 60
    while not [f for f in (out / 'raw').glob('.shard_00001.parquet.*.tmp') if f.stat().st_size == half] \
            and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)  # the machine goes: no clean-up at all
    p.communicate(timeout=60)
    release.set()
    HubHandler.hold = None
    assert not (out / 'raw' / 'shard_00001.parquet').exists() and not (out / 'meta.json').exists()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert [n for n, _ in HubHandler.seen].count('shard_00000.parquet') == 1  # a whole file is not fetched again
    assert [n for n, _ in HubHandler.seen].count('shard_00001.parquet') == 2  # a cut one is fetched again, whole
    assert sorted(os.listdir(out / 'raw')) == ['shard_00000.parquet', 'shard_00001.parquet', 'shard_01822.parquet']
    meta = json.load(open(out / 'meta.json'))
    assert meta['sources'][0]['url'] == f'{url}/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_00000.parquet'
    assert np.array_equal(tokens(out / 'train_000000.bin'), as_byte_tokens(docs['shard_00000.parquet'] + docs['shard_00001.parquet']))
    assert np.array_equal(tokens(out / 'val_000000.bin'), as_byte_tokens(docs['shard_01822.parquet']))


@pytest.mark.slow
def test_fineweb_edu_with_a_trained_tokenizer_learns_from_the_first_training_text(fineweb, tmp_path):
    url, docs = fineweb
    out = tmp_path / 'edu_bpe'
    assert prepare.main(['fineweb-edu', '--shards=2', '--tokenizer=bpe:400', '--tokenizer_bytes=20000',
                         '--allow_http', f'--out={out}']) == 0
    meta = json.load(open(out / 'meta.json'))
    first = [d.encode() for d in docs['shard_00000.parquet']]
    assert meta['tokenizer_trained_on']['bytes'] == max(sum(map(len, first[:i])) for i in range(len(first))
                                                        if sum(map(len, first[:i])) <= 20000)
    enc = prepare.load_encoding(meta, str(out))
    val = tokens(out / 'val_000000.bin')
    assert val[0] == 399 and enc.decode_bytes([t for t in val.tolist() if t != 399]) == \
        ''.join(docs['shard_01822.parquet']).encode()
    train(tiny_config(data=str(out), out=str(tmp_path / 'run'), steps=2))  # and trains


def test_a_damaged_parquet_shard_is_removed_and_named(fineweb, tmp_path, capsys):
    url, _ = fineweb
    HubHandler.files['shard_00000.parquet'] = b'PAR1 not really'
    out = tmp_path / 'bad'
    assert prepare.main(['fineweb-edu', '--tokenizer=byte', '--allow_http', f'--out={out}']) == 2
    err = capsys.readouterr().err
    assert 'shard_00000.parquet: not a readable parquet file' in err and 'removed it, run again' in err
    assert not (out / 'raw' / 'shard_00000.parquet').exists()


def test_without_pyarrow_one_line_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'pyarrow.parquet', None)
    assert prepare.main(['fineweb-edu', f'--out={tmp_path / "o"}', '--tokenizer=byte']) == 2
    assert capsys.readouterr().err == 'error: fineweb-edu reads parquet files with pyarrow: pip install pyarrow\n'
