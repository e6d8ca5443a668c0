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


class Int8Hostile(nn.Module):
    """An MLP that int8 cannot carry: each layer's weights hold one huge value on an input
    that is always zero, so fp32 is unaffected (huge x 0) while an int8 weight scale set by
    that value rounds every other weight of the row to zero. Both layers are so built, so
    leaving one in float still leaves the other ruined."""

    def __init__(self, input_shape, num_classes, hidden=32):
        super().__init__()
        n = 1
        for d in input_shape:
            n *= d
        self.fc1 = nn.Linear(n + 1, hidden)
        self.fc2 = nn.Linear(hidden + 1, num_classes)
        spike1, spike2 = torch.zeros(hidden, n + 1), torch.zeros(num_classes, hidden + 1)
        spike1[:, n], spike2[:, hidden] = 1e4, 1e4
        self.register_buffer("spike1", spike1)
        self.register_buffer("spike2", spike2)

    def forward(self, x):
        x = x.flatten(1)
        h = torch.relu(nn.functional.linear(torch.cat([x, x[:, :1] * 0], 1),
                                            self.fc1.weight + self.spike1, self.fc1.bias))
        return nn.functional.linear(torch.cat([h, h[:, :1] * 0], 1),
                                    self.fc2.weight + self.spike2, self.fc2.bias)


def int8_hostile(input_shape, num_classes):
    return Int8Hostile(input_shape, num_classes)
