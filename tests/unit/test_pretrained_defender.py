"""The pretrained defender shipped in the package (``ppd_defender``): file, pin, settings, resolution."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ppd import weights
from ppd.export import load_defender
from ppd.inference import PRETRAINED_NAME, resolve_defender
from ppd.io import sha256_file
from ppd.weights.registry import PPD_DEFENDER_SHA256

CP = weights.get_checkpoint(PRETRAINED_NAME)
SHIPPED = CP.bundled_path


@pytest.fixture(autouse=True)
def _no_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PPD_OFFLINE", "1")
    monkeypatch.setenv("PPD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(CP.env_var, raising=False)


def test_shipped_file_is_small_and_pinned() -> None:
    assert SHIPPED is not None and SHIPPED.is_file(), f"the pretrained defender {SHIPPED} is missing"
    assert SHIPPED.stat().st_size <= 5 * 2**20
    assert len(PPD_DEFENDER_SHA256) == 64 and set(PPD_DEFENDER_SHA256) != {"0"}
    assert sha256_file(SHIPPED) == PPD_DEFENDER_SHA256 == CP.sha256


def test_pretrained_resolves_to_the_shipped_file() -> None:
    assert weights.resolve(PRETRAINED_NAME) == SHIPPED
    assert resolve_defender("pretrained") == SHIPPED == resolve_defender(PRETRAINED_NAME)
    assert resolve_defender("some/defender.pt") == Path("some/defender.pt")


def test_shipped_file_carries_its_inference_settings() -> None:
    agent, env = load_defender(SHIPPED)
    qnet = agent.online
    # what PromptDefender / ppd.predict / ppd.evaluate need, without any config
    for key in ("grid", "k_feature", "k_physical", "sam_variant", "dino_name", "dino_resolution"):
        assert key in env, key
    assert "max_steps" in env and "keep_last_positive" in env
    assert env["max_steps"] is None  # the Q <= 0 rule stops it: no hand-chosen budget
    assert env["min_q"] == 0.0  # chosen on the dev splits (experiments/results/defender_dev_select.md)
    assert isinstance(env.get("feature_matching"), dict) and env["feature_matching"]
    assert env["sam_variant"] == "vit_t" and env["dino_name"] == "dinov2_vits14"
    assert env["sam_inputs"] is True and qnet.in_dim == env["feature_dim"] == 384 + 5 + 3
    assert all(torch.isfinite(p).all() for p in qnet.parameters())


def test_shipped_file_is_loaded_with_weights_only() -> None:
    payload = torch.load(SHIPPED, map_location="cpu", weights_only=True)
    assert payload["format"] and "state_dict" in payload and "optimizer_states" not in payload
