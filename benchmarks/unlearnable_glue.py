"""A GLUE task no budget can learn: the training labels of one task of ../shared/datasets permuted (seeded), its
dev file untouched — written as a data folder of its own (under --out, never into the project), laid out like
shared/datasets so every command reads it with --data-dir. What `qkvtune bench claims --profile quick` is shown
on: the reference arm misses the gate at every budget and rate, and the report must still come within the bound.

    python benchmarks/unlearnable_glue.py --data-dir ../shared/datasets --out runs/unlearnable
    qkvtune bench claims --profile quick --data-dir runs/unlearnable --out runs/claims-quick-unlearnable \\
        --report benchmarks/claims-quick/REPORT.md
"""

from __future__ import annotations

import argparse
import os
import random
import shutil


def write(data_dir: str, out: str, task: str = "SST-2", seed: int = 0) -> str:
    src = os.path.join(data_dir, "glue", task)
    dst = os.path.join(out, "glue", task)
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "train.tsv"), encoding="utf-8") as f:
        header, *rows = f.read().splitlines()
    col = header.split("\t").index("label")
    cells = [r.split("\t") for r in rows if r]
    labels = [c[col] for c in cells]
    random.Random(seed).shuffle(labels)  # same label counts, no relation left between a sentence and its label
    with open(os.path.join(dst, "train.tsv"), "w", encoding="utf-8") as f:
        f.write("\n".join([header] + ["\t".join(c[:col] + [y] + c[col + 1:]) for c, y in zip(cells, labels)]) + "\n")
    shutil.copyfile(os.path.join(src, "dev.tsv"), os.path.join(dst, "dev.tsv"))
    return dst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("QKVTUNE_DATA", "../shared/datasets"))
    p.add_argument("--out", required=True)
    p.add_argument("--task", default="SST-2")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(write(a.data_dir, a.out, a.task, a.seed))


if __name__ == "__main__":
    main()
