"""Drop-in fastai callbacks (documented here; they live in ``workers.engines.fastai``)."""

from workers.engines.fastai.callbacks import (
    SaveBestModelCallback,
    WandbBestModelCallback,
    epoch_row,
)

__all__ = ["SaveBestModelCallback", "WandbBestModelCallback", "epoch_row"]
