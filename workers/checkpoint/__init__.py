"""Checkpoint files: snapshot on the training thread, write and upload off it.

A checkpoint directory (file names in ``workers.contract.names``) holds:
- ``model.safetensors``: the unwrapped model's weights (no pickle, no code);
- ``train_state.pt``: epoch, tracker state and seed, plus the optimizer state in full-state
  (resume) checkpoints; loadable with ``torch.load(weights_only=True)``;
- ``metadata.json``: the epoch, every metric of that epoch, monitor, mode, is_best, the
  run's config and seed; written last, so a directory with it is complete;
- optionally (the fastai engine's kept models: the best, the top K, an also-monitor's best)
  ``learner.pth``: the same weights as a
  ``torch.save``'d state dict, the format of fastai's ``learn.save``.

This package owns checkpoints on the workers; it imports nothing of ``workers.loop`` or
``workers.engines`` (they hand it their state through ``state.ModelState``). Modules:
``manager`` (``CheckpointManager``: when to save, what, handing it to the writer; one per
rank), ``policy`` (which evaluations save, and which checkpoints Ray Train keeps),
``state`` (the interface that reads the model's whole state, ddp and fsdp alike),
``snapshot`` (the host copy that blocks training), ``weights_image`` (that copy laid out as
the bytes of ``model.safetensors``), ``writer`` (files into storage, in Ray's upload
thread), ``load`` and ``integrity`` (reading a checkpoint back, and checking it).
"""
