"""Typed config blocks shared by DataModules and command-line tools."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class DatasetConfig:
    """Where an image/mask data set lives and in which layout.

    Attributes:
        root: folder of the data set.
        kind: ``folder`` (images/ + masks/), ``fss1000`` (class folders) or ``voc`` (PASCAL VOC instances).
        split: optional split file (one stem per line) or list of stems.
        limit: keep only the first ``limit`` samples (after the split), ``None`` = all.
        options: extra keyword arguments of the dataset class.
    """

    root: str
    kind: str = "folder"
    split: str | list[str] | None = None
    limit: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Any:
        """Instantiate the dataset (see :func:`ppd.data.layouts.build_dataset`)."""
        from ppd.data.layouts import build_dataset

        kw = dict(self.options)
        if self.split is not None:
            kw["split"] = self.split
        ds = build_dataset(self.kind, self.root, **kw)
        if self.limit is not None:
            from torch.utils.data import Subset

            ds = Subset(ds, list(range(min(self.limit, len(ds)))))
        return ds
