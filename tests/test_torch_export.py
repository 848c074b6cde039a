"""``quiet_export``: torch.export's result and errors, without the partial graph printed."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from mpsearch._torch_export import quiet_export


class _Branch(nn.Module):
    """A branch on a value computed from the input: torch.export cannot keep it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        print("forward ran", file=sys.stderr)
        if (y > 0).sum() > 3:
            return y * 2
        return y


class _Straight(_Branch):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        print("forward ran", file=sys.stderr)
        return self.fc(x)


def test_a_failed_export_raises_torchs_error_without_printing_its_partial_graph(capsys) -> None:
    x = torch.randn(2, 4)
    with pytest.raises(Exception) as plain:  # what torch itself does
        torch.export.export(_Branch(), (x,), strict=False)
    assert "def forward" in capsys.readouterr().err
    with pytest.raises(type(plain.value)) as quiet:
        quiet_export(_Branch(), (x,), strict=False)
    assert "def forward" in quiet.value.partial_fx_graph  # kept on the exception
    err = capsys.readouterr().err
    assert "def forward" not in err
    assert "forward ran" in err  # what the model wrote is not lost


def test_a_successful_export_is_torchs_and_keeps_what_was_written(capsys) -> None:
    model, x = _Straight().eval(), torch.randn(2, 4)
    program = quiet_export(model, (x,), {}, strict=False)
    torch.testing.assert_close(program.module()(x), model(x))
    assert capsys.readouterr().err.count("forward ran") == 2
