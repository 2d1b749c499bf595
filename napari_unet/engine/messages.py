"""How runs are described to the user: durations, short lists of slices, models, results."""

from __future__ import annotations

from typing import Any, Sequence


def format_seconds(seconds: float | None) -> str:
    """``"42 s"``, ``"3 min 05 s"``, ``"2 h 07 min"``; ``"?"`` when unknown."""
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def short_list(values: Sequence[Any], limit: int = 8) -> str:
    """``"1, 2, 3"``; past ``limit`` values, the first ones and how many there are in all."""
    text = ", ".join(str(v) for v in values[:limit])
    return text + (f", … ({len(values)} in all)" if len(values) > limit else "")


def model_summary(model: Any) -> str:
    """One line about a model: ``"2D · foreground · <first line of its description>"``."""
    text = f"{model.spatial_dims}D · {model.task}"
    if model.description:
        text += f" · {model.description.splitlines()[0][:80]}"
    return text


def found_text(output: str, n_found: int) -> str:
    """What a segmentation found: objects for instances, classes otherwise."""
    return f"{n_found} objects" if output == "instances" else f"{n_found} class(es)"
