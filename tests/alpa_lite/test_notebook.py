"""``examples/inspect_plan.ipynb`` runs top to bottom in a fresh kernel (nbclient), as in CI.

Slow (a kernel start, five plans, a compile and a check: ~10 s): what its cells call (plan,
summary, check, compile and run, JSON round trip, the comparison, a GPU cluster plan) the default
suite tests on its own; this checks that the notebook as written still runs."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "inspect_plan.ipynb"


def _outputs(cell, mime: str) -> str:
    return "".join(o.get("data", {}).get(mime, "") if "data" in o else o.get("text", "") for o in cell.outputs)


@pytest.mark.slow
def test_notebook_executes():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Jupyter starts a notebook in its own folder; nbclient does so when told the path.
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError naming the cell when a cell fails
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    html = [_outputs(c, "text/html") for c in code]
    plans = [h for h in html if "class='alpa-lite-mesh'" in h]
    assert len(plans) == 2  # the CPU plan and the DGX H100 plan
    assert plans[0].count("class='alpa-lite-device'") == 8 and plans[1].count("class='alpa-lite-device'") == 16
    comparison = next(h for h in html if "alpa-lite-comparison" in h)
    for method in ("auto", "data_parallel", "zero3", "megatron", "dp_tp"):
        assert f">{method}</td>" in comparison, method
    text = "".join(_outputs(c, "text/plain") for c in code)
    assert "sharded step == unsharded step" in text
