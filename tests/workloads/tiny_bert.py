"""A Hugging Face model the way its users write one (no project import, no download): a
BERT classifier from a tiny config, batches as mappings (input_ids, attention_mask, labels)
padded by a collate function, no loss_fn (the model's own output.loss), and a torchmetrics
AUROC reported as val_auroc."""

from __future__ import annotations

from types import SimpleNamespace

import torch

VOCAB = 12


def make(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Label 1 when token 3 occurs more often than token 4; lengths vary."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 20, (1,), generator=gen))
        ids = torch.randint(3, VOCAB, (length,), generator=gen)
        out.append({"input_ids": ids, "labels": int((ids == 3).sum() > (ids == 4).sum())})
    return out


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    longest = max(len(s["input_ids"]) for s in samples)
    ids = torch.zeros(len(samples), longest, dtype=torch.long)  # 0: [PAD]
    mask = torch.zeros(len(samples), longest, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s["input_ids"])] = s["input_ids"]
        mask[i, : len(s["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask,
            "labels": torch.tensor([s["labels"] for s in samples])}


def build(hidden: int = 32, n_train: int = 128, n_val: int = 101) -> SimpleNamespace:
    from torchmetrics.classification import MulticlassAUROC
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=32, num_labels=2)
    return SimpleNamespace(
        model=BertForSequenceClassification(config),
        train_dataset=make(n_train, 1),
        val_dataset=make(n_val, 2),
        test_dataset=make(47, 3),
        collate_fn=collate,
        loss_fn=None,
        metrics={"auroc": MulticlassAUROC(num_classes=2)},
    )
