"""prepare.py against a local HTTP server (never the network): downloads with retries and clear
failures; token counts; the byte tokenizer; outputs that tinytpu's loader reads."""
import fcntl
import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import prepare
import tinytpu as tt
from conftest import ROOT, SHAKESPEARE, needs_gpt2, run_cli, serving

CORPUS = open(SHAKESPEARE, 'rb').read()


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves CORPUS at /ok.txt (with Range support), and misbehaves on other paths:
    /drop.txt sends half the body then closes, /flaky.txt answers 500 once, /redirect.txt
    redirects to /ok.txt, anything else is a 404."""
    state = {}

    def do_GET(self):
        self.state.setdefault('requests', []).append((self.path, self.headers.get('Range')))
        if self.path == '/redirect.txt':
            self.send_response(302)
            self.send_header('Location', '/ok.txt')
            self.end_headers()
            return
        if self.path == '/flaky.txt' and not self.state.get('flaked'):
            self.state['flaked'] = True
            self.send_error(500)
            return
        if self.path == '/trickle.txt':  # 1,000 bytes, one every 0.05 s
            self.send_response(200)
            self.send_header('Content-Length', '1000')
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b'x')
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass
            return
        if self.path not in ('/ok.txt', '/drop.txt', '/flaky.txt'):
            self.send_error(404)
            return
        start = int(self.headers['Range'][6:-1]) if self.headers.get('Range') else 0
        if start >= len(CORPUS):
            self.send_response(416)
            self.send_header('Content-Range', f'bytes */{len(CORPUS)}')
            self.end_headers()
            return
        body = CORPUS[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header('Content-Range', f'bytes {start}-{len(CORPUS) - 1}/{len(CORPUS)}')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if self.path == '/drop.txt' and not self.state.get('dropped'):
            self.state['dropped'] = True
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.connection.close()  # the rest never comes
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    Handler.state = {}
    with serving(Handler) as url:
        yield url, Handler.state


def test_download_follows_redirects_and_verifies(server, tmp_path):
    url, state = server
    sha = hashlib.sha256(CORPUS).hexdigest()
    path = str(tmp_path / 'a.txt')
    assert prepare.download(f'{url}/redirect.txt', path, sha, allow_http=True) == sha
    assert open(path, 'rb').read() == CORPUS
    with pytest.raises(prepare.PrepareError, match='does not match the expected'):
        prepare.download(f'{url}/ok.txt', str(tmp_path / 'b.txt'), '0' * 64, allow_http=True)
    assert not os.path.exists(tmp_path / 'b.txt') and not os.path.exists(tmp_path / 'b.txt.part')


def test_a_dropped_connection_is_retried_and_never_leaves_part_of_a_file(server, tmp_path, monkeypatch):
    url, state = server
    path = str(tmp_path / 'c.txt')
    monkeypatch.setattr(prepare.time, 'sleep', lambda s: None)
    prepare.download(f'{url}/drop.txt', path, hashlib.sha256(CORPUS).hexdigest(), allow_http=True)
    assert open(path, 'rb').read() == CORPUS and os.listdir(tmp_path) == ['c.txt']
    assert [p for p, _ in state['requests']] == ['/drop.txt', '/drop.txt']  # the second from the start
    state['dropped'] = False
    with pytest.raises(prepare.PrepareError, match=r'download failed \(the connection ended early'):
        prepare.download(f'{url}/drop.txt', str(tmp_path / 'd.txt'), retries=0, allow_http=True)
    assert os.listdir(tmp_path) == ['c.txt']  # nothing of the cut one: no file, no temporary name


def test_server_error_is_retried(server, tmp_path, monkeypatch):
    url, state = server
    prepare.download(f'{url}/flaky.txt', str(tmp_path / 'd.txt'), allow_http=True)
    assert [p for p, _ in state['requests']] == ['/flaky.txt', '/flaky.txt']


def test_404_and_no_network_are_one_line_errors(server, tmp_path):
    url, _ = server
    with pytest.raises(prepare.PrepareError, match='HTTP 404'):
        prepare.download(f'{url}/missing.txt', str(tmp_path / 'e.txt'), allow_http=True)
    with pytest.raises(prepare.PrepareError, match='plain http'):
        prepare.download(f'{url}/ok.txt', str(tmp_path / 'e.txt'))
    r = run_cli('prepare.py', 'text', f'--input={url}/missing.txt', '--allow_http', '--tokenizer=byte', f'--out={tmp_path / "o"}')
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and 'HTTP 404' in r.stderr
    r = run_cli('prepare.py', 'text', '--input=https://no-such-host.invalid/x.txt', '--tokenizer=byte', f'--out={tmp_path / "o"}')
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and 'pass --input=PATH' in r.stderr


@needs_gpt2
def test_shakespeare_gpt2_counts_match_nanogpt(tmp_path):
    out = tmp_path / 'shakespeare'
    r = run_cli('prepare.py', 'shakespeare', f'--input={SHAKESPEARE}', f'--out={out}')
    assert r.returncode == 0, r.stderr
    meta = json.load(open(out / 'meta.json'))
    # nanoGPT's counts (301,966 and 36,059), plus the end-of-text token that starts each split's document
    assert meta['splits']['train']['tokens'] == 301967 and meta['splits']['val']['tokens'] == 36060
    assert (meta['tokenizer'], meta['vocab_size'], meta['eot_id'], meta['dtype']) == ('gpt2', 50257, 50256, 'uint16')
    c = tt.validate(tt.Config(data=str(out), vocab_size=50257, seq_len=64))
    train, val, loaded = tt.load_data(c)
    assert train.count == 301967 - 64 and loaded == meta
    assert abs(meta['bytes_per_token'] - 111540 / 36060) < 1e-9
    mtime = os.path.getmtime(out / 'train_000000.bin')
    r = run_cli('prepare.py', 'shakespeare', f'--input={SHAKESPEARE}', f'--out={out}')
    assert 'already prepared' in r.stdout and os.path.getmtime(out / 'train_000000.bin') == mtime


def test_byte_tokenizer_round_trip():
    enc = prepare.get_encoding('byte')
    text = 'Héllo, wörld!\n<|endoftext|> ☃'
    ids = enc.encode_ordinary(text)
    assert ids == list(text.encode('utf-8')) and enc.decode(ids) == text
    assert enc.n_vocab == 257 and enc.eot_token == 256
    assert enc.encode('a<|endoftext|>', allowed_special='all') == [97, 256]


def test_text_directory_is_documents_separated_by_eot(tmp_path):
    src = tmp_path / 'src'
    src.mkdir()
    for i in range(10):
        (src / f'{i}.txt').write_text(f'document {i}\n' * 50)
    out = tmp_path / 'out'
    r = run_cli('prepare.py', 'text', f'--input={src}', '--tokenizer=byte', f'--out={out}', '--val_fraction=0.2')
    assert r.returncode == 0, r.stderr
    train = np.asarray(tt.open_shard(str(out / 'train_000000.bin')))
    val = np.asarray(tt.open_shard(str(out / 'val_000000.bin')))
    assert (train == 256).sum() == 8 and (val == 256).sum() == 2  # 8 + 2 documents, each after an end-of-text
    assert train[0] == 256 and bytes(train[1:12].astype(np.uint8)) == b'document 0\n'


def test_tinystories_style_eot_split_and_sharding(tmp_path, monkeypatch):
    stories = ''.join(f'Story {i} begins.\nIt ends.\n<|endoftext|>\n' for i in range(300))
    f = tmp_path / 'stories.txt'
    f.write_text(stories)
    monkeypatch.setattr(prepare, 'CHUNK_BYTES', 500)  # many chunks, so boundaries are exercised
    writer = prepare.ShardWriter(str(tmp_path), 'train', np.uint16, shard_tokens=3000)
    pieces = prepare.read_documents([(str(f), 0, len(stories))], True, cut_anywhere=True)
    prepare.tokenize(prepare.chunked(pieces, 500), 'byte', writer, workers=2)
    paths = writer.close()
    assert len(paths) == 3 and [len(tt.open_shard(p)) for p in paths[:2]] == [3000, 3000]
    tokens = np.concatenate([np.asarray(tt.open_shard(p)) for p in paths])
    docs = bytes(np.where(tokens == 256, ord('|'), tokens).astype(np.uint8)).decode().split('|')
    assert docs == [''] + [f'Story {i} begins.\nIt ends.' for i in range(300)]  # each story starts with end-of-text


def test_bad_flags_and_unknown_dataset():
    for args, message in [(['nope'], "invalid choice: 'nope'"), (['--foo=1'], 'unrecognized arguments: --foo=1'),
                          (['--val_fraction=2'], 'between 0 and 1'), (['--tokenizer=bert'], 'unknown')]:
        r = run_cli('prepare.py', *args)
        assert r.returncode == 2 and message in r.stderr and r.stderr.count('\n') == 1, r.stderr


@pytest.mark.parametrize('flag, says', [
    ('--shard_tokens=0', "argument --shard_tokens: '0': expected an integer of at least 1"),  # wrote empty shards
    ('--shard_tokens=-1', "argument --shard_tokens: '-1': expected an integer of at least 1"),  # spun forever
    ('--shards=two', "argument --shards: 'two': expected an integer of at least 1"),
    ('--workers', 'argument --workers: expected one argument'),
    ('--workers=-2', "argument --workers: '-2': expected an integer of at least 0"),
    ('--val_fraction=abc', "argument --val_fraction: 'abc': expected a number between 0 and 1"),
    ('--allow_http=maybe', "argument --allow_http: 'maybe': expected true or false"),
    ('--out', 'argument --out: expected one argument'),
    ('--out=', "argument --out: '': expected a directory"),
])
def test_every_flag_is_checked_before_anything_is_written(flag, says, tmp_path):
    r = run_cli('prepare.py', 'shakespeare', flag, cwd=str(tmp_path))
    assert r.returncode == 2 and r.stderr.strip() == f'error: {says}; python prepare.py --help lists the datasets and ' \
        'flags' and os.listdir(tmp_path) == [], r.stderr


def test_allow_http_false_means_false(tmp_path):
    assert prepare.parse_flags(['--allow_http=false', '--shards=2']) == ('shakespeare', {'allow_http': False, 'shards': 2})
    assert prepare.parse_flags(['text', '--allow_http']) == ('text', {'allow_http': True})
    r = run_cli('prepare.py', 'text', '--input=http://127.0.0.1:9/corpus.txt', '--allow_http=false',
                '--tokenizer=byte', f'--out={tmp_path / "o"}')
    assert r.returncode == 2 and 'plain http can be tampered with' in r.stderr


def shard_bytes(tokens):
    header = np.zeros(256, '<i4')
    header[:3] = 20240520, 1, len(tokens)
    return header.tobytes() + np.asarray(tokens, '<u2').tobytes()


def test_fineweb_shards_download_and_header_check(hub, tmp_path):
    url, files = hub
    files.update({'fineweb_val_000000.bin': shard_bytes(np.arange(500)),
                  'fineweb_train_000001.bin': shard_bytes(np.arange(1000)),
                  'fineweb_train_000002.bin': shard_bytes(np.arange(700))})
    out = tmp_path / 'fw'
    r = run_cli('prepare.py', 'fineweb10B', '--shards=2', '--allow_http', f'--out={out}', env={'HF_ENDPOINT': url})
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ['.prepare.lock', 'meta.json', 'train_000001.bin', 'train_000002.bin', 'val_000000.bin']
    meta = json.load(open(out / 'meta.json'))
    assert meta['splits']['train']['tokens'] == 1700 and meta['splits']['val']['tokens'] == 500
    assert meta['sources'][0]['url'] == f'{url}/datasets/kjj0/fineweb10B-gpt2/resolve/main/fineweb_val_000000.bin'
    train, val, _ = tt.load_data(tt.validate(tt.Config(data=str(out), vocab_size=50257, seq_len=64)))
    assert train.count == (1000 - 64) + (700 - 64)
    files['fineweb_train_000003.bin'] = shard_bytes(np.arange(10))[:-4]  # truncated upstream
    r = run_cli('prepare.py', 'fineweb10B', '--shards=3', '--allow_http', f'--out={tmp_path / "bad"}', env={'HF_ENDPOINT': url})
    assert r.returncode == 2 and 'train_000003.bin: not a valid GPT-2 token shard' in r.stderr
    assert not os.path.exists(tmp_path / 'bad' / 'train_000003.bin')


def test_finewebedu_shards_download_under_their_hub_names(hub, tmp_path):
    """kjj0/finewebedu10B-gpt2 names its files finewebedu_*: before the fix nothing downloaded."""
    url, files = hub
    files.update({'finewebedu_val_000000.bin': shard_bytes(np.arange(300)),
                  'finewebedu_train_000001.bin': shard_bytes(np.arange(400))})
    out = tmp_path / 'edu'
    r = run_cli('prepare.py', 'finewebedu10B', '--allow_http', f'--out={out}', env={'HF_ENDPOINT': url})
    assert r.returncode == 0, r.stderr
    assert json.load(open(out / 'meta.json'))['splits']['train']['tokens'] == 400


def test_llmc_shard_directories_load_as_they_are(tmp_path, capsys):
    """llm.c / modded-nanogpt download directories: their names, no meta.json."""
    for name, n in [('fineweb_train_000001.bin', 600), ('fineweb_train_000002.bin', 500), ('fineweb_val_000000.bin', 300)]:
        (tmp_path / name).write_bytes(shard_bytes(np.arange(n)))
    train, val, meta = tt.load_data(tt.validate(tt.Config(data=str(tmp_path), seq_len=64)))
    assert train.count == (600 - 64) + (500 - 64) and val.count == 300 - 64
    assert (meta['tokenizer'], meta['vocab_size']) == ('gpt2', 50257)
    assert '16-bit shards are taken as GPT-2 tokens' in capsys.readouterr().out
    d = tmp_path / 'ts'
    d.mkdir()
    (d / 'TinyStories_train.bin').write_bytes(shard_bytes(np.arange(200)))
    (d / 'TinyStories_val.bin').write_bytes(shard_bytes(np.arange(100)))
    train, val, _ = tt.load_data(tt.validate(tt.Config(data=str(d), seq_len=16)))
    assert (train.count, val.count) == (200 - 16, 100 - 16)


def test_tinystories_download_and_tokenize(hub, tmp_path):
    url, files = hub
    stories = lambda n: ''.join(f'Once upon a time {i}.\n<|endoftext|>\n' for i in range(n)).encode()
    files.update({'TinyStoriesV2-GPT4-train.txt': stories(40), 'TinyStoriesV2-GPT4-valid.txt': stories(5)})
    out = tmp_path / 'ts'
    r = run_cli('prepare.py', 'tinystories', '--tokenizer=byte', '--allow_http', f'--out={out}', env={'HF_ENDPOINT': url})
    assert r.returncode == 0, r.stderr
    meta = json.load(open(out / 'meta.json'))
    val = np.asarray(tt.open_shard(str(out / 'val_000000.bin')))
    assert (val == 256).sum() == 5 and meta['splits']['val']['tokens'] == len(val)
    assert meta['sources'][1]['sha256'] == hashlib.sha256(stories(5)).hexdigest()
    assert val[0] == 256 and bytes(val[1:19].astype(np.uint8)) == b'Once upon a time 0'


def test_a_download_cut_by_a_kill_is_never_used(server, tmp_path):
    """A prepare.py killed while downloading leaves only its temporary file (.NAME.XXXX.tmp), never
    NAME: the next run removes it and downloads the whole file."""
    url, _ = server
    out = tmp_path / 'o'
    (out / 'raw').mkdir(parents=True)
    (out / 'raw' / '.ok.txt.abcd1234.tmp').write_bytes(CORPUS[:100])
    r = run_cli('prepare.py', 'text', f'--input={url}/ok.txt', '--allow_http', '--tokenizer=byte', f'--out={out}')
    assert r.returncode == 0, r.stderr
    assert (out / 'raw' / 'ok.txt').read_bytes() == CORPUS and os.listdir(out / 'raw') == ['ok.txt']


@pytest.mark.slow
def test_a_trickling_download_gives_up(server, tmp_path, monkeypatch):
    """One byte every 0.05 s: before the fix, it never ended (each read was within the timeout)."""
    url, _ = server
    monkeypatch.setattr(prepare, 'SLOW', (200, 1))  # 200 bytes a second at least
    t = time.time()
    with pytest.raises(prepare.PrepareError, match=r'trickle.txt: download failed \(slower than 200 bytes in 1s\)'):
        prepare.download(f'{url}/trickle.txt', str(tmp_path / 't.txt'), retries=1, allow_http=True)
    monkeypatch.setattr(prepare, 'SLOW', (1, 100))
    monkeypatch.setattr(prepare, 'DEADLINE', (1, 10**12))  # an overall deadline of 1 s
    with pytest.raises(prepare.PrepareError, match=r'download failed \(not finished after 1s'):
        prepare.download(f'{url}/trickle.txt', str(tmp_path / 't.txt'), retries=3, allow_http=True)
    assert time.time() - t < 15


def encoded(text, tokenizer='gpt2'):
    enc = prepare.get_encoding(tokenizer)
    return [enc.eot_token] + enc.encode_ordinary(text)


def shard_tokens(out, split):
    return np.concatenate([np.asarray(tt.open_shard(str(p))) for p in sorted(out.glob(f'{split}_*.bin'))]).tolist()


@needs_gpt2
def test_parallel_tokenization_equals_encoding_the_whole_text(tmp_path, monkeypatch, capsys):
    """~500 pieces of 2 KB, tokenized apart by 2 workers, give the tokens of one whole-text encode
    (before the fix, a cut after a newline split GPT-2's '\\n\\n' tokens)."""
    monkeypatch.setattr(prepare, 'CHUNK_BYTES', 2048)
    out = tmp_path / 'out'
    assert prepare.main(['text', f'--input={SHAKESPEARE}', f'--out={out}', '--workers=2', '--val_fraction=0.5']) == 0
    text = open(SHAKESPEARE, encoding='utf-8').read()
    half = int(len(text) * 0.5)
    assert shard_tokens(out, 'train') == encoded(text[:half]) and shard_tokens(out, 'val') == encoded(text[half:])


def test_byte_tokens_are_the_raw_bytes(tmp_path):
    """latin-1 text, invalid UTF-8, binary and UTF-16: byte tokens are exactly the file's bytes
    (before the fix they were decoded with errors='replace')."""
    data = 'café naïve — ø\n'.encode('latin-1', errors='replace') * 50 + bytes(range(256)) + '☃'.encode('utf-16')
    (tmp_path / 'in.bin').write_bytes(data)
    out = tmp_path / 'out'
    r = run_cli('prepare.py', 'text', f'--input={tmp_path / "in.bin"}', '--tokenizer=byte', f'--out={out}')
    assert r.returncode == 0, r.stderr
    cut = int(len(data) * 0.9)
    assert shard_tokens(out, 'train') == [256] + list(data[:cut]) and shard_tokens(out, 'val') == [256] + list(data[cut:])


@needs_gpt2
def test_bpe_refuses_text_that_is_not_utf8_and_splits_utf8_between_characters(tmp_path):
    text = 'Voilà, ça marche.\n' * 200
    (tmp_path / 'latin.txt').write_bytes(text.encode('latin-1'))
    r = run_cli('prepare.py', 'text', f'--input={tmp_path / "latin.txt"}', f'--out={tmp_path / "o"}')
    assert r.returncode == 2 and r.stderr.strip() == (
        f'error: {tmp_path / "latin.txt"}: not UTF-8 at byte 4; convert it first (iconv -f ENCODING -t UTF-8 '
        'FILE > FILE.txt) or pass --tokenizer=byte'), r.stderr
    data = text.encode('utf-8')
    (tmp_path / 'in.txt').write_bytes(data)
    fraction = (data.index('ç'.encode()) + 1) / len(data)  # the byte cut falls inside "ç"
    r = run_cli('prepare.py', 'text', f'--input={tmp_path / "in.txt"}', f'--val_fraction={1 - fraction}',
                f'--out={tmp_path / "u"}')
    assert r.returncode == 0, r.stderr
    cut = data.index('ç'.encode())  # moved back to where the character starts
    assert shard_tokens(tmp_path / 'u', 'train') == encoded(data[:cut].decode())
    assert shard_tokens(tmp_path / 'u', 'val') == encoded(data[cut:].decode())


def test_a_text_too_short_for_two_splits_is_refused_at_prepare_time(tmp_path):
    """An empty file gave rc 0 and "train 0 tokens"; tinytpu then called the meta.json damaged."""
    for content in (b'', b'a'):
        (tmp_path / 'in.txt').write_bytes(content)
        r = run_cli('prepare.py', 'text', f'--input={tmp_path / "in.txt"}', '--tokenizer=byte', f'--out={tmp_path / "o"}')
        assert r.returncode == 2 and r.stderr.count('\n') == 1 and 'in.txt: no text for the train split' in r.stderr
        assert not (tmp_path / 'o' / 'meta.json').exists()


def test_reprepare_keeps_only_what_meta_lists(tmp_path):
    """Fewer shards the second time: before the fix the old ones stayed and were trained on."""
    out = tmp_path / 'out'
    args = ['text', f'--input={SHAKESPEARE}', '--tokenizer=byte', f'--out={out}']
    assert run_cli('prepare.py', *args, '--shard_tokens=300000').returncode == 0
    assert sorted(p.name for p in out.glob('train_*.bin')) == [f'train_00000{i}.bin' for i in range(4)]
    r = run_cli('prepare.py', *args)
    assert r.returncode == 0 and 'preparing' in r.stdout and 'again' in r.stdout, r.stderr
    assert sorted(p.name for p in out.glob('*.bin')) == ['train_000000.bin', 'val_000000.bin']
    assert 'already prepared' in run_cli('prepare.py', *args).stdout
    # a stale shard that meta.json does not list is not trained on
    (out / 'train_000007.bin').write_bytes((out / 'train_000000.bin').read_bytes())
    train, _, _ = tt.load_data(tt.validate(tt.Config(data=str(out), seq_len=64)))
    assert len(train.shards) == 1


@needs_gpt2  # byte tokens are too quick to catch the workers at work
def test_workers_end_when_prepare_is_killed(tmp_path):
    """SIGKILL runs no clean-up: before the fix the tokenizer processes lived on, orphaned."""
    if not os.path.isdir('/proc'):
        pytest.skip('needs /proc (Linux)')
    (tmp_path / 'big.txt').write_bytes(CORPUS * 40)
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, 'prepare.py'), 'text', f'--input={tmp_path / "big.txt"}',
                          f'--out={tmp_path / "o"}', '--workers=2'], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def children():
        found = []
        for pid in filter(str.isdigit, os.listdir('/proc')):
            try:
                if int(open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[1]) == p.pid:
                    found.append(int(pid))
            except (OSError, IndexError, ValueError):
                pass
        return found

    deadline = time.time() + 60
    while len(workers := children()) < 2 and time.time() < deadline:
        time.sleep(0.2)
    assert len(workers) >= 2
    time.sleep(2)  # tokenizing now
    p.send_signal(signal.SIGKILL)
    p.wait()
    deadline = time.time() + 15
    while any(os.path.exists(f'/proc/{w}') for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(os.path.exists(f'/proc/{w}') for w in workers)


def test_a_full_disk_while_writing_shards_is_one_line_and_leaves_no_shard(tmp_path, monkeypatch, capsys):
    real = prepare.fresh_file

    class FullDisk:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 5000:
                raise OSError(28, 'No space left on device')
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def fresh_file(path):
        f, tmp = real(path)
        return (FullDisk(f) if path.endswith('.bin') else f), tmp

    monkeypatch.setattr(prepare, 'fresh_file', fresh_file)
    out = tmp_path / 'out'
    assert prepare.main(['text', f'--input={SHAKESPEARE}', '--tokenizer=byte', f'--out={out}']) == 2
    err = capsys.readouterr().err
    assert err.strip() == f'error: {out}/train_000000.bin: could not write (No space left on device); free some space ' \
                          'and run the same command again', err
    assert not list(out.glob('*.bin*')) and not list(out.glob('.*.tmp')) and not (out / 'meta.json').exists()


def test_out_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / 'notes').write_text('mine')
    r = run_cli('prepare.py', 'text', f'--input={SHAKESPEARE}', '--tokenizer=byte', f'--out={tmp_path / "notes"}')
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and 'notes' in r.stderr, r.stderr
    assert (tmp_path / 'notes').read_text() == 'mine'


# ----------------------------------------------------------------------------------------------
# One writer, whole files: a data directory is published whole or not at all.

MOBY = os.path.join(ROOT, 'tests', 'data', 'mobydick.txt')


def shards_agree_with_meta(out):
    """Every shard meta.json lists has the token count it records, and nothing else is a shard."""
    meta = json.loads((out / 'meta.json').read_text())
    for split, s in meta['splits'].items():
        assert sum(prepare.shard_header(str(out / n))[0] for n in s['shards']) == s['tokens'], split
    assert sorted(p.name for p in out.glob('*.bin')) == sorted(n for s in meta['splits'].values() for n in s['shards'])
    return meta


def test_two_prepares_on_one_directory_never_mix_their_data(tmp_path):
    """While one prepare.py holds a directory, a second stops at once (one line, exit 2) and
    changes nothing; started together, the data left is one run's whole, never a mix."""
    out = tmp_path / 'R'
    out.mkdir()
    with open(out / '.prepare.lock', 'w') as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a prepare.py working on it holds it
        r = run_cli('prepare.py', 'text', f'--input={SHAKESPEARE}', '--tokenizer=byte', f'--out={out}')
    assert r.returncode == 2 and 'being prepared by another prepare.py right now' in r.stderr, r.stderr
    assert r.stderr.count('\n') == 1 and sorted(os.listdir(out)) == ['.prepare.lock']
    args = [sys.executable, os.path.join(ROOT, 'prepare.py'), 'text', '--tokenizer=byte', f'--out={out}']
    first = subprocess.Popen(args + [f'--input={MOBY}'], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.05)
    second = subprocess.Popen(args + [f'--input={SHAKESPEARE}'], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    codes = [first.wait(120), second.wait(120)]
    assert 0 in codes and all(c in (0, 2) for c in codes), (codes, first.stderr.read(), second.stderr.read())
    meta = shards_agree_with_meta(out)
    assert meta['request']['input'] == (SHAKESPEARE if codes[1] == 0 else MOBY)  # the last to succeed


def test_a_trained_tokenizer_reused_into_its_own_directory(tmp_path):
    """--tokenizer=D --out=D: D's tokenizer is read and checked before anything in D changes, and
    the new shards are tokenized with it."""
    pytest.importorskip('rustbpe', reason='rustbpe trains the tokenizer (pip install rustbpe)')
    d = tmp_path / 'D'
    assert prepare.main(['text', f'--input={MOBY}', '--tokenizer=bpe:300', f'--out={d}']) == 0
    before = json.loads((d / 'meta.json').read_text())
    assert prepare.main(['text', f'--input={SHAKESPEARE}', f'--tokenizer={d}', f'--out={d}']) == 0
    meta = shards_agree_with_meta(d)
    assert meta['tokenizer_sha256'] == before['tokenizer_sha256'] and meta['vocab_size'] == 300
    assert meta['request']['input'] == SHAKESPEARE and (d / 'tokenizer.tiktoken').is_file()
    enc = prepare.load_encoding(meta, str(d))
    tokens = tt.open_shard(str(d / meta['splits']['val']['shards'][0]))
    assert enc.decode(list(tokens[1:200])) in open(SHAKESPEARE).read()


def test_no_file_is_written_through_a_link_left_where_a_temporary_name_used_to_be(hub, tmp_path):
    """Every file is written under a fresh name created exclusively, then renamed: links planted
    at the old fixed temporary names (and at a download's .part) are never written through."""
    pytest.importorskip('rustbpe', reason='rustbpe trains the tokenizer (pip install rustbpe)')
    victim = tmp_path / 'victim'
    victim.write_bytes(b'precious')
    out = tmp_path / 'D'
    (out / 'raw').mkdir(parents=True)
    for name in ('meta.json.tmp', 'tokenizer.tiktoken.tmp', 'train_000000.bin.tmp', 'val_000000.bin.tmp'):
        (out / name).symlink_to(victim)
    assert prepare.main(['text', f'--input={SHAKESPEARE}', '--tokenizer=bpe:300', f'--out={out}']) == 0
    assert victim.read_bytes() == b'precious'
    assert not (out / 'meta.json').is_symlink() and not (out / 'tokenizer.tiktoken').is_symlink()
    shards_agree_with_meta(out)
    url, files = hub
    files['f.txt'] = b'hello world\n'
    (tmp_path / 'dl').mkdir()
    for name in ('f.txt.part', 'f.txt.part.json'):  # where downloads used to go
        (tmp_path / 'dl' / name).symlink_to(victim)
    prepare.download(f'{url}/cdn/f.txt', str(tmp_path / 'dl' / 'f.txt'), allow_http=True)
    assert victim.read_bytes() == b'precious' and (tmp_path / 'dl' / 'f.txt').read_bytes() == b'hello world\n'


def test_text_is_prepared_into_a_directory_named_after_its_input(tmp_path, monkeypatch):
    """`prepare.py text` twice on two texts: two directories, the second does not replace the first."""
    monkeypatch.chdir(tmp_path)
    assert prepare.main(['text', f'--input={MOBY}', '--tokenizer=byte']) == 0
    assert prepare.main(['text', f'--input={SHAKESPEARE}', '--tokenizer=byte']) == 0
    assert sorted(os.listdir(tmp_path / 'data')) == ['mobydick_byte', 'tinyshakespeare_byte']
    assert '--shard_tokens' in run_cli('prepare.py', '--help').stdout
