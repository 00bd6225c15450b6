"""The recipe sweep (``bench/recipe_sweep.py``) and the SSOLE ablation (``bench/ssole_ablation.py``):
their grids, the results file (appended run by run, resumable) and their tables, with a stand-in
for training; then each end to end on a tiny budget of real digits."""

from __future__ import annotations

import importlib
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from training.config import load_config
from training.objectives import METHODS

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the benches import each other as bench.*
sweep = importlib.import_module("bench.recipe_sweep")
ablation = importlib.import_module("bench.ssole_ablation")

# Seconds per run on a CPU: 32 images, 1 epoch of 2 steps, 16 px views, a 64-wide projector.
TINY = [
    "epochs=1", "data.max_images=32", "data.batch_size=16", "data.num_workers=0",
    "views.size=16", "model.projector_hidden=64", "model.projector_out=64", "device=cpu",
    "precision=fp32",
]  # fmt: skip


def _args(tmp_path: Path, *extra: str) -> list[str]:
    sets = [a for o in TINY for a in ("--set", o)]
    return [
        *sets, "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "results.json"),
        "--eval-train-images", "100", "--eval-test-images", "50", *extra,
    ]  # fmt: skip


# --- the grids ------------------------------------------------------------------------------


def test_every_method_has_a_grid_of_the_same_size_centred_on_its_recipe():
    grids = {m: sweep.sweep_grid(m) for m in METHODS}
    sizes = {m: len(g) for m, g in grids.items()}
    assert len(set(sizes.values())) == 1 and sizes["ssole"] == 16, sizes
    for method, grid in grids.items():
        names = [p.name for p in grid]
        assert names[0] == "base" and len(set(names)) == len(names), names
        base = dict(grid[0].settings)
        # Every other point changes something, and every point is a config the trainer takes.
        assert all(dict(p.settings) != base for p in grid[1:]), method
        for point in grid:
            cfg = load_config(sweep.DEFAULT_CONFIG, [f"method={method}", *point.overrides()])
            assert cfg.optim.final_lr == pytest.approx(cfg.optim.lr / 100)
    # Every grid is centred on the LARS + BatchNorm family, at the method's own lr.
    ssole_base = grids["ssole"][0].overrides()
    assert {"optim.name=lars", "model.projector_batch_norm=true", "optim.lr=0.3"} <= set(ssole_base)
    assert "optim.lr=0.2" in grids["barlowtwins"][0].overrides()
    vicreg_base = grids["vicreg"][0].overrides()
    assert {"optim.name=lars", "model.projector_batch_norm=true", "optim.lr=0.3"} <= set(
        vicreg_base
    )
    assert "optim.weight_decay=1e-06" in vicreg_base
    # Each method's own factor is in its grid, with the same number of levels.
    assert {"ssole_lambda=0.3", "ssole_lambda=1"} <= {p.name for p in grids["ssole"]}
    assert {"simclr_temperature=0.1", "simclr_temperature=0.5"} <= {p.name for p in grids["simclr"]}
    # Every method also tries the paper's SSOLE recipe: SGD, no BatchNorm, lr 0.5, wd 1e-5; then
    # the second round's two points, at 4x its own lr, and 2x with 2 views; the third round's,
    # at 8x, and 4x with 2 views.
    for method, grid in grids.items():
        paper = {p.name: p for p in grid}["recipe=sgd-nobn"]
        assert {"optim.name=sgd", "model.projector_batch_norm=false", "optim.lr=0.5",
                "optim.weight_decay=1e-05"} <= set(paper.overrides()), method  # fmt: skip
        lr = dict(grid[0].settings)["optim.lr"]
        names = ["lr=x4", "lr=x2+views=2", "lr=x8", "lr=x4+views=2"]
        assert [p.name for p in grid[-4:]] == names, method
        for point, (scale, views) in zip(grid[-4:], [(4, 4), (2, 2), (8, 4), (4, 2)], strict=True):
            settings = dict(point.settings)
            assert settings["optim.lr"] == pytest.approx(scale * lr), (method, point.name)
            assert settings["views.num_views"] == views, (method, point.name)
            assert f"optim.final_lr={settings['optim.lr'] / 100!r}" in point.overrides()


def test_points_select_a_subset_in_grid_order_and_unknown_names_fail():
    grid = sweep.sweep_grid("vicreg")
    picked = sweep.select_points(grid, "views=2,base")
    assert [p.name for p in picked] == ["base", "views=2"]
    with pytest.raises(ValueError, match=r"unknown point\(s\) lr=x3.*this grid has: base"):
        sweep.select_points(grid, "base,lr=x3")


def test_dry_run_lists_every_run_with_its_exact_overrides_and_trains_nothing(tmp_path, capsys):
    assert sweep.main(["--method", "barlowtwins", "--dry-run", *_args(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "barlowtwins_lambda=0.0025" in out and "optim.lr=0.2 " in out
    assert "16 points x 3 seeds (42, 1, 2) = 48 runs" in out
    assert "knn.every_epochs=0" in out and "data.max_images=32" in out
    assert "method=barlowtwins" in out  # the config's own method is SSOLE
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "work").exists()


def test_ablation_points_are_ssole_its_two_variants_and_the_other_view_counts(tmp_path, capsys):
    names = [p.name for p in ablation.ablation_points(4)]
    assert names == ["ssole", "objective=coupled_ole", "centering=none", "views=2", "views=8"]
    assert [p.name for p in ablation.ablation_points(2)][-2:] == ["views=4", "views=8"]
    assert ablation.main(["--dry-run", *_args(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ssole_objective=coupled_ole" in out and "ssole_centering=none" in out
    assert "5 points x 3 seeds (42, 1, 2) = 15 runs" in out


# --- the results file, with a stand-in for training ------------------------------------------


class _FakeTraining:
    """Stands in for ``train_and_evaluate``: a kNN that depends on the point and the seed;
    raises KeyboardInterrupt at call number ``interrupt_at``."""

    def __init__(self, interrupt_at: int | None = None) -> None:
        self.calls: list[tuple[str, int]] = []
        self.interrupt_at = interrupt_at

    def __call__(self, cfg, protocols, eval_options, keep=False) -> dict[str, Any]:
        self.calls.append((cfg.run_name, cfg.seed))
        if len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        knn = 50.0 + 10 * cfg.views.num_views + cfg.seed / 10
        linear = knn + 1 if "linear" in protocols else None
        return {"knn_top1": knn, "linear_top1": linear, "rankme": 3.0, "train_s": 1.0,
                "train_images_per_s": 10.0, "eval_s": 0.5}  # fmt: skip


def test_runs_are_written_as_they_finish_and_resume_runs_only_the_rest(
    tmp_path, monkeypatch, capsys
):
    argv = ["--method", "ssole", "--points", "base,views=2", "--seeds", "1", "2"]
    fake = _FakeTraining(interrupt_at=3)
    monkeypatch.setattr(sweep, "train_and_evaluate", fake)
    assert sweep.main(_args(tmp_path, *argv)) == 130
    kept = json.loads((tmp_path / "results.json").read_text())
    assert [(r["point"], r["seed"]) for r in kept["runs"]] == [("base", 1), ("base", 2)]
    assert kept["machine"]["load_average_before"] and kept["load_average_after"]

    fake = _FakeTraining()
    monkeypatch.setattr(sweep, "train_and_evaluate", fake)
    assert sweep.main(_args(tmp_path, *argv, "--resume")) == 0
    assert fake.calls == [("views_2-s1", 1), ("views_2-s2", 2)]
    out = capsys.readouterr().out
    assert "[1/4] base seed 1: already in results.json, skipped" in out
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["runs"]) == 4 and len(data["earlier_sessions"]) == 1
    # Sorted by mean kNN: base (4 views) before views=2; mean ± std over the two seeds.
    assert [r["point"] for r in data["summary"]] == ["base", "views=2"]
    base = data["summary"][0]
    assert base["knn_top1_mean"] == pytest.approx(90.15)
    assert base["knn_top1_std"] == pytest.approx(statistics.stdev([90.1, 90.2]), abs=1e-3)
    table = out[out.index("| point |") :]
    assert table.index("| base |") < table.index("| views=2 |")
    assert "| base | 2 | 0 | 90.15 ± 0.07 |" in table
    assert "views.num_views=2" in table  # the point's change from the base


def test_resume_refuses_a_file_of_another_budget(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep, "train_and_evaluate", _FakeTraining())
    argv = ["--method", "simclr", "--points", "base", "--seeds", "1"]
    assert sweep.main(_args(tmp_path, *argv)) == 0
    with pytest.raises(SystemExit):
        sweep.main(_args(tmp_path, *argv, "--resume", "--set", "epochs=2"))
    assert "holds another budget" in capsys.readouterr().err
    # Without --resume the file starts afresh.
    assert sweep.main(_args(tmp_path, *argv, "--set", "epochs=2")) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["runs"]) == 1 and "epochs=2" in data["budget"]["overrides"]


def test_ablation_table_keeps_the_point_order_and_records_the_probe(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep, "train_and_evaluate", _FakeTraining())
    argv = ["--points", "views=2,ssole", "--seeds", "7", "--plot", str(tmp_path / "a.png")]
    assert ablation.main([*argv, "--probe-epochs", "3", *_args(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert [r["point"] for r in data["summary"]] == ["ssole", "views=2"]
    assert data["budget"]["evaluation"]["probe_epochs"] == 3
    assert data["runs"][0]["linear_top1"] == pytest.approx(data["runs"][0]["knn_top1"] + 1)
    out = capsys.readouterr().out
    assert "| ssole | 1 | 0 | 90.70 ± 0.00 | 91.70 ± 0.00 | 3.0 ± 0.0 |" in out
    assert (tmp_path / "a.png").is_file() == ("wrote " + str(tmp_path / "a.png") in out)


# --- the real thing, tiny ---------------------------------------------------------------------


def test_wiring_check_catches_a_trainer_that_drops_the_objective_settings(
    tiny_config_overrides, monkeypatch
):
    import training.trainer as trainer_mod

    monkeypatch.setattr(sweep, "_wiring_checked", set())
    cfg = load_config(None, [*tiny_config_overrides, "ssole_objective=coupled_ole"])
    real = trainer_mod.build_objective
    monkeypatch.setattr(trainer_mod, "build_objective", lambda m, *a, **k: real(m))
    with pytest.raises(RuntimeError, match="does not pass the config's objective settings"):
        sweep.check_objective_wiring(cfg)


def test_the_trainer_trains_the_objective_the_config_names(tiny_config_overrides, monkeypatch):
    monkeypatch.setattr(sweep, "_wiring_checked", set())
    for setting in ("ssole_objective=coupled_ole", "ssole_centering=none"):
        sweep.check_objective_wiring(load_config(None, [*tiny_config_overrides, setting]))
    sweep.check_objective_wiring(
        load_config(None, [*tiny_config_overrides, "method=simclr", "simclr_temperature=0.5"])
    )
    assert len(sweep._wiring_checked) == 3


@pytest.fixture
def tiny_config_overrides() -> list[str]:
    return ["data.dataset=digits", *TINY]


def test_sweep_trains_and_evaluates_a_tiny_budget_end_to_end(tmp_path, capsys):
    argv = ["--method", "simclr", "--points", "base", "--seeds", "3"]
    assert sweep.main([*argv, *_args(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    (run,) = data["runs"]
    assert run["point"] == "base" and run["seed"] == 3 and run["linear_top1"] is None
    assert 0.0 <= run["knn_top1"] <= 100.0 and run["rankme"] >= 1.0 and run["train_s"] > 0
    run_dir = tmp_path / "work" / "simclr" / "base-s3"
    assert (run_dir / "log.jsonl").is_file() and not (run_dir / "final.pt").exists()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["method"] == "simclr"
    assert "| base | 1 |" in capsys.readouterr().out


def test_ablation_trains_a_variant_and_probes_it_end_to_end(tmp_path, capsys):
    argv = ["--points", "objective=coupled_ole", "--seeds", "5", "--probe-epochs", "2"]
    plot = tmp_path / "ablation.png"
    assert ablation.main([*argv, "--plot", str(plot), *_args(tmp_path)]) == 0
    (run,) = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert run["point"] == "objective=coupled_ole"
    assert "ssole_objective=coupled_ole" in run["overrides"]
    assert 0.0 <= run["knn_top1"] <= 100.0 and 0.0 <= run["linear_top1"] <= 100.0
    # The run trained coupled OLE: its logged loss is loss_low - lambda * loss_high.
    log = tmp_path / "work" / "ablation" / "objective_coupled_ole-s5" / "log.jsonl"
    train = next(e for e in map(json.loads, log.read_text().splitlines()) if e["event"] == "train")
    expected = train["loss_low"] - 0.6 * train["loss_high"]
    assert train["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    out = capsys.readouterr().out
    assert "| objective=coupled_ole | 1 |" in out
    assert plot.is_file() == ("matplotlib is not installed" not in out)


def test_a_diverged_run_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    """A grid point can diverge (VICReg on plain SGD does): that run is a result, counted in the
    table, and the sweep continues with the next one."""
    import training.pretrain as pretrain
    from training.trainer import NonFiniteLossError

    real_run = pretrain.run

    def run(cfg, overwrite=False):
        if cfg.seed == 1:
            raise NonFiniteLossError("loss not finite for 20 steps in a row; lower optim.lr")
        return real_run(cfg, overwrite=overwrite)

    monkeypatch.setattr(pretrain, "run", run)
    argv = ["--method", "ssole", "--points", "base", "--seeds", "1", "3"]
    assert sweep.main([*argv, *_args(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    runs = {r["seed"]: r for r in data["runs"]}
    assert runs[1]["diverged"] == "loss not finite for 20 steps in a row"
    assert runs[1]["knn_top1"] is None and runs[3]["knn_top1"] is not None
    assert (data["summary"][0]["runs"], data["summary"][0]["diverged"]) == (2, 1)
    out = capsys.readouterr().out
    assert "base seed 1: diverged (loss not finite for 20 steps in a row" in out
    assert "| base | 2 | 1 |" in out


confirm = importlib.import_module("bench.recipe_confirm")


def test_the_confirmation_takes_each_methods_best_point_that_never_diverged(tmp_path):
    summary = [
        {"point": "base", "runs": 3, "diverged": 1, "knn_top1_mean": 91.0},
        {"point": "views=2", "runs": 3, "diverged": 0, "knn_top1_mean": 85.0},
        {"point": "lr=x2", "runs": 3, "diverged": 0, "knn_top1_mean": 80.0},
    ]
    (tmp_path / "recipe_sweep_vicreg.json").write_text(json.dumps({"summary": summary}))
    point = confirm.winner("vicreg", tmp_path)
    assert point.name == "vicreg:views=2"
    assert {"method=vicreg", "views.num_views=2"} <= set(point.overrides())
    with pytest.raises(FileNotFoundError, match=r"recipe_sweep\.py --method simclr"):
        confirm.winner("simclr", tmp_path)


def test_the_confirmation_dry_run_lists_every_winner_at_the_fashion_mnist_budget(capsys):
    """From the sweeps' committed results: one point per method, each config validated."""
    assert confirm.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 points x 2 seeds (42, 1) = 8 runs" in out
    assert "views.size=64" in out and "data.root=" in out
    for method in METHODS:
        assert f"\n{method}:" in out
