"""What the generated data sets share. An item is drawn from ``(seed, split, index)`` alone, so any
process makes the same tensors: the split picks a seed stream (``SPLIT_STREAM``), the DataConfig
gives the image size and the split's length, and an index outside that length is named."""
from __future__ import annotations

from torch.utils.data import Dataset

from orchestrator.config import DataConfig

SPLIT_STREAM = {"train": 0, "val": 1}


def check_split(split: str) -> None:
    if split not in SPLIT_STREAM:
        raise ValueError(f"unknown split {split!r}; allowed: {sorted(SPLIT_STREAM)}")


class SeededDataset(Dataset):
    """``train`` holds ``data_cfg.train_samples`` items, ``val`` ``data_cfg.val_samples`` from
    another seed stream, at ``data_cfg.height x data_cfg.width``."""

    items = "samples"  # what an index counts, for the out-of-range message

    def __init__(self, data_cfg: DataConfig, split: str = "train"):
        check_split(split)
        self.split, self.seed = split, int(data_cfg.seed)
        self.height, self.width = data_cfg.height, data_cfg.width
        self.length = data_cfg.train_samples if split == "train" else data_cfg.val_samples

    def __len__(self) -> int:
        return self.length

    def check_index(self, index: int) -> None:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} {self.split} {self.items}")
