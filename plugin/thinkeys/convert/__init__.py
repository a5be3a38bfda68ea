"""HF checkpoint -> thin-key checkpoint (``thinkeys convert``).

``convert.py`` drives a conversion (checks, atomic write, summary); ``families.py`` maps each
source family's q/k tensors; ``svd.py`` holds the key SVD and the query absorption;
``rope_strategies.py`` chooses the per-head basis and RoPE table (``pairs``, ``svd``, ``none``).
Entry point for code: :func:`thinkeys.convert.convert.convert_checkpoint`.
"""
