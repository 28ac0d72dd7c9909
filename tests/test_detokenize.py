"""Incremental detokenization against the whole decode it replaces."""

from __future__ import annotations

import random

import pytest

from video_llava.engine.detokenize import Detokenizer


def _sentencepiece_like():
    """A byte-fallback SentencePiece-style BPE with Llama's decoder (Metaspace, byte pieces, first space dropped)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(byte_fallback=True))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    corpus = ["the red circle moves right", "a green square moves up, then stops.", "héllo wörld ☃ 日本語 …"] * 20
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<s>", "</s>"]))
    core.add_tokens([f"<0x{i:02X}>" for i in range(256)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")


def _embedded():
    from video_llava.model.embedded import build_tokenizer

    return build_tokenizer(1024)


@pytest.mark.parametrize("make", [_embedded, _sentencepiece_like], ids=["byte_level_bpe", "sentencepiece_like"])
def test_the_text_so_far_is_the_whole_decode_at_every_whole_character(make):
    tokenizer = make()
    rng = random.Random(0)
    text_ids = tokenizer("The red circle moves right. héllo ☃ 日本語, then stops…", add_special_tokens=False)["input_ids"]
    sequences = [text_ids] + [[rng.randrange(len(tokenizer)) for _ in range(80)] for _ in range(30)]
    eos = {tokenizer.eos_token_id}
    caught_up = 0
    for ids in sequences:
        detokenizer = Detokenizer(tokenizer, eos)
        for k, token in enumerate(ids, 1):
            text = detokenizer.add(token)
            whole = tokenizer.decode([t for t in ids[:k] if t not in eos], skip_special_tokens=True)
            if not whole.endswith("\ufffd"):  # else the character's bytes are still arriving
                assert text == whole, (ids[:k], text, whole)
                caught_up += 1
    assert caught_up > 1000  # most steps are at a whole character: the equality was really checked
    assert Detokenizer(tokenizer, eos).add(tokenizer.eos_token_id) == ""


@pytest.mark.parametrize("make", [_embedded, _sentencepiece_like], ids=["byte_level_bpe", "sentencepiece_like"])
def test_each_logprob_entry_has_its_tokens_own_bytes_and_the_entries_spell_the_text(make):
    """A character given as byte pieces (€ here) has its text on the piece that completes it, and every prefix of
    the entries' texts is the decoded prefix of their bytes."""
    from video_llava.engine.logprobs import TokenBytes, spelled

    tokenizer = make()
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    euro = tokenizer.convert_tokens_to_ids(["<0xE2>", "<0x82>", "<0xAC>"]) if make is _sentencepiece_like \
        else encode("€")
    before = encode("The red circle moves right. héllo ☃ 日本語")
    ids = before + euro + encode(" then stops…") + [tokenizer.eos_token_id]
    entries = spelled(TokenBytes(tokenizer), ids, [(-0.5, [(ids[0], -0.1)])] * len(ids))
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    assert "€" in whole
    assert len(entries) == len(ids) and entries[-1].token == "" and entries[-1].bytes == b""  # the end of sequence
    assert "".join(e.token for e in entries).lstrip(" ") == whole.lstrip(" ")  # SentencePiece drops the first space
    joined = b""
    for k, entry in enumerate(entries):
        joined += entry.bytes
        text = "".join(e.token for e in entries[:k + 1]).encode()
        assert joined.startswith(text) and len(joined) - len(text) < 4  # at most an unfinished character waits
    at = len(before) + len(euro) - 1
    if len(euro) == 3:
        assert [e.token for e in entries[at - 2:at + 1]] == ["", "", "€"]
        assert [e.bytes for e in entries[at - 2:at + 1]] == [b"\xe2", b"\x82", b"\xac"]
    assert all(e.top[0].bytes == TokenBytes(tokenizer)(ids[0]) for e in entries)
