"""Cache keys: a text's identity in the store.

key(text) = xxh3-128 of the UTF-8 bytes of unicodedata.normalize("NFC", text), kept as two
uint64 (high word, low word).

NFC is the *only* normalisation. Canonically equivalent spellings ("é" as one code point or as
"e" + combining acute) are the same text to every tokenizer worth using, so they share a key.
Nothing else is folded: case, whitespace, punctuation and compatibility forms (NFKC would turn
"ﬁ" into "fi") change what a teacher sees, so they change the key.
"""

import unicodedata

import numpy as np
import xxhash

HASH_ALGORITHM = "xxh3_128(utf8(nfc(text)))"


def normalize_text(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def text_key(text: str) -> tuple[int, int]:
    """(high, low) uint64 words of the text's xxh3-128.

    >>> text_key("caf\\u00e9") == text_key("cafe\\u0301")
    True
    """
    digest = xxhash.xxh3_128_intdigest(normalize_text(text).encode("utf-8"))
    return digest >> 64, digest & 0xFFFF_FFFF_FFFF_FFFF


def text_keys(texts) -> np.ndarray:
    """Keys of many texts as an (N, 2) uint64 array."""
    keys = np.fromiter(
        (word for text in texts for word in text_key(text)), dtype=np.uint64
    )
    return keys.reshape(-1, 2)
