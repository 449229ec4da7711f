"""Benchmarks: scripts that time rotjax and save their numbers (``results/``, committed)."""

from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SMOKE_RESULTS = Path("runs/benchmarks-smoke")  # a smoke run never replaces the committed numbers


def results_dir(out: str | None, smoke: bool) -> Path:
    """``--out``, or by default the committed results (a smoke run's: `SMOKE_RESULTS`)."""
    return Path(out) if out else SMOKE_RESULTS if smoke else RESULTS
