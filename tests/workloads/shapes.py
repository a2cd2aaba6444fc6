"""An image workload written the way torchvision users write one (no project import):
torchvision's ResNet-18 (BatchNorm2d everywhere) on 32x32 PIL images of three kinds of
shapes, drawn from a seed, with augmentation on the training split only."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset


def draw(kind: int, gen: torch.Generator) -> Image.Image:
    """A square, a disc or a cross, of a random colour, size and place."""
    image = Image.new("RGB", (32, 32), tuple(int(v) for v in torch.randint(0, 60, (3,),
                                                                             generator=gen)))
    pen = ImageDraw.Draw(image)
    size = int(torch.randint(8, 16, (1,), generator=gen))
    x, y = (int(v) for v in torch.randint(2, 30 - size, (2,), generator=gen))
    colour = tuple(int(v) for v in torch.randint(120, 256, (3,), generator=gen))
    box = (x, y, x + size, y + size)
    if kind == 0:
        pen.rectangle(box, fill=colour)
    elif kind == 1:
        pen.ellipse(box, fill=colour)
    else:
        pen.line((x, y, x + size, y + size), fill=colour, width=3)
        pen.line((x, y + size, x + size, y), fill=colour, width=3)
    return image


class Shapes(Dataset):
    def __init__(self, n: int, seed: int, transform) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 3, (n,), generator=gen).tolist()
        self.images = [draw(k, gen) for k in self.labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.labels[i]


def build(n_train: int = 96, n_val: int = 61, n_test: int = 37) -> SimpleNamespace:
    from torchvision import transforms
    from torchvision.models import resnet18

    normalize = [transforms.ToTensor(), transforms.Normalize([0.2] * 3, [0.3] * 3)]
    augment = transforms.Compose([transforms.RandomHorizontalFlip(),
                                  transforms.RandomCrop(32, padding=3), *normalize])
    plain = transforms.Compose(normalize)
    return SimpleNamespace(
        model=resnet18(num_classes=3),
        train_dataset=Shapes(n_train, 1, augment),
        val_dataset=Shapes(n_val, 2, plain),
        test_dataset=Shapes(n_test, 3, plain),
        loss_fn=torch.nn.functional.cross_entropy,
        metrics=["accuracy", "f1_macro"],
    )
