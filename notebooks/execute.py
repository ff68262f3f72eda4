"""Execute course notebooks in place and make the saved copy readable without a kernel.

    python notebooks/execute.py notebooks/04_transformer.ipynb [more.ipynb ...]

A reader who opens an executed notebook on the web has no widget support. A tqdm bar is
saved as a widget with a text fallback taken when the bar was *created* ("0%| 0/400"),
so the page would show every bar frozen at zero. After running the notebook, this script
replaces each bar's output with the text of its *last* state, read from the widget state
that Jupyter saves, and then drops that state and the per-cell timing metadata (noise in
every diff). Other widgets (the interactive panel of lesson 05) keep a one-line note; the
notebook shows a static picture of the panel below it.

Needs the notebooks extra (``pip install -e ".[notebooks]"``). One thread per process (``OMP_NUM_THREADS=1``): the course's matrices are small, and the
2-core machines it targets run faster that way.
"""

from __future__ import annotations

import html
import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def bar_text(model_id: str, state: dict) -> str | None:
    """The last text of a tqdm bar: its description, bar and counts, as tqdm prints them.

    tqdm's notebook bar is an HBox of three widgets: an HTML label ("train vae: 100%"),
    a progress bar and an HTML tail ("400/400 [00:12<00:00, 33.1it/s]"), HTML-escaped."""
    box = state.get(model_id, {}).get("state", {})
    children = [state.get(child.removeprefix("IPY_MODEL_"), {}) for child in box.get("children", [])]
    if len(children) != 3 or not children[1].get("model_name", "").endswith("ProgressModel"):
        return None
    label, progress, tail = (child["state"] for child in children)
    filled = round(10 * progress.get("value", 0) / max(progress.get("max", 1), 1))
    text = f"{label.get('value', '')}|{'█' * filled}{' ' * (10 - filled)}|{tail.get('value', '')}"
    return html.unescape(text).replace("\u2007", " ")


def hidden(model_id: str, state: dict) -> bool:
    layout = state.get(model_id, {}).get("state", {}).get("layout", "").removeprefix("IPY_MODEL_")
    return state.get(layout, {}).get("state", {}).get("visibility") == "hidden"


def freeze_widgets(notebook) -> int:
    """Replace every widget output by plain text; return how many bars were frozen."""
    state = notebook.metadata.pop("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    frozen = 0
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)
        kept = []
        for output in cell.get("outputs", []):
            view = output.get("data", {}).get(WIDGET_VIEW)
            if view is not None and hidden(view["model_id"], state):
                continue  # a bar made with leave=False hides itself when done: gone from the page too
            if view is not None:
                text = bar_text(view["model_id"], state)
                frozen += text is not None
                output["data"] = {"text/plain": text or "(an interactive widget: run the notebook to use it)"}
            kept.append(output)
        if cell.cell_type == "code":
            cell.outputs = kept
    return frozen


def cell_seconds(notebook) -> list[tuple[float, int]]:
    """(seconds, cell index) of every executed code cell, from the timing nbclient records."""
    from datetime import datetime

    timings = []
    for index, cell in enumerate(notebook.cells):
        execution = cell.metadata.get("execution", {})
        if "iopub.execute_input" in execution and "shell.execute_reply" in execution:
            start, end = (datetime.fromisoformat(execution[key].replace("Z", "+00:00"))
                          for key in ("iopub.execute_input", "shell.execute_reply"))
            timings.append(((end - start).total_seconds(), index))
    return timings


def execute(path: Path, timeout: int = 1200) -> None:
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    timings = cell_seconds(notebook)
    frozen = freeze_widgets(notebook)
    nbformat.write(notebook, path)
    slowest = ", ".join(f"cell {index} {seconds:.0f} s" for seconds, index in sorted(timings, reverse=True)[:4])
    print(f"{path}: executed, cells took {sum(t for t, _ in timings):.0f} s in all (slowest: {slowest}); "
          f"{frozen} progress bars frozen to their last state")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for name in sys.argv[1:]:
        execute(Path(name))
