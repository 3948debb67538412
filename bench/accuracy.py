"""Accuracy on real data: the yardstick for every default (not part of the test suite).

    python bench/accuracy.py [--datasets fmfull,fm100,digits,lfw,fm20,fm1000] [--budgets 15m,5m]
                             [--out /tmp/transferlab-accuracy] [--estimate-check]

Datasets, all offline:
  fm20 / fm100 / fm1000  Fashion-MNIST, 20 / 100 / 1,000 training images per class drawn from the
                         official training set, a disjoint validation split (20, 20, 200 per class),
                         and the official 10,000 test images (`transferlab data import fashion-mnist`)
  fmfull                 Fashion-MNIST in full: 54,000 train / 6,000 val / 10,000 test
  digits                 scikit-learn's 1,797 digits (the demo's PNG folders, split 70/15/15, seeded)
  lfw                    scikit-image's lfw_subset: 100 faces and 100 non-faces (25x25), split 70/15/15
Copies with the properties those lack (every split transformed alike, each image by its own seeded draw):
  fm1000-turned          fm1000 with every picture flipped and turned at random (one of the eight flips and
  fm100-turned           quarter turns): orientation-free by construction, as cells or aerial views are
  fm1000-shifted         fm1000 inverted, at a quarter of its contrast, with Gaussian noise (sigma 8): far
                         from ImageNet's photometry, as electroluminescence or X-ray images are
  fm100-300px            fm100 upscaled to 300 px (bicubic): the cost of an epoch on 300 px inputs (scikit-learn
                         and scikit-image ship no labelled photographs of 300 px or more, so not their detail)
Fashion-MNIST needs Debian's package: `apt-get install dataset-fashion-mnist`.

Each run is its own process (wall time and peak RSS are that process's); the first budget's default run
and the probe come first on every dataset, then the estimate check, the head runs and the other budgets:
  probe     frozen backbone features at the backbone's own preprocessing (224 px for efficientnet_lite0),
            scikit-learn logistic regression on standardised features, C chosen on val accuracy
  head      `transferlab train DATA --mode head`
  <budget>  `transferlab train DATA --time-limit <budget>` (the default: the race of training recipes)
  <budget>-single  the same with `--recipe single` (one fine-tuning recipe after the head, as before the race)
  nolimit   `transferlab train DATA` without a time limit (the race on the plan's estimate, early stopping)
`--runs` picks the runs (e.g. `--runs 15m,15m-single`); by default every budget, the probe and the head.
`--train-args '--drop-path 0.2' --tag dp2` passes options to every `transferlab train` run and keeps those runs
apart as `15m~dp2` (a variant beside the default, side by side in one table).
Results are appended to OUT/results.jsonl as they come (a run that was done is not run again) and
printed as one markdown table. `--estimate-check` runs full Fashion-MNIST without a time limit and
one fine-tuning epoch, and compares the plan's estimate of an epoch with the measured first epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

FASHION = "/usr/share/datasets/fashion-mnist"
FM = {"fm20": (20, 20), "fm100": (100, 20), "fm1000": (1000, 200), "fmfull": (None, 600)}


#: name -> (the dataset it copies, how each image is changed)
DERIVED = {"fm1000-turned": ("fm1000", "turned"), "fm1000-shifted": ("fm1000", "shifted"),
           "fm100-turned": ("fm100", "turned"), "fm100-300px": ("fm100", "300px")}


def derive(base: Path, out: Path, how: str) -> None:
    """Copy every image of ``base`` into ``out`` (same folders), changed as ``how`` says."""
    import zlib

    import numpy as np
    from PIL import Image

    flips = [None, *Image.Transpose][:8]  # identity, both flips, three turns, both diagonal flips
    for src in sorted(base.rglob("*.png")):
        dst = out / src.relative_to(base)
        dst.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(zlib.crc32(str(src.relative_to(base)).encode()))
        img = Image.open(src)
        if how == "turned":
            k = flips[int(rng.integers(0, 8))]
            img = img if k is None else img.transpose(k)
        elif how == "shifted":
            x = 255.0 - np.asarray(img.convert("L"), dtype=np.float64)
            x = 128 + (x - 128) * 0.25 + rng.normal(0, 8, x.shape)
            img = Image.fromarray(np.clip(x, 0, 255).astype(np.uint8), "L")
        elif how == "300px":
            img = img.resize((300, 300), Image.Resampling.BICUBIC)
        img.save(dst)


def build(name: str, root: Path) -> Path:
    """The dataset folder (made once)."""
    out = root / "data" / name
    if (out / ".done").exists():
        return out
    if name in DERIVED:
        base, how = DERIVED[name]
        derive(build(base, root), out, how)
    elif name in FM:
        from transferlab.data.imports import import_idx

        per_class, val = FM[name]
        import_idx("fashion-mnist", FASHION, out, train_per_class=per_class, val_per_class=val)
    elif name == "digits":
        from transferlab.demo import build_digits_dataset

        build_digits_dataset(out)
    elif name == "lfw":
        import numpy as np
        import skimage.data
        from PIL import Image

        faces = skimage.data.lfw_subset()  # 200 x 25 x 25 floats: 100 faces, then 100 non-faces
        for i, img in enumerate(faces):
            folder = out / ("face" if i < 100 else "nonface")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), "L").save(folder / f"{i:03d}.png")
    else:
        raise SystemExit(f"unknown dataset {name!r}")
    (out / ".done").write_text("ok")
    return out


def probe(data: Path, out: Path, backbone: str) -> dict:
    """The frozen-feature probe, in this process: features through transferlab's extractor (cached),
    then scikit-learn's LogisticRegression with C on a grid chosen by validation accuracy."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from transferlab.backbones import create_backbone
    from transferlab.data.scan import scan
    from transferlab.data.split import split_dataset
    from transferlab.features import FeatureCache, FeatureExtractor

    ds = split_dataset(scan(data), 0.15, 0.15, 0)
    bb, info = create_backbone(backbone)
    ext = FeatureExtractor(bb, info, quiet=True).extract([s.path for s in ds.samples], FeatureCache())
    idx = {c: i for i, c in enumerate(ds.classes)}
    y = np.array([idx[s.label] for s in ds.samples])
    split = np.array([s.split for s in ds.samples])
    parts = {sp: (ext.features[(split == sp) & ext.ok], y[(split == sp) & ext.ok]) for sp in ("train", "val", "test")}
    scaler = StandardScaler().fit(parts["train"][0])
    x = {sp: scaler.transform(v[0]) for sp, v in parts.items()}
    best = None
    for c in (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0):
        clf = LogisticRegression(C=c, max_iter=1000).fit(x["train"], parts["train"][1])
        acc = clf.score(x["val"], parts["val"][1])
        if best is None or acc > best[0]:
            best = (acc, c, clf)
    test_acc = best[2].score(x["test"], parts["test"][1])
    return {"test_accuracy": float(test_acc), "val_accuracy": float(best[0]), "C": best[1],
            "image_size": info.preprocessing.size,
            "n_images": {sp: int(len(v[1])) for sp, v in parts.items()}}


def run_child(cmd: list[str], log: Path) -> tuple[int, float, float]:
    """Run ``cmd``; returns exit code, wall seconds and the peak RSS (MB) of the process tree's largest."""
    t = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), time.time() - t, usage.ru_maxrss / 1024


def run_label(kind: str, tag: str) -> str:
    """The run's name in the results: ``kind``, or ``kind~TAG`` for a tagged variant (the probe trains nothing,
    so it is never tagged)."""
    return f"{kind}~{tag}" if tag and kind != "probe" else kind


def measure(name: str, kind: str, data: Path, root: Path, backbone: str, extra: Sequence[str] = (),
            tag: str = "") -> dict:
    """One run of ``kind`` on ``name``; ``extra`` options go to ``transferlab train``, and ``tag`` names the run
    apart (:func:`run_label`)."""
    label = run_label(kind, tag)
    run = root / "runs" / f"{name}-{label}"
    log = root / "runs" / f"{name}-{label}.log"
    run.parent.mkdir(parents=True, exist_ok=True)
    if kind == "probe":
        res_file = run.with_suffix(".json")
        cmd = [sys.executable, __file__, "--probe-only", str(data), "--probe-out", str(res_file), "--backbone", backbone]
    else:
        cmd = [sys.executable, "-m", "transferlab.cli", "train", str(data), "--out", str(run), "--overwrite",
               "--backbone", backbone]
        if kind == "estimate":  # not quiet: its log shows the plan printed before fine-tuning
            cmd += ["--ft-epochs", "1"]
        elif kind == "head":
            cmd += ["--quiet", "--mode", "head"]
        elif kind == "nolimit":
            cmd += ["--quiet"]
        else:
            budget, _, recipe = kind.partition("-")
            cmd += ["--quiet", "--time-limit", budget] + (["--recipe", recipe] if recipe else [])
        cmd += list(extra)
    rc, wall, rss = run_child(cmd, log)
    row = {"dataset": name, "run": label, "train_args": [] if kind == "probe" else list(extra), "rc": rc,
           "wall_s": round(wall, 1), "peak_rss_mb": round(rss)}
    if rc != 0:
        row["error"] = log.read_text()[-2000:]
        return row
    if kind == "probe":
        row.update(json.loads(res_file.read_text()))
        return row
    m = json.loads((run / "metrics.json").read_text())
    row["first_epoch_s"] = first_epoch_seconds(run)
    row.update({"test_accuracy": (m.get("test") or {}).get("accuracy"), "val_accuracy": (m.get("val") or {}).get("accuracy"),
                "plan": m.get("plan"), "finetune": m.get("finetune"), "timing": m.get("timing"),
                "strategy": m.get("strategy"), "budget": m.get("budget"),
                "n_images": m.get("n_images")})
    return row


def first_epoch_seconds(run: Path) -> float | None:
    """The first fine-tuning epoch's seconds, from its start to its end (validations inside included)."""
    hist = run / "logs" / "history.csv"
    rows = [line.split(",") for line in hist.read_text().splitlines() if ",finetune," in line] if hist.exists() else []
    return float(rows[0][-1]) if rows else None


def table(rows: list[dict]) -> str:
    by: dict[str, dict[str, dict]] = {}
    for r in rows:
        by.setdefault(r["dataset"], {})[r["run"]] = r
    lines = ["| dataset | train/val/test | run | test acc | vs probe | wall (s) | unused (s) | peak RSS (MB) | "
             "what the plan and the race chose |", "|---|---|---|---|---|---|---|---|---|"]
    for name, runs in by.items():
        base = (runs.get("probe") or {}).get("test_accuracy")
        for kind, r in runs.items():
            if kind == "estimate":
                continue
            n = r.get("n_images") or {}
            sizes = f"{n.get('train', '?')}/{n.get('val', '?')}/{n.get('test', '?')}"
            acc = r.get("test_accuracy")
            if acc is None:
                lines.append(f"| {name} | {sizes} | {kind} | failed (rc {r['rc']}) | | {r['wall_s']} | | {r['peak_rss_mb']} | |")
                continue
            margin = f"{100 * (acc - base):+.2f} pts" if base is not None and kind != "probe" else ""
            unused = (r.get("budget") or {}).get("unused_s")
            lines.append(f"| {name} | {sizes} | {kind} | {acc:.4f} | {margin} | {r['wall_s']:.0f} | "
                         f"{'' if unused is None else f'{unused:.0f}'} | {r['peak_rss_mb']} | {describe(r)} |")
    return "\n".join(lines)


def describe(r: dict) -> str:
    if r["run"] == "probe":
        return f"{r['image_size']} px, C={r['C']:g}"
    plan, ft = r.get("plan") or {}, r.get("finetune")
    text = f"{plan.get('image_size', '?')} px"
    if r.get("strategy"):
        text = f"plan {text} for the pretrained network"
    elif plan.get("finetune") and ft:
        kept = "kept" if ft.get("kept") else "discarded"
        text += f", fine-tune {plan['epochs']:g} ep planned, {ft['seconds']:.0f} s, {kept}"
        if ft.get("stopped_unpaid"):
            text += " (stopped unpaid)"
        if ft.get("stopped_by_time"):
            text += " (time limit)"
    elif r["run"] != "head":
        text += ", no fine-tuning"
    race = r.get("strategy")
    if race:
        rungs = "; ".join(f"{c['name']} {max((g['val_acc'] for g in c['rungs']), default=float('nan')):.3f}"
                          for c in race["candidates"] if c["rungs"])
        surv = race.get("survivor") or {}
        text += (f"; race: {rungs or race['reason']}; winner {race['winner']}, {surv.get('epochs_run', 0)} ep in "
                 f"{surv.get('seconds', 0):.0f} s, {'kept' if surv.get('kept') else 'head kept'}")
    budget = r.get("budget") or {}
    if budget.get("unused_s"):
        text += f"; unused: {budget['why']}"
    return text


def estimate_check(rows: list[dict], root: Path) -> str:
    out = []
    for r in rows:
        if r["run"] != "estimate" or r.get("test_accuracy") is None:
            continue
        est = (r["plan"] or {}).get("estimate", {}).get("finetune_epoch")
        measured = r.get("first_epoch_s") or first_epoch_seconds(root / "runs" / f"{r['dataset']}-estimate")
        if est and measured:
            out.append(f"{r['dataset']} without a time limit: the plan's estimate of one fine-tuning epoch "
                       f"{est:.0f} s, the measured first epoch (validations inside it included) {measured:.0f} s, "
                       f"ratio {measured / est:.2f}; plan: {r['plan']['image_size']} px")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="fmfull,fm100,digits,lfw,fm20,fm1000")
    ap.add_argument("--budgets", default="15m,5m")
    ap.add_argument("--out", default="/tmp/transferlab-accuracy")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--estimate-check", action="store_true")
    ap.add_argument("--runs", default=None, help="only these runs, comma-separated (e.g. 15m,15m-single,nolimit)")
    ap.add_argument("--train-args", default="", help="more options for every `transferlab train` run, as one "
                    "string (e.g. '--drop-path 0'); give them a --tag")
    ap.add_argument("--tag", default="", help="names these runs apart: run '15m~TAG' (kept beside the untagged)")
    ap.add_argument("--table-only", action="store_true", help="print the table of the results so far")
    ap.add_argument("--probe-only", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--probe-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe_only:
        args.probe_out.write_text(json.dumps(probe(args.probe_only, args.probe_out, args.backbone)))
        return
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    results = root / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    done = {(r["dataset"], r["run"]) for r in rows if r.get("rc") == 0}
    names, budgets = args.datasets.split(","), args.budgets.split(",")
    # most telling first: the first budget's default run and the probe on every dataset, then the rest
    jobs = [(d, k) for d in names for k in (budgets[0], "probe")]
    jobs += [("fmfull", "estimate")] if args.estimate_check else []
    jobs += [(d, k) for k in ["head", *budgets[1:]] for d in names]
    if args.runs:
        wanted = args.runs.split(",")
        jobs = [(d, k) for d in names for k in wanted]
    extra, tag = shlex.split(args.train_args), args.tag
    if extra and not tag:
        ap.error("--train-args needs a --tag, so that its runs are not taken for the default's")
    for name, kind in ([] if args.table_only else jobs):
        label = run_label(kind, tag)
        if (name, label) in done:
            continue
        data = build(name, root)
        print(f"{name} {label} ...", flush=True)
        row = measure(name, kind, data, root, args.backbone, extra, tag)
        rows = [r for r in rows if (r["dataset"], r["run"]) != (name, label)] + [row]
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"  test accuracy {row.get('test_accuracy')}, {row['wall_s']} s, {row['peak_rss_mb']} MB", flush=True)
    print(table(rows))
    print(estimate_check(rows, root))


if __name__ == "__main__":
    main()
