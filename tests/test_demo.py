"""`python -m diffit demo`: a short run of the demo's exact configuration learns (the loss falls),
writes the two images and its sample-quality numbers (printed and in demo.json); reruns replace
a previous demo, never other runs."""
import json

import pytest
from PIL import Image

from diffit import cli
from diffit.training.demo import DEMO_CONFIG, run_demo


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


def test_demo_short_run_loss_falls_and_writes_images(tmp_path, capsys):
    out = tmp_path / "demo"
    s = run_demo(out, steps=120, batch_size=32, progress=False)
    assert s["step"] == 120
    rec = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rec if "digits_quality" in r] == [120]    # after the grid
    rec = [r for r in rec if "loss" in r]
    assert [r["step"] for r in rec] == list(range(20, 121, 20))
    first, last = rec[0]["loss"], rec[-1]["loss"]
    assert last < 0.75 * first, [r["loss"] for r in rec]
    samples, loss = Image.open(out / "samples.png"), Image.open(out / "loss.png")
    # 100 samples, one class per column: 10 x 10 tiles of 64 px (8 px upscaled 8x), 2-px gaps
    assert samples.size == (10 * 66 + 2, 10 * 66 + 2)
    assert loss.size[0] >= 400 and loss.size[1] >= 300
    q = s["quality"]
    assert json.loads((out / "demo.json").read_text()) == \
        {"steps": 120, "batch_size": 32, "seed": 0, "quality": q}
    assert q["num_samples"] == 360 and q["weights"] == "ema"
    assert q["checkpoint"] == str(out / "checkpoints" / "ckpt_00000120.pt")
    assert len(q["accuracy_per_class"]) == 10 and 0 <= q["accuracy"] <= 1
    assert q["frechet_distance"] > 0 and q["reference"]["accuracy"] > 0.9
    cfg = json.loads((out / "config.json").read_text())
    assert {k: cfg[k] for k in DEMO_CONFIG if k not in ("steps", "batch_size", "out")} == \
        {k: v for k, v in DEMO_CONFIG.items() if k not in ("steps", "batch_size", "out")}

    # a second demo in the same directory replaces the first
    assert cli.main(["demo", "--out", str(out), "--steps", "2", "--batch-size", "8",
                     "--no-progress"]) == 0
    assert [json.loads(x)["step"] for x in open(out / "metrics.jsonl")] == [2, 2]
    said = capsys.readouterr().out
    q2 = json.loads((out / "demo.json").read_text())["quality"]
    assert f"classifier accuracy on 360 samples: {q2['accuracy']:.3f}" in said
    assert f"Frechet distance of classifier features: {q2['frechet_distance']:.3f}" in said
    assert [p.name for p in (out / "samples").iterdir()] == ["step_00000002.png"]


def test_demo_leaves_other_runs_alone(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "ckpt_00000005.pt").write_bytes(b"someone else's run")
    assert cli.main(["demo", "--out", str(tmp_path), "--steps", "2", "--no-progress"]) == 2
    assert "not from `diffit demo`" in capsys.readouterr().err
    assert (tmp_path / "checkpoints" / "ckpt_00000005.pt").read_bytes() == b"someone else's run"
    assert cli.main(["demo", "--threads", "0"]) == 2


def test_shipped_demo_config_matches_the_demo():
    from pathlib import Path

    d = json.loads((Path(__file__).resolve().parents[1] / "configs" /
                    "digits_tiny.json").read_text())
    d.pop("_comment")
    assert {k: v for k, v in d.items() if k != "out"} == \
        {k: v for k, v in DEMO_CONFIG.items() if k != "out"}
