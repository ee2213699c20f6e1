"""Datasets (folder, FSS-1000, VOC layouts) and the feature cache."""

from ppd.data.datasets import (
    DatasetError,
    Sample,
    SegmentationDataset,
    SegmentationFolder,
    load_image,
    load_mask,
)
from ppd.data.layouts import FSS1000, VOCInstances, build_dataset

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
