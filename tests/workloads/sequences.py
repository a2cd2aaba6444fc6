"""Variable-length token sequences with a padding collate function, batches as mappings
under a label key of the workload's own ("label"), and a loss_fn (no project import).

The class is whether token 1 occurs more often than token 2 in the sequence; a GRU reads the
padded batch, packing it by the lengths."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence

VOCAB = 8


def make(n: int, seed: int) -> list[tuple[torch.Tensor, int]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 15, (1,), generator=gen))
        tokens = torch.randint(1, VOCAB, (length,), generator=gen)
        out.append((tokens, int((tokens == 1).sum() > (tokens == 2).sum())))
    return out


def pad(samples: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    tokens = [t for t, _ in samples]
    return {"tokens": pad_sequence(tokens, batch_first=True),  # (B, T_max), 0 = padding
            "lengths": torch.tensor([len(t) for t in tokens]),
            "label": torch.tensor([y for _, y in samples])}


class GRUClassifier(torch.nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 16, padding_idx=0)
        self.gru = torch.nn.GRU(16, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, 2)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(self.embed(tokens), lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        _, last = self.gru(packed)  # (1, B, H)
        return self.head(last[0])


def build(hidden: int = 32, n_train: int = 160, n_val: int = 101) -> SimpleNamespace:
    return SimpleNamespace(
        model=GRUClassifier(hidden),
        train_dataset=make(n_train, 1),
        val_dataset=make(n_val, 2),
        test_dataset=make(53, 3),
        collate_fn=pad,
        label_key="label",
        loss_fn=torch.nn.functional.cross_entropy,
        metrics=["accuracy", "mcc"],
    )
