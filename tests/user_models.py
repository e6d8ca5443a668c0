"""User model factories for the tests (``--model tests.user_models:...``; commands that
load their checkpoints need ``--allow-custom-model tests.user_models:...``)."""
import torch
from torch import nn


class Untraceable(nn.Module):
    """A user model whose forward leaves autograd: torch-pruning cannot trace it."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        n = 1
        for d in input_shape:
            n *= d
        self.n = n
        self.conv = nn.Conv1d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * n, num_classes)

    def forward(self, x):
        h = torch.relu(self.conv(x.reshape(-1, 1, self.n)))
        h = torch.from_numpy(h.detach().numpy().copy())
        return self.fc(h.flatten(1))


def untraceable(input_shape, num_classes):
    return Untraceable(input_shape, num_classes)


def mlp(input_shape, num_classes, hidden=32):
    n = 1
    for d in input_shape:
        n *= d
    return nn.Sequential(nn.Flatten(), nn.Linear(n, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))
