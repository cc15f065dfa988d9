"""Text for calibration and evaluation, read from packages installed on this machine.

No machine of this project reaches the Hugging Face Hub, so every corpus here except
``wikitext2`` comes from a Debian or Python package and is read from disk. Each corpus is cut
into documents (an HTML page, a help topic); paragraphs repeated anywhere in the corpus are kept
only at their first occurrence, so calibration and evaluation share no paragraph.

Split rule, for every local corpus: documents are sorted by their path/name and numbered from 0;
document ``i`` goes to evaluation when ``i % EVAL_EVERY == 0`` and to calibration otherwise.
"""

from __future__ import annotations

import functools
import html
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from . import hub

Part = Literal["all", "calibration", "evaluation"]

EVAL_EVERY = 4
# Shorter blocks are headings, captions, "Note" labels and table cells, not prose.
MIN_WORDS = 8
# Prefix under which a corpus is looked for instead of "/", e.g. a tree made with
# `dpkg -x python3.11-doc_*.deb DIR` on a machine that cannot run apt-get (see docs/TEXT.md).
DATA_ROOT_ENV = "COUNTDOWN_DATA_ROOT"


class CorpusNotInstalledError(RuntimeError):
    """The package that ships a corpus is missing (the message gives the install command)."""


Document = list[str]  # paragraphs, each one line of normalised text


@dataclass(frozen=True)
class Corpus:
    name: str
    description: str
    licence: str
    install: str  # the exact command that makes the corpus available
    text: Callable[[Part], str]  # "all", "calibration" or "evaluation" -> plain text


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _is_prose(paragraph: str) -> bool:
    return len(paragraph.split()) >= MIN_WORDS


def _data_root() -> Path:
    return Path(os.environ.get(DATA_ROOT_ENV, "/"))


def _join(documents: list[Document]) -> str:
    return "\n\n".join(p for doc in documents for p in doc)


def _split(documents: list[Document], part: Part) -> str:
    # Drop repeats before splitting: boilerplate paragraphs recur across pages, and a repeat
    # on both sides would leak evaluation text into calibration.
    seen: set[str] = set()
    unique: list[Document] = []
    for doc in documents:
        kept = [p for p in doc if p not in seen]
        seen.update(kept)
        unique.append(kept)
    if part == "all":
        return _join(unique)
    wanted = part == "evaluation"
    return _join([doc for i, doc in enumerate(unique) if (i % EVAL_EVERY == 0) == wanted])


# --- python-docs: the CPython 3.11 documentation as Debian ships it -------------------------

_PYDOC_DIR = "usr/share/doc/python3.11/html"
_PYDOC_INSTALL = "apt-get update && apt-get install -y --no-install-recommends python3.11-doc"
# Sphinx's generated HTML is regular: the page text sits in one div before the sidebar, and
# paragraphs never nest, so regular expressions are enough and far faster than an HTML parser.
_MAIN = re.compile(r'<div class="body" role="main">(.*?)(?:<div class="sphinxsidebar"|\Z)', re.S)
_NOT_PROSE = re.compile(r"<(pre|table|script|style)\b.*?</\1>", re.S)
_PARAGRAPH = re.compile(r"<p(\s[^>]*)?>(.*?)</p>", re.S)
_TAG = re.compile(r"<[^>]+>")
# Indexes, search and the table of contents are lists of links, not prose.
_PYDOC_SKIP = ("genindex", "py-modindex", "search", "contents")


def _html_paragraphs(page: str) -> Document:
    main = _MAIN.search(page)
    body = _NOT_PROSE.sub(" ", main.group(1) if main else page)
    paragraphs = []
    for attrs, inner in _PARAGRAPH.findall(body):
        if "availability" in (attrs or ""):  # "Availability: Unix, not Emscripten ..." labels
            continue
        text = _normalise(html.unescape(_TAG.sub("", inner)).replace("\u00b6", ""))
        if _is_prose(text):
            paragraphs.append(text)
    return paragraphs


@functools.lru_cache(maxsize=None)
def _python_docs_documents(root: Path) -> tuple[tuple[str, ...], ...]:
    pages = sorted(
        p
        for p in root.rglob("*.html")
        if not any(part.startswith("_") for part in p.relative_to(root).parts)
        and not p.stem.startswith(_PYDOC_SKIP)
    )
    return tuple(tuple(_html_paragraphs(p.read_text(encoding="utf-8"))) for p in pages)


def _python_docs(part: Part) -> str:
    root = _data_root() / _PYDOC_DIR
    if not (root / "index.html").is_file():
        raise CorpusNotInstalledError(
            f"corpus 'python-docs' needs the Debian package python3.11-doc (not found at {root}); "
            f"install it with: {_PYDOC_INSTALL}  (or unpack it with `dpkg -x` into a folder and "
            f"set {DATA_ROOT_ENV} to that folder)"
        )
    return _split([list(d) for d in _python_docs_documents(root)], part)


# --- pydoc-topics: help() texts of the running Python's standard library ---------------------


def _pydoc_topics(part: Part) -> str:
    from pydoc_data.topics import topics  # part of every CPython; nothing to install

    documents = []
    for key in sorted(topics):
        # Blocks indented in the text are code samples and grammar rules.
        blocks = [b for b in re.split(r"\n\s*\n", topics[key]) if b and not b[0].isspace()]
        documents.append([t for t in map(_normalise, blocks) if _is_prose(t)])
    return _split(documents, part)


# --- wikitext2: the usual benchmark, only where the Hub is reachable -------------------------

_WIKITEXT_SPLIT: dict[Part, list[str]] = {
    "evaluation": ["test"],
    "calibration": ["train"],
    "all": ["train", "validation", "test"],
}


def _hub_reachable() -> bool:
    return hub.unreachable_reason(()) is None  # the one probe of the process (`countdown.hub`)


def _wikitext2(part: Part) -> str:
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as e:
        raise CorpusNotInstalledError(
            "corpus 'wikitext2' needs internet access to the Hugging Face Hub and the `datasets` "
            "package: pip install datasets"
        ) from e
    offline_cache = any(os.environ.get(v) == "1" for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if not offline_cache and not _hub_reachable():
        # Without this check `datasets` retries for ~30 s before giving up.
        raise CorpusNotInstalledError(
            "corpus 'wikitext2' needs internet access to the Hugging Face Hub (huggingface.co is "
            "unreachable); set HF_DATASETS_OFFLINE=1 to use a copy already in the local cache"
        )
    texts = []
    for split in _WIKITEXT_SPLIT[part]:
        try:
            rows = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split=split)
        except Exception as e:  # offline, Hub down, gated: all mean "not available here"
            raise CorpusNotInstalledError(
                "corpus 'wikitext2' could not be loaded from the Hugging Face Hub "
                f"(needs internet access): {e}"
            ) from e
        # "\n\n".join over rows is how published WikiText-2 perplexities are computed.
        texts.append("\n\n".join(rows["text"]))
    return "\n\n".join(texts)


# --- registry --------------------------------------------------------------------------------

_PYTHON_DOCS = Corpus(
    name="python-docs",
    description=(
        "Python 3.11.2 documentation (tutorial, HOWTOs, FAQs, What's New, language and library "
        "reference) from Debian bookworm's python3.11-doc; <p> paragraphs of each HTML page, "
        "code blocks and tables removed; one document per page"
    ),
    # The PSF License Agreement for Python 3.11.2 covers Python "and its associated
    # documentation"; code samples in the docs are also under Zero-Clause BSD (license.html).
    licence="PSF-2.0 (PSF License Agreement for Python 3.11.2); code samples also 0BSD",
    install=_PYDOC_INSTALL,
    text=_python_docs,
)

CORPORA: dict[str, Corpus] = {
    "default": _PYTHON_DOCS,
    "python-docs": _PYTHON_DOCS,
    "pydoc-topics": Corpus(
        name="pydoc-topics",
        description=(
            "help() topics of the running CPython (pydoc_data.topics, mostly the language "
            "reference), code and grammar blocks removed; ~46k SmolLM2 tokens on 3.11, too "
            "small for a full evaluation; varies with the Python version; nothing to install"
        ),
        licence="PSF-2.0",
        install="(none: part of the Python standard library)",
        text=_pydoc_topics,
    ),
    "wikitext2": Corpus(
        name="wikitext2",
        description=(
            "WikiText-2 raw v1 from the Hugging Face Hub: test split evaluates, train calibrates"
        ),
        licence="CC BY-SA 3.0 (Wikipedia text)",
        install="pip install datasets  (and internet access to the Hugging Face Hub)",
        text=_wikitext2,
    ),
}


def _corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; known corpora: {', '.join(sorted(CORPORA))}")
    return CORPORA[name]


def load_corpus(name: str) -> str:
    """Whole corpus as plain text: paragraphs (single lines) separated by blank lines."""
    return _corpus(name).text("all")


def calibration_text(name: str = "default") -> str:
    """Calibration part of a corpus; disjoint from :func:`evaluation_text` at document level.

    Local corpora: documents sorted by path, those whose index ``i % EVAL_EVERY != 0`` (3 in 4).
    ``wikitext2``: the train split.
    """
    return _corpus(name).text("calibration")


def evaluation_text(name: str = "default") -> str:
    """Evaluation part of a corpus; disjoint from :func:`calibration_text` at document level.

    Local corpora: documents sorted by path, those whose index ``i % EVAL_EVERY == 0`` (1 in 4).
    ``wikitext2``: the test split.
    """
    return _corpus(name).text("evaluation")


def read_text_file(path: str | os.PathLike[str]) -> str:
    """Text of a UTF-8 file; for text carried to a machine that has no corpus package."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file not found: {p}")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"text file is empty: {p}")
    return text


def _encode(tokenizer: Any, text: str) -> list[int]:
    # Both a transformers tokenizer and a bare `tokenizers.Tokenizer` take this call; the latter
    # returns an Encoding. No BOS/EOS: windows cut mid-text must not pretend to start a document.
    out = tokenizer.encode(text, add_special_tokens=False)
    return list(getattr(out, "ids", out))


def document_prefix(tokenizer: Any) -> list[int]:
    """The ids ``tokenizer`` puts before every document (Gemma's ``<bos>``; none for Llama-3-style
    GGUF, Qwen or SmolLM2 tokenizers), read off its own special-token behaviour.

    A model trained to always see them first degrades badly without (Gemma-3 270M: 23.9 against 10.7
    perplexity), so windows cut mid-text start with them, as lm-eval's rolling perplexity does."""
    plain = _encode(tokenizer, "a")
    out = tokenizer.encode("a", add_special_tokens=True)
    special = list(getattr(out, "ids", out))
    for start in range(len(special) - len(plain) + 1):
        if special[start:start + len(plain)] == plain:
            return special[:start]
    return []


def token_windows(
    tokenizer: Any,
    text: str,
    seq_len: int,
    max_windows: int | None = None,
    stride: int | None = None,
) -> torch.LongTensor:
    """Tokenise ``text`` once and cut it into windows: a ``[n, seq_len]`` int64 tensor.

    Each window starts with the tokenizer's `document_prefix` (if any) followed by text tokens;
    windows start every ``stride`` text tokens (default: back to back, no overlap); a tail shorter
    than a window is dropped; at most ``max_windows`` windows are kept, the first.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    prefix = document_prefix(tokenizer)
    if not prefix or seq_len <= len(prefix):
        return _text_windows(tokenizer, text, seq_len, max_windows, stride)
    body = _text_windows(tokenizer, text, seq_len - len(prefix), max_windows, stride)
    return torch.cat([torch.tensor(prefix, dtype=torch.long).expand(body.shape[0], -1), body], dim=1)


def _text_windows(tokenizer: Any, text: str, seq_len: int, max_windows: int | None,
                  stride: int | None) -> torch.LongTensor:
    """``[n, seq_len]`` windows of the text's own tokens (no special tokens)."""
    step = seq_len if stride is None else stride
    if step < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    if not text.strip():
        raise ValueError("text is empty: nothing to cut into windows")
    ids = _encode_prefix(tokenizer, text, None if max_windows is None else (max_windows - 1) * step + seq_len)
    if len(ids) < seq_len:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    windows = torch.tensor(ids, dtype=torch.long).unfold(0, seq_len, step)
    if max_windows is not None:
        windows = windows[:max_windows]
    return windows.contiguous()  # type: ignore[return-value]


def _encode_prefix(tokenizer: Any, text: str, n_tokens: int | None) -> list[int]:
    """Token ids of the text, or of a prefix holding at least ``n_tokens`` tokens.

    Corpora are megabytes long and a run needs a few thousand tokens: tokenise a growing prefix (cut
    at a paragraph break, so no word is split) instead of the whole text.
    """
    if n_tokens is None:
        return _encode(tokenizer, text)
    chars = n_tokens * 6  # English prose averages ~4-5 characters per token
    while True:
        if chars >= len(text):
            return _encode(tokenizer, text)
        cut = text.find("\n\n", chars)
        prefix = text if cut < 0 else text[:cut]
        ids = _encode(tokenizer, prefix)
        if len(ids) >= n_tokens or cut < 0:
            return ids
        chars *= 2


def first_tokens(tokenizer: Any, text: str, n_tokens: int, seq_len: int) -> torch.LongTensor:
    """The first ``n_tokens`` tokens of ``text`` (rounded down to whole windows, at least one) as
    ``[n, seq_len]`` windows, each starting with the tokenizer's `document_prefix`."""
    return token_windows(tokenizer, text, seq_len, max_windows=max(1, n_tokens // seq_len))


def token_stream(tokenizer: Any, text: str, n_tokens: int, seq_len: int) -> torch.LongTensor:
    """The first ``n_tokens`` text tokens of ``text`` (whole ``seq_len`` windows, at least one) as one
    ``[n]`` stream without any document prefix: what `evaluate.perplexity` slides its windows over
    (it puts the prefix before each window itself)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    return _text_windows(tokenizer, text, seq_len, max(1, n_tokens // seq_len), None).reshape(-1)


def calibration_windows(calibration: Any, tokenizer: Any, seq_len: int, max_windows: int | None) -> torch.LongTensor:
    """Texts (a str or a list of str, with ``tokenizer``) or token batches ([n, L] / [L] tensors or a
    list of them) as ``[n, seq_len]`` windows of token ids, with clear errors for bad input."""
    if isinstance(calibration, torch.Tensor):
        windows = calibration if calibration.dim() == 2 else calibration.reshape(1, -1)
    elif isinstance(calibration, (list, tuple)) and calibration and all(isinstance(c, torch.Tensor) for c in calibration):
        windows = torch.cat([c.reshape(1, -1) if c.dim() == 1 else c for c in calibration])
    else:
        texts = [calibration] if isinstance(calibration, str) else list(calibration or [])
        text = "\n\n".join(t for t in texts if isinstance(t, str))
        if not text.strip():
            raise ValueError("calibration text is empty: pass real text (str or list of str) or token batches")
        if tokenizer is None:
            raise ValueError("calibration is text, so it needs tokenizer=... to cut it into token windows")
        return token_windows(tokenizer, text, seq_len, max_windows=max_windows)
    if windows.numel() == 0:
        raise ValueError("calibration token batches are empty")
    if windows.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"calibration token batches must be integer token ids, got {windows.dtype}")
    return windows.long()[:max_windows] if max_windows else windows.long()
