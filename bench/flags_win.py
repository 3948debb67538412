"""Do the flags of `transferlab train` win over a --config file? (the --mixup / --drop-path bug of 93f6f4f)

    python bench/flags_win.py                                # this checkout
    PYTHONPATH=/path/to/other/src python bench/flags_win.py  # another one

A config file sets ft_mixup=on and ft_drop_path=0.1; the command line gives --mixup off --drop-path 0.2. The
library's train is replaced by a stub that records the options it would have run with. The test suite checks
every option this way (tests/test_pipeline.py); this script runs on checkouts that predate that test.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from transferlab import pipeline
from transferlab.cli import main as cli

seen: dict = {}


def _stub(data, out, **options):
    seen.update(options)
    raise pipeline.ConfigError("stopped before training (bench/flags_win.py)")


pipeline.train = _stub
folder = Path(tempfile.mkdtemp())
(folder / "options.json").write_text(json.dumps({"ft_mixup": "on", "ft_drop_path": 0.1}))
cli(["train", str(folder), "--config", str(folder / "options.json"), "--mixup", "off", "--drop-path", "0.2", "-q"])
got = (seen.get("ft_mixup"), seen.get("ft_drop_path"))
print(f"ft_mixup={got[0]!r} ft_drop_path={got[1]!r}:", "the flags win" if got == ("off", 0.2) else
      "the config file wins over the flags (the bug)")
