"""prepare.py: download a text corpus, tokenize it, and write the token shards tinytpu.py trains on.

    python prepare.py                                     # tiny Shakespeare, GPT-2 BPE -> data/shakespeare
    python prepare.py shakespeare --tokenizer=byte        # byte tokens -> data/shakespeare_byte
    python prepare.py tinystories                         # 2.2 GB of short stories, streamed
    python prepare.py fineweb-edu --shards=24 --tokenizer=bpe:32768   # nanochat's text, its own 32K BPE
    python prepare.py fineweb10B --shards=8               # pre-tokenized GPT-2 shards, 100M tokens each
    python prepare.py text --input=my_corpus/             # your own .txt files (or one file, or a URL)
    python prepare.py hellaswag                           # HellaSwag's 10,042 validation examples (eval)

Output (--out; by default data/NAME, or data/NAME_TOKENIZER for a tokenizer other than gpt2, where
NAME is the dataset's or, for `text`, its input's): OUT/train_000000.bin ..., OUT/val_000000.bin ...,
and OUT/meta.json listing them, written last; for hellaswag, OUT/hellaswag_val.jsonl, the examples
`python tinytpu.py eval` scores. Shards use llm.c's format: a header of 256 int32 (magic,
version, token count), then the tokens as uint16, or as uint32 (magic 20240801, version 7) for a
vocabulary of more than 65,536 tokens. Every document starts with the end-of-text token, as in
llm.c; `byte` tokens are the text's raw bytes. Hugging Face files come from $HF_ENDPOINT when it is
set (a mirror). Needs requests, tiktoken and numpy; --tokenizer=bpe:N also rustbpe, fineweb-edu pyarrow.
"""

import argparse
import base64
import contextlib
import fcntl
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import resource
import shutil
import sys
import tempfile
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

HF = os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/') + '/datasets'  # or a mirror's
DATASETS = {  # name: where the text (or tokens) come from
    'shakespeare': dict(
        url='https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt',
        sha256='86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed'),
    'tinystories': dict(
        train=f'{HF}/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-train.txt',
        val=f'{HF}/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-valid.txt'),
    # FineWeb-edu's sample-100BT shuffled into parquet files shard_00000 ... shard_01822 (a "text" column,
    # ~250M characters each), the last for validation, as nanochat takes it (dataset.py's BASE_URL, MAX_SHARD)
    'fineweb-edu': dict(parquet=f'{HF}/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_{{i:05d}}.parquet',
                        last=1822),
    'fineweb10B': dict(tokens=f'{HF}/kjj0/fineweb10B-gpt2/resolve/main/fineweb_{{split}}_{{i:06d}}.bin'),
    'finewebedu10B': dict(tokens=f'{HF}/kjj0/finewebedu10B-gpt2/resolve/main/finewebedu_{{split}}_{{i:06d}}.bin'),
    'text': {},
    # multiple-choice examples for `tinytpu.py eval`: a jsonl file, not token shards
    'hellaswag': dict(task='https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl'),
}


class PrepareError(Exception):
    """A problem the user can fix: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------
# meta.json says what a prepared directory holds: its shards per split and their token counts, the
# tokenizer (by name, or a trained one's file and SHA-256), the vocabulary, where the text came from,
# and the request (dataset and flags) that made it. tinytpu.py checks every field it uses.

BUILT_IN = ('gpt2', 'r50k_base', 'p50k_base', 'cl100k_base', 'o200k_base')


def read_meta(path):
    """A meta.json as a dict; {} if it is missing or not a JSON object."""
    try:
        with open(path, encoding='utf-8') as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return {}
    return meta if type(meta) is dict else {}


def listed_files(meta):
    """The file names a meta.json lists (shards, tokenizer, task); None if its lists are damaged."""
    try:
        names = [n for s in meta.get('splits', {}).values() for n in s['shards']] + \
            [meta[k] for k in ('tokenizer_file', 'task') if k in meta]
        return names if all(type(n) is str and n == os.path.basename(n) for n in names) else None
    except (AttributeError, KeyError, TypeError):
        return None


# ----------------------------------------------------------------------------------------------
# Tokenizers, all encoded by tiktoken: OpenAI's `gpt2`, `cl100k_base` and `o200k_base`; `byte`
# (256 byte tokens and end-of-text); `bpe:N`, a byte-level BPE of N tokens learned here from the
# training split (up to --tokenizer_bytes of it, spread over all of it) by rustbpe, nanochat's
# trainer: the text is split by BPE_PATTERN and the most frequent adjacent pair of tokens merged,
# N - 257 times. Its ranks go into the data directory as tokenizer.tiktoken (tiktoken's format),
# and meta.json records that file's SHA-256; end-of-text is the last id, N - 1.

# GPT-4's split with numbers cut into pieces of at most two digits, as nanochat does for small
# vocabularies: no ids spent on the thousand three-digit numbers.
BPE_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
               r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
TOKENIZER_FILE = 'tokenizer.tiktoken'
TOKENIZER_FIELDS = ('tokenizer_file', 'tokenizer_sha256', 'tokenizer_pattern', 'tokenizer_trained_on')
SHA256 = re.compile('[0-9a-f]{64}')


def get_encoding(name):
    """A tokenizer that is not trained, by name."""
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
    """The tokenizer a meta.json names (a data directory's, or a checkpoint's): by name, or a
    trained one from directory/tokenizer.tiktoken, which must have the SHA-256 meta.json records.
    `what` names the meta.json in errors."""
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


def train_bpe(texts, vocab_size):
    """A byte-level BPE of vocab_size tokens (end-of-text included) learned from an iterable of
    strings by rustbpe: -> ranks. The same strings give the same ranks on any number of threads."""
    try:
        import rustbpe
    except ImportError:
        raise PrepareError('--tokenizer=bpe:N trains a tokenizer with rustbpe: pip install rustbpe')
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(texts, vocab_size - 1, buffer_size=256, pattern=BPE_PATTERN)  # <= 256 MB held
    return {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}


# ----------------------------------------------------------------------------------------------
# Files. Every file either script writes is written whole or not at all: into a fresh file of its
# own (created exclusively: never through a link left in its place), renamed over the name at the
# end. A download streams so, checking its size and (where known) its SHA-256; it is retried from
# the start, with backoff, after a timeout, a dropped connection or a server error (as nanochat's
# are), and also when slower than SLOW (a trickle); one unfinished after DEADLINE gives up.

SLOW = (16_384, 60)           # fewer bytes than this in this many seconds: too slow, retry
DEADLINE = (3600, 100_000)    # a file gets this many seconds plus one per this many bytes


def fresh_file(path):
    """A new file beside `path` under a name no one else has: -> (open binary file, its name)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or '.', prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
    return os.fdopen(fd, 'w+b'), tmp


@contextlib.contextmanager
def written(path):
    """`with written(path) as f:` writes a file whole or not at all: on an error, path is unchanged."""
    f, tmp = fresh_file(path)
    try:
        with f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def write_json(path, record):
    with written(path) as f:
        f.write(json.dumps(record, indent=1).encode())


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 22), b''):
            h.update(block)
    return h.hexdigest()


class Retry(requests.ConnectionError):  # a failed attempt worth another: a 5xx, a connection ended early
    pass


def download(url, path, sha256=None, retries=5, timeout=30, allow_http=False):
    """Download url to path (skipped if path exists). Returns the file's SHA-256."""
    if url.startswith('http://') and not allow_http:
        raise PrepareError(f'{url}: plain http can be tampered with; use https or pass --allow_http')
    if os.path.exists(path):
        return file_sha256(path)
    t0 = time.time()
    for attempt in range(retries + 1):
        try:
            with written(path) as f:
                digest = fetch(url, f, timeout, t0)
                if sha256 and digest != sha256:
                    raise PrepareError(f'{url}: SHA-256 {digest} does not match the expected {sha256}; '
                                       'the download was corrupted or the file changed upstream')
            return digest
        except (requests.ConnectionError, requests.Timeout) as e:
            dns = 'NameResolution' in repr(e) or 'Name or service not known' in repr(e)
            why = 'DNS lookup failed' if dns else (str(e).split('\n')[0][:160] or type(e).__name__)
            if attempt == retries or dns:
                raise PrepareError(f'{url}: download failed ({why}); check your network, or download it yourself '
                                   'and pass --input=PATH')
            print(f'  {why}; retrying in {min(2 ** attempt, 30)}s', flush=True)
            time.sleep(min(2 ** attempt, 30))


def fetch(url, f, timeout, t0):
    """One attempt: the body into f as it arrives (in reads of up to 64 KB: requests' iter_content
    waits for whole blocks, so a trickle would never reach the speed check); how far it is, every
    10 s. -> its SHA-256"""
    with requests.get(url, stream=True, timeout=timeout) as r:
        if r.status_code >= 400:
            if r.status_code >= 500:
                raise Retry(f'HTTP {r.status_code}')
            raise PrepareError(f'{url}: HTTP {r.status_code} {r.reason}; check the URL, or download '
                               'the file yourself and pass --input=PATH')
        total = int(r.headers['Content-Length']) if r.headers.get('Content-Length', '').isdigit() else None
        have, h, t1, read = 0, hashlib.sha256(), time.time(), getattr(r.raw, 'read1', r.raw.read)
        deadline, window, shown = t0 + DEADLINE[0] + (total or 0) / DEADLINE[1], (t1, 0), t1
        while True:
            try:
                block = read(1 << 16, decode_content=True)
            except urllib3.exceptions.ReadTimeoutError as e:
                raise requests.Timeout(e)
            except (urllib3.exceptions.ProtocolError, urllib3.exceptions.DecodeError) as e:
                raise Retry(f'the connection ended early ({type(e).__name__})')
            if not block:
                break
            f.write(block)
            h.update(block)
            have, now = have + len(block), time.time()
            if now > deadline:
                raise PrepareError(f'{url}: download failed (not finished after {now - t0:.0f}s at {have / 1e6:,.1f} '
                                   'MB); check your network, or download it yourself and pass --input=PATH')
            if now - window[0] >= SLOW[1]:
                if have - window[1] < SLOW[0]:
                    raise requests.Timeout(f'slower than {SLOW[0]:,} bytes in {SLOW[1]}s')
                window = (now, have)
            if now - shown >= 10:
                shown = now
                print(f'  {url.split("?")[0].rsplit("/", 1)[-1]}: {have / 1e6:,.1f}' + (f' of {total / 1e6:,.1f}' if total
                      else '') + f' MB, {have / 1e6 / (now - t1):.1f} MB/s', flush=True)
        if total and have != total:
            raise Retry(f'got {have:,} bytes of a {total:,}-byte file')
        return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Shards: tokens are appended to a writer that cuts a new file every SHARD_TOKENS tokens. Each is
# a fresh file, its header written last, then renamed: a .bin that exists is complete.

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


class ShardWriter:
    """Appends tokens to fresh files for SPLIT_000000.bin, SPLIT_000001.bin, ... as they arrive (never
    more than one batch in memory), a new file every shard_tokens tokens."""

    def __init__(self, out, split, dtype, shard_tokens=SHARD_TOKENS):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, np.dtype(dtype), shard_tokens
        self.file, self.paths, self.tokens = None, [], 0

    def add(self, tokens):
        tokens = np.asarray(tokens).astype(self.dtype.newbyteorder('<'))
        self.tokens += len(tokens)
        while len(tokens) or (self.file is None and not self.paths):  # no tokens at all: still one empty shard
            if self.file is None:
                self.path = os.path.join(self.out, f'{self.split}_{len(self.paths):06d}.bin')
                (self.file, self.tmp), self.in_file = fresh_file(self.path), 0
                self.write(b'\0' * HEADER_BYTES)  # a placeholder, filled in by finish()
            take, tokens = tokens[:self.shard_tokens - self.in_file], tokens[self.shard_tokens - self.in_file:]
            self.write(take.tobytes())
            self.in_file += len(take)
            if self.in_file == self.shard_tokens:
                self.finish()

    def write(self, data, close=False):
        """Write to the current file (and close it); a failure (a full disk) removes it, in one line."""
        try:
            self.file.write(data)
            if close:
                self.file.close()  # flushes: a full disk can show here
        except OSError as e:
            with contextlib.suppress(OSError):
                self.file.close()
            os.remove(self.tmp)
            raise PrepareError(f'{self.path}: could not write ({e.strerror or e}); free some space and run '
                               'the same command again')

    def finish(self):
        magic = next(m for m, (_, dtype) in SHARD_FORMATS.items() if dtype == self.dtype.type)
        self.file.seek(0)
        self.write(np.array([magic, SHARD_FORMATS[magic][0], self.in_file] + [0] * 253, '<i4').tobytes(), close=True)
        os.replace(self.tmp, self.path)
        self.paths.append(self.path)
        self.file = None

    def close(self):
        self.add([])
        if self.file is not None:
            self.finish()
        return self.paths


# ----------------------------------------------------------------------------------------------
# Tokenization: text is read as bytes in pieces of about CHUNK_BYTES, cut where the tokenizer would
# put a token boundary anyway, so tokenizing the pieces apart gives exactly the tokens of the whole
# text. A pool of processes, one per core, tokenizes them, at most 2 chunks per worker in flight so
# memory stays bounded whatever the corpus size; results are written in order. BPE tokenizers take
# UTF-8 text and refuse anything else with the file and byte offset. As in llm.c, every document
# starts with the end-of-text token.

_encoder = None


def _init_worker(tokenizer, parent):
    """tokenizer: a built-in one's name, or (meta.json, directory) of a trained one. The worker
    ends when prepare.py does, even when it is killed (SIGKILL runs no clean-up)."""
    global _encoder
    _encoder = get_encoding(tokenizer) if isinstance(tokenizer, str) else load_encoding(*tokenizer)

    def exit_with_parent():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)
    threading.Thread(target=exit_with_parent, daemon=True).start()


def not_utf8(path, offset):
    return PrepareError(f'{path}: not UTF-8 at byte {offset:,}; convert it first (iconv -f ENCODING -t UTF-8 '
                        'FILE > FILE.txt) or pass --tokenizer=byte')


def _encode(chunk):
    """[(bytes, eot_before, (path, offset)), ...] -> (uint32 tokens, with an end-of-text token where
    eot_before is set; bytes read), in a worker."""
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
                raise not_utf8(path, offset + e.start)
        n_bytes += len(data)
    return np.concatenate([np.asarray(t, np.uint32) for t in out] or [np.zeros(0, np.uint32)]), n_bytes


def tokenize(chunks, tokenizer, writer, workers=None):
    """Tokenize an iterable of chunks (lists of (bytes, eot_before, where)) in parallel into writer."""
    workers, in_bytes, t0 = workers or os.cpu_count(), 0, time.time()  # one process per core
    spawn = multiprocessing.get_context('spawn')  # fork is unsafe if the caller runs threads (JAX)
    with ProcessPoolExecutor(workers, spawn, initializer=_init_worker, initargs=(tokenizer, os.getpid())) as pool:
        pending = deque()
        try:
            for chunk in itertools.chain(chunks, [None]):  # streamed: never the whole corpus at once
                if chunk is not None:
                    pending.append(pool.submit(_encode, chunk))
                while pending and (chunk is None or len(pending) >= 2 * workers):
                    tokens, n_bytes = pending.popleft().result()
                    writer.add(tokens)
                    in_bytes += n_bytes
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
    tokens, else before the last newline that follows an ASCII letter or digit (no split pattern,
    tiktoken's or BPE_PATTERN, joins a letter or digit to the newline after it)."""
    with open(path, 'rb') as f:
        f.seek(start)
        carry, offset, left = b'', start, end - start
        while left > 0 and (block := f.read(min(size, left))):
            left -= len(block)
            data, cut = carry + block, len(carry + block)
            if left > 0 and sep and sep in data:
                cut = data.rfind(sep) + len(sep)
            elif left > 0 and cut_anywhere:  # but not inside an end-of-text marker
                cut -= len(sep) - 1 if sep else 0
            elif left > 0:
                while (cut := data.rfind(b'\n', 0, cut)) > 0 and not data[cut - 1:cut].isalnum():
                    pass
                cut = max(cut, 0)
            if cut == 0 and len(data) > 64 * CHUNK_BYTES:  # no boundary in 64 MB: cut at a newline
                cut = data.rfind(b'\n') + 1 or len(data)
            if cut:
                yield data[:cut], offset
                offset += cut
            carry = data[cut:]
        if carry:
            yield carry, offset


def chunked(pieces, size=CHUNK_BYTES):
    """Group (bytes, new_doc, where) pieces into lists of about `size` bytes."""
    chunk, n = [], 0
    for piece in pieces:
        chunk.append(piece)
        n += len(piece[0])
        if n >= size:
            yield chunk
            chunk, n = [], 0
    if chunk:
        yield chunk


def split_point(path, fraction, by_bytes):
    """Where the first `fraction` of a file's bytes ends; for BPE tokenizers, moved back to where a
    UTF-8 character starts (a byte that is not 0b10xxxxxx). For ASCII text, nanoGPT's split."""
    cut = int(os.path.getsize(path) * fraction)
    with open(path, 'rb') as f:
        f.seek(max(cut - 3, 0))
        near, i = f.read(4), cut - max(cut - 3, 0)  # bytes cut-3 .. cut; byte `cut` is near[i]
    while not by_bytes and 0 < i < len(near) and near[i] & 0xC0 == 0x80:
        i, cut = i - 1, cut - 1
    return cut


# ----------------------------------------------------------------------------------------------
# Datasets: text (one file split in two, several split whole), parquet (fineweb-edu), and
# pre-tokenized GPT-2 shards (fineweb10B).

def text_sources(dataset, args, raw):
    """-> ({'train': [(path, start, end) byte ranges], 'val': [...]}, [source records]) of a text
    dataset or --input (a file, a directory of .txt files, a URL): one file is split (the first
    1 - val_fraction is train, as in nanoGPT); of several, the last val_fraction by bytes is val."""
    spec, fraction, source = DATASETS[dataset], args.get('val_fraction', 0.1), args.get('input')
    if dataset == 'tinystories' and not source:
        files = {split: [os.path.join(raw, os.path.basename(spec[split]))] for split in ('train', 'val')}
        sources = [{'url': spec[split], 'sha256': download(spec[split], files[split][0], allow_http=args.get('allow_http'))}
                   for split in ('train', 'val')]
        return {split: [(f, 0, os.path.getsize(f)) for f in fs] for split, fs in files.items()}, sources
    source = source or spec.get('url')
    if not source:
        raise PrepareError('text: pass --input=FILE, --input=DIR (of .txt files) or --input=URL')
    digest = None
    if source.startswith(('http://', 'https://')):
        files = [os.path.join(raw, os.path.basename(source.split('?')[0]) or 'input.txt')]
        digest = download(source, files[0], spec.get('sha256') if source == spec.get('url') else None,
                          allow_http=args.get('allow_http'))
    elif os.path.isdir(source):
        files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(source) for f in fs if f.endswith('.txt'))
        if not files:
            raise PrepareError(f'--input={source}: no .txt files in that directory')
    elif os.path.isfile(source):
        files, digest = [source], file_sha256(source)
    else:
        raise PrepareError(f'--input={source}: no such file or directory')
    sources = [{'url' if '://' in source else 'path': source, 'sha256': digest}]
    if len(files) == 1:
        cut = split_point(files[0], 1 - fraction, args.get('tokenizer', 'gpt2') == 'byte')
        return {'train': [(files[0], 0, cut)], 'val': [(files[0], cut, os.path.getsize(files[0]))]}, sources
    sizes = np.cumsum([os.path.getsize(f) for f in files])
    n = min(max(int(np.searchsorted(sizes, sizes[-1] * (1 - fraction), side='right')), 1), len(files) - 1)
    return {'train': [(f, 0, os.path.getsize(f)) for f in files[:n]],
            'val': [(f, 0, os.path.getsize(f)) for f in files[n:]]}, sources


def prepare_text(dataset, args, out, source):
    raw = os.path.join(out, 'raw')
    os.makedirs(raw, exist_ok=True)
    paths, sources = text_sources(dataset, args, raw)
    for split in ('train', 'val'):
        if sum(end - start for _, start, end in paths[split]) == 0:
            raise PrepareError(f'{args.get("input") or dataset}: no text for the {split} split (the input is empty, '
                               'or too short to split by --val_fraction); give it more text')

    def documents(split, size=CHUNK_BYTES):
        return read_documents(paths[split], dataset == 'tinystories', args.get('tokenizer', 'gpt2') == 'byte', size)

    train_bytes = sum(end - start for _, start, end in paths['train'])  # a sample of it, in pieces of ~64 KB
    enc, fields = make_tokenizer(args, out, source, lambda budget: spread(documents('train', 1 << 16), train_bytes, budget))
    return {'dataset': dataset, **tokenize_splits(documents, enc, fields, args, out), 'sources': sources}


def tokenize_splits(documents, enc, fields, args, out):
    """Both splits' documents (documents(split): (bytes, new_doc, where) pieces) tokenized into
    shards in out: -> meta.json's fields for the tokens and the tokenizer."""
    dtype = np.uint16 if enc.n_vocab <= 65536 else np.uint32
    loads = enc.name if 'tokenizer_sha256' not in fields else ({'tokenizer': enc.name, **fields}, out)  # the workers
    splits = {}
    for split in ('train', 'val'):
        writer = ShardWriter(out, split, dtype, args.get('shard_tokens', SHARD_TOKENS))
        n_bytes, seconds = tokenize(chunked(documents(split)), loads, writer, args.get('workers', 0))
        shards = writer.close()
        splits[split] = {'tokens': writer.tokens, 'bytes': n_bytes, 'shards': [os.path.basename(p) for p in shards]}
        print(f'{split}: {writer.tokens:,} tokens from {n_bytes / 1e6:,.1f} MB in {seconds:.1f}s '
              f'({n_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s) -> {len(shards)} shard(s)', flush=True)
    return {'tokenizer': enc.name, **fields, 'vocab_size': enc.n_vocab, 'eot_id': enc.eot_token,
            'dtype': np.dtype(dtype).name, 'splits': splits,
            'bytes_per_token': splits['val']['bytes'] / max(splits['val']['tokens'], 1)}


def make_tokenizer(args, out, source, sample):
    """The tokenizer --tokenizer names, as (tiktoken encoding, meta.json's fields for it). bpe:N
    is trained here on sample(budget) (strings of about budget bytes of the training split) and
    written into out; --tokenizer=DIR's (source: read before anything changed) is written there
    too. Built-in ones need no fields."""
    name, path = args.get('tokenizer', 'gpt2'), os.path.join(out, TOKENIZER_FILE)
    if source:  # a tokenizer trained for another directory (or for this one, before)
        meta, data = source
        with written(path) as f:
            f.write(data)
        fields = {**{k: meta[k] for k in TOKENIZER_FIELDS if k in meta}, 'tokenizer_file': TOKENIZER_FILE}
        return load_encoding({'tokenizer': meta['tokenizer'], **fields}, out), fields
    n = bpe_size(name)
    if not n:
        return get_encoding(name), {}
    budget, seen, t = int(args.get('tokenizer_bytes', 1e9)), [0], time.time()
    print(f'training a {n:,}-token BPE on up to {budget / 1e6:,.0f} MB of the training text ...', flush=True)
    ranks = train_bpe((seen.append(len(s.encode('utf-8'))) or s for s in sample(budget)), n)
    with written(path) as f:  # tiktoken's format, in rank order: the same ranks give the same bytes
        for token, rank in sorted(ranks.items(), key=lambda t: t[1]):
            f.write(base64.b64encode(token) + b' %d\n' % rank)
    seconds, peak, learned = time.time() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, sum(seen)
    print(f'tokenizer: {len(ranks) + 1:,} tokens learned from {learned / 1e6:,.1f} MB in {seconds:.1f}s '
          f'(peak memory {peak:,.0f} MB) -> {path}', flush=True)
    if len(ranks) + 1 < n:
        print(f'note: the text has too few distinct pieces for {n:,} tokens; the tokenizer has {len(ranks) + 1:,}')
    fields = {'tokenizer_file': TOKENIZER_FILE, 'tokenizer_sha256': file_sha256(path),
              'tokenizer_pattern': BPE_PATTERN, 'tokenizer_trained_on': {'bytes': learned, 'seconds': round(seconds, 1)}}
    return bpe_encoding(name, ranks), fields


def tokenizer_source(name):
    """--tokenizer=DIR: (DIR's meta.json, its trained tokenizer's file) read whole and checked now,
    before anything is written (DIR may be --out itself); None for a tokenizer's name (checked)."""
    if name in BUILT_IN or name == 'byte' or bpe_size(name):
        return None
    meta_path = os.path.join(name, 'meta.json')
    if not os.path.isdir(name):
        get_encoding(name)  # says which names there are
    meta = read_meta(meta_path)
    if not (SHA256.fullmatch(str(meta.get('tokenizer_sha256'))) and bpe_size(str(meta.get('tokenizer')))
            and listed_files(meta) is not None and type(meta.get('tokenizer_pattern', '')) is str):
        raise PrepareError(f'--tokenizer={name}: {meta_path} names no trained tokenizer; pass a directory prepared '
                           'with --tokenizer=bpe:N')
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
        if kept + len(data) > (budget if total is None else budget * seen / max(total, 1)):
            if total is None:
                return
            continue
        try:
            yield data.decode('utf-8')
        except UnicodeDecodeError as e:
            raise not_utf8(path, offset + e.start)
        kept += len(data)


def prepare_parquet(dataset, args, out, source):
    """Text in parquet files (fineweb-edu): --shards=N training files and the validation file, each
    downloaded when tokenization reaches it, read a row group at a time (a row is a document)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PrepareError(f'{dataset} reads parquet files with pyarrow: pip install pyarrow')
    spec, n = DATASETS[dataset], args.get('shards', 1)
    if n > spec['last']:
        raise PrepareError(f'--shards={n}: {dataset} has {spec["last"]} training shards')
    raw = os.path.join(out, 'raw')
    os.makedirs(raw, exist_ok=True)
    urls = {'train': [spec['parquet'].format(i=i) for i in range(n)], 'val': [spec['parquet'].format(i=spec['last'])]}
    sources = {}

    def fetch(url):
        path = os.path.join(raw, os.path.basename(url))
        sources[url] = {'url': url, 'sha256': download(url, path, allow_http=args.get('allow_http'))}
        return path

    def documents(split):
        for url in urls[split]:
            yield from parquet_documents(fetch(url), pq)

    enc, fields = make_tokenizer(args, out, source, lambda budget: spread(documents('train'), None, budget))
    return {'dataset': dataset, **tokenize_splits(documents, enc, fields, args, out), 'sources': list(sources.values())}


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


def prepare_tokens(dataset, args, out, source=None):
    """Pre-tokenized GPT-2 shards: downloaded and their headers checked (a bad one is removed)."""
    if args.get('tokenizer', 'gpt2') != 'gpt2':
        raise PrepareError(f'{dataset} is pre-tokenized with gpt2; drop --tokenizer')
    jobs = [('val', 0, 'val_000000.bin')] + [('train', i, f'train_{i:06d}.bin') for i in range(1, args.get('shards', 1) + 1)]
    splits, sources = {'train': {'tokens': 0, 'shards': []}, 'val': {'tokens': 0, 'shards': []}}, []
    for split, i, name in jobs:
        url, path = DATASETS[dataset]['tokens'].format(split=split, i=i), os.path.join(out, name)
        sources.append({'url': url, 'sha256': download(url, path, allow_http=args.get('allow_http'))})
        n_tokens, dtype, problem = shard_header(path)
        if problem or dtype != np.uint16:
            os.remove(path)
            why = problem.removeprefix(f'{path}: ').split(';')[0] if problem else 'its tokens are not uint16'
            raise PrepareError(f'{path}: not a valid GPT-2 token shard ({why}); removed it, re-run to download again')
        splits[split]['tokens'] += n_tokens
        splits[split]['shards'].append(name)
    return {'dataset': dataset, 'tokenizer': 'gpt2', 'vocab_size': 50257, 'eot_id': 50256, 'dtype': 'uint16',
            'splits': splits, 'sources': sources}


# ----------------------------------------------------------------------------------------------
# HellaSwag, for `python tinytpu.py eval`: its validation set, a jsonl file of one example per line
# (the context, "ctx" or "ctx_a" and "ctx_b"; candidate "endings"; "label", the right one's index).
# Checked here as a JSON object per line, field by field when tinytpu reads it.

def prepare_task(dataset, args, out):
    """OUT/hellaswag_val.jsonl, downloaded (or copied from --input) and checked before it is kept."""
    for flag in ('tokenizer', 'shards', 'shard_tokens'):
        if flag in args:
            raise PrepareError(f'--{flag}: {dataset} is a file of text examples, tokenized by `tinytpu.py eval` '
                               'with the model\'s own tokenizer; drop the flag')
    path, source = os.path.join(out, f'{dataset}_val.jsonl'), args.get('input') or DATASETS[dataset]['task']
    got = os.path.join(out, 'raw', os.path.basename(path)) if '://' in source else source
    if got == source and not os.path.isfile(source):
        raise PrepareError(f'--input={source}: no such file (a copy of hellaswag_val.jsonl)')
    os.makedirs(os.path.dirname(got) or '.', exist_ok=True)
    digest = download(source, got, allow_http=args.get('allow_http')) if got != source else file_sha256(got)
    with open(got, 'rb') as f:
        lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    bad = next((i for i, line in lines if not re.fullmatch(rb'\s*\{.*\}\s*', line, re.S)), None)
    if bad or not lines:
        if got != source:
            os.remove(got)  # not kept: running again downloads it again
        raise PrepareError(f'{got}, line {bad}: not a JSON object (one per line, as in HellaSwag)' if bad else
                           f'{got}: no examples in it')
    with open(got, 'rb') as f, written(path) as copy:
        shutil.copyfileobj(f, copy)
    return {'dataset': dataset, 'task': os.path.basename(path), 'examples': len(lines),
            'sources': [{'url' if got != source else 'path': source, 'sha256': digest}]}


# ----------------------------------------------------------------------------------------------
# One directory, one writer, published whole: meta.json goes first and comes back last.

def prepare(dataset, args):
    source = tokenizer_source(args.get('tokenizer', 'gpt2'))  # checked before anything is downloaded or written
    tokenizer = source[0]['tokenizer'] if source else args.get('tokenizer', 'gpt2')
    name = re.sub(r'[^A-Za-z0-9._-]', '_', os.path.splitext(os.path.basename(args['input'].split('?')[0].rstrip(
        '/')))[0]).strip('._') or 'text' if dataset == 'text' and args.get('input') else dataset  # input's: its own
    suffix = '' if tokenizer == 'gpt2' or 'task' in DATASETS[dataset] else '_' + tokenizer.replace(':', '')
    out = args.get('out') or os.path.join('data', name + suffix)
    request = {'dataset': dataset, **{k: v for k, v in args.items() if k in OUTPUT_FLAGS},
               **({'tokenizer_sha256': source[0]['tokenizer_sha256']} if source else {})}
    os.makedirs(out, exist_ok=True)
    with open(os.open(os.path.join(out, '.prepare.lock'), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)) as lock:
        try:  # one writer at a time: a lock the system releases when this process ends, however it ends
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PrepareError(f'--out={out} is being prepared by another prepare.py right now; wait for it to '
                               'end, or choose another --out') from None
        return prepare_into(out, dataset, args, request, source)


OUTPUT_FLAGS = ('tokenizer', 'tokenizer_bytes', 'input', 'val_fraction', 'shards', 'shard_tokens')


def prepare_into(out, dataset, args, request, source):
    """prepare(), holding the directory: until the new meta.json is written, it is not a prepared one."""
    meta_path = os.path.join(out, 'meta.json')
    if os.path.lexists(meta_path):
        meta = read_meta(meta_path)
        files = listed_files(meta)
        if meta.get('request') == request and files is not None and all(os.path.isfile(os.path.join(out, f))
                                                                          for f in files):
            print(f'{out} is already prepared ({meta_path}); delete it to prepare again')
            return out
        print(f'preparing {out} again: its meta.json was made by another command or version, or is damaged')
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


# ----------------------------------------------------------------------------------------------
# The command line: every flag is parsed and checked here, before anything is downloaded or written.

class Flags(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2 (main), not argparse's usage block
        raise PrepareError(f'{message}; python prepare.py --help lists the datasets and flags')


def parse_flags(argv):
    """['shakespeare', '--shards=2', ...] -> (dataset, {'shards': 2, ...}): only the flags given."""
    def flag(kind, ok, words):  # an argparse type: a value of `kind` that satisfies `ok`
        def parse(value):
            try:
                v = kind(value)
            except ValueError:
                v = None
            if v is None or not ok(v):
                raise argparse.ArgumentTypeError(f'{value!r}: expected {words}')
            return v
        return parse

    p = Flags(prog='prepare.py', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
              argument_default=argparse.SUPPRESS, allow_abbrev=False)
    count = (lambda lo: flag(int, lambda v: v >= lo, f'an integer of at least {lo}'))
    p.add_argument('dataset', nargs='?', default='shakespeare', choices=DATASETS, help=', '.join(DATASETS))
    p.add_argument('--tokenizer', help='gpt2 (default), cl100k_base, o200k_base, byte, bpe:N (learn a BPE of N '
                   'tokens from the training text; needs rustbpe), or a directory prepared with one (reuses it)')
    p.add_argument('--out', type=flag(str, bool, 'a directory'), help='the directory to write (default: data/NAME)')
    p.add_argument('--input', type=flag(str, bool, 'a path or URL'),
                   help='text: a file, a directory of .txt files, or a URL; hellaswag: a copy of its file')
    p.add_argument('--val_fraction', type=flag(float, lambda v: 0 < v < 1, 'a number between 0 and 1'),
                   help='the part of the text held out for validation (default 0.1)')
    p.add_argument('--shards', type=count(1), help='fineweb-edu, fineweb10B: training files to download (default 1)')
    p.add_argument('--shard_tokens', type=count(1),
                   help=f'tokens per shard file written (default {SHARD_TOKENS:,}); fewer for many small files')
    p.add_argument('--tokenizer_bytes', type=flag(float, lambda v: v >= 1, 'a number of bytes, at least 1'),
                   help='bpe:N: how much of the training text it learns from (default 1e9)')
    p.add_argument('--workers', type=count(0), help='tokenizer processes (default 0: one per core)')
    p.add_argument('--allow_http', nargs='?', const=True, help='allow plain http:// URLs (default false)', type=flag(
        lambda v: {'true': True, '1': True, 'yes': True, 'false': False, '0': False, 'no': False}.get(v.lower()),
        lambda v: True, 'true or false'))
    args = vars(p.parse_args(argv))
    return args.pop('dataset', 'shakespeare'), args


def main(argv):
    try:
        dataset, args = parse_flags(argv)
        if args.get('out', '').startswith('gs://'):
            raise PrepareError(f'--out={args["out"]}: prepare.py writes to a local directory; prepare it there '
                               f'(--out=DIR), then upload it: gcloud storage rsync -r DIR {args["out"]} -x "^raw/"')
        prepare(dataset, args)
    except SystemExit as e:  # --help
        return e.code
    except PrepareError as e:  # a mistake the user can fix: one line, exit 2 (as tinytpu's)
        print(f'error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('\ninterrupted; re-run the same command to continue', file=sys.stderr)
        return 130
    except OSError as e:  # a file the user named or made: missing, a directory, not allowed, a full disk
        if not e.filename:
            raise
        print(f'error: {e.filename}: {e.strerror}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
