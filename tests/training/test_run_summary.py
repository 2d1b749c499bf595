"""What the Fine-tune dock says about a run."""

from __future__ import annotations

from types import SimpleNamespace

from napari_unet.training import run_summary


def _stats(**kwargs):
    values = dict(iteration=12, total_iterations=None, loss=0.12345, samples_per_second=3.21,
                  best_score=None, keeps_best=False)
    values.update(kwargs)
    return SimpleNamespace(**values)


def test_before_the_run():
    assert run_summary.preparing_text("tiny v1", "bf16", ["a: 2 corrected slice(s)", "b"]) == \
        "Preparing fine-tuning of tiny v1 (bf16)… a: 2 corrected slice(s); b"
    assert "best-scoring ones are kept if they beat the start model" in run_summary.weights_plan_text(True)
    assert "the last weights are kept" in run_summary.weights_plan_text(False)
    assert run_summary.trainer_message_text("held out slice 3") == "Held out slice 3."


def test_progress_line():
    text = run_summary.progress_text(_stats(), "fp32", "5 s")
    assert text == "iteration 12 · loss 0.1235 · 3.2 samples/s · 5 s · fp32"
    text = run_summary.progress_text(_stats(total_iterations=50, best_score=0.8), "fp32", "5 s")
    assert text.startswith("iteration 12/50 ·") and text.endswith("· best Dice 0.800")


def test_result_line():
    assert run_summary.result_text("tiny v2", "1 min 02 s", None) == \
        "New version tiny v2 (after 1 min 02 s). It is selected in the Segment dock."
    last = run_summary.result_text("tiny v2", "3 s", _stats())
    assert "12 iterations, loss 0.1235, last weights)" in last
    best = run_summary.result_text("tiny v2", "3 s", _stats(keeps_best=True, best_score=0.9))
    assert "best-scoring weights: Dice 0.900 on the held-out part" in best
    # keeps the best but was never scored: says neither
    neither = run_summary.result_text("tiny v2", "3 s", _stats(keeps_best=True))
    assert "weights" not in neither


def test_loaded_model_line():
    assert "cannot be fine-tuned" in run_summary.loaded_model_text("zoo v1", True)
    assert run_summary.loaded_model_text("tiny v1", False) == \
        "Loaded tiny v1; Fine-tune makes a new version of it."
