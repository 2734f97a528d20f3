"""Tokenizers: the committed SentencePiece model, the byte tokenizer, build_tokenizer, training."""

import json
import os
import pickle
import subprocess
import sys

import pytest

from megatron_qsparse.data.tokenizer import (
    TOKENIZER_TYPES,
    ByteTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    build_tokenizer,
)
from tests.helpers import clean_env, load_tool

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(REPO, "examples", "data", "kjv_sp4k.model")

STRINGS = [
    "In the beginning God created the heaven and the earth.",
    "And the LORD said unto Moses, Stretch out thine hand.",
    "Call 555-0123 in 2024: 3.14159 and 42!",
    "  leading and   multiple spaces\tand a tab\nand a newline ",
    "Unicode via byte fallback: naïve café, 日本語, Ελληνικά, emoji 🙂",
]


def test_sentencepiece_round_trip():
    tok = build_tokenizer("SentencePieceTokenizer", MODEL)
    assert isinstance(tok, SentencePieceTokenizer) and isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.eod, tok.bos, tok.pad, tok.unk) == (4096, 2, 1, -1, 0)
    for text in STRINGS:
        ids = tok.tokenize(text)
        assert ids and all(0 <= i < tok.vocab_size for i in ids)
        assert tok.unk not in ids  # byte fallback: nothing is unknown
        assert tok.detokenize(ids) == text
    # digits are split into single pieces
    pieces = [tok.id_to_piece(i) for i in tok.tokenize("1611")]
    assert len([p for p in pieces if p != "▁"]) == 4
    # common English is compressed well below one token per character
    text = STRINGS[0]
    assert len(tok.tokenize(text)) < len(text) / 3
    assert tok.detokenize(tok.tokenize(text) + [tok.eod]) == text
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.tokenize(text) == tok.tokenize(text)


def test_aliases():
    plain = build_tokenizer("GPTSentencePieceTokenizer", MODEL)
    llama = build_tokenizer("Llama2Tokenizer", MODEL)
    text = STRINGS[1]
    assert plain.tokenize(text) == build_tokenizer("SentencePieceTokenizer", MODEL).tokenize(text)
    assert llama.tokenize(text) == [llama.bos] + plain.tokenize(text)
    assert llama.detokenize(llama.tokenize(text)) == text


def test_byte_tokenizer():
    tok = build_tokenizer("ByteTokenizer", None)
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.eod, tok.bos, tok.pad) == (259, 256, 257, 258)
    for text in STRINGS:
        ids = tok.tokenize(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.detokenize(ids + [tok.eod]) == text
    assert tok.detokenize([0xC3]) == "\ufffd"  # invalid UTF-8 is replaced, not an error


def test_build_tokenizer_errors(tmp_path):
    assert set(TOKENIZER_TYPES) == {"SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                                    "Llama2Tokenizer", "ByteTokenizer", "HuggingFaceTokenizer"}
    with pytest.raises(ValueError, match="--tokenizer-type 'BertWordPiece' is not supported"):
        build_tokenizer("BertWordPiece", None)
    with pytest.raises(ValueError, match="needs --tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer", None)
    with pytest.raises(ValueError, match="not found") as info:
        build_tokenizer("Llama2Tokenizer", str(tmp_path / "missing.model"))
    assert "--tokenizer-model" in str(info.value) and "\n" not in str(info.value)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"this is not a protobuf")
    with pytest.raises(ValueError, match="not a readable SentencePiece model") as info:
        build_tokenizer("SentencePieceTokenizer", str(junk))
    assert "\n" not in str(info.value)


def _run_tool(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "train_tokenizer.py"),
                           *args], capture_output=True, text=True, cwd=REPO, timeout=120,
                           env=clean_env())


def test_train_tokenizer_deterministic_and_check(tmp_path):
    corpus = tmp_path / "c.jsonl"
    with open(MODEL.replace("kjv_sp4k.model", "kjv_sample.jsonl"), encoding="utf-8") as f:
        lines = [next(f) for _ in range(40)]
    corpus.write_text("".join(lines) + "not json\n" + json.dumps({"text": 3}) + "\n",
                      encoding="utf-8")
    outs = []
    for name in ("a", "b"):
        r = _run_tool("--input", str(corpus), "--vocab-size", "400",
                      "--output-prefix", str(tmp_path / name))
        assert r.returncode == 0, r.stderr
        assert "vocab_size 400" in r.stdout and "bos 1" in r.stdout and "eos/eod 2" in r.stdout
        assert "2 lines skipped" in r.stderr
        outs.append(((tmp_path / f"{name}.model").read_bytes(),
                     (tmp_path / f"{name}.vocab").read_bytes()))
    assert outs[0] == outs[1]
    assert sorted(os.listdir(tmp_path)) == ["a.model", "a.vocab", "b.model", "b.vocab", "c.jsonl"]
    tok = SentencePieceTokenizer(str(tmp_path / "a.model"))
    assert tok.vocab_size == 400 and tok.detokenize(tok.tokenize(STRINGS[4])) == STRINGS[4]
    vocab = (tmp_path / "a.vocab").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 400 and vocab[:3] == ["<unk>\t0", "<s>\t0", "</s>\t0"]

    r = _run_tool("--check", MODEL)
    assert r.returncode == 0
    assert "vocab_size 4096" in r.stdout and "unk 0" in r.stdout and "pad -1" in r.stdout
    r = _run_tool("--check", str(tmp_path / "nope.model"))
    assert r.returncode == 2 and r.stderr.startswith("error: ")


def test_train_tokenizer_sample_of_sharded_compressed_corpus(tmp_path):
    """Directories of .gz/.zst shards; a seeded reservoir sample; BPE and unigram."""
    import gzip

    zstandard = pytest.importorskip("zstandard")
    with open(MODEL.replace("kjv_sp4k.model", "kjv_sample.jsonl"), "rb") as f:
        lines = [next(f) for _ in range(60)]
    shards = tmp_path / "shards"
    shards.mkdir()
    with gzip.open(shards / "a.jsonl.gz", "wb") as f:
        f.write(b"".join(lines[:30]))
    (shards / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b"".join(lines[30:])))
    models = []
    for name, kind in (("u1", "unigram"), ("u2", "unigram"), ("b1", "bpe")):
        r = _run_tool("--input", str(shards), "--vocab-size", "320", "--model-type", kind,
                      "--max-sentences", "40", "--output-prefix", str(tmp_path / name))
        assert r.returncode == 0, r.stderr
        assert "on 40 of " in r.stderr and "in 2 file(s)" in r.stderr
        models.append((tmp_path / f"{name}.model").read_bytes())
        tok = SentencePieceTokenizer(str(tmp_path / f"{name}.model"))
        assert tok.vocab_size == 320 and tok.detokenize(tok.tokenize(STRINGS[4])) == STRINGS[4]
        assert len([p for p in map(tok.id_to_piece, tok.tokenize("2024")) if p != "▁"]) == 4
    assert models[0] == models[1] and models[0] != models[2]
    r = _run_tool("--input", str(tmp_path / "none*.jsonl"), "--output-prefix", str(tmp_path / "x"))
    assert r.returncode == 2 and "the pattern matches no files" in r.stderr


def test_reservoir_sample_is_seeded_ordered_and_bounded(tmp_path):
    sample_sentences = load_tool("train_tokenizer").sample_sentences
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": f"Sentence {i}."}) + "\n" for i in range(1000)))
    a = sample_sentences([str(src)], "text", 100, 50, seed=1)
    b = sample_sentences([str(src)], "text", 100, 50, seed=1)
    c = sample_sentences([str(src)], "text", 100, 50, seed=2)
    assert a == b and a[0] != c[0] and a[1:] == (1000, 0, 1000)
    numbers = [int(s.split()[1][:-1]) for s in a[0]]
    assert len(numbers) == 50 and numbers == sorted(numbers)  # corpus order kept
    assert max(numbers) > 500  # drawn from the whole corpus, not its start
    everything = sample_sentences([str(src)], "text", 100, 0, seed=1)[0]
    assert len(everything) == 1000


def _tiny_hf_tokenizer(path) -> None:
    """A byte-level BPE `transformers` tokenizer with Qwen-style special tokens, built locally."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                  "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(STRINGS * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(str(path))


def test_huggingface_tokenizer(tmp_path):
    import pickle

    _tiny_hf_tokenizer(tmp_path / "tok")
    tok = build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "tok"))
    assert tok.eod == tok.pad == 0 and tok.bos == -1 and tok.vocab_size <= 300
    for text in STRINGS:
        ids = tok.tokenize(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.detokenize(ids + [tok.eod]) == text
    assert tok.tokenize("<|im_end|>") == [2]  # special-token text maps to its id
    again = pickle.loads(pickle.dumps(tok))  # data-loader workers
    assert again.tokenize(STRINGS[0]) == tok.tokenize(STRINGS[0])
    with pytest.raises(ValueError, match="needs --tokenizer-model DIR"):
        build_tokenizer("HuggingFaceTokenizer", None)
    with pytest.raises(ValueError, match="is not a directory"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "missing"))
