"""The W&B "Simple PyTorch Integration" tutorial's pipeline, as the baseline `bench.py` measures.

Kept as the tutorial wrote it: a torchvision dataset with `transforms.ToTensor()` (one PIL image at a
time), `Subset(range(0, N, 5))`, a DataLoader with 2 worker processes and `shuffle=True`, its ConvNet
(layer2 hard-codes 16 input channels: the same net as ours for kernels [16, 32]), Adam,
`wandb.watch(model, criterion, log="all", log_freq=10)`, and `wandb.log` + print of the step's loss every
25 batches. What differs, and why:
  - Fashion-MNIST instead of MNIST (MNIST cannot be downloaded here; same format and sizes).
  - `pin_memory` only on CUDA (the tutorial sets it unconditionally; on a CPU it only warns).
  - Test accuracy is computed on the full 10 000-image test set (the tutorial uses its every-5th subset)
    so it is comparable with ours; the tutorial's ONNX export is left out (it is not training).
  - `on_epoch_start` / `on_epoch_end` let the benchmark time each epoch from the outside.
"""

from __future__ import annotations

from typing import Callable

import torch
import torchvision
from torch import nn
from torchvision import transforms


def get_data(root: str, slice: int = 5, train: bool = True) -> torch.utils.data.Dataset:
    full_dataset = torchvision.datasets.FashionMNIST(root=root, train=train, transform=transforms.ToTensor(), download=False)
    # equiv to slicing with [::slice]
    return torch.utils.data.Subset(full_dataset, indices=range(0, len(full_dataset), slice))


def make_loader(dataset, batch_size: int, device: torch.device) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset=dataset, batch_size=batch_size, shuffle=True,
                                       pin_memory=device.type == "cuda", num_workers=2)


class ConvNet(nn.Module):
    def __init__(self, kernels, classes=10):
        super().__init__()
        self.layer1 = nn.Sequential(
            nn.Conv2d(1, kernels[0], kernel_size=5, stride=1, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2))
        self.layer2 = nn.Sequential(
            nn.Conv2d(16, kernels[1], kernel_size=5, stride=1, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2))
        self.fc = nn.Linear(7 * 7 * kernels[-1], classes)

    def forward(self, x):
        out = self.layer1(x)
        out = self.layer2(out)
        out = out.reshape(out.size(0), -1)
        return self.fc(out)


def train_batch(images, labels, model, optimizer, criterion, device):
    images, labels = images.to(device), labels.to(device)
    outputs = model(images)
    loss = criterion(outputs, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def train(model, loader, criterion, optimizer, config, run, device,
          on_epoch_start: Callable[[int], None] = lambda e: None,
          on_epoch_end: Callable[[int, int], None] = lambda e, n: None) -> None:
    run.watch(model, criterion, log="all", log_freq=10)
    example_ct = 0
    batch_ct = 0
    for epoch in range(config["epochs"]):
        on_epoch_start(epoch)
        seen = 0
        for _, (images, labels) in enumerate(loader):
            loss = train_batch(images, labels, model, optimizer, criterion, device)
            example_ct += len(images)
            seen += len(images)
            batch_ct += 1
            # Report metrics every 25th batch
            if ((batch_ct + 1) % 25) == 0:
                loss = loss.item()  # a host-device sync, as the tutorial's tensor in wandb.log + f-string
                run.log({"epoch": epoch, "loss": loss}, step=example_ct)
                print(f"Loss after {str(example_ct).zfill(5)} examples: {loss:.3f}")
        on_epoch_end(epoch, seen)


def test(model, test_loader, run, device) -> float:
    model.eval()
    with torch.no_grad():
        correct, total = 0, 0
        for images, labels in test_loader:
            images, labels = images.to(device), labels.to(device)
            outputs = model(images)
            _, predicted = torch.max(outputs.data, 1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
    run.log({"test_accuracy": correct / total})
    model.train()
    return correct / total


def make(config: dict, root: str, device: torch.device):
    """The tutorial's `make`: data, loaders, model, loss, optimizer (test set at full size, see above)."""
    train_set = get_data(root, slice=config["train_stride"], train=True)
    test_set = get_data(root, slice=1, train=False)
    train_loader = make_loader(train_set, config["batch_size"], device)
    test_loader = make_loader(test_set, config["batch_size"], device)
    model = ConvNet(config["kernels"], config["classes"]).to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=config["learning_rate"])
    return model, train_loader, test_loader, criterion, optimizer
