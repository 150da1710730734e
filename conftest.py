"""Repository-wide pytest set-up: notebooks run through nbval (see pyproject.toml).

nbval compares only the cells marked ``# NBVAL_CHECK_OUTPUT`` (lax mode); here we also drop the
``stderr`` stream from those comparisons, since progress bars and warnings write there.
"""

import os

os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_collection_modifyitems(items):
    for item in items:
        notebook = item.parent
        if hasattr(notebook, "skip_compare") and "stderr" not in notebook.skip_compare:
            notebook.skip_compare = (*notebook.skip_compare, "stderr")
