"""Labels in the user's own data: read as strings, missing values refused, the label set and its order.

Labels stay strings (JSON numbers and booleans are written as in JSON: ``1``, ``true``). An empty label, or a
missing-value marker as spreadsheets and pandas write them (:data:`MISSING_LABELS`), is a hole in the data,
not a class of its own. Without a fixed list the label set is the sorted distinct labels of the training
data, numerically when every label is a number (``2`` before ``10``). Tags of token classification follow
the same rules, with ``O`` first.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable

from peftlab.errors import PeftlabError

# What spreadsheets, R and pandas write for a missing value (pandas' default ``na_values``, compared without
# case): such a label is a hole in the data, not a class of its own.
MISSING_LABELS = frozenset({
    "nan", "-nan", "na", "n/a", "#n/a", "#n/a n/a", "#na", "<na>", "null", "none", "nil",
    "1.#ind", "-1.#ind", "1.#qnan", "-1.#qnan",
})
OUTSIDE_TAG = "O"


def as_label_names(value: Any) -> list[str]:
    """``label_names`` as given (a list, or ``"a,b,c"``), checked: no empty or repeated label."""
    if isinstance(value, str):
        names = [part.strip() for part in value.split(",")]
    elif isinstance(value, (list, tuple)):
        names = [label_string(v) if not isinstance(v, str) else v.strip() for v in value]
    else:
        raise PeftlabError(f"Option --label-names must be a list of labels (or 'a,b,c'), not {value!r}.")
    if not names or any(name == "" for name in names):
        raise PeftlabError(f"Option --label-names has an empty label: {value!r}. Give labels as 'a,b,c'.")
    if len(set(names)) != len(names):
        raise PeftlabError(f"Option --label-names lists a label twice: {', '.join(names)}.")
    return names


def label_string(value: Any) -> str:
    """A label from a file as a string: CSV text stripped; JSON scalars as JSON writes them."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return json.dumps(value)


def sort_labels(labels: Iterable[str]) -> list[str]:
    """Sorted distinct labels: numerically when all parse as finite numbers, else as strings."""
    labels = set(labels)
    try:
        values = {label: float(label) for label in labels}
    except ValueError:
        return sorted(labels)
    if not all(math.isfinite(v) for v in values.values()):
        return sorted(labels)
    return sorted(labels, key=lambda label: (values[label], label))


def sort_tags(tags: Iterable[str]) -> list[str]:
    """Distinct tags, ``O`` first, then sorted by entity type and B- before I- (``B-LOC, I-LOC, B-PER``...)."""
    distinct = set(tags)
    rest = sorted(distinct - {OUTSIDE_TAG}, key=lambda tag: (tag[2:] if tag[1:2] == "-" else tag, tag))
    return ([OUTSIDE_TAG] if OUTSIDE_TAG in distinct else []) + rest


def read_label(value: Any, where: str, *, regression: bool, fixed: list[str] | None) -> str | float:
    """One label of a row (``where`` names file, line and field): a string, or a float for regression."""
    if value is None or isinstance(value, (list, dict)):
        raise PeftlabError(
            f"{where} is {'null' if value is None else 'a JSON ' + type(value).__name__}, not a label; "
            "fill it in or drop the row."
        )
    if isinstance(value, float) and not math.isfinite(value):  # JSON's NaN / Infinity
        raise PeftlabError(f"{where} is {json.dumps(value)}, not a "
                           f"{'finite number' if regression else 'label'}; fill it in or drop the row.")
    label = label_string(value)
    if label == "":
        raise PeftlabError(f"{where} is empty; fill it in or drop the row.")
    if regression:
        try:
            number = float(label)
        except ValueError:
            raise PeftlabError(f"{where} is '{label}', not a number (--regression needs numeric labels); "
                               "fix it or drop the row.") from None
        if not math.isfinite(number):
            raise PeftlabError(f"{where} is '{label}', not a finite number (--regression needs numeric "
                               "labels); fix it or drop the row.")
        return number
    if label.lower() in MISSING_LABELS and not (fixed and label in fixed):
        raise PeftlabError(
            f"{where} is '{label}', a missing-value marker rather than a class; fill in the label or drop the "
            f"row (if '{label}' is a real class, list it in --label-names)."
        )
    return label
