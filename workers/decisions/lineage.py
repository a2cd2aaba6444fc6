"""Population-based training, the workers' side (pure): where a trial's leg ends, whether a
restart continues from another trial's checkpoint, and the lineage its saved models carry
(the trials and epochs their weights came through)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Lineage:
    """A trial's weights: trained by ``ancestors`` (``{"trial_id", "epochs": [first, last]}``,
    oldest first), then by the trial itself from ``first_epoch`` on."""

    trial_id: str
    ancestors: tuple[dict[str, Any], ...] = ()

    @property
    def first_epoch(self) -> int:
        return int(self.ancestors[-1]["epochs"][1]) + 1 if self.ancestors else 1

    def through(self, epoch: int) -> list[dict[str, Any]]:
        """The lineage of the weights after ``epoch``, as a saved model's metadata holds it."""
        own = {"trial_id": self.trial_id, "epochs": [self.first_epoch, int(epoch)]}
        return [*(dict(a) for a in self.ancestors), own]


def leg_end(start_epoch: int, interval: int, epochs: int) -> int:
    """The last epoch of the leg a trial starts at ``start_epoch``: the next multiple of
    ``interval`` (where the population is compared), or the run's last epoch."""
    return min(((start_epoch - 1) // interval + 1) * interval, epochs)


def exploit_applies(start_epoch: int, consumed: int, exploit_epoch: int) -> bool:
    """Whether a restart continues from the copy of another trial's checkpoint taken after
    ``exploit_epoch``: only while the trial has trained nothing past that epoch itself (the
    copy stays the trial's restore point in Tune; once the trial saved later epochs of its
    own, a restart continues from those)."""
    return (start_epoch, consumed) <= (exploit_epoch + 1, 0)


def ancestors_of(donor_metadata: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """What a trial continuing from the donor's checkpoint descends from: the donor's lineage
    through that checkpoint's epoch (a model saved before any lineage: the donor alone)."""
    lineage = donor_metadata.get("lineage")
    if lineage:
        return tuple(dict(segment) for segment in lineage)
    return ({"trial_id": str(donor_metadata.get("trial_id", "?")),
             "epochs": [1, int(donor_metadata["epoch"])]},)
