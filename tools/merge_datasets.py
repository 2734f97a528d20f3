#!/usr/bin/env python
"""Merge Megatron ``.bin``/``.idx`` shards into one dataset (Megatron-LM's tool and flags).

Example (from the repository root)::

    python tools/merge_datasets.py --input data/shards --output-prefix data/corpus_text_document

merges every ``PREFIX.bin``/``PREFIX.idx`` pair found in ``data/shards`` (in sorted prefix order,
as Megatron-LM's ``tools/merge_datasets.py`` does) into ``data/corpus_text_document.{bin,idx}``.
``--input`` also takes explicit shard prefixes (merged in the order given; ``x``, ``x.bin`` and
``x.idx`` all name the shard ``x``). Every shard is validated first (a truncated or mismatched
pair is named); all must have the same token dtype. Sequences, documents and token bytes are
appended unchanged, so the result equals preprocessing the shards' inputs in one run. The output
is written under temporary names and renamed only when complete; memory use is bounded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


from megatron_qsparse.data.indexed_dataset import (  # noqa: E402
    IndexedDataset,
    IndexedDatasetBuilder,
    data_file_path,
    index_file_path,
)


def get_parser() -> argparse.ArgumentParser:
    """The command-line interface (Megatron-LM flag names)."""
    p = argparse.ArgumentParser(
        description="Merge Megatron .bin/.idx shards into one dataset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True, nargs="+",
                   help="A directory holding the shards to merge (all PREFIX.bin/PREFIX.idx "
                        "pairs in it, sorted by prefix), or shard prefixes in merge order.")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True,
                   help="Output path without suffix; writes PREFIX.bin and PREFIX.idx.")
    return p


def shards_in_directory(directory: str) -> list[str]:
    """Prefixes of the ``.bin``/``.idx`` pairs in ``directory``, sorted (Megatron-LM's order).

    Raises:
        ValueError: a ``.bin`` without its ``.idx`` or the reverse, or no pair at all.
    """
    stems: dict[str, set[str]] = {}
    for name in os.listdir(directory):
        stem, ext = os.path.splitext(name)
        if ext in (".bin", ".idx") and not name.startswith(".") and \
                os.path.isfile(os.path.join(directory, name)):
            stems.setdefault(stem, set()).add(ext)
    for stem, exts in sorted(stems.items()):
        if len(exts) == 1:
            have, missing = next(iter(exts)), ({".bin", ".idx"} - exts).pop()
            raise ValueError(f"{os.path.join(directory, stem + have)} has no matching "
                             f"{stem + missing} in {directory}; every shard needs both files")
    if not stems:
        raise ValueError(f"--input {directory!r}: no .bin/.idx shard pairs in this directory")
    return [os.path.join(directory, stem) for stem in sorted(stems)]


def resolve_shards(inputs: list[str]) -> list[str]:
    """Shard prefixes from ``--input``: one directory, or prefixes (``.bin``/``.idx`` stripped)."""
    if len(inputs) == 1 and os.path.isdir(inputs[0]):
        return shards_in_directory(inputs[0])
    prefixes = []
    for item in inputs:
        if os.path.isdir(item):
            raise ValueError(f"--input {item!r} is a directory; give either one directory or "
                             f"a list of shard prefixes")
        prefix = item[:-4] if item.endswith((".bin", ".idx")) else item
        prefixes.append(prefix)
    return prefixes


def merge(prefixes: list[str], output_prefix: str, log=print) -> IndexedDataset:
    """Merge the shards ``prefixes`` (in order) into ``output_prefix``; returns the result.

    Raises:
        ValueError: an unreadable shard (message names the file), mixed dtypes, or an output
            that is also an input.
    """
    out = os.path.abspath(output_prefix)
    for prefix in prefixes:
        if os.path.abspath(prefix) == out:
            raise ValueError(f"--output-prefix {output_prefix!r} is also an input shard; "
                             f"write the merged dataset elsewhere")
    shards = [IndexedDataset(p) for p in prefixes]  # validates every pair up front
    dtypes = {s.dtype for s in shards}
    if len(dtypes) > 1:
        first = shards[0]
        other = next(s for s in shards if s.dtype != first.dtype)
        raise ValueError(f"shards have different token dtypes: {first.prefix} is "
                         f"{first.dtype.name} but {other.prefix} is {other.dtype.name}; "
                         f"preprocess every shard with the same tokenizer")
    for s in shards:
        if s.has_sequence_modes:
            raise ValueError(f"{index_file_path(s.prefix)} is a multimodal dataset (sequence "
                             f"modes), which this tool does not merge")
    dtype = shards[0].dtype
    del shards
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with IndexedDatasetBuilder(output_prefix, dtype) as builder:
        for k, prefix in enumerate(prefixes):
            builder.add_index(prefix)
            log(f"[{k + 1}/{len(prefixes)}] {prefix}: "
                f"{os.path.getsize(data_file_path(prefix)) / 1e6:,.1f} MB")
    return IndexedDataset(output_prefix)


def main(argv: list[str] | None = None) -> int:
    """Run the tool; returns the exit status (0 ok, 2 input error)."""
    args = get_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        prefixes = resolve_shards(args.input)
        merged = merge(prefixes, args.output_prefix,
                       log=lambda msg: print(msg, file=sys.stderr))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: merged {len(prefixes)} shards: {len(merged)} sequences, "
          f"{len(merged.document_indices) - 1} documents, {merged.num_tokens} tokens "
          f"({merged.dtype.name}) in {time.perf_counter() - start:.2f} s -> "
          f"{args.output_prefix}.{{bin,idx}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
