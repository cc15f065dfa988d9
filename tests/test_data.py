"""Tests for countdown.data: real corpora on disk, a small word-level tokenizer built here.

The SmolLM2 tokenizer takes ~15 s to load from its GGUF file, so windowing is tested with a
tokenizer made from the corpus's own words; `token_windows` treats both alike.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from countdown import data


def _paragraphs(text: str) -> set[str]:
    return set(text.split("\n\n"))


def _word_tokenizer(text: str) -> Tokenizer:
    words = sorted(set(text.split()))
    vocab = {"[UNK]": 0} | {w: i + 1 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def _bos_tokenizer(text: str) -> Tokenizer:
    """A tokenizer that, like Gemma's, puts <bos> before every encoded text."""
    tok = _word_tokenizer(text)
    bos = tok.get_vocab_size()
    tok.add_special_tokens(["<bos>"])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return tok


@pytest.fixture(scope="module")
def default_splits() -> tuple[str, str, str]:
    return data.load_corpus("default"), data.calibration_text(), data.evaluation_text()


def test_default_splits_are_disjoint_and_cover_the_corpus(default_splits):
    whole, calib, evaluation = default_splits
    shared = _paragraphs(calib) & _paragraphs(evaluation)
    assert not shared, f"{len(shared)} paragraphs in both splits, e.g. {next(iter(shared))!r}"
    assert _paragraphs(calib) | _paragraphs(evaluation) == _paragraphs(whole)


def test_default_splits_are_large_enough(default_splits):
    _, calib, evaluation = default_splits
    # ~1.3 SmolLM2 tokens a word: evaluation needs ~100k tokens, calibration 64 x 512.
    assert len(evaluation.split()) > 150_000
    assert len(calib.split()) > 150_000


def test_default_text_is_clean_prose(default_splits):
    whole, _, _ = default_splits
    for p in whole.split("\n\n"):
        assert len(p.split()) >= data.MIN_WORDS
        assert p == " ".join(p.split())
    # Classes of Sphinx's inline markup; the docs also quote tags such as <a href="..."> as text.
    for leftover in ('class="pre"', 'class="reference', "docutils literal", "headerlink"):
        assert leftover not in whole
    assert "\u00b6" not in whole  # Sphinx's heading anchors


def test_html_extraction_keeps_only_paragraph_prose():
    page = (
        '<div class="related"><p>sidebar link text that is long enough to count</p></div>'
        '<div class="body" role="main">'
        "<h1>Title¶</h1><p>The <code>spam</code> module makes eggs &amp; ham for every caller.</p>"
        "<pre>print('code is not prose at all, however long it happens to be')</pre>"
        "<table><tr><td><p>a table cell that is long enough to count as prose</p></td></tr></table>"
        '<p class="availability">Availability: Unix, not Emscripten, not WASI, not anything.</p>'
        "<p>Too short.</p>"
        '</div><div class="sphinxsidebar"><p>more sidebar text that is long enough too</p></div>'
    )
    assert data._html_paragraphs(page) == [
        "The spam module makes eggs & ham for every caller."
    ]


def test_small_corpus_split_is_disjoint():
    calib, evaluation = data.calibration_text("pydoc-topics"), data.evaluation_text("pydoc-topics")
    assert calib and evaluation
    assert not _paragraphs(calib) & _paragraphs(evaluation)


def test_unknown_corpus_names_the_known_ones():
    with pytest.raises(ValueError, match="python-docs") as err:
        data.load_corpus("no-such-corpus")
    assert "wikitext2" in str(err.value)
    with pytest.raises(ValueError):
        data.evaluation_text("no-such-corpus")


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv(data.DATA_ROOT_ENV, str(tmp_path))
    with pytest.raises(data.CorpusNotInstalledError, match="apt-get install .*python3.11-doc"):
        data.calibration_text()


def test_wikitext2_offline_says_what_it_needs(monkeypatch):
    monkeypatch.setattr(data, "_hub_reachable", lambda: False)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(data.CorpusNotInstalledError, match="wikitext2.*(internet|datasets)"):
        data.evaluation_text("wikitext2")


def test_read_text_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        data.read_text_file(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        data.read_text_file(empty)
    full = tmp_path / "full.txt"
    full.write_text("Some real text.\n", encoding="utf-8")
    assert data.read_text_file(full) == "Some real text.\n"


def test_token_windows_shape_and_stride():
    text = data.evaluation_text("pydoc-topics")
    tok = _word_tokenizer(text)
    n_tokens = len(text.split())

    windows = data.token_windows(tok, text, seq_len=64)
    assert windows.dtype == torch.long
    assert windows.shape == (n_tokens // 64, 64)
    assert windows[1, 0] == tok.encode(text).ids[64]

    assert data.token_windows(tok, text, seq_len=64, max_windows=3).shape == (3, 64)

    overlapping = data.token_windows(tok, text, seq_len=64, stride=16, max_windows=5)
    assert overlapping.shape == (5, 64)
    assert torch.equal(overlapping[1, :48], overlapping[0, 16:])


def test_token_windows_rejects_empty_and_short_text():
    tok = _word_tokenizer("one two three four five")
    with pytest.raises(ValueError, match="empty"):
        data.token_windows(tok, "  \n", seq_len=4)
    with pytest.raises(ValueError, match=r"5 tokens.*seq_len=8"):
        data.token_windows(tok, "one two three four five", seq_len=8)
    assert data.token_windows(tok, "one two three four five", seq_len=5).shape == (1, 5)


def test_document_prefix_is_what_the_tokenizer_puts_first():
    text = data.evaluation_text("pydoc-topics")
    plain, with_bos = _word_tokenizer(text), _bos_tokenizer(text)
    assert data.document_prefix(plain) == []
    bos = with_bos.token_to_id("<bos>")
    assert data.document_prefix(with_bos) == [bos]

    windows = data.token_windows(with_bos, text, seq_len=64, max_windows=3)
    body = plain.encode(text).ids
    assert windows.shape == (3, 64)
    assert (windows[:, 0] == bos).all()
    assert windows[1, 1:].tolist() == body[63:126]  # each window: <bos> then the next 63 text tokens

    stream = data.token_stream(with_bos, text, 128, 64)
    assert stream.tolist() == body[:128]  # no <bos> in the stream: perplexity puts it before each window
