"""Loss curves: python tinytpu.py plot draws one or several runs' log.jsonl (train and val loss,
bits per byte, the task score) as an SVG, PNG or PDF, and says in one line what it cannot draw."""
import json
import os
import sys
import xml.etree.ElementTree as ET

import pytest

import tinytpu as tt


def write_log(out, losses, extra=lambda step: {}):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'log.jsonl'), 'w') as f:
        for step, loss in enumerate(losses, 1):
            f.write(json.dumps({'step': step * 10, 'tokens': step * 7680, 'loss': loss, **extra(step)}) + '\n')
        f.write('{"step": 30, "summary": {}}\n{"cut by a cra')


def test_plot_writes_svg_and_png_overlaying_runs(tmp_path, capsys):
    pytest.importorskip('matplotlib')
    a, b = str(tmp_path / 'run_a'), str(tmp_path / 'run_b')
    write_log(a, [3.0, 2.5, 2.2], lambda s: {'val_loss': 2.4, 'val_bpb': 3.4} if s == 3 else {})
    write_log(b, [3.1, 2.4, 2.0], lambda s: {'hellaswag_acc_norm': 0.3} if s > 1 else {})
    assert tt.main(['plot', f'--out={a},{b}']) == 0
    svg = ET.parse(os.path.join(a, 'loss.svg')).getroot()
    words = ' '.join(t.text or '' for t in svg.iter('{http://www.w3.org/2000/svg}text'))
    assert 'run_a train' in words and 'run_b train' in words and 'run_a val' in words
    assert 'hellaswag acc_norm' in words and 'validation bits per byte' in words
    png = tmp_path / 'curves.png'
    assert tt.main(['plot', f'--out={a}', f'--plot_file={png}']) == 0
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert tt.main(['plot', f'--out={a}', f'--plot_file={tmp_path}/x.gif']) == 2
    assert tt.main(['plot', f'--out={tmp_path}/none']) == 2
    assert 'log.jsonl: no such file' in capsys.readouterr().err


def test_plot_refuses_what_has_nothing_to_draw(tmp_path, capsys):
    """An empty log wrote an empty picture (rc 0); --out=,, was an IndexError; a record with
    "tokens": "x" or null a TypeError."""
    pytest.importorskip('matplotlib')
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'log.jsonl').write_text('')
    assert tt.main(['plot', f'--out={tmp_path / "empty"}']) == 2
    assert tt.main(['plot', '--out=,,']) == 2
    err = capsys.readouterr().err.splitlines()
    assert 'no loss recorded yet' in err[0] and err[1] == 'error: --out=,,: name the run directories to draw, --out=A or --out=A,B'
    assert not (tmp_path / 'empty' / 'loss.svg').exists()
    write_log(str(tmp_path / 'odd'), [3.0, 2.5], lambda s: {'tokens': 'x'} if s == 1 else {})
    with open(tmp_path / 'odd' / 'log.jsonl', 'a') as f:
        f.write(json.dumps({'step': 40, 'tokens': None, 'loss': 2.0}) + '\n')
    assert tt.main(['plot', f'--out={tmp_path / "odd"}']) == 0


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    write_log(str(tmp_path), [3.0])
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    assert tt.main(['plot', f'--out={tmp_path}']) == 2
    assert 'pip install matplotlib' in capsys.readouterr().err
    assert not os.path.exists(tmp_path / 'loss.svg')
