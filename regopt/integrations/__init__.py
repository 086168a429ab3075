"""Trainers of other libraries driving a regopt optimizer. Each submodule imports its library when imported
itself (``import regopt`` imports none of them): :mod:`regopt.integrations.huggingface` for transformers."""
