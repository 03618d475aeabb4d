"""prepare.py: download a text corpus, tokenize it, and write the token shards tinytpu.py trains on.

    python prepare.py                                     # tiny Shakespeare, GPT-2 BPE -> data/shakespeare
    python prepare.py shakespeare --tokenizer=byte        # byte tokens -> data/shakespeare_byte
    python prepare.py tinystories                         # 2.2 GB of short stories, streamed
    python prepare.py fineweb-edu --shards=24 --tokenizer=bpe:32768   # nanochat's text, its own 32K BPE
    python prepare.py fineweb10B --shards=8               # pre-tokenized GPT-2 shards, 100M tokens each
    python prepare.py text --input=my_corpus/             # your own .txt files (or one file, or a URL)
    python prepare.py hellaswag                           # HellaSwag's 10,042 validation examples (eval)
    python prepare.py choices                             # a multiple-choice test made of held-out text

Flags: --tokenizer=gpt2|cl100k_base|o200k_base|byte|bpe:N|DIR --out=DIR --input=PATH_OR_URL
--val_fraction=0.1 --shards=N (fineweb-edu, fineweb10B) --workers=N (tokenizer processes; default
one per core) --allow_http --mirror=URL (fetch Hugging Face files from a mirror instead of
https://huggingface.co) --encoding=NAME (text that is not UTF-8, for BPE tokenizers: latin-1,
cp1252, utf-16, ...) --tokenizer_bytes=1e9 (text a bpe:N tokenizer learns from)
--shard_tokens=100000000 (tokens per shard file; smaller for many small files)

--tokenizer=bpe:N trains a byte-level BPE of N tokens on the training text (needs: pip install
rustbpe) and keeps it in DIR/tokenizer.tiktoken; --tokenizer=DIR reuses the one of a directory
prepared so. fineweb-edu reads parquet files (needs: pip install pyarrow).

Output (--out, by default data/NAME, or data/NAME_TOKENIZER for a tokenizer other than gpt2, where
NAME is the dataset's, or for `text` its input's): DIR/train_000000.bin ..., DIR/val_000000.bin ...,
DIR/meta.json (listing the shards), written last;
for hellaswag and choices, DIR/NAME_val.jsonl, the examples `python tinytpu.py eval` scores.
Shards use the llm.c format: a header of 256 int32 (magic, version, token count), then the tokens
as uint16, or as uint32 (magic 20240801, version 7) when the vocabulary has more than 65,536
tokens. Every document starts with the end-of-text token, as in llm.c. `byte` tokens are the
files' raw bytes. Runtime needs: requests, tiktoken, numpy.
"""

import base64
import codecs
import contextlib
import fcntl
import glob
import hashlib
import json
import math
import multiprocessing
import os
import random
import re
import resource
import tempfile
import shutil
import sys
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import requests
import tiktoken
import urllib3

SHARD_TOKENS = 100_000_000  # tokens per shard, as in llm.c and modded-nanogpt
CHUNK_BYTES = 1 << 20       # text per tokenization task: big enough to amortize, small for memory
EOT = '<|endoftext|>'

HF = 'https://huggingface.co/datasets'
DATASETS = {  # name: where the text (or tokens) come from
    'shakespeare': dict(
        url='https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt',
        sha256='86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed'),
    'tinystories': dict(
        train=f'{HF}/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-train.txt',
        val=f'{HF}/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-valid.txt'),
    # FineWeb-edu as text, as nanochat takes it: karpathy/fineweb-edu-100b-shuffle on the Hub holds
    # FineWeb-edu's sample-100BT shuffled into parquet files shard_00000 ... shard_01822 (a "text"
    # column, ~250M characters each); the last is validation. Names from nanochat/dataset.py
    # (BASE_URL, MAX_SHARD; github.com/karpathy/nanochat, commit 030de3a).
    'fineweb-edu': dict(parquet=f'{HF}/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_{{i:05d}}.parquet',
                        last=1822),
    'fineweb10B': dict(tokens=f'{HF}/kjj0/fineweb10B-gpt2/resolve/main/fineweb_{{split}}_{{i:06d}}.bin'),
    'finewebedu10B': dict(tokens=f'{HF}/kjj0/finewebedu10B-gpt2/resolve/main/finewebedu_{{split}}_{{i:06d}}.bin'),
    'text': {},
    # multiple-choice tasks for `tinytpu.py eval` (below): a jsonl file, not token shards
    'hellaswag': dict(task='https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl'),
    'choices': dict(task='shakespeare'),  # made from a text's held-out part: by default, shakespeare's
}


class PrepareError(Exception):
    """A problem the user can fix: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------
# Metadata: every field of every JSON file either script reads (this one's meta.json, tinytpu's
# checkpoint meta.json and bench.jsonl) is checked against a schema before it is used, so a
# damaged or hand-edited file is one line naming the file and the field, never a traceback.


def integer(lo=0, hi=None):
    return lambda v: type(v) is int and v >= lo and (hi is None or v <= hi)


def number(lo=0.0, hi=math.inf):
    return lambda v: type(v) in (int, float) and math.isfinite(v) and lo <= v <= hi


def text(v):
    return type(v) is str


def optional(test):
    return lambda v: v is None or test(v)


def file_name(v):
    """A plain file name: no directory, not '.' or '..' (what meta.json may name in its directory)."""
    return text(v) and v and os.path.basename(v) == v and v not in ('.', '..')


def shard_names(v):
    """{'train': {'shards': ['train_000000.bin', ...], 'tokens': N}, 'val': {...}}: plain file names."""
    return type(v) is dict and all(
        type(s) is dict and type(s.get('shards', [])) is list and integer()(s.get('tokens', 0))
        and all(file_name(n) for n in s.get('shards', []))
        for s in v.values())


DATA_META = {  # field: (test, what it must be, required)
    'tokenizer': (text, 'a tokenizer name', False),
    'tokenizer_file': (file_name, 'a file name', False),
    'tokenizer_sha256': (lambda v: text(v) and SHA256.fullmatch(v) is not None, 'a SHA-256', False),
    'tokenizer_pattern': (text, 'a regular expression', False),
    'vocab_size': (integer(2, 2**32), 'an integer from 2 to 2^32', False),
    'eot_id': (integer(0, 2**32 - 1), 'a token id', False),
    'bytes_per_token': (number(1e-9), 'a positive number', False),
    'splits': (shard_names, 'per split, a list of shard file names and a token count', False),
    'task': (file_name, 'a file name', False),
}


def field_problem(record, schema):
    """What is wrong with a parsed JSON record, in words ('"vocab_size" is 1e9, expected an
    integer ...'), or None if every field has the type and range the schema says."""
    if type(record) is not dict:
        return 'not a JSON object'
    for name, (test, words, required) in schema.items():
        if name not in record:
            if required:
                return f'no "{name}" field'
        elif not test(record[name]):
            return f'"{name}" is {json.dumps(record[name])[:40]}, expected {words}'
    return None


def read_json(path, schema):
    """A JSON file checked against a schema: -> (record, None), or (None, what is wrong with it)."""
    try:
        with open(path, encoding='utf-8') as f:
            record = json.load(f)
    except OSError as e:
        return None, f'unreadable: {e.strerror}'
    except ValueError:
        return None, 'not valid JSON'
    problem = field_problem(record, schema)
    return (None, problem) if problem else (record, None)


# ----------------------------------------------------------------------------------------------
# Tokenizers. tiktoken encodes every one of them. `gpt2`, `cl100k_base` and `o200k_base` are
# OpenAI's; `byte` is built here (256 byte tokens plus end-of-text, no download needed); `bpe:N`
# is a byte-level BPE of N tokens learned from the corpus being prepared: the training split's
# text, up to --tokenizer_bytes of it (1 GB by default: a 32K vocabulary trained on more
# compresses held-out text only a little better; docs/running.md has the numbers), is split by
# BPE_PATTERN and the most frequent adjacent pair of tokens is merged, N - 257 times, by rustbpe
# (nanochat's trainer; an optional extra, imported only here). Its ranks (token bytes -> id,
# in the order the merges were learned) go into the data directory as tokenizer.tiktoken, in
# tiktoken's own file format, and meta.json names that file and its SHA-256; the end-of-text
# token comes last, id N - 1. --tokenizer=DIR reuses the tokenizer of a directory prepared so.

# GPT-4's split (cl100k_base's pattern) with numbers cut into pieces of at most two digits, as
# nanochat does for small vocabularies: no ids spent on the thousand three-digit numbers.
BPE_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
               r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
TOKENIZER_FILE = 'tokenizer.tiktoken'
BUILT_IN = ('gpt2', 'r50k_base', 'p50k_base', 'cl100k_base', 'o200k_base')
SHA256 = re.compile('[0-9a-f]{64}')


def get_encoding(name):
    """A built-in tokenizer by name (trained ones: load_encoding)."""
    if name == 'byte':
        return tiktoken.Encoding('byte', pat_str=r"[\s\S]", mergeable_ranks={bytes([i]): i for i in range(256)},
                                 special_tokens={EOT: 256})
    if name not in BUILT_IN:
        raise PrepareError(f'--tokenizer={name}: unknown (choose gpt2, cl100k_base, o200k_base, byte, bpe:N '
                           'to train one, or a directory prepared with one)')
    try:
        return tiktoken.get_encoding(name)
    except requests.RequestException as e:
        raise PrepareError(f'--tokenizer={name}: could not download its BPE files ({type(e).__name__}); '
                           'connect to the internet, set TIKTOKEN_CACHE_DIR to a cache, or use --tokenizer=byte')


def bpe_size(name):
    """N of a tokenizer name 'bpe:N', or None for any other name."""
    m = re.fullmatch(r'bpe:([0-9]+)', name)
    if name.startswith('bpe:') and not (m and 258 <= int(m[1]) <= 1 << 20):
        raise PrepareError(f'--tokenizer={name}: say bpe:N with N, the vocabulary size, from 258 to 1048576 '
                           '(for example bpe:32768)')
    return int(m[1]) if m else None


def load_encoding(meta, directory, what=None):
    """The tokenizer a meta.json names (a data directory's, or a checkpoint's): a built-in one by
    name, or a trained one from `directory`/tokenizer.tiktoken, which must have the SHA-256 that
    meta.json records. `what` names the meta.json in errors."""
    name = meta.get('tokenizer')
    if not meta.get('tokenizer_sha256'):
        return get_encoding(name)
    path = os.path.join(directory, meta.get('tokenizer_file', TOKENIZER_FILE))
    if not os.path.isfile(path):
        raise PrepareError(f'{path}: missing; {what or directory} names a trained tokenizer ({name}) kept in that '
                           'file; copy it back from the data directory it was prepared in')
    if os.path.islink(path):
        raise PrepareError(f'{path} is a symbolic link; refusing to read a tokenizer through links')
    if file_sha256(path) != meta['tokenizer_sha256']:
        raise PrepareError(f'{path}: not the tokenizer {what or directory} was made with (its SHA-256 differs); '
                           'prepare the data again, or restore that file')
    return bpe_encoding(name, read_ranks(path), meta.get('tokenizer_pattern', BPE_PATTERN))


def bpe_encoding(name, ranks, pattern=BPE_PATTERN):
    return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={EOT: len(ranks)})


def read_ranks(path):
    """tokenizer.tiktoken: a line per token, base64 of its bytes, a space, its rank (id)."""
    ranks = {}
    with open(path, 'rb') as f:
        for i, line in enumerate(f):
            token, _, rank = line.partition(b' ')
            try:
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise PrepareError(f'{path}: line {i + 1} is not "BASE64 RANK"; prepare the data again')
    if sorted(ranks.values()) != list(range(len(ranks))) or any(ranks.get(bytes([b])) is None for b in range(256)):
        raise PrepareError(f'{path}: not a byte-level BPE (its ranks must be 0..n-1 and hold every byte); '
                           'prepare the data again')
    return ranks


def write_ranks(path, ranks):
    """Ranks in tiktoken's file format, in rank order: the same ranks give the same bytes."""
    with written(path) as f:
        for token, rank in sorted(ranks.items(), key=lambda t: t[1]):
            f.write(base64.b64encode(token) + b' %d\n' % rank)


def train_bpe(texts, vocab_size):
    """Learn a byte-level BPE of vocab_size tokens (end-of-text included) from an iterable of
    strings, with rustbpe: -> ranks. Deterministic: the same strings give the same ranks, on any
    number of threads (RAYON_NUM_THREADS; one per core by default)."""
    try:
        import rustbpe
    except ImportError:
        raise PrepareError('--tokenizer=bpe:N trains a tokenizer with rustbpe: pip install rustbpe')
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(texts, vocab_size - 1, buffer_size=256, pattern=BPE_PATTERN)  # <= 256 MB held
    return {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}


# ----------------------------------------------------------------------------------------------
# Downloads: stream to NAME.part, resume with an HTTP Range request, retry timeouts and 5xx with
# backoff, verify the size and (where known) the SHA-256, then rename to NAME. NAME.part.json
# ties a .part to its URL and the file's version (ETag) and size, so it never continues another
# download. Each read times out after `timeout` s; a download slower than SLOW (a trickle) is
# retried, and one still unfinished after DEADLINE gives up.

SLOW = (16_384, 60)           # fewer bytes than this in this many seconds: too slow, retry
DEADLINE = (3600, 100_000)    # a file gets this many seconds plus one per this many bytes


def download(url, path, sha256=None, retries=5, timeout=30, allow_http=False):
    """Download url to path (skipped if path exists). Returns the file's SHA-256."""
    if url.startswith('http://') and not allow_http:
        raise PrepareError(f'{url}: plain http can be tampered with; use https or pass --allow_http')
    if os.path.exists(path):
        return file_sha256(path)
    part = path + '.part'
    linked = os.path.islink(part) or os.path.islink(part + '.json')  # never written through: removed
    started = None if linked else read_json(part + '.json', PART)[0]
    if not started or started['url'] != url:  # a .part of another URL (or of unknown origin)
        for leftover in (part, part + '.json'):
            if os.path.lexists(leftover):
                os.remove(leftover)
    t0 = time.time()
    for attempt in range(retries + 1):
        try:
            fetch(url, part, timeout, t0)
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                ServerError) as e:
            if attempt == retries or is_dns_failure(e) or isinstance(e, OverDeadline):
                raise PrepareError(f'{url}: download failed ({describe(e)}); check your network, or '
                                   'download it yourself and pass --input=PATH')
            wait = min(2 ** attempt, 30)
            print(f'  {describe(e)}; retrying in {wait}s', flush=True)
            time.sleep(wait)
    digest = file_sha256(part)
    if sha256 and digest != sha256:
        os.remove(part)
        raise PrepareError(f'{url}: SHA-256 {digest} does not match the expected {sha256}; '
                           'the download was corrupted or the file changed upstream')
    os.replace(part, path)
    os.remove(part + '.json')
    return digest


PART = {'url': (text, 'a URL', True), 'etag': (optional(text), 'an ETag', False),
        'total': (optional(integer()), 'a size in bytes', False)}


class ServerError(Exception):
    pass


class OverDeadline(requests.Timeout):
    pass


def is_dns_failure(e):
    return 'NameResolution' in repr(e) or 'Name or service not known' in repr(e)


def describe(e):
    return 'DNS lookup failed' if is_dns_failure(e) else (str(e).split('\n')[0][:160] or type(e).__name__)


def fetch(url, part, timeout, t0):
    """One attempt: continue part from where it ends (Range, If-Range: the same version), writing
    as data arrives; the part is complete when it has the size the server gave."""
    started = read_json(part + '.json', PART)[0]
    have = os.path.getsize(part) if started and os.path.exists(part) else 0
    headers = {'Range': f'bytes={have}-', **({'If-Range': started['etag']} if started.get('etag') else {})} if have else {}
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
        if r.status_code == 416:  # nothing after `have`: complete if that is the file's size
            if (full_size(r) or started.get('total')) == have == started.get('total'):
                return
            os.remove(part)
            raise ServerError('the partial download is larger than the file: starting over')
        if r.status_code >= 500:
            raise ServerError(f'HTTP {r.status_code}')
        if r.status_code >= 400:
            raise PrepareError(f'{url}: HTTP {r.status_code} {r.reason}; check the URL, or download '
                               'the file yourself and pass --input=PATH')
        total = full_size(r)
        if have and r.status_code == 206 and started.get('total') != total:
            os.remove(part)
            raise ServerError('the file changed since the partial download: starting over')
        if r.status_code != 206:  # the server sent the whole file (it ignored the Range, or If-Range saw a new version)
            have = 0
        write_json(part + '.json', {'url': url, 'etag': r.headers.get('ETag'), 'total': total})
        deadline = t0 + DEADLINE[0] + (total or 0) / DEADLINE[1]
        progress = Progress(os.path.basename(part)[:-5], total, have)
        window = (time.time(), have)  # SLOW: bytes by then
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if have else os.O_TRUNC)
        with os.fdopen(os.open(part, flags, 0o644), 'ab' if have else 'wb') as f:
            while block := read_some(r):
                f.write(block)
                progress.update(len(block))
                now = time.time()
                if now > deadline:
                    raise OverDeadline(f'not finished after {now - t0:.0f}s at {progress.have / 1e6:,.1f} MB')
                if now - window[0] >= SLOW[1]:
                    if progress.have - window[1] < SLOW[0]:
                        raise requests.Timeout(f'slower than {SLOW[0]:,} bytes in {SLOW[1]}s')
                    window = (now, progress.have)
        progress.done()
        size = os.path.getsize(part)
        if total and size < total:
            raise requests.exceptions.ChunkedEncodingError('connection closed before the end')
        if total and size > total:
            os.remove(part)
            raise ServerError(f'got {size:,} bytes of a {total:,}-byte file: starting over')


def read_some(r):
    """The next bytes of a streamed response as they arrive (up to 64 KB; b'' at the end), with
    urllib3's errors as requests' (requests' own iter_content waits for a full block, so a trickle
    would never reach the speed checks)."""
    read = getattr(r.raw, 'read1', None) or r.raw.read  # read1: urllib3 >= 2
    try:
        return read(1 << 16, decode_content=True)
    except urllib3.exceptions.ReadTimeoutError as e:
        raise requests.Timeout(e)
    except (urllib3.exceptions.ProtocolError, urllib3.exceptions.DecodeError) as e:
        raise requests.exceptions.ChunkedEncodingError(e)


def full_size(r):
    """The whole file's size from a response: Content-Range's total for a 206 or 416, else
    Content-Length."""
    if r.status_code in (206, 416):
        total = r.headers.get('Content-Range', '').rpartition('/')[2]
        return int(total) if total.isdigit() else None
    length = r.headers.get('Content-Length', '')
    return int(length) if length.isdigit() else None


def fresh_file(path):
    """A new file beside `path`, under a name no one else has (created exclusively: never a link
    or a file left there), to be renamed over `path` when whole. -> (open binary file, its name)"""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or '.', prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
    return os.fdopen(fd, 'w+b'), tmp  # readable too: a download can be checked before it is kept


@contextlib.contextmanager
def written(path):
    """`with written(path) as f:` writes a file whole or not at all (both scripts write every file
    this way): into a fresh_file, renamed over `path` at the end; on an error, path is unchanged."""
    f, tmp = fresh_file(path)
    try:
        with f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def copy_file(src, dst):
    with open(src, 'rb') as f, written(dst) as out:
        shutil.copyfileobj(f, out)


def write_json(path, record):
    with written(path) as f:
        f.write(json.dumps(record, indent=1).encode())


class Progress:
    """Bytes, MB/s and ETA: redrawn in place on a terminal every 0.5 s, else a line every 10 s."""

    def __init__(self, name, total, have=0):
        self.name, self.total, self.have, self.start_have = name, total, have, have
        self.t0 = self.last = time.time()
        self.tty = sys.stdout.isatty()

    def update(self, n):
        self.have += n
        now = time.time()
        if now - self.last >= (0.5 if self.tty else 10):
            self.last = now
            print(('\r' if self.tty else '') + self.line(now), end='' if self.tty else '\n', flush=True)

    def line(self, now):
        rate = (self.have - self.start_have) / max(now - self.t0, 1e-9)
        s = f'  {self.name}: {self.have / 1e6:,.1f}'
        if self.total:
            eta = (self.total - self.have) / rate if rate else 0
            s += f'/{self.total / 1e6:,.1f} MB {rate / 1e6:.1f} MB/s ETA {eta // 60:.0f}m{eta % 60:02.0f}s'
        return s + ('' if self.total else f' MB {rate / 1e6:.1f} MB/s')

    def done(self):
        if self.tty and self.last > self.t0:
            print()


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 22), b''):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Shards: tokens are appended to a writer that cuts a new file every SHARD_TOKENS tokens. Each file
# is written as a fresh file with its header last, then renamed: a .bin that exists is complete.

HEADER_BYTES = 256 * 4  # 256 int32: magic, version, token count, zeros; then the tokens, little-endian
SHARD_FORMATS = {20240520: (1, np.uint16), 20240801: (7, np.uint32)}  # magic: (version, token dtype)


def shard_header(path):
    """A token shard's (token count, token dtype, problem): problem says what is wrong with its
    header or size, or is None. tinytpu.py reads shards with this too."""
    header = np.fromfile(path, dtype='<i4', count=256)
    if header.size < 256:
        return 0, None, f'{path}: shorter than a shard header ({os.path.getsize(path)} bytes); re-create it with prepare.py'
    magic, version, n_tokens = (int(v) for v in header[:3])
    if magic not in SHARD_FORMATS:
        return 0, None, (f'{path}: not a token shard (magic {magic}, expected {" or ".join(map(str, SHARD_FORMATS))}); '
                         're-create it with prepare.py')
    expected_version, dtype = SHARD_FORMATS[magic]
    if version != expected_version:
        return 0, None, (f'{path}: unsupported shard version {version} for magic {magic} (expected '
                         f'{expected_version}); re-create it with prepare.py')
    size, expected = os.path.getsize(path), HEADER_BYTES + n_tokens * np.dtype(dtype).itemsize
    if size != expected:
        return 0, None, (f'{path}: header says {n_tokens} tokens ({expected} bytes) but the file has {size} bytes '
                         '(interrupted download?); delete it and re-run prepare.py')
    return n_tokens, np.dtype(dtype), None


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 65536 else np.uint32


class ShardWriter:
    """Appends tokens to fresh files for SPLIT_000000.bin, SPLIT_000001.bin, ... as they arrive (never
    more than one batch in memory), cutting a new file every shard_tokens tokens. A finished
    file gets its header, then its final name."""

    def __init__(self, out, split, dtype, shard_tokens=SHARD_TOKENS):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, np.dtype(dtype), shard_tokens
        self.file, self.in_file, self.paths, self.tokens = None, 0, [], 0

    def add(self, tokens):
        tokens = np.asarray(tokens).astype(self.dtype.newbyteorder('<'))
        self.tokens += len(tokens)
        while len(tokens):
            if self.file is None:
                self.start()
            take = tokens[:self.shard_tokens - self.in_file]
            self.write(take.tobytes())
            self.in_file += len(take)
            tokens = tokens[len(take):]
            if self.in_file == self.shard_tokens:
                self.finish()

    def write(self, data):
        """Write to the current file; a failure (a full disk) removes it and says so in one line."""
        try:
            self.file.write(data)
        except OSError as e:
            self.file.close()
            os.remove(self.tmp)
            raise PrepareError(f'{self.path}: could not write ({e.strerror or e}); free some space and run '
                               'the same command again')

    def finish(self):
        magic = next(m for m, (_, dtype) in SHARD_FORMATS.items() if dtype == self.dtype.type)
        version = SHARD_FORMATS[magic][0]
        header = np.zeros(256, '<i4')
        header[:3] = magic, version, self.in_file
        self.file.seek(0)
        self.write(header.tobytes())
        try:
            self.file.close()  # flushes: a full disk can show here
        except OSError as e:
            os.remove(self.tmp)
            raise PrepareError(f'{self.path}: could not write ({e.strerror or e}); free some space and run '
                               'the same command again')
        os.replace(self.tmp, self.path)
        self.paths.append(self.path)
        self.file = None

    def start(self):
        self.path = os.path.join(self.out, f'{self.split}_{len(self.paths):06d}.bin')
        (self.file, self.tmp), self.in_file = fresh_file(self.path), 0
        self.write(b'\0' * HEADER_BYTES)  # header placeholder, filled in by finish()

    def close(self):
        if self.file is None and not self.paths:  # no tokens at all: still one (empty) shard
            self.start()
        if self.file is not None:
            self.finish()
        return self.paths


# ----------------------------------------------------------------------------------------------
# Tokenization: text is read as bytes, in pieces of about CHUNK_BYTES cut where the tokenizer
# would put a token boundary anyway, so tokenizing the pieces apart gives exactly the tokens of
# the whole text. A pool of processes, one per core, tokenizes them, at most 2 chunks per worker
# in flight so memory stays bounded whatever the corpus size; results are written in order.
# `byte` tokens are the file's raw bytes; BPE tokenizers take UTF-8 text (another encoding is
# converted first, with --encoding) and refuse anything else with the file and byte offset.
# As in llm.c, every document starts with the end-of-text token.

_encoder = None


def _init_worker(tokenizer, parent):
    """tokenizer: a built-in one's name, or (meta.json, directory) of a trained one."""
    global _encoder
    _encoder = get_encoding(tokenizer) if isinstance(tokenizer, str) else load_encoding(*tokenizer)
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent):
    """A worker ends when prepare.py does, even when it is killed (SIGKILL runs no clean-up)."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def _encode(chunk):
    """[(bytes, eot_before, (path, offset)), ...] -> (uint32 tokens, an end-of-text token where
    eot_before is set; bytes read), computed here in the worker, off the main process."""
    out, n_bytes = [], 0
    for data, eot_before, (path, offset) in chunk:
        if eot_before:
            out.append([_encoder.eot_token])
        if _encoder.name == 'byte':
            out.append(np.frombuffer(data, np.uint8))
        else:
            try:
                out.append(_encoder.encode_ordinary(data.decode('utf-8')))
            except UnicodeDecodeError as e:
                raise PrepareError(f'{path}: not UTF-8 at byte {offset + e.start:,}; pass --encoding=NAME '
                                   '(latin-1, cp1252, utf-16, ...) or --tokenizer=byte')
        n_bytes += len(data)
    return np.concatenate([np.asarray(t, np.uint32) for t in out] or [np.zeros(0, np.uint32)]), n_bytes


def tokenize(chunks, tokenizer, writer, workers=None):
    """Tokenize an iterable of chunks (lists of (bytes, eot_before, where)) in parallel into writer."""
    workers = workers or os.cpu_count()  # one process per core
    in_bytes, t0 = 0, time.time()
    spawn = multiprocessing.get_context('spawn')  # fork is unsafe if the caller runs threads (JAX)
    with ProcessPoolExecutor(workers, spawn, initializer=_init_worker, initargs=(tokenizer, os.getpid())) as pool:
        pending = deque()

        def write_oldest():
            nonlocal in_bytes
            tokens, n_bytes = pending.popleft().result()
            writer.add(tokens)
            in_bytes += n_bytes

        try:
            for chunk in chunks:
                pending.append(pool.submit(_encode, chunk))
                if len(pending) >= 2 * workers:
                    write_oldest()
            while pending:
                write_oldest()
        except BaseException:
            pool.shutdown(cancel_futures=True)  # stop at once, not after the queued chunks
            raise
    return in_bytes, time.time() - t0


def read_documents(ranges, split_at_eot, cut_anywhere, size=CHUNK_BYTES):
    """Yield (bytes, starts_a_document, (path, offset)) pieces of about `size` bytes from byte
    ranges (path, start, end) of files. Each range is a document; with split_at_eot,
    '<|endoftext|>' separates documents inside it too (and newlines around it are dropped)."""
    eot = EOT.encode()
    for path, start, end in ranges:
        new_doc = True
        for block, offset in read_blocks(path, start, end, eot if split_at_eot else None, cut_anywhere, size):
            at = offset
            for i, part in enumerate(block.split(eot) if split_at_eot else [block]):
                if i > 0:  # an end-of-text marker came before this part
                    new_doc, at = True, at + len(eot)
                body = part.strip(b'\n') if split_at_eot else part
                if body:
                    yield body, new_doc, (path, at + len(part) - len(part.lstrip(b'\n')) if split_at_eot else at)
                    new_doc = False
                at += len(part)


def read_blocks(path, start, end, sep, cut_anywhere, size=CHUNK_BYTES):
    """Bytes start..end of a file as (block, offset) of about `size` bytes each, cut just after
    the last `sep` (an end-of-text marker) in a block, else at a token boundary: anywhere for byte
    tokens, else before a newline that follows an ASCII letter or digit (no split pattern here,
    tiktoken's or BPE_PATTERN, joins a letter or digit to the newline after it)."""
    with open(path, 'rb') as f:
        f.seek(start)
        carry, offset, left = b'', start, end - start
        while left > 0:
            block = f.read(min(size, left))
            if not block:
                break
            left -= len(block)
            data = carry + block
            if left <= 0:
                cut = len(data)
            elif sep and sep in data:
                cut = data.rfind(sep) + len(sep)
            elif cut_anywhere:  # but not inside an end-of-text marker
                cut = len(data) - (len(sep) - 1 if sep else 0)
            else:
                cut = safe_cut(data)
            if cut == 0 and len(data) > 64 * CHUNK_BYTES:  # no boundary in 64 MB: cut at a newline
                cut = data.rfind(b'\n') + 1 or len(data)
            if cut:
                yield data[:cut], offset
                offset += cut
            carry = data[cut:]
        if carry:
            yield carry, offset


def safe_cut(data):
    """The last position in data of a newline after an ASCII letter or digit, or 0."""
    i = len(data)
    while (i := data.rfind(b'\n', 0, i)) > 0:
        if data[i - 1:i].isalnum():
            return i
    return 0


def chunked(pieces, size=CHUNK_BYTES):
    """Group (bytes, new_doc, where) pieces into chunks of about `size` bytes, marking where an
    end-of-text token goes: before every document."""
    chunk, n = [], 0
    for data, new_doc, where in pieces:
        chunk.append((data, new_doc, where))
        n += len(data)
        if n >= size:
            yield chunk
            chunk, n = [], 0
    if chunk:
        yield chunk


def split_point(path, fraction, by_bytes):
    """Where the first `fraction` of a file ends, as a byte offset: of its bytes (byte tokens), or
    of its UTF-8 characters, as nanoGPT splits text (a character starts at every byte that is
    not 0b10xxxxxx). Streams: never holds the file in memory."""
    size = os.path.getsize(path)
    if by_bytes:
        return int(size * fraction)

    def starts(block):
        return np.flatnonzero((np.frombuffer(block, np.uint8) & 0xC0) != 0x80)

    with open(path, 'rb') as f:
        target = int(sum(len(starts(b)) for b in iter(lambda: f.read(CHUNK_BYTES), b'')) * fraction)
        f.seek(0)
        offset = 0
        for block in iter(lambda: f.read(CHUNK_BYTES), b''):
            s = starts(block)
            if target < len(s):
                return offset + int(s[target])
            target -= len(s)
            offset += len(block)
    return size


def transcode(path, encoding, raw):
    """A copy of a text file in UTF-8 (in raw/), from --encoding; a byte that is not valid in that
    encoding is a one-line error with its offset."""
    decoder = codecs.getincrementaldecoder(encoding)('strict')  # a known one: parse_flags checked
    out = os.path.join(raw, os.path.basename(path) + '.utf8')
    with open(path, 'rb') as src, written(out) as dst:
        offset = 0
        for block in iter(lambda: src.read(CHUNK_BYTES), b''):
            pending = len(decoder.getstate()[0])
            try:
                dst.write(decoder.decode(block).encode('utf-8'))
            except UnicodeDecodeError as e:
                raise PrepareError(f'{path}: not valid {encoding} at byte {offset - pending + e.start:,}')
            offset += len(block)
        try:
            dst.write(decoder.decode(b'', final=True).encode('utf-8'))
        except UnicodeDecodeError:
            raise PrepareError(f'{path}: not valid {encoding}: it ends inside a character')
    return out


# ----------------------------------------------------------------------------------------------
# Datasets.


def text_sources(dataset, args, raw):
    """-> ({'train': [(path, start, end) byte ranges], 'val': [...]}, [source records]) for a text
    dataset: one file is split by characters (the first 1 - val_fraction is train, as in nanoGPT;
    bytes for the byte tokenizer), several files are split whole."""
    spec = DATASETS[dataset]
    if dataset == 'tinystories' and not args.get('input'):
        sources, files = [], {}
        for split in ('train', 'val'):
            url = mirrored(spec[split], args)
            path = os.path.join(raw, os.path.basename(url))
            sources.append({'url': url, 'sha256': download(url, path, **dl_args(args))})
            files[split] = [path]
    else:
        sources = []
        files = split_files(input_files(spec, args, raw, sources), args)
    if args.get('tokenizer', 'gpt2') != 'byte' and args.get('encoding', 'utf-8').lower() not in ('utf-8', 'utf8'):
        utf8 = {f: transcode(f, args['encoding'], raw) for f in dict.fromkeys(files['train'] + files['val'])}
        files = {split: [utf8[f] for f in fs] for split, fs in files.items()}
    if len(files['train']) == 1 and files['train'] == files['val']:  # one file: split it
        path = files['train'][0]
        cut = split_point(path, 1 - args.get('val_fraction', 0.1), args.get('tokenizer', 'gpt2') == 'byte')
        return {'train': [(path, 0, cut)], 'val': [(path, cut, os.path.getsize(path))]}, sources
    return {split: [(f, 0, os.path.getsize(f)) for f in fs] for split, fs in files.items()}, sources


def input_files(spec, args, raw, sources):
    """The text files of --input (a file, a directory of .txt files, a URL) or of the dataset's URL."""
    source = args.get('input') or spec.get('url')
    if not source:
        raise PrepareError('text: pass --input=FILE, --input=DIR (of .txt files) or --input=URL')
    if source.startswith(('http://', 'https://')):
        path = os.path.join(raw, os.path.basename(source.split('?')[0]) or 'input.txt')
        digest = download(source, path, spec.get('sha256') if source == spec.get('url') else None,
                          **dl_args(args))
        files = [path]
    elif os.path.isdir(source):
        files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(source) for f in fs if f.endswith('.txt'))
        if not files:
            raise PrepareError(f'--input={source}: no .txt files in that directory')
        digest = None
    elif os.path.isfile(source):
        files, digest = [source], file_sha256(source)
    else:
        raise PrepareError(f'--input={source}: no such file or directory')
    sources.append({'url' if '://' in source else 'path': source, 'sha256': digest})
    return files


def split_files(files, args):
    """{'train': files, 'val': files}: one file goes to both (text_sources splits it); of several,
    the last val_fraction of them by bytes are validation."""
    if len(files) == 1:
        return {'train': files, 'val': files}
    sizes = np.cumsum([os.path.getsize(f) for f in files])
    cut = np.searchsorted(sizes, sizes[-1] * (1 - args.get('val_fraction', 0.1)), side='right')
    n_train = min(max(int(cut), 1), len(files) - 1)
    return {'train': files[:n_train], 'val': files[n_train:]}


def mirrored(url, args):
    """The URL on --mirror (a Hugging Face mirror, e.g. https://hf-mirror.com) when one is given."""
    mirror = args.get('mirror')
    return url.replace('https://huggingface.co', mirror.rstrip('/'), 1) if mirror else url


def dl_args(args):
    return {'allow_http': bool(args.get('allow_http'))}


def prepare_text(dataset, args, out, source):
    raw = os.path.join(out, 'raw')
    os.makedirs(raw, exist_ok=True)
    paths, sources = text_sources(dataset, args, raw)
    for split in ('train', 'val'):
        if sum(end - start for _, start, end in paths[split]) == 0:
            where = args.get('input') or dataset
            raise PrepareError(f'{where}: no text for the {split} split (the input is empty, or too short to split '
                               'by --val_fraction); give it more text')
    byte_tokens = args.get('tokenizer', 'gpt2') == 'byte'

    def documents(split, size=CHUNK_BYTES):
        return read_documents(paths[split], split_at_eot=(dataset == 'tinystories'), cut_anywhere=byte_tokens, size=size)

    train_bytes = sum(end - start for _, start, end in paths['train'])  # a sample of it, in pieces of ~64 KB
    enc, fields = make_tokenizer(args, out, source, lambda budget: spread(documents('train', 1 << 16), train_bytes, budget))
    return {'dataset': dataset, **tokenize_splits(documents, enc, fields, args, out), 'sources': sources}


def tokenize_splits(documents, enc, fields, args, out):
    """Both splits' documents (documents(split): (bytes, new_doc, where) pieces) tokenized into
    shards in out: -> meta.json's fields for the tokens and the tokenizer."""
    dtype = token_dtype(enc.n_vocab)
    loads = enc.name if 'tokenizer_sha256' not in fields else ({'tokenizer': enc.name, **fields}, out)  # the workers
    splits = {}
    for split in ('train', 'val'):
        writer = ShardWriter(out, split, dtype, int(args.get('shard_tokens', SHARD_TOKENS)))
        n_bytes, seconds = tokenize(chunked(documents(split)), loads, writer, int(args.get('workers', 0)))
        shards = writer.close()
        splits[split] = {'tokens': writer.tokens, 'bytes': n_bytes, 'shards': [os.path.basename(p) for p in shards]}
        print(f'{split}: {writer.tokens:,} tokens from {n_bytes / 1e6:,.1f} MB in {seconds:.1f}s '
              f'({n_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s) -> {len(shards)} shard(s)', flush=True)
    return {'tokenizer': enc.name, **fields, 'vocab_size': enc.n_vocab, 'eot_id': enc.eot_token,
            'dtype': np.dtype(dtype).name, 'splits': splits,
            'bytes_per_token': splits['val']['bytes'] / max(splits['val']['tokens'], 1)}


TOKENIZER_BYTES = 10 ** 9  # text a bpe:N tokenizer learns from, by default (--tokenizer_bytes)


def make_tokenizer(args, out, source, sample):
    """The tokenizer --tokenizer names, as (tiktoken encoding, meta.json's fields for it). bpe:N
    is trained here on sample(budget) (strings of about budget bytes of the training split) and
    written into out; --tokenizer=DIR's (source: read before anything changed) is written there
    too. Built-in ones need no fields."""
    name = args.get('tokenizer', 'gpt2')
    if source:  # a tokenizer trained for another directory (or for this one, before)
        meta, data = source
        with written(os.path.join(out, TOKENIZER_FILE)) as f:
            f.write(data)
        fields = {**{k: meta[k] for k in TOKENIZER_FIELDS if k in meta}, 'tokenizer_file': TOKENIZER_FILE}
        return load_encoding({'tokenizer': meta['tokenizer'], **fields}, out), fields
    n = bpe_size(name)
    if not n:
        return get_encoding(name), {}
    budget, seen, t = int(args.get('tokenizer_bytes', TOKENIZER_BYTES)), [0], time.time()
    print(f'training a {n:,}-token BPE on up to {budget / 1e6:,.0f} MB of the training text ...', flush=True)

    def counted(texts):
        for s in texts:
            seen[0] += len(s.encode('utf-8'))
            yield s

    ranks = train_bpe(counted(sample(budget)), n)
    path = os.path.join(out, TOKENIZER_FILE)
    write_ranks(path, ranks)
    seconds = time.time() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f'tokenizer: {len(ranks) + 1:,} tokens learned from {seen[0] / 1e6:,.1f} MB in {seconds:.1f}s '
          f'(peak memory {peak:,.0f} MB) -> {path}', flush=True)
    if len(ranks) + 1 < n:
        print(f'note: the text has too few distinct pieces for {n:,} tokens; the tokenizer has {len(ranks) + 1:,}',
              flush=True)
    fields = {'tokenizer_file': TOKENIZER_FILE, 'tokenizer_sha256': file_sha256(path),
              'tokenizer_pattern': BPE_PATTERN, 'tokenizer_trained_on': {'bytes': seen[0], 'seconds': round(seconds, 1)}}
    return bpe_encoding(name, ranks), fields


TOKENIZER_FIELDS = ('tokenizer_file', 'tokenizer_sha256', 'tokenizer_pattern', 'tokenizer_trained_on')


def tokenizer_source(name):
    """--tokenizer=DIR: (DIR's meta.json, its trained tokenizer's file) read whole and checked now,
    before anything is written (DIR may be --out itself); None for a tokenizer's name (checked).
    A one-line error otherwise."""
    if name in BUILT_IN or name == 'byte' or bpe_size(name):
        return None
    meta_path = os.path.join(name, 'meta.json')
    if not os.path.isdir(name):
        get_encoding(name)  # says which names there are
    meta, problem = read_json(meta_path, DATA_META)
    if problem or not meta.get('tokenizer_sha256'):
        raise PrepareError(f'--tokenizer={name}: {meta_path} ' + (problem or 'names no trained tokenizer') +
                           '; pass a directory prepared with --tokenizer=bpe:N')
    load_encoding(meta, name, meta_path)  # there, not a link, the SHA-256 meta.json records, well-formed
    with open(os.path.join(name, meta.get('tokenizer_file', TOKENIZER_FILE)), 'rb') as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != meta['tokenizer_sha256']:
        raise PrepareError(f'--tokenizer={name}: its tokenizer file changed while it was read; run again')
    return meta, data


def spread(pieces, total, budget):
    """The text of (bytes, new_doc, where) pieces whose sizes sum to `total`, as strings, about
    `budget` bytes of them spread evenly over all of them: a piece is kept while what is kept stays
    within budget/total of what has been read (all when total <= budget; the first pieces up to
    budget when total is None, for sources whose order is already random)."""
    kept = seen = 0
    for data, _, (path, offset) in pieces:
        seen += len(data)
        allowed = budget if total is None else budget * seen / max(total, 1)
        if kept + len(data) > allowed:
            if total is None:
                return
            continue
        try:
            yield data.decode('utf-8')
        except UnicodeDecodeError as e:
            raise PrepareError(f'{path}: not UTF-8 at byte {offset + e.start:,}; pass --encoding=NAME '
                               '(latin-1, cp1252, utf-16, ...) or --tokenizer=byte')
        kept += len(data)


def prepare_parquet(dataset, args, out, source):
    """Text in parquet files (fineweb-edu): --shards=N training files and the validation file,
    each downloaded when tokenization reaches it (the next one while the current one is being
    tokenized), read a row group at a time (a row is a document), tokenized as `text` is."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PrepareError(f'{dataset} reads parquet files with pyarrow: pip install pyarrow')
    spec, n = DATASETS[dataset], int(args.get('shards', 1))
    if n > spec['last']:
        raise PrepareError(f'--shards={n}: {dataset} has {spec["last"]} training shards')
    raw = os.path.join(out, 'raw')
    os.makedirs(raw, exist_ok=True)
    urls = {'train': [spec['parquet'].format(i=i) for i in range(n)], 'val': [spec['parquet'].format(i=spec['last'])]}
    sources = {}

    def fetch(url):
        url = mirrored(url, args)
        path = os.path.join(raw, os.path.basename(url))
        sources[url] = {'url': url, 'sha256': download(url, path, **dl_args(args))}
        return path

    def documents(split):
        ahead = Ahead(fetch, urls[split][0])
        for i in range(len(urls[split])):
            path = ahead.result()
            if i + 1 < len(urls[split]):
                ahead = Ahead(fetch, urls[split][i + 1])
            yield from parquet_documents(path, pq)

    enc, fields = make_tokenizer(args, out, source, lambda budget: spread(documents('train'), None, budget))
    meta = tokenize_splits(documents, enc, fields, args, out)
    return {'dataset': dataset, **meta, 'sources': list(sources.values())}


class Ahead:
    """fn(*args) run in a background thread; result() waits for it (and raises what it raised)."""

    def __init__(self, fn, *args):
        self.value = self.error = None
        self.thread = threading.Thread(target=self.run, args=(fn, args), daemon=True)  # never holds up an exit
        self.thread.start()

    def run(self, fn, args):
        try:
            self.value = fn(*args)
        except BaseException as e:
            self.error = e

    def result(self):
        self.thread.join()
        if self.error:
            raise self.error
        return self.value


def parquet_documents(path, pq):
    """(bytes, new_doc, (path, row)) for each row's "text" of a parquet file, a row group at a
    time. A file that does not read is removed (running again downloads it again)."""
    try:
        f = pq.ParquetFile(path)
        if 'text' not in f.schema_arrow.names:
            raise ValueError('no "text" column')
        row = 0
        for group in range(f.num_row_groups):
            for doc in f.read_row_group(group, columns=['text']).column('text').to_pylist():
                if doc:
                    yield doc.encode('utf-8'), True, (path, row)
                row += 1
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        os.remove(path)
        raise PrepareError(f'{path}: not a readable parquet file of text ({str(e)[:100]}); removed it, run again '
                           'to download it again')


def check_shard(path):
    """A downloaded GPT-2 shard's token count; a bad one is removed (re-running downloads it again)."""
    n_tokens, dtype, problem = shard_header(path)
    if problem or dtype != np.uint16:
        os.remove(path)
        why = problem.removeprefix(f'{path}: ').split(';')[0] if problem else 'its tokens are not uint16'
        raise PrepareError(f'{path}: not a valid GPT-2 token shard ({why}); removed it, re-run to download again')
    return n_tokens


def prepare_tokens(dataset, args, out, source=None):
    """Pre-tokenized GPT-2 shards: download, check headers, no re-tokenization."""
    if args.get('tokenizer', 'gpt2') != 'gpt2':
        raise PrepareError(f'{dataset} is pre-tokenized with gpt2; drop --tokenizer')
    template = DATASETS[dataset]['tokens']
    n = int(args.get('shards', 1))
    if n < 1:
        raise PrepareError(f'--shards={n}: must be at least 1')
    jobs = [('val', 0, 'val_000000.bin')] + [('train', i, f'train_{i:06d}.bin') for i in range(1, n + 1)]
    splits = {'train': {'tokens': 0, 'shards': []}, 'val': {'tokens': 0, 'shards': []}}
    sources = []
    for split, i, name in jobs:
        url = mirrored(template.format(split=split, i=i), args)
        path = os.path.join(out, name)
        sources.append({'url': url, 'sha256': download(url, path, **dl_args(args))})
        splits[split]['tokens'] += check_shard(path)
        splits[split]['shards'].append(name)
    return {'dataset': dataset, 'tokenizer': 'gpt2', 'vocab_size': 50257, 'eot_id': 50256, 'dtype': 'uint16',
            'splits': splits, 'sources': sources}


# ----------------------------------------------------------------------------------------------
# Multiple-choice tasks, for `python tinytpu.py eval`: a jsonl file with one example per line in
# HellaSwag's format: the context ("ctx", or "ctx_a" and "ctx_b"), candidate "endings" and the
# index of the right one, "label". `hellaswag` downloads HellaSwag's validation set; `choices`
# makes such a file from the held-out part of a text (by default the validation 10% of
# Shakespeare, which `prepare.py shakespeare` keeps out of training): the right ending is the
# rest of a line, the wrong ones are its words in other orders.

TASK_EXAMPLE = {
    'ctx': (text, 'text', False), 'ctx_a': (text, 'text', False), 'ctx_b': (text, 'text', False),
    'endings': (lambda v: type(v) is list and len(v) >= 2 and all(map(text, v)), 'a list of 2 or more strings', True),
    'label': (integer(), 'the index of the right ending', True),
}


def read_task(path, limit=0):
    """The first `limit` (0: all) examples of a multiple-choice jsonl as [(context, endings, label)],
    or a one-line PrepareError naming the file and the line that is not such an example."""
    examples = []
    try:
        with open(path, encoding='utf-8') as f:
            for n, line in enumerate(f, 1):
                if limit and len(examples) == limit:
                    break
                if not line.strip():
                    continue
                try:
                    example = json.loads(line)
                except ValueError:
                    raise PrepareError(f'{path}, line {n}: not valid JSON')
                problem = field_problem(example, TASK_EXAMPLE)
                if not problem and 'ctx' not in example and 'ctx_a' not in example:
                    problem = 'no "ctx" (or "ctx_a") field'
                if not problem and example['label'] >= len(example['endings']):
                    problem = f'"label" is {example["label"]}, but there are {len(example["endings"])} endings'
                if not problem and not all(ending.strip() for ending in example['endings']):
                    problem = 'an ending is empty (nothing to score)'
                if problem:
                    raise PrepareError(f'{path}, line {n}: {problem}; each line needs "ctx" (or "ctx_a" and '
                                       '"ctx_b"), "endings" and "label", as in HellaSwag')
                context = example.get('ctx', ' '.join(p for p in (example.get('ctx_a'), example.get('ctx_b')) if p))
                examples.append((context, example['endings'], example['label']))
    except UnicodeDecodeError:
        raise PrepareError(f'{path}: not UTF-8 text')
    if not examples:
        raise PrepareError(f'{path}: no examples in it')
    return examples


def make_choices(corpus, n=1000, choices=4, seed=0):
    """Up to n HellaSwag-format examples from a text. The context is a passage of up to 300
    characters that ends inside a line, after its first words; the right ending is the rest of
    the line (4 or more words), the wrong ones are those same words in other orders. So nothing
    but knowing how words go together tells them apart: an untrained model is at chance."""
    rng = random.Random(seed)
    lines = corpus.split('\n')
    examples = []
    for i in range(1, len(lines)):  # line 0 may start mid-line (where the held-out part begins)
        words = lines[i].split(' ')
        if len(words) < 5 or len(set(words)) < 3:
            continue
        cut = rng.randrange(1, len(words) - 3)
        rest, orders = words[cut:], [words[cut:]]  # the right order first
        for _ in range(20 * choices):
            order = rng.sample(rest, len(rest))
            if len(orders) < choices and order not in orders:
                orders.append(order)
        if len(orders) < choices:
            continue
        first = i
        while first > 1 and sum(len(line) + 1 for line in lines[first - 1:i]) <= 300:
            first -= 1
        endings = [' '.join(order) for order in orders[1:]]
        label = rng.randrange(choices)
        endings.insert(label, ' '.join(rest))
        examples.append({'ctx': '\n'.join(lines[first:i] + [' '.join(words[:cut])]), 'endings': endings, 'label': label})
    return rng.sample(examples, min(n, len(examples)))


def prepare_task(dataset, args, out):
    """OUT/DATASET_val.jsonl: HellaSwag's (downloaded, or a copy of --input) or made by make_choices
    from the held-out part of --input (a file, a directory of .txt files or a URL; by default
    Shakespeare). Checked example by example before it is kept; written whole or not at all."""
    for flag in ('tokenizer', 'shards', 'shard_tokens'):
        if flag in args:
            raise PrepareError(f'--{flag}: {dataset} is a file of text examples, tokenized by `tinytpu.py eval` '
                               'with the model\'s own tokenizer; drop the flag')
    path, sources = os.path.join(out, f'{dataset}_val.jsonl'), []
    source = args.get('input') or DATASETS[dataset]['task']
    if dataset == 'hellaswag' and source.startswith(('http://', 'https://')):
        raw = os.path.join(out, 'raw')
        os.makedirs(raw, exist_ok=True)
        got = os.path.join(raw, os.path.basename(path))
        digest = download(source, got, **dl_args(args))
        try:
            read_task(got)  # checked, then kept
        except PrepareError:
            os.remove(got)
            raise
        copy_file(got, path)
        sources.append({'url': source, 'sha256': digest})
    elif dataset == 'hellaswag':
        if not os.path.isfile(source):
            raise PrepareError(f'--input={source}: no such file (a copy of hellaswag_val.jsonl)')
        read_task(source)
        copy_file(source, path)
        sources.append({'path': source, 'sha256': file_sha256(path)})
    else:
        raw = os.path.join(out, 'raw')
        os.makedirs(raw, exist_ok=True)
        ranges, sources = text_sources('shakespeare' if not args.get('input') else 'text', args, raw)
        held_out = b''
        for p, start, end in ranges['val']:  # the first 4 MB of it are plenty
            with open(p, 'rb') as f:
                f.seek(start)
                held_out += f.read(min(end - start, (4 << 20) - len(held_out)))
        held_out = held_out[:held_out.rfind(b'\n') + 1] if len(held_out) == 4 << 20 else held_out  # whole lines
        try:
            examples = make_choices(held_out.decode('utf-8'))  # --encoding was converted to UTF-8 already
        except UnicodeDecodeError:
            raise PrepareError(f'{source}: not UTF-8 text; pass --encoding=NAME (latin-1, cp1252, utf-16, ...)')
        if not examples:
            raise PrepareError(f'{source}: too little held-out text to make examples of (lines of 5 or more words)')
        with written(path) as f:
            f.write(''.join(json.dumps(e) + '\n' for e in examples).encode())
    return {'dataset': dataset, 'task': os.path.basename(path), 'examples': len(read_task(path)), 'sources': sources}


def prepare(dataset, args):
    if dataset not in DATASETS:
        raise PrepareError(f'unknown dataset {dataset!r} (choose {", ".join(DATASETS)})')
    tokenizer = args.get('tokenizer', 'gpt2')
    source = tokenizer_source(tokenizer)  # checked before anything is downloaded or written
    name = source[0]['tokenizer'] if source else tokenizer
    suffix = '' if name == 'gpt2' or 'task' in DATASETS[dataset] else '_' + name.replace(':', '')
    name = dataset
    if dataset == 'text' and args.get('input'):  # named after its input: the next text gets its own directory
        name = re.sub(r'[^A-Za-z0-9._-]', '_', os.path.splitext(os.path.basename(
            args['input'].split('?')[0].rstrip('/')))[0]).strip('._') or 'text'
    out = args.get('out') or os.path.join('data', name + suffix)
    request = {'dataset': dataset, **{k: v for k, v in args.items() if k in OUTPUT_FLAGS},
               **({'tokenizer_sha256': source[0]['tokenizer_sha256']} if source else {})}
    os.makedirs(out, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise PrepareError(f'--out={out}: directory is not writable')
    with one_writer(out):
        return prepare_into(out, dataset, args, request, source)


@contextlib.contextmanager
def one_writer(out):
    """Hold OUT/.prepare.lock (a lock the system releases when this process ends, however it ends):
    a second prepare.py on the same directory stops at once, before it changes anything."""
    fd = os.open(os.path.join(out, '.prepare.lock'), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PrepareError(f'--out={out} is being prepared by another prepare.py right now; wait for it to '
                           'end, or choose another --out')
    try:
        yield
    finally:
        os.close(fd)


def prepare_into(out, dataset, args, request, source):
    """prepare(), holding the directory: meta.json goes first (until the new one is complete, the
    directory is not), and comes back last."""
    meta_path = os.path.join(out, 'meta.json')
    if os.path.lexists(meta_path):
        meta, problem = read_json(meta_path, DATA_META)
        files = [os.path.join(out, f) for f in prepared_files(meta or {})]
        if meta and meta.get('request') == request and all(os.path.isfile(p) for p in files):
            print(f'{out} is already prepared ({meta_path}); delete it to prepare again')
            return out
        print(f'preparing {out} again: {problem or "made by another command or version"}')
        os.remove(meta_path)
    for stale in glob.glob(os.path.join(out, '.*.tmp')) + glob.glob(os.path.join(out, 'raw', '.*.tmp')):
        os.remove(stale)  # a file half written by a prepare.py that was killed
    if 'task' in DATASETS[dataset]:
        meta = prepare_task(dataset, args, out)
        write_json(meta_path, {**meta, 'request': request})
        print(f'wrote {os.path.join(out, meta["task"])}: {meta["examples"]:,} examples')
        return out
    kind = next((k for k in ('tokens', 'parquet') if k in DATASETS[dataset]), 'text')
    meta = {'tokens': prepare_tokens, 'parquet': prepare_parquet, 'text': prepare_text}[kind](dataset, args, out, source)
    kept = {name for split in meta['splits'].values() for name in split['shards']}
    for stale in glob.glob(os.path.join(out, '*_*.bin')):
        if os.path.basename(stale).startswith(('train_', 'val_')) and os.path.basename(stale) not in kept:
            os.remove(stale)  # left by an earlier preparation: only what meta.json lists stays
    if 'tokenizer_file' not in meta and os.path.lexists(os.path.join(out, TOKENIZER_FILE)):
        os.remove(os.path.join(out, TOKENIZER_FILE))
    mine, child = (resource.getrusage(who).ru_maxrss / 1024 for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print(f'peak memory: {mine:.0f} MB in this process, {child:.0f} MB in the largest worker')
    write_json(meta_path, {**meta, 'request': request})  # meta.json last: its presence means "complete"
    print(f'wrote {out}: train {meta["splits"]["train"]["tokens"]:,} tokens, val {meta["splits"]["val"]["tokens"]:,} tokens')
    return out


OUTPUT_FLAGS = ('tokenizer', 'tokenizer_bytes', 'input', 'val_fraction', 'shards', 'shard_tokens', 'encoding')


def prepared_files(meta):
    """The files a prepared directory's meta.json lists: shards, the tokenizer, the task."""
    return [name for split in meta.get('splits', {}).values() for name in split.get('shards', [])] + \
        [meta[k] for k in ('tokenizer_file', 'task') if meta.get(k)]


# Every flag: (type, what a value must satisfy, the words for it). Parsed and checked in one place,
# before anything is downloaded or written.
FLAGS = {
    'tokenizer': (str, bool, 'a name'), 'out': (str, bool, 'a directory'),
    'input': (str, bool, 'a file, directory or URL'), 'mirror': (str, bool, 'a URL'),
    'val_fraction': (float, lambda v: 0 < v < 1, 'between 0 and 1'),
    'shards': (int, lambda v: v >= 1, 'at least 1'),
    'shard_tokens': (int, lambda v: v >= 1, 'at least 1'),
    'tokenizer_bytes': (float, lambda v: v >= 1, 'a number of bytes, at least 1 (e.g. 1e9)'),
    'workers': (int, lambda v: v >= 0, 'at least 0 (0 = one per core)'),
    'allow_http': (bool, lambda v: True, 'true or false'),
    'encoding': (str, lambda v: known_encoding(v), 'an encoding Python knows (latin-1, cp1252, utf-16, ...)'),
}


def known_encoding(name):
    try:
        return bool(codecs.lookup(name))
    except LookupError:
        return False


def flag_value(name, kind, eq, value):
    """The value of `--name` (eq == '') or `--name=value` as kind (bool, int, float or str), or a
    one-line PrepareError. tinytpu.py parses its flags with this too."""
    if kind is bool:
        if not eq or value.lower() in ('1', 'true', 'yes'):
            return True
        if value.lower() in ('0', 'false', 'no'):
            return False
        raise PrepareError(f'--{name}={value}: expected true or false')
    if not eq:
        raise PrepareError(f'--{name} needs a value: --{name}=...')
    try:
        v = kind(value)
    except ValueError:
        raise PrepareError(f'--{name}={value}: expected {"an integer" if kind is int else "a number"}')
    if kind is int and not -2**63 <= v < 2**63:
        raise PrepareError(f'--{name}={value}: out of range (integers here are below 2^63)')
    return v


def parse_flags(argv):
    """['--shards=2', '--allow_http', ...] -> {'shards': 2, 'allow_http': True, ...}, or a
    PrepareError naming the first flag that is unknown, lacks a value or has a bad one."""
    args = {}
    for a in argv:
        name, eq, value = a.removeprefix('--').partition('=')
        if not a.startswith('--') or name not in FLAGS:
            raise PrepareError(f'unknown flag {a!r} (python prepare.py --help lists them)')
        kind, ok, words = FLAGS[name]
        args[name] = flag_value(name, kind, eq, value)
        if not ok(args[name]):
            raise PrepareError(f'--{name}={value}: must be {words}')
    return args


def main(argv):
    if any(a in ('-h', '--help') for a in argv):
        print(__doc__)
        print('flags: ' + ' '.join(f'--{f}' for f in FLAGS) + f'\ndatasets: {", ".join(DATASETS)}')
        return 0
    dataset = argv[0] if argv and not argv[0].startswith('-') else 'shakespeare'
    try:
        args = parse_flags(argv[1:] if argv and argv[0] == dataset else argv)
        if args.get('out', '').startswith('gs://'):
            raise PrepareError(f'--out={args["out"]}: prepare.py writes to a local directory; prepare it there '
                               f'(--out=DIR), then upload it: gcloud storage rsync -r DIR {args["out"]} -x "^raw/"')
        prepare(dataset, args)
    except (PrepareError, ValueError) as e:  # a mistake the user can fix: one line, exit 2 (as tinytpu's)
        print(f'error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('\ninterrupted; re-run the same command to continue', file=sys.stderr)
        return 130
    except OSError as e:
        return file_error(e)
    return 0


def file_error(e):
    """An OSError on a file the user named or made (missing, a directory, not allowed, a full
    disk) as one line and exit code 2, for both scripts; one that names no file is re-raised."""
    if not e.filename:
        raise e
    print(f'error: {e.filename}: {e.strerror}', file=sys.stderr)
    return 2


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
