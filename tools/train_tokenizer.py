#!/usr/bin/env python
"""Train a LLaMA-style SentencePiece tokenizer on JSON-lines corpora, or inspect a model.

Training (from the repository root)::

    python tools/train_tokenizer.py --input examples/data/kjv_sample.jsonl \\
        --vocab-size 4096 --output-prefix examples/data/kjv_sp4k

writes ``kjv_sp4k.model`` and ``kjv_sp4k.vocab`` (atomically: each is written under a temporary
name in the same directory, then renamed; ``.vocab`` first, ``.model`` last). The options are
LLaMA's: BPE (or ``--model-type unigram``), byte fallback (every UTF-8 byte has a piece, so no
text is ever ``<unk>``), digits split into single pieces, ``<unk>``=0, ``<s>``=1, ``</s>``=2, no
pad piece, identity normalization, whitespace kept as is.

``--input`` takes files (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``), directories of shards and
glob patterns, like ``tools/preprocess_data.py``.

Documents are cut into training "sentences" at sentence ends (``.``, ``!``, ``?``, ``;``, ``:``
followed by whitespace) and newlines, and packed up to ``--max-sentence-length`` bytes, because
SentencePiece silently drops longer lines. ``--max-sentences`` keeps a seeded uniform sample,
drawn with a reservoir while the input streams by, so a corpus of hundreds of GB needs only the
sample's memory (reading it all still takes its time: point ``--input`` at a few shards).

Determinism: the sample is drawn here with a seeded RNG and SentencePiece's own RNG is seeded,
so the same inputs and flags give a byte-identical model. BPE pieces and scores do not depend on
``--num-threads`` (checked: 1 and 2 threads give the same pieces and scores; the ``.model`` bytes
differ only in the thread count recorded in its trainer spec). Unigram pieces do change with the
thread count (deterministic for a fixed one), hence the default of 1 thread.

Inspecting an existing model (e.g. LLaMA's or Mistral's ``tokenizer.model``)::

    python tools/train_tokenizer.py --check path/to/tokenizer.model
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import sys
import time


from megatron_qsparse.data.corpus import (  # noqa: E402
    CorruptInputError,
    check_decoders,
    expand_inputs,
    iter_lines,
)
from megatron_qsparse.atomic import write_bytes as _write_atomic  # noqa: E402

_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n+")


def get_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        description="Train a LLaMA-style SentencePiece tokenizer on .jsonl(.gz/.zst) files, or "
                    "inspect a model with --check.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", nargs="+", default=None,
                   help="JSON-lines training files (one document per line; .jsonl, .jsonl.gz, "
                        ".jsonl.zst), directories of shards or glob patterns.")
    p.add_argument("--json-key", default="text", help="Key holding the document text.")
    p.add_argument("--vocab-size", type=int, default=32000,
                   help="Vocabulary size, including the 3 special and 256 byte-fallback pieces.")
    p.add_argument("--model-type", default="bpe", choices=("bpe", "unigram"),
                   help="SentencePiece model type.")
    p.add_argument("--output-prefix", default=None,
                   help="Writes PREFIX.model and PREFIX.vocab.")
    p.add_argument("--max-sentences", type=int, default=2_000_000,
                   help="Train on a seeded uniform sample (reservoir, streamed) of at most this "
                        "many sentences (0: all).")
    p.add_argument("--max-sentence-length", type=int, default=4192,
                   help="Longest training sentence in bytes; longer text is cut at whitespace.")
    p.add_argument("--character-coverage", type=float, default=0.99995,
                   help="Fraction of characters covered by pieces; the rest use byte fallback.")
    p.add_argument("--num-threads", type=int, default=1,
                   help="SentencePiece training threads (BPE pieces do not depend on it; unigram ones do).")
    p.add_argument("--seed", type=int, default=1234, help="Seed of the sentence sample.")
    p.add_argument("--check", metavar="MODEL", default=None,
                   help="Load MODEL, print its vocab size and special ids, and exit.")
    return p


def _split_long(sentence: str, limit: int) -> list[str]:
    """Cut ``sentence`` at whitespace into pieces of at most ``limit`` UTF-8 bytes."""
    if len(sentence.encode("utf-8")) <= limit:
        return [sentence]
    out, current, size = [], [], 0
    for word in re.findall(r"\S+\s*", sentence):
        n = len(word.encode("utf-8"))
        if current and size + n > limit:
            out.append("".join(current).rstrip())
            current, size = [], 0
        if n > limit:  # a single huge "word": cut by characters
            data = word
            while len(data.encode("utf-8")) > limit:
                cut = limit
                while len(data[:cut].encode("utf-8")) > limit:
                    cut -= 1
                out.append(data[:cut])
                data = data[cut:]
            word, n = data, len(data.encode("utf-8"))
        current.append(word)
        size += n
    if current and "".join(current).strip():
        out.append("".join(current).rstrip())
    return out


def document_sentences(text: str, limit: int):
    """Training sentences of one document: sentence-end cuts packed up to ``limit`` bytes."""
    packed, size = [], 0
    for part in _SENTENCE_END.split(text):
        part = part.strip()
        if not part:
            continue
        for piece in _split_long(part, limit):
            n = len(piece.encode("utf-8")) + 1
            if packed and size + n > limit:
                yield " ".join(packed)
                packed, size = [], 0
            packed.append(piece)
            size += n
    if packed:
        yield " ".join(packed)


def sample_sentences(paths: list[str], json_key: str, limit: int, max_sentences: int,
                     seed: int) -> tuple[list[str], int, int, int]:
    """A seeded uniform sample of at most ``max_sentences`` training sentences (0: all).

    The inputs are streamed and sampled with a reservoir, so memory is bounded by the sample, not
    by the corpus. Kept sentences stay in corpus order; when the corpus has no more than
    ``max_sentences`` sentences, all are kept.

    Returns:
        ``(sentences, documents used, lines skipped, sentences seen)``.
    """
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    docs = skipped = seen = 0
    for _path, _line, raw in iter_lines(paths):
        if not raw.strip():
            continue
        try:
            text = json.loads(raw.decode("utf-8", errors="replace"))[json_key]
        except (ValueError, KeyError, TypeError, IndexError):
            skipped += 1
            continue
        if not isinstance(text, str) or not text.strip():
            skipped += 1
            continue
        docs += 1
        for sentence in document_sentences(text, limit):
            if not max_sentences or len(reservoir) < max_sentences:
                reservoir.append((seen, sentence))
            else:
                j = rng.randrange(seen + 1)
                if j < max_sentences:
                    reservoir[j] = (seen, sentence)
            seen += 1
    reservoir.sort(key=lambda item: item[0])
    return [sentence for _, sentence in reservoir], docs, skipped, seen


def llama_trainer_options(args: argparse.Namespace) -> dict:
    """SentencePiece trainer options (LLaMA's, with our vocab size, model type and coverage)."""
    return dict(
        model_type=args.model_type,
        vocab_size=args.vocab_size,
        character_coverage=args.character_coverage,
        byte_fallback=True,
        split_digits=True,
        split_by_unicode_script=True,
        split_by_number=True,
        split_by_whitespace=True,
        allow_whitespace_only_pieces=True,
        treat_whitespace_as_suffix=False,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        max_sentence_length=args.max_sentence_length,
        input_sentence_size=0,  # we sample ourselves, deterministically
        shuffle_input_sentence=False,
        num_threads=args.num_threads,
        hard_vocab_limit=True,
        vocabulary_output_piece_score=True,
        minloglevel=2,
    )


def train(args: argparse.Namespace) -> int:
    """Train and atomically write ``PREFIX.model`` / ``PREFIX.vocab``."""
    import sentencepiece as spm

    try:
        paths = expand_inputs(args.input)
        check_decoders(paths)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.vocab_size < 259 + 1:
        print(f"error: --vocab-size {args.vocab_size} is too small: 3 special + 256 byte pieces "
              f"are always present; use at least 260", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        sentences, docs, skipped, seen = sample_sentences(
            paths, args.json_key, args.max_sentence_length, args.max_sentences, args.seed)
    except CorruptInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not sentences:
        print(f"error: no usable text under key {args.json_key!r} in {args.input}",
              file=sys.stderr)
        return 2
    print(f"training {args.model_type} vocab {args.vocab_size} on {len(sentences)} of {seen} "
          f"sentences from {docs} documents in {len(paths)} file(s) ({skipped} lines skipped)",
          file=sys.stderr)

    out_prefix = os.path.abspath(args.output_prefix)
    os.makedirs(os.path.dirname(out_prefix), exist_ok=True)
    if hasattr(spm, "set_random_generator_seed"):
        spm.set_random_generator_seed(args.seed)
    # Train into memory (model_writer) rather than to a model_prefix: the prefix would be
    # recorded in the model's trainer spec and make the file depend on a temporary path.
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model,
                                   **llama_trainer_options(args))
    proto = model.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    # Same text SentencePiece writes to PREFIX.vocab: "piece<TAB>score" (C++ ostream, like %g).
    vocab = "".join(f"{sp.IdToPiece(i)}\t{sp.GetScore(i):g}\n" for i in range(sp.GetPieceSize()))
    # .model last: a reader that finds the .model finds its .vocab too.
    _write_atomic(out_prefix + ".vocab", vocab.encode("utf-8"))
    _write_atomic(out_prefix + ".model", proto)
    print(f"wrote {out_prefix}.model and {out_prefix}.vocab in {time.perf_counter() - start:.1f} s")
    return check(out_prefix + ".model")


def check(model_path: str) -> int:
    """Print vocab size and special ids of a SentencePiece model; 0 if it loads."""
    from megatron_qsparse.data.tokenizer import SentencePieceTokenizer

    try:
        tok = SentencePieceTokenizer(model_path)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def special(i: int) -> str:
        return f"{i} ({tok.id_to_piece(i)!r})" if i >= 0 else "-1 (none)"

    byte_fallback = tok.vocab_size > 0 and any(
        tok.id_to_piece(i) == "<0x00>" for i in range(min(tok.vocab_size, 512)))
    sample = "Hello world 2024, naïve café ☃"
    ids = tok.tokenize(sample)
    print(f"{model_path}: vocab_size {tok.vocab_size}, unk {special(tok.unk)}, "
          f"bos {special(tok.bos)}, eos/eod {special(tok.eod)}, pad {special(tok.pad)}, "
          f"byte_fallback {'yes' if byte_fallback else 'no'}, "
          f"round trip {'ok' if tok.detokenize(ids) == sample else 'LOSSY'} "
          f"({len(ids)} tokens for {len(sample)} characters)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the tool; returns the exit status."""
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.check:
        return check(args.check)
    if not args.input or not args.output_prefix:
        print("error: training needs --input and --output-prefix (or use --check MODEL)",
              file=sys.stderr)
        return 2
    return train(args)


if __name__ == "__main__":
    sys.exit(main())
