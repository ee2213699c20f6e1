"""Real MobileSAM: the decoder with the cached image side equals segment_anything's ``MaskDecoder`` (<= 1e-5)."""

from __future__ import annotations

import pytest
import torch

from ppd.data.datasets import SegmentationFolder
from ppd.data.features import FeatureCache
from ppd.models.sam import build_sam
from tests.helpers.sam_reference import assert_cached_matches_reference

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mobile_sam_and_embedding():
    sample = SegmentationFolder("examples/data/ph2")[0]
    feats = FeatureCache(sam_variant="vit_t", dino_name="dinov2_vits14", dino_resolution=224).get(
        sample.image
    )
    return build_sam("vit_t"), feats.sam_embedding.float()[None]


@pytest.mark.parametrize("b,n", [(1, 1), (2, 20), (1, 120)])
@pytest.mark.parametrize("multimask", [False, True])
def test_cached_decode_equals_segment_anything_on_mobile_sam(
    mobile_sam_and_embedding, b, n, multimask
) -> None:
    sam, emb = mobile_sam_and_embedding
    assert_cached_matches_reference(sam, b, n, multimask, seed=b + n, embedding=emb)


def test_random_embedding_too(mobile_sam_and_embedding) -> None:
    sam, _ = mobile_sam_and_embedding
    torch.manual_seed(0)
    assert_cached_matches_reference(sam, 3, 7, True, seed=1)
