"""Segmentation quality: pixel overlap (Dice, IoU) and instance matching scores."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

#: Keys of :func:`evaluate` in the order :func:`format_scores` prints them.
SCORE_ORDER = (
    "dice", "iou", "precision", "recall", "f1", "mean_matched_iou", "n_pred", "n_gt",
    "true_positives", "false_positives", "false_negatives",
)


def as_label_image(array: np.ndarray, what: str = "labels") -> np.ndarray:
    """``array`` as a label image (bool or integers, 0 = background), or a clear ValueError.

    Float arrays holding only whole numbers (labels saved as float) become ``int64``; NaN,
    infinite or fractional values (a probability map) are refused rather than counted as
    foreground.

    Parameters
    ----------
    array : numpy.ndarray
    what : str
        How the message names the array, e.g. a file name.
    """
    array = np.asarray(array)
    if array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer):
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{what} must be a label image (integers), got dtype {array.dtype}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} has NaN or infinite values; a label image holds integers "
                         "(0 = background)")
    if not np.array_equal(array, np.round(array)):
        raise ValueError(f"{what} holds fractional values (a probability map?); binarise it "
                         "first (eval --threshold 0.5) or predict with --output labels")
    return array.astype(np.int64)


def _check_shapes(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred shape {pred.shape} differs from gt shape {gt.shape}")
    return as_label_image(pred, "pred"), as_label_image(gt, "gt")


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient ``2|P∩G| / (|P| + |G|)`` of the nonzero voxels; 1.0 if both are empty."""
    pred, gt = _check_shapes(pred, gt)
    p, g = pred != 0, gt != 0
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(g))
    if total == 0:
        return 1.0
    return 2.0 * np.count_nonzero(p & g) / total


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of the nonzero voxels; 1.0 if both are empty."""
    pred, gt = _check_shapes(pred, gt)
    p, g = pred != 0, gt != 0
    union = int(np.count_nonzero(p | g))
    if union == 0:
        return 1.0
    return np.count_nonzero(p & g) / union


@dataclass
class InstanceScores:
    """Result of :func:`match_instances`.

    ``precision = TP / n_pred``, ``recall = TP / n_gt``, ``f1 = 2 TP / (n_pred + n_gt)``
    (each 1.0 when its denominator is 0 and both images are empty, else 0.0);
    ``mean_matched_iou`` is the mean IoU of the matched pairs (1.0 if both are empty, 0.0
    without matches).
    """

    precision: float
    recall: float
    f1: float
    mean_matched_iou: float
    true_positives: int
    false_positives: int
    false_negatives: int
    n_pred: int
    n_gt: int

    def as_dict(self) -> dict[str, float | int]:
        """The fields as a dict."""
        return asdict(self)


def _compact(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Ids renumbered to ``1..N`` as ``intp`` (0 stays background) and ``N``."""
    if labels.dtype == bool:
        return labels.astype(np.intp), int(labels.any())
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"instance labels must be integers, got dtype {labels.dtype}")
    if labels.size == 0:
        return labels.astype(np.intp), 0
    if np.issubdtype(labels.dtype, np.signedinteger) and labels.min() < 0:
        raise ValueError("instance labels must be non-negative")
    max_id = int(labels.max())
    if max_id <= max(1 << 26, 4 * labels.size):
        present = np.zeros(max_id + 1, dtype=bool)
        present[labels.ravel()] = True
        present[0] = False
        lut = np.zeros(max_id + 1, dtype=np.intp)
        n = int(present.sum())
        lut[present] = np.arange(1, n + 1)
        return lut[labels], n
    uniq, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape).astype(np.intp)
    if uniq[0] != 0:
        return inverse + 1, len(uniq)
    return inverse, len(uniq) - 1


def _iou_pairs(
    pred: np.ndarray, gt: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """IoU of every overlapping (gt, pred) pair from a sparse joint histogram.

    Returns gt indices, pred indices (both 0-based), their IoUs, ``n_gt`` and ``n_pred``.
    """
    pred_ids, n_pred = _compact(pred)
    gt_ids, n_gt = _compact(gt)
    pred_ids, gt_ids = pred_ids.ravel(), gt_ids.ravel()
    pred_sizes = np.bincount(pred_ids, minlength=n_pred + 1)
    gt_sizes = np.bincount(gt_ids, minlength=n_gt + 1)
    both = (pred_ids > 0) & (gt_ids > 0)
    rows, cols = gt_ids[both] - 1, pred_ids[both] - 1
    if rows.size == 0:
        empty = np.zeros(0, dtype=np.intp)
        return empty, empty, np.zeros(0), n_gt, n_pred
    # summing duplicate entries of a sparse matrix is a bincount over (gt, pred) pairs
    joint = coo_matrix((np.ones(rows.size, dtype=np.int64), (rows, cols)), shape=(n_gt, n_pred))
    joint.sum_duplicates()
    rows, cols, intersection = joint.row, joint.col, joint.data.astype(float)
    union = gt_sizes[rows + 1] + pred_sizes[cols + 1] - intersection
    return rows, cols, intersection / union, n_gt, n_pred


def _match(
    rows: np.ndarray, cols: np.ndarray, ious: np.ndarray, n_gt: int, n_pred: int
) -> np.ndarray:
    """IoUs of a one-to-one matching of maximal total IoU among the candidate pairs given."""
    if ious.size == 0:
        return ious
    # the candidate graph falls apart into small groups; solve each group on its own
    graph = coo_matrix((np.ones(ious.size), (rows, n_gt + cols)), shape=(n_gt + n_pred,) * 2)
    _, group_of_node = connected_components(graph, directed=False)
    groups = group_of_node[rows]
    order = np.argsort(groups, kind="stable")
    boundaries = np.flatnonzero(np.diff(groups[order])) + 1
    matched = []
    for edges in np.split(order, boundaries):
        if edges.size == 1:
            matched.append(ious[edges])
            continue
        r_ids, r = np.unique(rows[edges], return_inverse=True)
        c_ids, c = np.unique(cols[edges], return_inverse=True)
        block = np.zeros((len(r_ids), len(c_ids)))
        block[r, c] = ious[edges]
        best_r, best_c = linear_sum_assignment(block, maximize=True)
        values = block[best_r, best_c]
        matched.append(values[values > 0])
    return np.concatenate(matched)


def match_instances(pred: np.ndarray, gt: np.ndarray, iou_threshold: float = 0.5) -> InstanceScores:
    """Match predicted to ground-truth objects by IoU.

    Pairs with ``IoU > iou_threshold`` are candidates.  For ``iou_threshold >= 0.5`` every
    object has at most one candidate; below, a one-to-one matching of maximal total IoU is
    chosen (Hungarian algorithm on each connected group of candidates).

    Parameters
    ----------
    pred, gt : numpy.ndarray
        Instance label images of the same shape (0 = background; ids need not be sequential).
    iou_threshold : float
        Minimal IoU (exclusive) of a match.

    Returns
    -------
    InstanceScores
    """
    pred, gt = _check_shapes(pred, gt)
    rows, cols, ious, n_gt, n_pred = _iou_pairs(pred, gt)
    candidates = ious > iou_threshold
    rows, cols, ious = rows[candidates], cols[candidates], ious[candidates]
    if iou_threshold >= 0.5:
        matched = ious
    else:
        matched = _match(rows, cols, ious, n_gt, n_pred)
    tp = int(matched.size)
    both_empty = n_pred == 0 and n_gt == 0
    return InstanceScores(
        precision=tp / n_pred if n_pred else float(both_empty),
        recall=tp / n_gt if n_gt else float(both_empty),
        f1=2 * tp / (n_pred + n_gt) if not both_empty else 1.0,
        mean_matched_iou=float(matched.mean()) if tp else float(both_empty),
        true_positives=tp,
        false_positives=n_pred - tp,
        false_negatives=n_gt - tp,
        n_pred=n_pred,
        n_gt=n_gt,
    )


def evaluate(
    pred: np.ndarray,
    gt: np.ndarray,
    instances: bool | None = None,
    iou_threshold: float = 0.5,
) -> dict[str, float | int]:
    """Pixel and (optionally) instance scores of a prediction.

    Parameters
    ----------
    pred, gt : numpy.ndarray
        Label images or masks of the same shape.
    instances : bool, optional
        Also score instances; ``None``: when ``gt`` has more than one distinct nonzero id.
    iou_threshold : float
        See :func:`match_instances`.

    Returns
    -------
    dict
        ``dice`` and ``iou``, plus with instances the :class:`InstanceScores` fields
        (``precision``, ``recall``, ``f1``, ``mean_matched_iou``, ``n_pred``, ``n_gt``,
        ``true_positives``, ``false_positives``, ``false_negatives``).
    """
    pred, gt = _check_shapes(pred, gt)
    scores: dict[str, float | int] = {"dice": dice(pred, gt), "iou": iou(pred, gt)}
    if instances is None:
        values = gt[gt != 0]
        instances = values.size > 0 and bool(np.any(values != values[0]))
    if instances:
        scores.update(match_instances(pred, gt, iou_threshold).as_dict())
    return scores


def format_scores(scores: dict[str, float | int]) -> str:
    """One line ``"dice=0.912 iou=0.838 precision=..."``: floats with 3 decimals, counts as
    integers, known keys first."""
    keys = [k for k in SCORE_ORDER if k in scores] + [k for k in scores if k not in SCORE_ORDER]
    parts = []
    for key in keys:
        value = scores[key]
        if isinstance(value, (bool, int, np.integer)):
            parts.append(f"{key}={int(value)}")
        else:
            parts.append(f"{key}={float(value):.3f}")
    return " ".join(parts)
