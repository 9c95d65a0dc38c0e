import pytest

from depthdif_hpc import build_model
from depthdif_hpc.data.synthetic import build_tiny_store
from tests.helpers import tiny_config


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """20 synthetic samples of 32 x 32 pixels (8 train, 12 val)."""
    return build_tiny_store(tmp_path_factory.mktemp("ocean"), tile_size=32)


@pytest.fixture(scope="session")
def tiny_model():
    return build_model(tiny_config(overrides=["model.sampling.sampler=ddim", "model.sampling.ddim_num_timesteps=3"])).eval()
