"""The notebooks in notebooks/ run top to bottom (small settings), and are stored without outputs."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
ROOT = NOTEBOOKS.parent
NAMES = ["pareto_analysis.ipynb", "controller_tradeoff.ipynb"]
CELL_TIMEOUT_S = 300


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs(name: str) -> None:
    nb = json.loads((NOTEBOOKS / name).read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code
    for cell in code:
        assert cell["outputs"] == [] and cell["execution_count"] is None, cell["source"][:80]
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    nbformat.validate(nbformat.reads(json.dumps(nb), as_version=4))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> dict[str, str]:
    """Environment of the notebooks: a temporary study storage and caches, small settings."""
    tmp = tmp_path_factory.mktemp("notebooks")
    env = {}
    from jupyter_client.kernelspec import find_kernel_specs

    if "python3" not in find_kernel_specs():  # register this interpreter's ipykernel, in tmp
        from ipykernel.kernelspec import install

        install(prefix=str(tmp / "jupyter"), kernel_name="python3")
        env["JUPYTER_PATH"] = str(tmp / "jupyter" / "share" / "jupyter")
    return env | {
        "MPSEARCH_NB_SMALL": "1",
        "MPSEARCH_NB_CONFIG": str(ROOT / "studies" / "digits.yaml"),
        "MPSEARCH_NB_STORAGE": f"sqlite:///{tmp / 'study.db'}",
        "MPSEARCH_NB_STUDY": "nb_digits",
        "MPSEARCH_NB_CACHE": str(tmp / "cache"),
        "TMP_CWD": str(tmp),
    }


def execute(
    name: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> nbformat.NotebookNode:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": env["TMP_CWD"]}},
    )
    try:
        client.execute()
    finally:
        dump = os.environ.get("MPSEARCH_NB_DUMP")  # keep the executed notebook for a look
        if dump:
            nbformat.write(nb, str(Path(dump) / name))
    return nb


def outputs_text(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def images(nb: nbformat.NotebookNode) -> int:
    return sum(
        "image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", [])
    )


@pytest.mark.slow
def test_pareto_analysis_runs_a_study_and_loads_it(workdir, monkeypatch) -> None:
    nb = execute("pareto_analysis.ipynb", workdir, monkeypatch)
    text = outputs_text(nb)
    assert "no study 'nb_digits'" in text  # it ran the study into the temporary storage
    assert "running 6 trials" in text
    assert "drawing with matplotlib" in text or "drawing with plotly" in text
    # fronts (2 figures or 1 panel), bits, heat map, hypervolume, baselines
    assert images(nb) >= 5
    assert "mpsearch" in text and "uniform" in text
    assert not list(ROOT.glob("studies/nb_digits*"))  # nothing landed in the checkout
    assert Path(workdir["TMP_CWD"], "study.db").exists()


@pytest.mark.slow
def test_controller_tradeoff_runs_on_the_study_plans(workdir, monkeypatch) -> None:
    nb = execute("controller_tradeoff.ipynb", workdir, monkeypatch)
    text = outputs_text(nb)
    assert "plans from study 'nb_digits'" in text
    assert "eps=0.01" in text and "eps=0.05" in text
    # the controller serving the test split for real agrees with the offline table (up to the
    # few inputs that dynamic activation scales may route differently)
    found = re.search(r"largest agreement difference, served vs table: ([0-9.e-]+)", text)
    assert found and float(found.group(1)) <= 0.02
    assert images(nb) >= 3
