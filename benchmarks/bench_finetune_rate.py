"""Fine-tuning speed of every shipped model, as a user's fine-tune runs, quiet and beside a busy
process.

For each shipped model, on the held-out data of bench_hitl (never trained on), the ground truth
of 3 slices (EM: 2) pasted into the model's own prediction; the Trainer runs at the default
settings (validation on, distillation on, threads chosen by measurement) for ``--seconds``, in
bf16 and in fp32, first on the machine as it is, then with another process spinning on one
core (``--busy``: a plain Python busy loop, as napari's drawing or another program would be).
Iterations per second count the whole run (sampling, validation, everything but the data
preparation).

Run::

    python benchmarks/bench_finetune_rate.py [--seconds 20] [--models ...] [--no-busy]

The last line is ``min_bf16_it_s=... min_fp32_it_s=... min_bf16_busy_it_s=... min_fp32_busy_it_s=...``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_hitl import DATA, MODELS, corrected_labels, load_case, segment_like_the_dock, slice_choices  # noqa: E402

from napari_unet.progress import drain  # noqa: E402
from napari_unet.training.config import TrainingConfig, TrainingPair  # noqa: E402
from napari_unet.training.trainer import Trainer  # noqa: E402
from napari_unet.zoo.loading import load_model  # noqa: E402


def bf16_matmul_peak() -> float:
    """GFLOP/s of a 2048² bf16 matmul on this CPU (the machine's own limit, for context)."""
    import torch

    a = torch.randn(2048, 2048, dtype=torch.bfloat16)
    b = torch.randn(2048, 2048, dtype=torch.bfloat16)
    a @ b
    start = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 2048**3 / (time.perf_counter() - start) / 1e9


def rate(case, pair: TrainingPair, precision: str, seconds: float) -> tuple[float, str]:
    model = load_model(case.model)
    trainer = Trainer(model, [pair], TrainingConfig(time_limit=seconds, device="cpu", precision=precision))
    start = time.perf_counter()
    tuned = drain(trainer.run())
    took = time.perf_counter() - start
    entry = tuned.history[-1]
    return entry["iterations"] / took, entry.get("threads", "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--no-busy", dest="busy", action="store_false", help="skip the busy-process runs")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"no data at {args.data}; this benchmark needs ../shared/data", file=sys.stderr)
        return 1
    print(f"bf16 2048² matmul peak: {bf16_matmul_peak():.0f} GFLOP/s", flush=True)
    results: dict[tuple[str, bool], list[float]] = {}
    pairs = {}
    for key in [k.strip() for k in args.models.split(",") if k.strip()]:
        case = load_case(key, args.data)
        instances, mask = segment_like_the_dock(load_model(case.model), case)
        slices = slice_choices(case.image.shape[0], case.corrected, 1)[0]
        pairs[key] = (case, TrainingPair(case.image, corrected_labels(case, instances, mask, slices), slices=slices))
    for busy in (False, True) if args.busy else (False,):
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            for key, (case, pair) in pairs.items():
                for precision in ("bf16", "fp32"):
                    value, threads = rate(case, pair, precision, args.seconds)
                    results.setdefault((precision, busy), []).append(value)
                    print(f"{case.model} {precision}{' busy' if busy else ''}: {value:.2f} it/s ({threads})",
                          flush=True)
        finally:
            if spinner is not None:
                spinner.kill()
    parts = []
    for (precision, busy), values in results.items():
        parts.append(f"min_{precision}{'_busy' if busy else ''}_it_s={min(values):.2f}")
    print(" ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
