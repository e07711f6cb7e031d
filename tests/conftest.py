import os

import pytest
import torch

torch.set_num_threads(2)

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
needs_fmnist = pytest.mark.skipif(
    not os.path.exists(os.path.join(FMNIST_DIR, "t10k-images-idx3-ubyte.gz")),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
