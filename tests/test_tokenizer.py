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


def test_stream_decoder_holds_a_split_character_until_it_is_whole():
    tok = ByteTokenizer()
    ids = tok.encode("a🙂é")  # 1 + 4 + 2 bytes
    decode = tok.stream_decoder()
    pieces = [decode([i]) for i in ids] + [decode([], final=True)]
    assert pieces == ["a", "", "", "", "🙂", "", "é", ""]


@pytest.mark.parametrize("seed", range(20))
def test_stream_decoder_joins_to_decode_even_for_invalid_utf8(seed):
    """Random bytes (broken sequences, stray continuation bytes, a cut last character) cut
    at random points decode, piece by piece, to what `decode` gives for all at once."""
    rng = np.random.default_rng(seed)
    ids = np.concatenate([rng.integers(0, 256, 40), ByteTokenizer().encode("数据 🙂")[:-1]])
    cuts = np.sort(rng.choice(np.arange(1, len(ids)), size=12, replace=False))
    decode = ByteTokenizer().stream_decoder()
    streamed = "".join(decode(piece) for piece in np.split(ids, cuts)) + decode([], final=True)
    assert streamed == ByteTokenizer().decode(ids)
    assert streamed.endswith("\ufffd")


def test_unknown_spec_lists_known_ones():
    with pytest.raises(UserError, match=r"'gpt5'.*bytes"):
        get_tokenizer("gpt5")


@pytest.mark.parametrize("vocab, dtype", [(2, np.uint8), (256, np.uint8), (257, np.uint16),
                                          (50257, np.uint16), (65536, np.uint16),
                                          (65537, np.uint32)])
def test_token_dtype(vocab, dtype):
    assert token_dtype(vocab) is dtype
