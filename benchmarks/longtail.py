"""Build a long-tailed variant of a class-folder zip (such as the CIFAR-10 JPEG zip) for the imbalance study:
class i of K (alphabetical) keeps round(most * (least / most) ** (i / (K - 1))) training images, so the counts
fall geometrically from `most` to `least`; a balanced test split of `test` images per class comes from the
images not used for training. Members are copied as they are (no re-encoding), chosen with a seeded shuffle.

    python benchmarks/longtail.py ../shared/datasets/cifar10-jpeg-train.zip /tmp/cifar10-lt.zip \\
        --most 2500 --least 25 --test 500
    cnnlab train examples/imbalance-study.yaml data.root=/tmp/cifar10-lt.zip
"""
from __future__ import annotations

import argparse
import random
import zipfile
from collections import defaultdict


def build(src: str, dest: str, *, most: int, least: int, test: int, seed: int = 0) -> dict[str, int]:
    with zipfile.ZipFile(src) as z:
        by_class: dict[str, list[str]] = defaultdict(list)
        for name in z.namelist():
            parts = name.split("/")
            if len(parts) >= 2 and parts[-1] and not name.endswith("/"):
                by_class[parts[-2]].append(name)
        classes = sorted(by_class)
        k = len(classes)
        counts = {c: round(most * (least / most) ** (i / max(1, k - 1))) for i, c in enumerate(classes)}
        rng = random.Random(seed)
        with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as out:
            for c in classes:
                names = sorted(by_class[c])
                rng.shuffle(names)
                if len(names) < counts[c] + test:
                    raise SystemExit(f"class {c!r} has {len(names)} images, fewer than {counts[c]} + {test}")
                for split, chosen in (("train", names[:counts[c]]), ("test", names[counts[c]:counts[c] + test])):
                    for n in chosen:
                        out.writestr(f"{split}/{c}/{n.split('/')[-1]}", z.read(n))
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src")
    p.add_argument("dest")
    p.add_argument("--most", type=int, default=2500)
    p.add_argument("--least", type=int, default=25)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    counts = build(a.src, a.dest, most=a.most, least=a.least, test=a.test, seed=a.seed)
    print(f"{a.dest}: train {sum(counts.values()):,} images ({', '.join(f'{c} {n}' for c, n in counts.items())}); "
          f"test {a.test} per class")


if __name__ == "__main__":
    main()
