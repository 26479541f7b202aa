"""``python examples/mlp.py`` (the README's first command) does what the README says: plans the
4-layer MLP training step on 2x4, prints the plan, runs two steps (the second fed the first's
params and optimizer state) and checks both against the unsharded step."""

from __future__ import annotations

import re

from examples import mlp


def test_example_runs_two_chained_steps_equal_to_unsharded(capsys):
    mlp.main()  # raises AssertionError if a step differs from the unsharded step
    out = capsys.readouterr().out
    assert "method auto" in out and "Predicted cost per step" in out  # the plan's summary
    steps = re.findall(r"^step (\d): loss (\S+), sharded == unsharded ✓$", out, re.M)
    assert [n for n, _ in steps] == ["1", "2"], out
    first, second = (float(loss) for _, loss in steps)
    assert second < first  # the second step ran on the first's updated params (adam lowers the loss)
