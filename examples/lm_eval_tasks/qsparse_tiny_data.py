"""Loads the tiny local tasks' JSON-lines files next to this file (no download, no cache)."""

import json
import os

import datasets

HERE = os.path.dirname(os.path.abspath(__file__))


def _rows(name: str) -> list[dict]:
    with open(os.path.join(HERE, name), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_tiny_mc(**kwargs) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(_rows("qsparse_tiny_mc.jsonl"))})


def load_tiny_gen(**kwargs) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(_rows("qsparse_tiny_gen.jsonl"))})


def load_tiny_ppl(**kwargs) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(_rows("qsparse_tiny_ppl.jsonl"))})
