"""What the Fine-tune dock says about a run: before it starts, every update, at its end, and
which weights the new version gets. Text only; durations come formatted by the caller."""

from __future__ import annotations

from typing import Any, Sequence

HOLD_OUT_PLAN = ("A part of the corrections will be held out to score the weights; the "
                 "best-scoring ones are kept if they beat the start model there.")
NO_HOLD_OUT_PLAN = ("Fewer than 2 corrected slices or images (or hold-out off): nothing is "
                    "held out, the last weights are kept.")


def preparing_text(model_label: str, precision: str, notes: Sequence[str]) -> str:
    """The status line while the Trainer prepares the data."""
    return f"Preparing fine-tuning of {model_label} ({precision})… " + "; ".join(notes)


def weights_plan_text(validation_expected: bool) -> str:
    """Which weights the run will keep, said before it starts."""
    return HOLD_OUT_PLAN if validation_expected else NO_HOLD_OUT_PLAN


def trainer_message_text(message: str) -> str:
    """The Trainer's account of what it held out, as a sentence."""
    return message[:1].upper() + message[1:] + "."


def progress_text(stats: Any, precision: str, elapsed: str) -> str:
    """The status line of an update (:class:`~napari_unet.training.config.TrainingStats`);
    ``elapsed``: its time so far, formatted."""
    text = (f"iteration {stats.iteration}"
            + (f"/{stats.total_iterations}" if stats.total_iterations else "")
            + f" · loss {stats.loss:.4f} · {stats.samples_per_second:.1f} samples/s"
            + f" · {elapsed} · {precision}")
    if stats.best_score is not None:
        text += f" · best Dice {stats.best_score:.3f}"
    return text


def result_text(key: str, elapsed: str, stats: Any | None, entry: dict | None = None) -> str:
    """The status line at the end: the new version ``key`` after ``elapsed`` (formatted) and,
    from the last update, the iterations and loss; from the model's history ``entry``, which
    weights it got and why (with the held-out scores) and what happened to its
    post-processing."""
    text = f"New version {key} (after {elapsed}"
    if stats is not None:
        text += f", {stats.iteration} iterations, loss {stats.loss:.4f}"
    entry = entry or {}
    if entry.get("decision"):
        text += f"). It keeps {entry['decision']}"
        if entry.get("postprocessing"):
            text += f"; {entry['postprocessing']}"
        return text + ". It is selected in the Segment dock."
    if stats is not None:
        if stats.keeps_best and stats.best_score is not None:
            text += f", best-scoring weights: Dice {stats.best_score:.3f} on the held-out part"
        elif not stats.keeps_best:
            text += ", last weights"
    return text + "). It is selected in the Segment dock."


def loaded_model_text(key: str, foreign: bool) -> str:
    """The status line after a model file was added."""
    if foreign:
        return (f"Loaded {key}: a Zoo model made elsewhere segments (Segment dock) but cannot "
                "be fine-tuned here.")
    return f"Loaded {key}; Fine-tune makes a new version of it."

