import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # envs/, data/ and the scripts in algos/


@pytest.fixture(scope="session")
def small_reacher_dataset(tmp_path_factory):
    """400 transitions of reacher expert-mix from the committed behaviour policy, as a file."""
    from data import mujoco_datasets

    path = tmp_path_factory.mktemp("reacher") / "expert-mix-small.npz"
    np.savez(path, **mujoco_datasets.build("reacher", "expert-mix", size=400))
    return str(path)
