"""Runs kept in a Cloud Storage bucket (--out=gs://...), against a real GCS API server on
127.0.0.1 (gcp-storage-emulator): a run killed with its disk lost resumes from the bucket, bitwise;
half-uploaded checkpoints are never loaded; one run per bucket path; a bucket that stops
answering is retried. tinytpu is given nothing but STORAGE_EMULATOR_HOST, as a user would."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import tinytpu as tt
from conftest import ROOT, run_cli, run_main, tiny_config, train

storage = pytest.importorskip('google.cloud.storage', reason='google-cloud-storage is an optional extra')
emulator = pytest.importorskip('gcp_storage_emulator.server', reason='the tests need gcp-storage-emulator')

TINY = ['--n_layer=2', '--d_model=32', '--n_head=2', '--n_kv_head=1', '--seq_len=16', '--context=16',
        '--batch_size=4', '--eval_batches=2', '--log_every=2', '--eval_every=50', '--ckpt_every=50', '--lr=3e-3',
        '--warmup_steps=2', '--cpu_devices=1']  # one device: a fifth less CPU than two for a model this small


@pytest.fixture
def bucket(monkeypatch, tmp_path):
    """A fresh emulator with a bucket `runs`; the environment says where (and where local copies go)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    server = emulator.create_server('localhost', port, in_memory=True, default_bucket='runs')
    server.start()
    monkeypatch.setenv('STORAGE_EMULATOR_HOST', f'http://localhost:{port}')
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    yield storage.Client().bucket('runs')
    server.stop()


def names(bucket, prefix):
    return sorted(b.name for b in bucket.client.list_blobs(bucket, prefix=prefix))


def cli(data, out, steps, *extra):
    return [sys.executable, os.path.join(ROOT, 'tinytpu.py'), f'--data={data}', f'--out={out}', f'--steps={steps}',
            *TINY, *extra]


def final_params(out):
    path = tt.list_checkpoints(out)[-1][1]
    with np.load(os.path.join(path, 'state.npz')) as f:
        return {k: f[k] for k in f.files}


def losses(out):
    return [(r['step'], r['loss']) for r in map(json.loads, open(os.path.join(out, 'log.jsonl'))) if 'loss' in r]


@pytest.mark.slow
def test_a_run_killed_with_its_disk_lost_resumes_from_the_bucket_bitwise(byte_data, tmp_path, bucket):
    steps = 600
    r = subprocess.run(cli(byte_data, tmp_path / 'whole', steps), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out, local = 'gs://runs/spot/run1', tmp_path / 'cache' / 'tinytpu' / 'runs' / 'spot' / 'run1'
    p = subprocess.Popen(cli(byte_data, out, steps), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    for line in p.stdout:
        if line.startswith('uploaded ckpt_'):  # the first checkpoint is in the bucket
            break
    p.send_signal(signal.SIGKILL)  # no clean-up at all; then the VM is gone with its disk
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    shutil.rmtree(local)
    r = subprocess.run(cli(byte_data, out, steps), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert 'downloaded ckpt_' in r.stdout and f'uploaded ckpt_{steps:08d} to {out}' in r.stdout
    a, b = final_params(str(tmp_path / 'whole')), final_params(str(local))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    shutil.rmtree(local)  # and what the bucket holds is the whole run: its log too
    r = run_cli('sample', f'--out={out}', '--max_new_tokens=5')
    assert r.returncode == 0, r.stderr
    assert losses(str(tmp_path / 'whole')) == losses(str(local))
    held = names(bucket, 'spot/run1/')  # the last two, whole (and the one before the warmdown if it was written
    steps_held = {n.split('/')[2] for n in held if n.split('/')[2].startswith('ckpt_')}  # after the kill)
    last_two, before_warmdown = {f'ckpt_{s:08d}' for s in (steps - 50, steps)}, f'ckpt_{steps // 2:08d}'
    assert last_two <= steps_held <= last_two | {before_warmdown}
    assert held == sorted([f'spot/run1/{s}/{f}' for s in steps_held for f in ('meta.json', 'state.npz')] +
                          ['spot/run1/log.jsonl'])


@pytest.mark.slow
def test_a_half_uploaded_checkpoint_is_never_loaded_and_is_cleaned(byte_data, tmp_path, bucket, capsys):
    out = 'gs://runs/half'
    train(tiny_config(data=byte_data, out=out, steps=4, ckpt_every=4, warmdown_frac=0.0))
    local = tt.local_copy(out)
    shutil.rmtree(local)
    bucket.blob('half/ckpt_00000008/state.npz').upload_from_string(b'the first part of an upload')  # no meta.json
    capsys.readouterr()
    train(tiny_config(data=byte_data, out=out, steps=6, ckpt_every=4, warmdown_frac=0.0))
    assert f'resuming from {os.path.join(local, "ckpt_00000004")}' in capsys.readouterr().out
    assert 'half/ckpt_00000008/state.npz' not in names(bucket, 'half/')


@pytest.mark.slow
def test_one_run_per_bucket_path_and_a_stale_lock_is_taken_over(byte_data, bucket, capsys):
    out = 'gs://runs/locked'
    lock = bucket.blob('locked/.lock')
    lock.upload_from_string(json.dumps({'host': 'vm-1', 'pid': 42, 'time': time.time()}))
    r = run_main(capsys, f'--data={byte_data}', f'--out={out}', '--steps=2', *TINY)
    assert r.returncode == 2 and r.stderr.count('\n') == 1, r.stderr
    assert f'--out={out} is in use by another training run (host vm-1, pid 42' in r.stderr
    assert names(bucket, 'locked/') == ['locked/.lock']
    lock.upload_from_string(json.dumps({'host': 'vm-1', 'pid': 42, 'time': time.time() - 3600}))  # a dead VM's
    r = run_main(capsys, f'--data={byte_data}', f'--out={out}', '--steps=2', *TINY)
    assert r.returncode == 0 and 'taking over the lock of a run that stopped 36' in r.stdout, r.stderr
    lock.upload_from_string(json.dumps({'host': socket.gethostname(), 'pid': 2**22 + 7, 'time': time.time()}))
    r = run_main(capsys, f'--data={byte_data}', f'--out={out}', '--steps=4', *TINY)  # this machine's, its process gone
    assert r.returncode == 0 and 'taking over the lock of a run that stopped (its process is gone)' in r.stdout, r.stderr
    assert 'locked/.lock' not in names(bucket, 'locked/')  # released at the end


@pytest.mark.slow
def test_a_bucket_that_stops_answering_is_retried_and_said(byte_data, bucket, monkeypatch, capsys):
    real, failures = tt.Bucket.upload, []

    def flaky(self, path, name):
        if len(failures) < 2:
            failures.append(name)
            raise tt.BucketDown(f'upload {name}: ConnectionError: the emulator is down')
        return real(self, path, name)

    monkeypatch.setattr(tt.Bucket, 'upload', flaky)
    monkeypatch.setattr(tt.time, 'sleep', lambda s: None)  # no real waiting between tries
    # one checkpoint (no warmdown, so none before it): which one the background upload meets first
    # must not depend on how fast the steps run (the warmdown's, at step 2, was met first under load)
    train(tiny_config(data=byte_data, out='gs://runs/flaky', steps=4, ckpt_every=4, warmdown_frac=0.0))
    err, out = capsys.readouterr()[::-1]
    assert err.count('could not upload ckpt_00000004/state.npz (upload ckpt_00000004/state.npz: ConnectionError') == 2
    assert 'trying again in 1s' in err and 'trying again in 2s' in err
    assert 'uploaded ckpt_00000004 to gs://runs/flaky' in out
    assert 'flaky/ckpt_00000004/meta.json' in names(bucket, 'flaky/')


@pytest.mark.slow
def test_bench_history_and_plots_in_a_bucket(byte_data, tmp_path, bucket):
    out = 'gs://runs/hist'
    tt.record_bench(tiny_config(out=out), {'chip': 'v5e', 'mfu': 0.25})
    tt.record_bench(tiny_config(out=out), {'chip': 'v5e', 'mfu': 0.3})
    assert tt.bench_mfu(tiny_config(out=out), tt.chip_named('v5e'))[0] == 0.3
    pytest.importorskip('matplotlib')
    train(tiny_config(data=byte_data, out=out, steps=4))
    shutil.rmtree(tt.local_copy(out))
    assert tt.main(['plot', f'--out={out}', f'--plot_file={tmp_path / "loss.png"}']) == 0
    assert (tmp_path / 'loss.png').exists()


def test_without_google_cloud_storage_one_line_says_what_to_install(byte_data, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'google.cloud', None)
    assert tt.main([f'--data={byte_data}', '--out=gs://runs/x', '--steps=2', *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['error: gs://runs/x: a Cloud Storage path needs an optional extra: pip install google-cloud-storage']


def test_a_missing_bucket_is_one_line_naming_it(byte_data, bucket, capsys):
    """As a new user meets it, following the README before creating the bucket: for --out (whose
    first write is the lock) and for --data (whose meta.json is not there either)."""
    r = run_cli(f'--data={byte_data}', '--out=gs://try/run', '--steps=2', *TINY)
    assert r.returncode == 2 and r.stderr.count('\n') == 1, r.stderr
    assert 'gs://try/run: no such bucket; create it: gcloud storage buckets create gs://try' in r.stderr
    assert tt.main(['--data=gs://nosuchbucket/d', '--out=out', '--steps=2', *TINY]) == 2
    assert capsys.readouterr().err.strip() == ('error: gs://nosuchbucket/d: no such bucket; create it: gcloud storage '
                                               "buckets create gs://nosuchbucket --location=REGION (the TPU's region)")


def test_a_bucket_that_does_not_answer_at_start_says_so_at_once_and_ends_in_one_line(byte_data, monkeypatch, capsys):
    """Nothing listens at the bucket's address: each try is said as it fails, and after
    BUCKET_PATIENCE seconds the run stops in one line (exit 2), for --out and for --data."""
    monkeypatch.setenv('STORAGE_EMULATOR_HOST', 'http://127.0.0.1:9')
    monkeypatch.setattr(tt, 'BUCKET_PATIENCE', 2)
    for flags in ([f'--data={byte_data}', '--out=gs://runs/x'], ['--data=gs://runs/d', '--out=out']):
        t = time.time()
        assert tt.main([*flags, '--steps=2', *TINY]) == 2
        assert time.time() - t < 30
        err = capsys.readouterr().err.strip().splitlines()
        assert 'trying again in 1s' in err[0], err
        assert err[-1].startswith('error: gs://runs/') and 'check the network (or STORAGE_EMULATOR_HOST)' in err[-1]


@pytest.mark.slow
def test_the_log_in_the_bucket_reaches_its_newest_checkpoint(byte_data, bucket, monkeypatch):
    """A checkpoint counts in the bucket once its meta.json is there; the log goes up before it, so
    a run killed between the two leaves a log that reaches the newest whole checkpoint."""
    real, order = tt.Bucket.upload, []
    monkeypatch.setattr(tt.Bucket, 'upload', lambda self, path, name: (order.append(name), real(self, path, name)))
    train(tiny_config(data=byte_data, out='gs://runs/order', steps=4, ckpt_every=2, warmdown_frac=0.0))
    for step in (2, 4):
        meta = order.index(f'ckpt_{step:08d}/meta.json')
        assert 'log.jsonl' in order[order.index(f'ckpt_{step:08d}/state.npz'):meta], order


def upload(directory, bucket, prefix):
    """What `gcloud storage rsync -r DIR gs://runs/PREFIX -x "^raw/"` does (the README's upload)."""
    for name in sorted(os.listdir(directory)):
        if os.path.isfile(os.path.join(directory, name)):
            bucket.blob(f'{prefix}/{name}').upload_from_filename(os.path.join(directory, name))


@pytest.mark.slow
def test_data_in_a_bucket_is_copied_once_and_a_changed_file_again(tmp_path, bucket, capsys):
    """Data prepared here and uploaded as it is: a VM training on --data=gs://... copies each file
    meta.json lists once (checked against the bucket's CRC32C) and trains as on local data; a
    local copy that no longer matches the bucket (the data prepared again, same sizes) is copied
    again, never trusted for its size."""
    import prepare
    from conftest import SHAKESPEARE
    data = tmp_path / 'prepared'
    assert prepare.main(['shakespeare', '--tokenizer=byte', f'--input={SHAKESPEARE}', f'--out={data}']) == 0
    upload(data, bucket, 'data/shakespeare_byte')
    url = 'gs://runs/data/shakespeare_byte'
    capsys.readouterr()
    train(tiny_config(data=url, out=str(tmp_path / 'run'), steps=2))
    out = capsys.readouterr().out
    assert 'copied gs://runs/data/shakespeare_byte/train_000000.bin (1.9 MiB' in out
    train(tiny_config(data=url, out=str(tmp_path / 'run'), steps=4))  # copied once: not again
    assert 'copied' not in capsys.readouterr().out
    val = bytearray((data / 'val_000000.bin').read_bytes())
    val[-100:] = val[-200:-100]  # prepared again: the same size, other tokens
    bucket.blob('data/shakespeare_byte/val_000000.bin').upload_from_string(bytes(val))
    train(tiny_config(data=url, out=str(tmp_path / 'run2'), steps=2))
    out = capsys.readouterr().out
    assert 'copied gs://runs/data/shakespeare_byte/val_000000.bin' in out and 'train_000000' not in out
    assert (tmp_path / 'cache/tinytpu/runs/data/shakespeare_byte/val_000000.bin').read_bytes() == bytes(val)
    bucket.blob('data/shakespeare_byte/train_000000.bin').delete()  # an upload cut short
    with pytest.raises(tt.UserError, match='train_000000.bin: missing, and meta.json lists it'):
        train(tiny_config(data=url, out=str(tmp_path / 'run3'), steps=2))


def test_prepare_writes_locally_and_says_how_to_upload(tmp_path, capsys):
    import prepare
    assert prepare.main(['shakespeare', '--out=gs://runs/data/x']) == 2
    assert 'gcloud storage rsync -r DIR gs://runs/data/x -x "^raw/"' in capsys.readouterr().err


@pytest.mark.slow
def test_a_trained_tokenizer_goes_into_the_bucket_with_the_run(tmp_path, bucket, capsys):
    """--tokenizer=bpe:N data: the run uploads its tokenizer.tiktoken; a new VM that has neither
    the data nor the run samples from the bucket with it."""
    pytest.importorskip('rustbpe', reason='rustbpe trains the tokenizer (pip install rustbpe)')
    import prepare
    from conftest import SHAKESPEARE
    data = tmp_path / 'data'
    assert prepare.main(['text', f'--input={SHAKESPEARE}', '--tokenizer=bpe:512', f'--out={data}']) == 0
    out = 'gs://runs/bpe'
    train(tiny_config(data=str(data), out=out, steps=2))
    assert 'bpe/tokenizer.tiktoken' in names(bucket, 'bpe/')
    assert bucket.blob('bpe/tokenizer.tiktoken').download_as_bytes() == (data / 'tokenizer.tiktoken').read_bytes()
    shutil.rmtree(tmp_path / 'cache')  # a new VM: no local copy of the run ...
    shutil.move(data, tmp_path / 'elsewhere')  # ... and no data directory
    capsys.readouterr()
    assert tt.main(['sample', f'--out={out}', '--prompt=ROMEO:', '--max_new_tokens=4']) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith('ROMEO:')


@pytest.fixture
def strict(monkeypatch):
    """Bucket.write as Cloud Storage does it (the emulator ignores ifGenerationMatch): with a
    generation, only if the object is still that one (0: only if there is none)."""
    real, guard = tt.Bucket.write, threading.Lock()

    def write(self, name, data, generation=None):
        with guard:
            if generation is not None:
                blob = self.bucket.get_blob(self.prefix + name)
                if (blob.generation if blob else 0) != generation:
                    return None
            return real(self, name, data)
    monkeypatch.setattr(tt.Bucket, 'write', write)


def test_the_lock_holds_against_a_race_and_a_run_that_lost_it_uploads_nothing(bucket, strict, monkeypatch, capsys):
    """Two runs that both saw no lock: the second write fails its precondition and that run stops.
    A run whose lock was taken over (it stalled past STALE, say) learns it at its next refresh,
    uploads nothing more, and leaves the new holder's lock alone."""
    monkeypatch.setattr(tt.BucketRun, 'REFRESH', 0.1)
    a, b = tt.BucketRun('gs://runs/race', lead=True), tt.BucketRun('gs://runs/race', lead=True)
    monkeypatch.setattr(b.bucket, 'read', lambda name: (None, 0))  # b read before a wrote
    a.__enter__()
    with pytest.raises(tt.UserError, match='was locked by another training run just now'):
        b.lock()
    bucket.blob('race/.lock').upload_from_string(json.dumps({'host': 'vm-2', 'pid': 1, 'time': time.time()}))
    taken = bucket.get_blob('race/.lock').generation
    for _ in range(100):
        if a.lost:
            break
        time.sleep(0.05)
    assert a.lost and 'another run took the lock over; this run uploads nothing more' in capsys.readouterr().err
    ckpt = os.path.join(a.local, 'ckpt_00000009')
    os.makedirs(ckpt)
    for name in ('state.npz', 'meta.json'):
        open(os.path.join(ckpt, name), 'w').write('{}')
    a.__exit__(None, None, None)
    assert names(bucket, 'race/') == ['race/.lock'] and bucket.get_blob('race/.lock').generation == taken


def test_a_lock_whose_time_is_far_in_the_future_is_taken_over(byte_data, bucket):
    """A host whose clock runs ahead (or a forged lock) proves no life: past STALE seconds in the
    future, the time is not believed."""
    bucket.blob('future/.lock').upload_from_string(json.dumps({'host': 'vm-1', 'pid': 42, 'time': 1e18}))
    with tt.BucketRun('gs://runs/future', lead=True) as run:
        assert run.generation
    bucket.blob('future/.lock').upload_from_string(json.dumps({'host': 'vm-1', 'pid': 42, 'time': time.time() + 30}))
    with pytest.raises(tt.UserError, match=r'in use by another training run \(host vm-1, pid 42, alive 0s ago\)'):
        tt.BucketRun('gs://runs/future', lead=True).__enter__()


@pytest.mark.parametrize('url', ['gs://runs/../../../../tmp/escaped', 'gs://bkt1/../bkt2/run', 'gs://runs/a/./b'])
def test_a_bucket_path_with_dot_parts_is_refused(url, bucket, tmp_path):
    """Its local copy would be outside the cache, or another path's."""
    with pytest.raises(tt.UserError, match='a bucket path has no "." or ".." parts'):
        tt.BucketRun(url, lead=True)


@pytest.mark.slow
def test_a_run_starts_from_a_run_kept_in_a_bucket(byte_data, tmp_path, bucket, capsys):
    """--init_from=gs://...: on a machine without the source's local copy, its newest checkpoint is
    downloaded, and the new run starts from its weights."""
    assert tt.main([f'--data={byte_data}', '--out=gs://runs/pre', '--steps=4', *TINY]) == 0
    shutil.rmtree(tt.local_copy('gs://runs/pre'))  # a new machine: only the bucket holds the run
    out = str(tmp_path / 'tuned')
    assert tt.main([f'--data={byte_data}', f'--out={out}', '--init_from=gs://runs/pre', '--steps=2', *TINY]) == 0
    assert 'starting from the weights of gs://runs/pre (ckpt_00000004, step 4)' in capsys.readouterr().out
    assert json.loads(open(os.path.join(out, 'log.jsonl')).readline())['init_from']['path'] == 'gs://runs/pre'
