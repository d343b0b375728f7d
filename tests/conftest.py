import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def fixture(name):
    """A reference fixture: the reference implementation's weights, an input and its logits."""
    return torch.load(os.path.join(FIXTURES, name + '.pt'), weights_only=True)
