"""One line of docs/distributed/results/metrics_1_vs_2.md: how far apart the metrics.csv of three
`fwdgrad train` runs are (1 process x 1 thread, 2 processes x 1 thread, 1 process x 2 threads).

    python docs/distributed/compare_metrics.py RUN_1x1 RUN_2x1 RUN_1x2 "method description"

The 1x2 run is the control: the same arithmetic on one process, summed in another order by
two threads, shows how sensitive the run itself is to floating-point rounding.
"""

import csv
import json
import sys

from fwdgrad.train.trainer import TIMING_COLUMNS


def largest_difference(a_rows: list[dict], b_rows: list[dict]) -> tuple[float, str]:
    """(largest relative difference, where) over the non-timing columns of two metrics.csv."""
    return max((abs(float(a[k]) - float(b[k])) / max(1e-12, abs(float(a[k]))), f"epoch {a['epoch']} {k}")
               for a, b in zip(a_rows, b_rows) for k in a if k not in TIMING_COLUMNS)


def main(one, two, threads, method) -> None:
    directories = (one, two, threads)
    rows = [list(csv.DictReader(open(f"{d}/metrics.csv"))) for d in directories]
    summaries = [json.load(open(f"{d}/summary.json")) for d in directories]
    (processes, where), (control, where_control) = largest_difference(rows[0], rows[1]), \
        largest_difference(rows[0], rows[2])
    print(f"- `{method}` (lr {summaries[0]['lr']:.3g}), {len(rows[0])} epochs: largest relative difference of "
          f"metrics.csv (non-timing columns), 2 processes vs 1: **{processes:.1e}** ({where}); control, 1 process "
          f"with 2 threads vs 1 thread: {control:.1e} ({where_control}); test accuracy "
          f"{summaries[0]['test_accuracy_last']:.4f} (1 process) / {summaries[1]['test_accuracy_last']:.4f} "
          f"(2 processes); ms/step {summaries[0]['ms_per_step']:.1f} (1x1) / {summaries[1]['ms_per_step']:.1f} (2x1) / "
          f"{summaries[2]['ms_per_step']:.1f} (1x2); bytes/step/process {summaries[1]['bytes_per_step']:.0f}")


if __name__ == "__main__":
    main(*sys.argv[1:5])
