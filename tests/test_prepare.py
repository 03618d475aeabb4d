"""prepare.py against a local HTTP server (never the network): downloads with resume, retries and
clear failures; token counts; the byte tokenizer; outputs that tinytpu's loader reads."""
import hashlib
import http.server
import json
import os
import threading

import numpy as np
import pytest

import prepare
import tinytpu as tt
from conftest import SHAKESPEARE, run_cli

CORPUS = (open(SHAKESPEARE, 'rb').read() if os.path.exists(SHAKESPEARE)
          else b'First Citizen:\nBefore we proceed any further, hear me speak.\n' * 20000)


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
        if self.path not in ('/ok.txt', '/drop.txt', '/flaky.txt'):
            self.send_error(404)
            return
        start = int(self.headers['Range'][6:-1]) if self.headers.get('Range') else 0
        body = CORPUS[start:]
        self.send_response(206 if start else 200)
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
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}', Handler.state
    httpd.shutdown()


def test_download_follows_redirects_and_verifies(server, tmp_path):
    url, state = server
    sha = hashlib.sha256(CORPUS).hexdigest()
    path = str(tmp_path / 'a.txt')
    assert prepare.download(f'{url}/redirect.txt', path, sha, allow_http=True) == sha
    assert open(path, 'rb').read() == CORPUS
    with pytest.raises(prepare.PrepareError, match='does not match the expected'):
        prepare.download(f'{url}/ok.txt', str(tmp_path / 'b.txt'), '0' * 64, allow_http=True)
    assert not os.path.exists(tmp_path / 'b.txt') and not os.path.exists(tmp_path / 'b.txt.part')


def test_dropped_connection_resumes_with_range(server, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare.time, 'sleep', lambda s: None)
    url, state = server
    path = str(tmp_path / 'c.txt')
    prepare.download(f'{url}/drop.txt', path, hashlib.sha256(CORPUS).hexdigest(), allow_http=True)
    assert open(path, 'rb').read() == CORPUS
    ranges = [r for p, r in state['requests'] if p == '/drop.txt']
    assert ranges[0] is None and ranges[1].startswith('bytes=') and 0 < int(ranges[1][6:-1]) <= len(CORPUS) // 2


def test_server_error_is_retried(server, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare.time, 'sleep', lambda s: None)
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


@pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason='needs ../shared/data/tinyshakespeare.txt')
def test_shakespeare_gpt2_counts_match_nanogpt(tmp_path):
    out = tmp_path / 'shakespeare'
    r = run_cli('prepare.py', 'shakespeare', f'--input={SHAKESPEARE}', f'--out={out}')
    assert r.returncode == 0, r.stderr
    meta = json.load(open(out / 'meta.json'))
    assert meta['splits']['train']['tokens'] == 301966 and meta['splits']['val']['tokens'] == 36059
    assert (meta['tokenizer'], meta['vocab_size'], meta['eot_id'], meta['dtype']) == ('gpt2', 50257, 50256, 'uint16')
    c = tt.validate(tt.Config(data=str(out), vocab_size=50257, seq_len=64))
    train, val, loaded = tt.load_data(c)
    assert train.count == 301966 - 64 and loaded == meta
    assert abs(meta['bytes_per_token'] - 111540 / 36059) < 1e-9
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
    assert (train == 256).sum() == 7 and (val == 256).sum() == 1  # 8 + 2 documents
    assert bytes(train[:11].astype(np.uint8)) == b'document 0\n'


def test_tinystories_style_eot_split_and_sharding(tmp_path, monkeypatch):
    stories = ''.join(f'Story {i} begins.\nIt ends.\n<|endoftext|>\n' for i in range(300))
    f = tmp_path / 'stories.txt'
    f.write_text(stories)
    monkeypatch.setattr(prepare, 'CHUNK_BYTES', 500)  # many chunks, so boundaries are exercised
    writer = prepare.ShardWriter(str(tmp_path), 'train', np.uint16, shard_tokens=3000)
    prepare.tokenize(prepare.chunked(prepare.read_documents([str(f)], True), 500), 'byte', writer, workers=2)
    paths = writer.close()
    assert len(paths) == 3 and [len(tt.open_shard(p)) for p in paths[:2]] == [3000, 3000]
    tokens = np.concatenate([np.asarray(tt.open_shard(p)) for p in paths])
    docs = bytes(np.where(tokens == 256, ord('|'), tokens).astype(np.uint8)).decode().split('|')
    assert docs == [f'Story {i} begins.\nIt ends.' for i in range(300)]


def test_bad_flags_and_unknown_dataset():
    for args, message in [(['nope'], 'unknown dataset'), (['--foo=1'], 'unknown flag'),
                          (['--val_fraction=2'], 'between 0 and 1'), (['--tokenizer=bert'], 'unknown')]:
        r = run_cli('prepare.py', *args)
        assert r.returncode == 2 and message in r.stderr and r.stderr.count('\n') == 1, r.stderr


@pytest.mark.parametrize('flag, says', [
    ('--shard_tokens=0', '--shard_tokens=0: must be at least 1'),     # wrote empty shards until the disk filled
    ('--shard_tokens=-1', '--shard_tokens=-1: must be at least 1'),   # spun forever
    ('--shards=two', '--shards=two: expected an integer'),
    ('--workers', '--workers needs a value: --workers=...'),
    ('--workers=-2', '--workers=-2: must be at least 0 (0 = one per core)'),
    ('--val_fraction=abc', '--val_fraction=abc: expected a number'),
    ('--allow_http=maybe', '--allow_http=maybe: expected true or false'),
    ('--out', '--out needs a value: --out=...'),
])
def test_every_flag_is_checked_before_anything_is_written(flag, says, tmp_path):
    r = run_cli('prepare.py', 'shakespeare', flag, cwd=str(tmp_path))
    assert r.returncode == 2 and r.stderr.strip() == f'error: {says}' and os.listdir(tmp_path) == [], r.stderr


def test_allow_http_false_means_false(tmp_path):
    assert prepare.parse_flags(['--allow_http=false', '--shards=2']) == {'allow_http': False, 'shards': 2}
    r = run_cli('prepare.py', 'text', '--input=http://127.0.0.1:9/corpus.txt', '--allow_http=false',
                '--tokenizer=byte', f'--out={tmp_path / "o"}')
    assert r.returncode == 2 and 'plain http can be tampered with' in r.stderr


class HubHandler(http.server.BaseHTTPRequestHandler):
    """A stand-in for huggingface.co with the real URL layout: /datasets/<repo>/resolve/main/<file>
    answers a 302 to /cdn/<file>, as the Hub does, which serves the bytes."""
    files = {}

    def do_GET(self):
        if '/resolve/main/' in self.path:
            self.send_response(302)
            self.send_header('Location', '/cdn/' + self.path.split('/resolve/main/')[1])
            self.end_headers()
            return
        body = self.files.get(self.path[len('/cdn/'):])
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub():
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), HubHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}', HubHandler.files
    httpd.shutdown()


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
    r = run_cli('prepare.py', 'fineweb10B', '--shards=2', f'--mirror={url}', '--allow_http', f'--out={out}')
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ['meta.json', 'train_000001.bin', 'train_000002.bin', 'val_000000.bin']
    meta = json.load(open(out / 'meta.json'))
    assert meta['splits']['train']['tokens'] == 1700 and meta['splits']['val']['tokens'] == 500
    assert meta['sources'][0]['url'] == f'{url}/datasets/kjj0/fineweb10B-gpt2/resolve/main/fineweb_val_000000.bin'
    train, val, _ = tt.load_data(tt.validate(tt.Config(data=str(out), vocab_size=50257, seq_len=64)))
    assert train.count == (1000 - 64) + (700 - 64)
    files['fineweb_train_000003.bin'] = shard_bytes(np.arange(10))[:-4]  # truncated upstream
    r = run_cli('prepare.py', 'fineweb10B', '--shards=3', f'--mirror={url}', '--allow_http', f'--out={tmp_path / "bad"}')
    assert r.returncode == 2 and 'train_000003.bin: not a valid GPT-2 token shard' in r.stderr
    assert not os.path.exists(tmp_path / 'bad' / 'train_000003.bin')


def test_tinystories_download_and_tokenize(hub, tmp_path):
    url, files = hub
    stories = lambda n: ''.join(f'Once upon a time {i}.\n<|endoftext|>\n' for i in range(n)).encode()
    files.update({'TinyStoriesV2-GPT4-train.txt': stories(40), 'TinyStoriesV2-GPT4-valid.txt': stories(5)})
    out = tmp_path / 'ts'
    r = run_cli('prepare.py', 'tinystories', '--tokenizer=byte', f'--mirror={url}', '--allow_http', f'--out={out}')
    assert r.returncode == 0, r.stderr
    meta = json.load(open(out / 'meta.json'))
    val = np.asarray(tt.open_shard(str(out / 'val_000000.bin')))
    assert (val == 256).sum() == 4 and meta['splits']['val']['tokens'] == len(val)
    assert meta['sources'][1]['sha256'] == hashlib.sha256(stories(5)).hexdigest()
    assert bytes(val[:18].astype(np.uint8)) == b'Once upon a time 0'
