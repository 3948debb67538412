"""Does a change preserve behaviour? One deterministic run, whose figures two checkouts must print alike.

    python bench/same_run.py OUT                               # this checkout
    PYTHONPATH=/path/to/other/src python bench/same_run.py OUT2  # another one (a git worktree's src)

The digits (the demo's PNG folders) at 64 px, the default race of one after the head, 2 fine-tuning epochs,
no time limit (so no clock decides anything), no diagnostics. Prints the test and validation accuracy,
every fine-tuning validation pass, the race's winner and the fitted temperature, as one JSON line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def main() -> None:
    out = Path(sys.argv[1])
    data = out / "digits"
    if not data.exists():
        from transferlab.demo import build_digits_dataset

        build_digits_dataset(data)
    run = out / "run"
    subprocess.run([sys.executable, "-m", "transferlab.cli", "train", str(data), "--out", str(run), "--overwrite",
                    "--image-size", "64", "--ft-epochs", "2", "--workers", "0", "--no-diagnose", "-q", "--json"],
                   check=True, stdout=subprocess.DEVNULL)
    m = json.loads((run / "metrics.json").read_text())
    ft = m.get("finetune") or {}
    print(json.dumps({"test_accuracy": m["test"]["accuracy"], "val_accuracy": m["val"]["accuracy"],
                      "finetune_kept": ft.get("kept"),
                      "validations": [[v.get("val_acc"), v.get("val_cal_loss")] for v in ft.get("validations", [])],
                      "winner": (m.get("strategy") or {}).get("winner"),
                      "temperature": m["calibration"]["temperature"]}))


if __name__ == "__main__":
    main()
