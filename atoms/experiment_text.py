"""The text of `atoms run`: its documents, and how the token budget is spread over them.

The fit and held-out parts are whole documents (`atoms.text.split_articles`); `spread` takes the same number
of tokens from the start of every document of a part, so the activations cover many topics.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from atoms.errors import BadInputError
from atoms.experiment_config import ExperimentConfig
from atoms.experiment_definitions import Keys
from atoms.text import Article, text_files, wikipedia_articles

__all__ = ["TEXT", "documents", "spread"]

TEXT = Keys(
    {
        "source": "Where the documents come from, in words.",
        "fit_articles": "Documents (whole articles) in the fit part.",
        "heldout_articles": "Documents (whole articles) in the held-out part.",
        "heldout_titles": "Titles of the held-out documents (the atom cards name them).",
        "fit_tokens": "Tokens captured per layer from the fit documents (position 0 of each chunk dropped).",
        "heldout_tokens": "Tokens captured per layer from the held-out documents.",
        "tokens_per_document_fit": "Target tokens taken from the start of each fit document, so the budget "
        "spreads over many articles instead of the first few.",
        "tokens_per_document_heldout": "Target tokens taken from the start of each held-out document.",
    }
)
"""The results' "text" record."""


def _paragraphs(docs: list[Article]) -> list[Article]:
    """Split documents into paragraphs (blank-line separated) so that one file can give fit and held-out."""
    out = []
    for doc in docs:
        parts = [p.strip() for p in doc.text.split("\n\n") if p.strip()]
        out.extend(Article(f"{doc.title} paragraph {k + 1}", p) for k, p in enumerate(parts))
    return out


def documents(config: ExperimentConfig) -> tuple[list[Article], str]:
    """The run's documents (its text files or the Wikipedia sample) and where they come from, in words."""
    if config.text_files:
        docs = text_files(list(config.text_files))
        source = f"{len(docs)} text file(s): " + ", ".join(Path(p).name for p in config.text_files)
        if len(docs) < 2:
            docs = _paragraphs(docs)
            source += " (split into paragraphs)"
        if len(docs) < 2:
            raise BadInputError(
                "the text files hold a single paragraph, which cannot be split into fit and held-out text; "
                "pass at least two files or a file with several paragraphs separated by blank lines."
            )
        return docs, source
    return wikipedia_articles(), "the Wikipedia sample in the gensim wheel (enwiki-latest-pages-articles1)"


def _cut(text: str, n_chars: int) -> str:
    """The first ~n_chars characters of text, ending at a whitespace when one is near."""
    if len(text) <= n_chars:
        return text
    space = text.rfind(" ", int(n_chars * 0.8), n_chars)
    return text[: space if space > 0 else n_chars]


def spread(articles: list[Article], tokenizer: Any, n_tokens: int) -> tuple[list[str], int]:
    """Texts holding about n_tokens / len(articles) tokens from the start of each article (10% to spare).

    Without this the capture's budget would come from the first few articles only (the whole sample has
    ~700k tokens); spread over every article, the activations cover many topics. The characters per token
    of each article are measured on its first 4000 characters.
    """
    quota = math.ceil(n_tokens / len(articles) * 1.1)
    texts = []
    for a in articles:
        sample = a.text[:4000]
        count = len(tokenizer(sample, add_special_tokens=False, verbose=False)["input_ids"])
        chars_per_token = len(sample) / max(count, 1)
        texts.append(_cut(a.text, math.ceil(quota * chars_per_token)))
    return texts, quota
