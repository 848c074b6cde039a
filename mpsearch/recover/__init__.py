"""Recovery fine-tune: quantization-aware training of a chosen plan, distilled from fp32.

>>> import torch
>>> from torch import nn
>>> from mpsearch.recover import recover
>>> net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
>>> res = recover(net, "w4a8_pc", [torch.randn(8, 32) for _ in range(3)], steps=4, progress=False)
>>> res.steps_done, res.trained
(4, ['0', '2'])
"""

from mpsearch.recover._options import RecoverOptions
from mpsearch.recover._recover import RecoveryResult, recover

__all__ = ["RecoverOptions", "RecoveryResult", "recover"]
