"""The one reader of CSV files a user writes (scan lists, gallery references, dataset manifests, labelled images
to ingest): UTF-8 with Excel's BOM read, the columns checked, and text that is not UTF-8 or not CSV a message
rather than a traceback. Serving side (``wildcheck scan`` and galleries read CSVs), so training imports it."""

from __future__ import annotations

import csv
from pathlib import Path

from serving.errors import InvalidInput


def read_rows(path: str | Path, required: set[str], missing: str) -> tuple[list[dict], list[str]]:
    """The rows of ``path`` and its header; ``missing``: the message when a ``required`` column is absent."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: Excel writes a BOM
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            if not required <= set(header):  # say what the first line holds: 'Path', 'path ', or no header at all
                found = ", ".join(repr(h) for h in header[:8]) + (", ..." if len(header) > 8 else "")
                raise InvalidInput(f"{path}: " + (f"its first line has the columns {found}; " if header else
                                                  "it is empty; ") + missing)
            return list(reader), header
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save the CSV as UTF-8") from exc
    except csv.Error as exc:
        raise InvalidInput(f"{path} is not a readable CSV: {exc}") from exc
