import numpy as np
import pytest

from app.errors import UserError
from app.tokenizer import ByteTokenizer, get_tokenizer, token_dtype


@pytest.mark.parametrize("text", ["", "hello", "café naïve Grüße → 数据 🙂\n\ttab"])
def test_byte_round_trip(text):
    tok = get_tokenizer("bytes")
    ids = tok.encode(text)
    assert ids.dtype == np.uint8 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text


def test_byte_spec_and_vocab():
    tok = ByteTokenizer()
    assert tok.spec == "bytes" and tok.vocab_size == 256


def test_decode_cut_mid_character_replaces():
    ids = ByteTokenizer().encode("é")[:1]
    assert ByteTokenizer().decode(ids) == "\ufffd"


def test_decode_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="256"):
        ByteTokenizer().decode([65, 300])


def test_unknown_spec_lists_known_ones():
    with pytest.raises(UserError, match=r"'gpt5'.*bytes"):
        get_tokenizer("gpt5")


@pytest.mark.parametrize("vocab, dtype", [(2, np.uint8), (256, np.uint8), (257, np.uint16),
                                          (50257, np.uint16), (65536, np.uint16),
                                          (65537, np.uint32)])
def test_token_dtype(vocab, dtype):
    assert token_dtype(vocab) is dtype
