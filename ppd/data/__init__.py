"""Datasets (folder, FSS-1000, VOC layouts) and the feature cache."""

from ppd.data.datasets import (
    FSS1000,
    DatasetError,
    Sample,
    SegmentationDataset,
    SegmentationFolder,
    VOCInstances,
    build_dataset,
    load_image,
    load_mask,
)

__all__ = [
    "FSS1000",
    "DatasetError",
    "Sample",
    "SegmentationDataset",
    "SegmentationFolder",
    "VOCInstances",
    "build_dataset",
    "load_image",
    "load_mask",
]
