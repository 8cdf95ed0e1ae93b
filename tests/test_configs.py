"""configs/: the model files are the presets of moe/presets.py, one file each, and nothing else."""

from pathlib import Path

import pytest
import yaml

from moe import ModelConfig, get_preset, preset_names

CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.mark.parametrize("name", preset_names())
def test_model_config_file_is_the_preset(name):
    values = yaml.safe_load((CONFIGS / "model" / f"{name}.yaml").read_text())["model"]["config"]
    assert ModelConfig(**values) == get_preset(name)


def test_no_model_file_without_a_preset():
    assert sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml")) == sorted(preset_names())
