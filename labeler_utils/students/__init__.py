"""The students: the labeler interface (``base``), the family registry (``registry``) and one module per family.

Families: ``bi_encoder`` (the default CPU student), ``cross_encoder`` and ``causal_lm`` (LoRA/QLoRA on a small
causal LM; the paper's method on a GPU). Callers pick a family by name through :mod:`.registry` and never branch
on it.
"""
