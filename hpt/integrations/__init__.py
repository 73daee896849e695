"""Where training code lives: hpt for PyTorch Lightning, the Hugging Face Trainer and DDP.

- :mod:`hpt.integrations.lightning` (``pip install hpt[lightning]``): ``HptCallback`` for
  ``lightning.pytorch``/``pytorch_lightning`` trainers.
- :mod:`hpt.integrations.transformers` (``pip install hpt[transformers]``): ``HptCallback`` and
  ``resume_from(trainer)`` for ``transformers.Trainer``.
- :mod:`hpt.integrations.ddp`: a DDP communication hook that makes the reducer's bucket
  all-reduces visible to hpt's collective detector.

Nothing here is imported by ``import hpt``; each module imports its trainer when it is imported.
"""
