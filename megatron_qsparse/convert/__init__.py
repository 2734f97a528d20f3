"""Checkpoint conversion: Hugging Face <-> ours, and between parallel layouts
(see ``tools/checkpoint_convert.py``)."""
