"""Recovery fine-tuning of thin-key checkpoints (``thinkeys finetune``).

``finetune.py`` drives a run (checks, stages, resumable state, final save); ``layerwise.py`` fits
each layer's thin q/k to the original attention output; ``logit.py`` is the end-to-end
distillation step; ``params.py`` says what is trained; ``workdir.py`` holds the resumable state,
the log and the interruption handling. Entry point for code: :func:`thinkeys.train.finetune.finetune`.
"""
