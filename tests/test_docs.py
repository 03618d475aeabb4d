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
