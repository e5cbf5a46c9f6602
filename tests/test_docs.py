"""The README and docs/: every relative link names a file that exists, and
every ``#anchor`` a heading of that file (as GitHub spells its anchors)."""
import glob
import os.path as osp
import re

import pytest

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
PAGES = ['README.md'] + sorted(
    osp.relpath(p, REPO) for p in glob.glob(osp.join(REPO, 'docs', '*.md')))


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (but
    ``-`` and ``_``), each space a ``-``."""
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def read(page: str) -> str:
    with open(osp.join(REPO, page), encoding='utf-8') as f:
        return f.read()


def links(text: str):
    """``(target, anchor)`` of each relative Markdown link outside code."""
    text = re.sub(r'```.*?```', '', text, flags=re.S)
    text = re.sub(r'`[^`\n]*`', '', text)
    for match in re.finditer(r'\]\(([^)\s]+)\)', text):
        target, _, fragment = match.group(1).partition('#')
        if not target.startswith(('http://', 'https://', 'mailto:')):
            yield target, fragment


def test_anchor_spelling():
    assert anchor('N = 1 kernels of the fused op (issue 16 item 4)') == \
        'n--1-kernels-of-the-fused-op-issue-16-item-4'
    assert anchor('The CPU in bfloat16, 2026-11-29 (thirteenth session)') == \
        'the-cpu-in-bfloat16-2026-11-29-thirteenth-session'


@pytest.mark.parametrize('page', PAGES)
def test_links_resolve(page):
    found = list(links(read(page)))
    assert found or page != 'README.md'
    for target, fragment in found:
        path = osp.normpath(osp.join(osp.dirname(page), target)) if target \
            else page
        assert osp.exists(osp.join(REPO, path)), f'{page}: no file {target}'
        if fragment and path.endswith('.md'):
            headings = re.findall(r'^#+ (.*)$', read(path), re.M)
            assert fragment in {anchor(h) for h in headings}, \
                f'{page}: no heading #{fragment} in {path}'
