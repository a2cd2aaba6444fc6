"""Evaluation's maths and the collectives it needs, below checkpoints and the loop.

Modules: ``metrics`` (metric maths from float64 sufficient statistics; torchmetrics metrics,
whose ``compute`` gathers across ranks; the names an epoch reports) and ``collectives`` (the
few ``torch.distributed`` calls every rank makes: sums, maxima, rank 0's buffers and flags).
Pure decisions (``workers.decisions``) import nothing from here.
"""
