"""Shared fixtures: a tiny config, a tiny byte-level data set, the text the tests train on (in the
repository: the suite needs nothing beside the checkout), GPT-2's BPE files where a tiktoken cache
has them, and a local stand-in for the Hugging Face Hub."""
import contextlib
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import types

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # libtpu may be installed (test_tpu compiles with it): run on CPU
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # test_tpu's compiles may overlap under pytest -n
# One compilation cache for the whole session, this process's and every `python tinytpu.py` it
# starts: the tests compile the same tiny steps many times over (each CLI run, each new config), and
# a cached executable is the one XLA would compile again. Gone with the session; set
# JAX_COMPILATION_CACHE_DIR yourself to keep one between sessions.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    COMPILE_CACHE = os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='tinytpu-tests-jax-cache-')
    os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
    os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
else:
    COMPILE_CACHE = None
# XLA's CPU backend at optimization level 0, here and in every process the tests start: their
# models are tiny, so compiling is most of their time, and unoptimized machine code compiles in a
# quarter less CPU time (the suite runs a fifth faster). The program is the same HLO; its machine
# code may round a last bit otherwise than a user's run, which no test compares against bit for bit.
USER_XLA_FLAGS = os.environ.get('XLA_FLAGS', '')
os.environ['XLA_FLAGS'] = (USER_XLA_FLAGS + ' --xla_backend_optimization_level=0').strip()
# For the few computations of the tests' own that spend their time running, not compiling
# (a vocabulary of 50,257 logits): jax.jit at the optimization level a user's run compiles at.
OPTIMIZED = {'xla_backend_optimization_level': 2}
SHAKESPEARE = os.path.join(ROOT, 'tests', 'data', 'tinyshakespeare.txt')  # public domain, 1.1 MB


def pytest_unconfigure(config):
    if COMPILE_CACHE and not hasattr(config, 'workerinput'):  # pytest -n: the workers share it
        shutil.rmtree(COMPILE_CACHE, ignore_errors=True)


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: takes seconds of training, compiling or subprocesses; '
                                       'python -m pytest -m "not slow" tests runs the rest, the fast tier; '
                                       'slow(seconds=N) for the few of a minute or so, which run first')


def pytest_collection_modifyitems(items):
    """The tests marked slow(seconds=N) first, longest first, the rest in their files' order: under
    pytest -n 2 a minute-long test that started last would keep one worker busy while the other
    waits. (Only tests without module-scoped fixtures carry the mark: moving them costs nothing.)"""
    def seconds(item):
        mark = item.get_closest_marker('slow')
        return mark.kwargs.get('seconds', 0) if mark else 0
    items.sort(key=lambda item: -seconds(item))


def gpt2_files_cached():
    """Whether tiktoken's cache holds GPT-2's two BPE files (named by the SHA-1 of their URLs, in
    $TIKTOKEN_CACHE_DIR, else tiktoken's default): tests never download them."""
    cache = os.environ.get('TIKTOKEN_CACHE_DIR') or os.environ.get('DATA_GYM_CACHE_DIR') or \
        os.path.join(tempfile.gettempdir(), 'data-gym-cache')
    base = 'https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/'
    return all(os.path.isfile(os.path.join(cache, hashlib.sha1((base + name).encode()).hexdigest()))
               for name in ('vocab.bpe', 'encoder.json'))


needs_gpt2 = pytest.mark.skipif(not gpt2_files_cached(), reason="needs GPT-2's BPE files in a tiktoken cache "
                                '(set TIKTOKEN_CACHE_DIR to a directory holding them); tests never download')

import tinytpu as tt  # noqa: E402

# The tests' own process has one CPU device, whichever test runs first: tt.main asks for
# --cpu_devices (2 by default), which JAX grants until its backend starts, so it starts here.
# What runs on several devices runs in processes of its own, as a user's run would.
tt.use_cpu_devices(1)
assert len(tt.jax.devices()) == 1

# The model's forward compiled whole, for tests that compare its logits with a reference: op by op,
# compiling each op takes longer than the test
forward = tt.jax.jit(tt.forward, static_argnames='c')


def tiny_config(**kw):
    """A 2-layer model small enough to train for a few steps in a second or two."""
    base = dict(preset='cpu', n_layer=2, d_model=32, n_head=4, n_kv_head=2, vocab_size=257, context=32,
                seq_len=16, batch_size=4, grad_accum=1, steps=8, lr=3e-3, warmup_steps=2, eval_every=4, eval_batches=2,
                log_every=2, ckpt_every=4, keep_ckpts=2, seed=0)
    base['lr_width'] = kw.get('d_model', base['d_model'])  # --lr as given, whatever the width
    base['embed_lr'] = kw.get('lr', base['lr'])  # and beside Muon, AdamW's rate for the embedding too
    return tt.validate(tt.Config(**{**base, **kw}))


def write_shard(path, tokens, magic=20240520, version=1, dtype=np.uint16, count=None):
    header = np.zeros(256, '<i4')
    header[:3] = magic, version, len(tokens) if count is None else count
    with open(path, 'wb') as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype).tobytes())


@pytest.fixture
def byte_data(tmp_path):
    """Byte-level Shakespeare (first 60 KB train, next 10 KB val) in the shard format."""
    return byte_shards(tmp_path / 'data', SHAKESPEARE)


def byte_shards(d, text_file, train_bytes=60000, val_bytes=10000):
    """A data directory of a text's first 60 KB (train) and next 10 KB (val) as byte tokens. -> its path"""
    text = open(text_file, 'rb').read()
    d.mkdir()
    write_shard(d / 'train_000000.bin', np.frombuffer(text[:train_bytes], np.uint8))
    write_shard(d / 'val_000000.bin', np.frombuffer(text[train_bytes:train_bytes + val_bytes], np.uint8))
    (d / 'meta.json').write_text('{"tokenizer": "byte", "vocab_size": 257, "eot_id": 256, "bytes_per_token": 1.0}')
    return str(d)


def run_cli(*args, cwd=ROOT, timeout=600, optimized=False, env=None):
    """Run `python tinytpu.py ARGS` (or prepare.py when args[0] ends in .py) as a user would, with
    `env` added to the environment; optimized=True compiles as a user's run does, for one that
    spends its time training."""
    script = args[0] if args and args[0].endswith('.py') else 'tinytpu.py'
    rest = args[1:] if script == args[0] else args
    env = dict(os.environ, **(env or {}), **({'XLA_FLAGS': USER_XLA_FLAGS} if optimized else {}))
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *rest], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


MANY = """
import contextlib, io, json, os, sys
sys.path.insert(0, sys.argv[1])
import tinytpu as tt
tt.use_cpu_devices(int(sys.argv[2]))
assert len(tt.jax.devices()) == int(sys.argv[2])  # started: each run's --cpu_devices takes a share
results = []
for argv, env in json.loads(sys.argv[3]):
    os.environ.update(env)
    if sys.argv[4] == 'fresh':
        tt.jax.clear_caches()  # each run traces its functions anew
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = tt.main(argv)
    results.append({'returncode': code, 'stdout': out.getvalue(), 'stderr': err.getvalue()})
print(json.dumps(results))
"""


def run_cli_many(*argvs, devices=8, program=ROOT, envs=None, fresh=False, timeout=600):
    """Several command lines run as `python tinytpu.py ARGS` would run them, one after another in
    one new process of `devices` CPU devices, each taking the first --cpu_devices of them: what
    separate processes print and write, without a process start and JAX's import for each, and a
    command compiled once for all the runs of the same shape. program: the directory of the
    tinytpu.py to run; envs: variables to set before each run; fresh: each run traces (and
    compiles) anew, as in a process of its own. -> [.returncode, .stdout, .stderr]"""
    runs = [(list(map(str, a)), e) for a, e in zip(argvs, envs or [{}] * len(argvs), strict=True)]
    r = subprocess.run([sys.executable, '-c', MANY, program, str(devices), json.dumps(runs),
                        'fresh' if fresh else 'shared'],
                       cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return [types.SimpleNamespace(**x) for x in json.loads(r.stdout.splitlines()[-1])]


def train(c):
    """What `python tinytpu.py` runs (main): Part I's train loop with Part II's TrainingRun."""
    return tt.train(c, tt.TrainingRun(c))


def save_checkpoint(out, state, c, extra):
    """A checkpoint as TrainingRun.save keeps it: Part I's write_checkpoint, then retention."""
    path = tt.write_checkpoint(out, state, c, extra)
    tt.keep_newest(out, path, c.keep_ckpts)
    return path


def load_checkpoint(path, template):
    """A checkpoint as restore reads it: checked, then Part I's read_checkpoint."""
    tt.check_checkpoint(path, tt.read_checkpoint_meta(path), template)
    return tt.read_checkpoint(path, template)


def run_main(capsys, *args):
    """tt.main(args) in this process, as run_cli runs the command line in a new one, for what needs
    no process of its own (one-line errors, plan): -> .returncode, .stdout, .stderr"""
    code = tt.main(list(args))
    out = capsys.readouterr()
    return types.SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


class HubHandler(http.server.BaseHTTPRequestHandler):
    """A stand-in for huggingface.co with the real URL layout: /datasets/<repo>/resolve/main/<file>
    answers a 302 to /cdn/<file>, as the Hub does, which serves the bytes, with Range requests.
    `seen` logs (file, Range header) per request; `hold` = (file, event): that file's first
    whole-file answer stops halfway until the event is set (a download killed mid-file)."""
    files, seen, hold = {}, [], None

    def do_GET(self):
        if '/resolve/main/' in self.path:
            self.send_response(302)
            self.send_header('Location', '/cdn/' + self.path.split('/resolve/main/')[1])
            self.end_headers()
            return
        name = self.path[len('/cdn/'):]
        body = self.files.get(name)
        if body is None:
            self.send_error(404)
            return
        asked = self.headers.get('Range')
        self.seen.append((name, asked))
        start = int(asked[6:-1]) if asked else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header('Content-Range', f'bytes {start}-{len(body) - 1}/{len(body)}')
        self.send_header('Content-Length', str(len(body) - start))
        self.send_header('ETag', '"%s"' % hashlib.sha256(body).hexdigest()[:16])
        self.end_headers()
        if self.hold and self.hold[0] == name and not start:
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.hold[1].wait(60)
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serving(handler):
    """An HTTP server on 127.0.0.1 answering with `handler`, for as long as the block lasts. -> its URL"""
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f'http://127.0.0.1:{httpd.server_address[1]}'
    finally:
        httpd.shutdown()


@pytest.fixture
def hub():
    """(its URL, the files it serves: name -> bytes), on 127.0.0.1 for this test only."""
    HubHandler.files, HubHandler.seen, HubHandler.hold = {}, [], None
    with serving(HubHandler) as url:
        yield url, HubHandler.files
