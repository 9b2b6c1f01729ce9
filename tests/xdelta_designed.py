"""The designed edge weakness of XDelta's check (issue: ">= 80% of explained samples in the
expected category, and the missed concept is the designed part"): a base, an edge that never learned
one small part, and their DELTA, on a class subset of the synthetic scenes at difficulty 0.

Used by ``tests/test_xdelta.py`` (slow) and by ``bench/xdelta_designed.py``, which re-runs it with
other seeds and class sets.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class ClassSubset:
    """A class subset of a synthetic set, relabelled 0..k-1, with its masks (what ``explain`` reads)."""

    def __init__(self, data, classes):
        self.data, self.classes = data, list(classes)
        keep = np.flatnonzero(np.isin(data.labels, self.classes))
        self.rows = keep
        self.labels = np.searchsorted(self.classes, data.labels[keep])
        self.class_names = [data.class_names[c] for c in self.classes]
        self.part_names = data.part_names
        self.has_masks, self.num_classes, self.image_size, self.channels = True, len(self.classes), 32, 3

    def __len__(self):
        return len(self.rows)

    def get(self, idx):
        x, _ = self.data.get(self.rows[np.asarray(idx)])
        return x, torch.from_numpy(self.labels[np.asarray(idx)])

    def pixels(self, idx):
        return self.data.pixels(self.rows[np.asarray(idx)])

    def masks(self, idx):
        return self.data.masks(self.rows[np.asarray(idx)])


class Net(nn.Module):
    def __init__(self, features: nn.Sequential, width: int, classes: int):
        super().__init__()
        self.features = features
        self.classifier = nn.Linear(width, classes)

    def forward_features(self, x):
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x):
        return self.classifier(self.forward_features(x))


def fit(model, x, y, *, epochs, seed, lr=2e-3, batch=64):
    """Adam with a cosine schedule (trains these BN-free nets faster than the pair recipe's SGD)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * ((len(x) + batch - 1) // batch))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            b = order[i:i + batch]
            loss = nn.functional.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()


def designed_pair(classes, blind_to, seen_as, *, train_n=1800, base_epochs=12, seed=0):
    """The designed weakness: the edge is trained with class ``blind_to`` labelled ``seen_as`` (two
    classes that differ only by one small part), so nothing in its training tells that part apart
    and it calls every ``blind_to`` image ``seen_as``; everything else it learns normally.

    Base: four convs at full resolution. Edge: three narrower convs. DELTA: the base's first three
    convs (the last map 16x16, so its region can resolve a 3-pixel part), SE, resizer."""
    from fl.data.synthetic import SyntheticImageSet
    from fl.delta.construct import DeltaTrainSettings, train_delta
    from fl.delta.network import DeltaArch, FusedDelta

    train = ClassSubset(SyntheticImageSet(int(train_n * 10 / len(classes)), seed, stream=0, difficulty=0.0), classes)
    test = ClassSubset(SyntheticImageSet(1500, seed, stream=1, difficulty=0.0), classes)
    x, y = train.get(np.arange(len(train)))
    torch.manual_seed(seed)
    conv = lambda i, o: [nn.Conv2d(i, o, 3, padding=1), nn.ReLU(inplace=True)]  # noqa: E731
    base = Net(nn.Sequential(*conv(3, 16), nn.MaxPool2d(2), *conv(16, 32), *conv(32, 48), nn.MaxPool2d(2),
                              *conv(48, 64)), 64, len(classes))
    edge = Net(nn.Sequential(*conv(3, 16), nn.MaxPool2d(2), *conv(16, 32), nn.MaxPool2d(2), *conv(32, 32)),
                32, len(classes))
    fit(base, x, y, epochs=base_epochs, seed=seed)
    fit(edge, x, torch.where(y == blind_to, torch.full_like(y, seen_as), y), epochs=25, seed=seed)
    base.eval(), edge.eval()
    arch = DeltaArch(num_classes=len(classes), in_channels=3, image_size=32, convs=(16, 32, 48),
                     pools=(True, False, False), se_hidden=8, delta_dim=16, resizer_hidden=32, edge_pool_dim=32,
                     edge_feat_dim=32, feature_dim=64, edge=("designed", ()))
    fused = FusedDelta(arch, edge=edge)
    with torch.no_grad():
        for mine, theirs in zip(fused.delta.convs(), [base.features[0], base.features[3], base.features[5]]):
            mine.weight.copy_(theirs.weight), mine.bias.copy_(theirs.bias)
        fused.classifier.load_state_dict(base.classifier.state_dict())
    train_delta(fused, base, x, y, DeltaTrainSettings(epochs=30, lr=5e-3, fnc=0.05, ce=1.0), seed)
    return fused.eval(), base, test
