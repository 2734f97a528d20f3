"""Data pipeline: Megatron-compatible indexed datasets, tokenizers, GPT sample indices, samplers.

- :mod:`.indexed_dataset` reads and writes the ``.bin``/``.idx`` pairs made by
  ``tools/preprocess_data.py`` (byte-compatible with Megatron-LM).
- :mod:`.corpus` finds and streams JSON-lines inputs (directories, globs, ``.gz``, ``.zst``) and
  plans ``--partitions``; :mod:`.tables` streams Parquet files and ``datasets`` Arrow folders;
  :mod:`.encoding` checks and tokenizes their documents (lines or rows) alike.
- :mod:`.tokenizer` wraps SentencePiece (plus a byte-level tokenizer for tests).
- :mod:`.gpt_dataset` builds the cached document/sample/shuffle indices and splits;
  :mod:`.blended_dataset` blends datasets by weight (cached too); :mod:`.cache` writes cache
  files atomically.
- :mod:`.sampler` turns a dataset into per-rank micro-batches that resume from ``consumed_samples``.
"""
