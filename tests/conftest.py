import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from lossguide.oracle import default_mixture  # noqa: E402
from lossguide.schedule import NoiseSchedule  # noqa: E402

# the tests' tensors are small: one thread by default; OMP_NUM_THREADS=2 runs the suite on two (every bound must hold
# on both)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


@pytest.fixture(scope="session")
def schedule():
    return NoiseSchedule.linear()


@pytest.fixture(scope="session")
def prior():
    return default_mixture()


class TinyEpsNet(torch.nn.Module):
    """A small conv ε-network (random weights) for image-path tests: ε ≈ x_t plus a bounded
    perturbation, so x0_hat stays O(1) like a trained model's."""

    def __init__(self, ch: int = 1, width: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c1 = torch.nn.Conv2d(ch + 1, width, 3, padding=1)
        self.c2 = torch.nn.Conv2d(width, ch, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)

    def forward(self, x, t):
        tt = (t.to(x.dtype) / 1000).view(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return x + 0.01 * torch.tanh(self.c2(torch.tanh(self.c1(torch.cat([x, tt], 1)))))


@pytest.fixture
def tiny_net():
    return TinyEpsNet()


@pytest.fixture
def restore_logging():
    """The training script configures the root logger (handlers, level): put it back afterwards."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in root.handlers:
        if h not in handlers:
            h.close()
    root.handlers[:] = handlers
    root.setLevel(level)
