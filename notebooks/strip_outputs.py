"""Remove outputs and execution counts from notebooks before committing: python notebooks/strip_outputs.py notebooks/*.ipynb"""

import sys

import nbformat

for path in sys.argv[1:]:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.write(nb, path)
