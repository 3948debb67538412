"""The orientation decision: refused on digits (a 6 turned is a 9), accepted on a copy turned at random."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from transferlab.orientation import MIN_TOLERANCE, TURNS, judge_orientation


def test_the_verdict_weighs_the_drop_against_its_noise():
    rng = np.random.default_rng(0)
    up = rng.random(300) < 0.9
    assert judge_orientation(up, up).no_up  # the same accuracy turned
    assert not judge_orientation(up, up & (rng.random(300) < 0.5)).no_up  # half the hits lost
    small = judge_orientation(up, up.copy())
    assert small.tolerance == MIN_TOLERANCE and small.n == 300
    one_lost = up.copy()
    one_lost[np.flatnonzero(up)[0]] = False  # one image of 300 lost: within the noise
    assert judge_orientation(up, one_lost).no_up


@pytest.fixture(scope="module")
def turned_digits(digits_dir, tmp_path_factory):
    """The digits, each picture flipped and turned at random: orientation-free by construction."""
    root = tmp_path_factory.mktemp("turned-digits")
    rng = np.random.default_rng(0)
    for path in sorted(digits_dir.rglob("*.png")):
        out = root / path.relative_to(digits_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        k = int(rng.integers(0, len(TURNS) + 2))  # identity and the horizontal flip too: all eight
        img = Image.open(path)
        img = img if k == len(TURNS) else img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if k > len(TURNS) \
            else img.transpose(TURNS[k])
        img.save(out)
    return root


@pytest.mark.slow
def test_orientation_is_refused_on_digits_and_accepted_on_a_turned_copy(digits_dir, turned_digits, tmp_path):
    from transferlab.pipeline import train
    from transferlab.training.plan import Plan

    verdicts = {}
    for name, data in (("digits", digits_dir), ("turned", turned_digits)):
        res = train(data, tmp_path / name, mode="auto", ft_epochs=1, image_size=64, workers=0, quiet=True,
                    diagnose=False, recipe="single")
        plan = json.loads((res.run_dir / "plan.json").read_text())
        verdicts[name] = plan["decisions"]["orientation"]
        assert res.metrics["plan"]["decisions"] == plan["decisions"]
        assert any(line.strip().startswith("orientation: the head scores") for line in Plan(**plan).describe())
        config = json.loads((res.model_dir / "config.json").read_text())
        assert config["training"]["config"]["augment"] == ("orient" if verdicts[name]["no_up"] else "light")
        assert "orientation" in (res.run_dir / "report.html").read_text()
    assert not verdicts["digits"]["no_up"], verdicts
    assert verdicts["digits"]["turned"] < verdicts["digits"]["upright"] - 0.2
    assert verdicts["turned"]["no_up"], verdicts
    # an --augment given by the user is kept: nothing is judged
    res = train(turned_digits, tmp_path / "light", mode="auto", ft_epochs=1, image_size=64, workers=0, quiet=True,
                diagnose=False, recipe="single", augment="light")
    assert "orientation" not in res.metrics["plan"]["decisions"]
    assert json.loads((res.model_dir / "config.json").read_text())["training"]["config"]["augment"] == "light"
