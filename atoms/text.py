"""Text sources for activation capture: the Wikipedia sample shipped inside gensim, and plain text files.

Everything here is offline. The Wikipedia sample is the ~100-article dump that the gensim wheel carries for
its own tests (about 3 million characters, ~700k SmolLM2 tokens); the paper estimates its second moment on
Wikipedia too. Held-out articles are split off by article, never by token, so no held-out text leaks into a
fit.
"""

from __future__ import annotations

import bz2
import glob
import importlib.util
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from atoms.errors import AtomsError, BadInputError

__all__ = ["Article", "split_articles", "text_files", "wikipedia_articles"]

_GENSIM_INSTALL = (
    "pip install 'gensim>=4.3' (or install atoms with its demo extra: pip install 'atoms[demo]')"
)


class Article(NamedTuple):
    """One document: `title` names it in reports and atom cards, `text` is what the model reads."""

    title: str
    text: str


def _wikipedia_dump() -> str:
    """Path of the bz2 Wikipedia sample inside the installed gensim wheel, found without importing gensim."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise AtomsError(
            "The Wikipedia sample ships inside the gensim package, which is not installed. "
            f"Install it with: {_GENSIM_INSTALL}."
        )
    pattern = os.path.join(
        spec.submodule_search_locations[0], "test", "test_data", "enwiki-latest-pages-articles1.xml-*.bz2"
    )
    found = sorted(glob.glob(pattern))
    if not found:
        raise AtomsError(
            f"gensim is installed but its Wikipedia sample ({pattern}) is missing; reinstall the wheel: "
            "pip install --force-reinstall --no-deps 'gensim>=4.3'."
        )
    return found[0]


def _clean(wikitext: str) -> str:
    """Plain prose from filter_wiki's output: drop bold/italic quotes and '=' heading marks."""
    text = re.sub(r"'{2,}", "", wikitext)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.MULTILINE)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def wikipedia_articles(limit: int | None = None) -> list[Article]:
    """The articles of gensim's bundled Wikipedia sample in dump order (106; redirects, empty pages skipped).

    `limit` keeps the first `limit` articles (parsing all of them takes about 5 s). Markup is removed with
    gensim's `filter_wiki`, then bold/italic quotes and heading marks are dropped.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise BadInputError(f"limit must be a positive int or None (all articles), got {limit!r}.")
    path = _wikipedia_dump()
    try:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    except ImportError as err:
        raise AtomsError(f"gensim failed to import ({err}); reinstall it: {_GENSIM_INSTALL}.") from err
    articles: list[Article] = []
    with bz2.open(path) as stream:
        for title, wikitext, _page_id in extract_pages(stream):
            if wikitext.lstrip().lower().startswith("#redirect"):
                continue
            text = _clean(filter_wiki(wikitext))
            if text:
                articles.append(Article(title, text))
                if limit is not None and len(articles) == limit:
                    break
    return articles


def split_articles(
    articles: Sequence[Article], heldout_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Article], list[Article]]:
    """Split documents into (fit, heldout) by whole article, deterministically for a given `seed`.

    round(heldout_fraction * n) articles (at least one, and at least one left to fit) go to the held-out part,
    chosen by a seeded permutation; both parts keep the input order.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise BadInputError(
            f"heldout_fraction must lie strictly between 0 and 1, got {heldout_fraction!r}; "
            "0.2 keeps a fifth of the articles apart."
        )
    n = len(articles)
    if n < 2:
        raise BadInputError(
            f"Cannot split {n} article(s) into fit and held-out parts; pass at least 2 articles."
        )
    n_heldout = min(max(round(heldout_fraction * n), 1), n - 1)
    heldout = set(np.random.default_rng(seed).permutation(n)[:n_heldout].tolist())
    fit = [a for i, a in enumerate(articles) if i not in heldout]
    held = [a for i, a in enumerate(articles) if i in heldout]
    return fit, held


def text_files(paths: Sequence[str | os.PathLike[str]]) -> list[Article]:
    """Read UTF-8 text files as articles titled by their file name; a missing or blank file is an error."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if len(paths) == 0:
        raise BadInputError("text_files got no paths; pass a list of UTF-8 text files to read.")
    articles = []
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise BadInputError(f"Text file {str(path)!r} does not exist or is not a file; check the path.")
        try:
            text = path.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as err:
            raise BadInputError(
                f"Text file {str(path)!r} is not valid UTF-8 ({err}); convert it, e.g. `iconv -t utf-8`."
            ) from err
        if not text:
            raise BadInputError(
                f"Text file {str(path)!r} is empty; remove it from the list or give it some text."
            )
        articles.append(Article(path.name, text))
    return articles
