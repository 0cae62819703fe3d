import unicodedata

import numpy as np
import xxhash

from embed_cache.store.hashing import normalize_text, text_key, text_keys


def test_key_is_xxh3_128_of_utf8_split_in_two_words():
    digest = xxhash.xxh3_128_intdigest("hello world".encode("utf-8"))
    assert text_key("hello world") == (digest >> 64, digest & (2**64 - 1))


def test_canonically_equivalent_spellings_share_a_key():
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert composed != decomposed
    assert text_key(composed) == text_key(decomposed)
    assert normalize_text(decomposed) == composed


def test_nothing_but_nfc_is_folded():
    base = text_key("Hello world")
    for variant in ["hello world", "Hello  world", "Hello world ", " Hello world", "Hello\tworld", "Hello world."]:
        assert text_key(variant) != base, variant
    # NFKC would fold the ligature to "fi"; teachers see different tokens, so keys must differ
    assert unicodedata.normalize("NFKC", "\ufb01") == "fi"
    assert text_key("\ufb01") != text_key("fi")


def test_text_keys_matches_scalar_and_handles_full_uint64_range():
    texts = ["a", "b", "emoji \U0001F600", "\u4e2d\u6587", ""]
    keys = text_keys(texts)
    assert keys.dtype == np.uint64 and keys.shape == (5, 2)
    for row, text in zip(keys, texts):
        assert tuple(int(v) for v in row) == text_key(text)
    assert text_keys([]).shape == (0, 2)
