"""The Flax, NNX and Equinox examples run as ``python examples/X.py`` runs them (their ``main``):
every step checked against the unsharded step inside, one plan per example."""

from __future__ import annotations

import re

import pytest

from examples import equinox_mlp, flax_lm, nnx_mlp


def _steps(out: str, prefix: str = "") -> list[float]:
    line = rf"^{prefix}step \d[^:]*: loss (\S+), sharded == unsharded ✓ \(plans made: 1\)$"
    return [float(x) for x in re.findall(line, out, re.M)]


# Slow (12 s, mostly the compile): its model, loop and Orbax round trip are those of
# tests/alpa_lite/test_flax_linen.py, which the default suite runs.
@pytest.mark.slow
def test_flax_lm_example_trains_checkpoints_and_continues(capsys):
    flax_lm.main()  # raises AssertionError if a step differs from the unsharded step
    out = capsys.readouterr().out
    losses = _steps(out)
    assert len(losses) == 4, out  # 3 steps, then one from the restored Orbax checkpoint
    assert "restored from an Orbax checkpoint" in out
    assert losses == sorted(losses, reverse=True)  # each step ran on the previous one's state


@pytest.mark.parametrize("example, prefixes", [(nnx_mlp, ("functional ", "decorated ")), (equinox_mlp, ("",))])
def test_nnx_and_equinox_examples_run(example, prefixes, capsys):
    example.main()
    out = capsys.readouterr().out
    for prefix in prefixes:
        assert len(_steps(out, prefix)) == 3, out
