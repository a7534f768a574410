"""The experiments (Figure 2, Figure 5, Table 1) end to end at toy size."""

import csv
import json

import pytest

from geonorm_jax import experiments, sweep

TOY = experiments.Sizes(n_train=12, n_valid=6, n_test=6, batch_size=6, epochs=2, eval_every=1, hidden_dim=8)
FIGURE2_AXES = experiments.Figure2Axes(depths=(1, 2), depth_panel_n=(4,), size_panel_n=(4, 5), size_panel_depth=2)


def read_csv(path):
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def toy_axes(models, seeds=(30,), learning_rates=(5e-3,)):
    return experiments.Axes(n_particles=(4,), num_layers=(2,), seeds=seeds, learning_rates=learning_rates,
                            models=models)


@pytest.fixture(scope="module")
def figure2_dir(data_root, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("figure2")
    experiments.run_figure2(out_dir, TOY, FIGURE2_AXES, data_root=data_root, progress=False)
    return out_dir


def test_figure2_writes_plot_and_table(data_root, figure2_dir):
    outputs = experiments.run_figure2(figure2_dir, TOY, FIGURE2_AXES, data_root=data_root, progress=False)

    assert outputs["figure"].is_file()
    assert outputs["table_md"].is_file()
    rows = read_csv(outputs["table_csv"])
    assert sorted((row["N"], row["layers"]) for row in rows) == [("4", "1"), ("4", "2"), ("5", "2")]
    assert {row["status"] for row in rows} == {"finished"}
    assert len(list((figure2_dir / "runs").iterdir())) == 3


def test_figure2_rerun_skips_finished_runs(data_root, figure2_dir, monkeypatch):
    (figure2_dir / "figure2.png").unlink()

    def fail(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(sweep, "train_seed_group", fail)
    outputs = experiments.run_figure2(figure2_dir, TOY, FIGURE2_AXES, data_root=data_root, progress=False)

    assert outputs["figure"].is_file()


def test_figure5_writes_plot_per_setting(data_root, tmp_path):
    axes = toy_axes(("egnn", "geonorm"), seeds=(30, 40))

    outputs = experiments.run_figure5(tmp_path, TOY, axes, data_root=data_root, progress=False)

    assert outputs["figure_N4_L2"].is_file()
    rows = read_csv(outputs["table_csv"])
    assert sorted((row["model"], row["seed"]) for row in rows) == [
        ("EGNN", "30"), ("EGNN", "40"), ("EGNN-GN", "30"), ("EGNN-GN", "40")
    ]


def test_table1_separates_equivariant_norms(data_root, tmp_path):
    axes = toy_axes(("scalenorm", "geonorm"), learning_rates=(5e-4,))

    outputs = experiments.run_table1(tmp_path, TOY, axes, data_root=data_root, progress=False)

    assert outputs["table_md"].is_file()
    rows = {row["model"]: row for row in read_csv(outputs["table_csv"])}
    assert set(rows) == {"EGNN-SN", "EGNN-GN"}
    assert float(rows["EGNN-GN"]["equivariance max"]) < 1e-3
    assert abs(float(rows["EGNN-GN"]["translation delta"])) < 1e-4
    assert abs(float(rows["EGNN-SN"]["rotation delta"])) < 1e-4
    assert float(rows["EGNN-SN"]["equivariance max"]) > 1e-2
    for run_dir in (tmp_path / "runs").iterdir():
        assert (run_dir / experiments.RTE_FILE).is_file()


def test_huge_learning_rate_is_recorded_as_divergence(data_root, tmp_path, allow_nans):
    axes = experiments.Figure2Axes(depths=(2,), depth_panel_n=(4,), size_panel_n=(), learning_rate=1e6)

    outputs = experiments.run_figure2(tmp_path / "figure2", TOY, axes, data_root=data_root, progress=False)
    table = experiments.run_table1(tmp_path / "table1", TOY, toy_axes(("egnn",), learning_rates=(1e6,)),
                                   data_root=data_root, progress=False)

    assert outputs["figure"].is_file()
    [row] = read_csv(outputs["table_csv"])
    assert row["status"].startswith("diverged at epoch")
    [row] = read_csv(table["table_csv"])
    assert row["status"].startswith("diverged at epoch")
    summary = json.loads(next((tmp_path / "table1" / "runs").iterdir()).joinpath("summary.json").read_text())
    assert summary["status"] == row["status"]


def test_make_grid_rejects_unknown_model():
    with pytest.raises(ValueError, match="unknown model"):
        experiments.make_grid(TOY, n_particles=(4,), num_layers=(2,), seeds=(30,), learning_rates=(5e-4,),
                              models=("batchnorm",))
