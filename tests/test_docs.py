"""The README and docs/: every relative link resolves (a file, and a heading where one is named)."""
import os
import re

from conftest import ROOT

PAGES = ['README.md'] + [os.path.join('docs', n) for n in sorted(os.listdir(os.path.join(ROOT, 'docs'))) if n.endswith('.md')]


def anchors(path):
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to dashes."""
    text = open(path, encoding='utf-8').read()
    return {re.sub(r'[^\w\- ]', '', h.strip().lower()).replace(' ', '-') for h in re.findall(r'^#+ (.*)$', text, re.M)}


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        text = open(os.path.join(ROOT, page), encoding='utf-8').read()
        text = re.sub(r'```.*?```', '', text, flags=re.S)  # code blocks hold commands, not links
        for target in re.findall(r'\]\(([^)\s]+)\)', text):
            if re.match(r'[a-z]+:', target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition('#')
            where = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path else os.path.join(ROOT, page)
            if not os.path.exists(where) or anchor and anchor not in anchors(where):
                broken.append(f'{page}: {target}')
    assert not broken


def test_the_tpu_presets_estimates_read_the_same_on_every_page():
    """The `tpu` preset's one-chip estimates are quoted on several pages (the README twice,
    multi-chip.md, performance.md, tpu-estimates.md): they were 422.8 ms on two and 425.5 on two.
    Every row that gives them must give the same ms/step and MFU."""
    quoted = set()
    for page in PAGES:
        for line in open(os.path.join(ROOT, page), encoding='utf-8'):
            if not line.startswith('|') or any(w in line for w in ('gpt2', 'plan', 'scan', 'compiled before',
                                                                     'adamw', 'AdamW', 'vocab')):
                continue  # another model or optimizer, or a row that says it is an older compile
            if '`v6e:1x1`' in line or '(the preset now)' in line or line.startswith('| v6e-1'):
                quoted |= {('v6e', ms) for ms in re.findall(r'(?<![\d,.])(\d{3}\.\d)(?!\d)', line)}
            if '`v5e:1x1`' in line or line.startswith('| v5e-1'):
                quoted |= {('v5e', ms) for ms in re.findall(r'\b(1,\d{3}\.\d)\b', line)}
    assert quoted == {('v6e', '422.2'), ('v5e', '1,241.6')}, quoted
