"""The decisions a run makes before fine-tuning, on the benchmark datasets, without the fine-tuning itself.

    python bench/bench_decisions.py [--datasets digits,lfw,fm1000,fm1000-turned,fm1000-shifted]
                                    [--out /tmp/transferlab-accuracy]

For each dataset (built as bench/accuracy.py builds it, in OUT/data): the run's own first stages
(`prepare`, the head stage at the backbone's input size, then the orientation check), each verdict with its
figures, and the seconds each took. Not part of the tests.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import build  # noqa: E402

from transferlab.backbones import Classifier  # noqa: E402
from transferlab.pipeline import prepare  # noqa: E402
from transferlab.stages import Trained, head_stage, orientation_stage  # noqa: E402


def decide(data: Path) -> dict:
    """The head stage and the orientation check of a default run on ``data``, timed."""
    t0 = time.perf_counter()
    p = prepare(data, Path(tempfile.mkdtemp(prefix="tl-decide-")) / "run", None, mode="auto", quiet=True,
                diagnose=False)
    t = Trained(Classifier(p.backbone, p.task.new_head(p.info.num_features, len(p.ds.classes), p.cfg),
                           p.info.preprocessing), p.info, p.ds)
    t = head_stage(p, t)
    head_s = time.perf_counter() - t0
    check = orientation_stage(p, t)
    return {"head_s": head_s, "extract_s": t.stats.extract_s, "check": check,
            "n": {k: v for k, v in p.ds.split_sizes().items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="digits,lfw,fm1000,fm1000-turned,fm1000-shifted")
    ap.add_argument("--out", default="/tmp/transferlab-accuracy")
    args = ap.parse_args()
    print(f"{'dataset':<16}{'images':>18}{'head stage s':>13}  orientation")
    for name in args.datasets.split(","):
        r = decide(build(name, Path(args.out)))
        n = "/".join(str(r["n"][k]) for k in ("train", "val", "test"))
        c = r["check"]
        verdict = "not judged" if c is None else (
            f"{'NO UP (turns)' if c.no_up else 'has an up'}: turned {c.turned:.3f} against upright {c.upright:.3f}, "
            f"tolerance {c.tolerance:.3f}, {c.seconds:.1f}s")
        print(f"{name:<16}{n:>18}{r['head_s']:>13.1f}  {verdict}", flush=True)


if __name__ == "__main__":
    main()
