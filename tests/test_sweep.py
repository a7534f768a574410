"""Seeds trained together in one vmapped step, and the sweep driver around them."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geonorm_jax import graphs, sweep
from geonorm_jax.config import make_config
from geonorm_jax.rundir import RunDirectory
from geonorm_jax.train import run_training

SEEDS = (30, 40)


def tiny_configs(**overrides):
    return [make_config("tiny", seed=seed, **overrides) for seed in SEEDS]


def read_metrics(run_dir):
    return RunDirectory(run_dir).read_metrics()


def column(records, key):
    return np.array([np.nan if record[key] is None else record[key] for record in records], dtype=float)


@pytest.fixture(scope="module")
def separate_runs(data_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("separate")
    return {
        config.seed: run_training(config, root / str(config.seed), data_root=data_root, progress=False)
        for config in tiny_configs()
    }


def test_vmapped_seeds_match_separate_runs(data_root, separate_runs, tmp_path):
    configs = tiny_configs()
    run_dirs = [tmp_path / str(config.seed) for config in configs]

    summaries = sweep.train_seed_group(configs, run_dirs, data_root=data_root, progress=False)

    for config, run_dir, summary in zip(configs, run_dirs, summaries):
        separate = separate_runs[config.seed]
        vmapped_metrics = read_metrics(run_dir)
        separate_metrics = read_metrics(separate["run_dir"])
        assert [r["epoch"] for r in vmapped_metrics] == [r["epoch"] for r in separate_metrics]
        for key in ("train_mse", "valid_mse", "test_mse", "grad_norm"):
            np.testing.assert_allclose(column(vmapped_metrics, key), column(separate_metrics, key),
                                       rtol=2e-4, err_msg=f"seed {config.seed}, {key}")
        assert summary["status"] == separate["status"] == "finished"
        assert summary["best_epoch"] == separate["best_epoch"]
        assert set(summary) == set(separate)
        for name in ("config.json", "metrics.jsonl", "summary.json", "best_params.msgpack", "loss_curves.png"):
            assert (run_dir / name).is_file(), name
        assert RunDirectory(run_dir).read_config() == config
    first, second = (read_metrics(run_dir)[0]["train_mse"] for run_dir in run_dirs)
    assert first != second, "seeds must get their own init and shuffle order"


def test_diverged_seed_stops_while_others_continue(data_root, separate_runs, tmp_path, monkeypatch, allow_nans):
    original = sweep._initialize_seed

    def poison_seed_40(run, *args):
        original(run, *args)
        if run.config.seed == 40:
            run.state["params"] = jax.tree.map(lambda leaf: jnp.full_like(leaf, jnp.nan), run.state["params"])

    monkeypatch.setattr(sweep, "_initialize_seed", poison_seed_40)
    configs = tiny_configs()
    run_dirs = [tmp_path / str(config.seed) for config in configs]

    healthy, diverged = sweep.train_seed_group(configs, run_dirs, data_root=data_root, progress=False)

    assert diverged["status"] == "diverged at epoch 1"
    assert [r["epoch"] for r in read_metrics(run_dirs[1])] == [1]
    assert (run_dirs[1] / "loss_curves.png").is_file()
    assert healthy["status"] == "finished"
    np.testing.assert_allclose(column(read_metrics(run_dirs[0]), "train_mse"),
                               column(read_metrics(separate_runs[30]["run_dir"]), "train_mse"), rtol=2e-4)


def test_group_by_seed_groups_and_keeps_order():
    a30, a40 = tiny_configs()
    b30 = dataclasses.replace(a30, learning_rate=1e-3)

    groups = sweep.group_by_seed([a30, b30, a40])

    assert groups == [[a30, a40], [b30]]


def test_group_by_seed_rejects_repeated_config():
    config = make_config("tiny")

    with pytest.raises(ValueError, match="appears twice"):
        sweep.group_by_seed([config, config])


def test_train_seed_group_rejects_mixed_configs(tmp_path):
    a30, _ = tiny_configs()
    other = dataclasses.replace(a30, num_layers=3, seed=40)

    with pytest.raises(ValueError, match="differ only in seed"):
        sweep.train_seed_group([a30, other], [tmp_path / "a", tmp_path / "b"])


def test_stack_graphs_rejects_different_structures():
    rng = np.random.default_rng(0)

    def batch(systems):
        x, v, target = (rng.normal(size=(systems, 4, 3)) for _ in range(3))
        return graphs.build_graphs(x, v, np.ones((systems, 4)), target, batch_size=3)

    stacked = sweep.stack_graphs([batch(3), batch(3)])
    assert stacked.nodes["x"].shape == (2, 13, 3)
    assert stacked.senders.shape == batch(3).senders.shape
    with pytest.raises(ValueError, match="share n_node"):
        sweep.stack_graphs([batch(3), batch(2)])


@pytest.fixture(scope="module")
def finished_sweep(data_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    results = sweep.run_sweep(tiny_configs(epochs=1), root=root, data_root=data_root, progress=False)
    return root, results


def test_run_sweep_skips_finished_configs(data_root, finished_sweep, tmp_path, monkeypatch):
    configs = tiny_configs(epochs=1)
    shutil.copytree(finished_sweep[0], tmp_path, dirs_exist_ok=True)
    first = finished_sweep[1]
    assert [result.summary["status"] for result in first] == ["finished", "finished"]

    def fail(*args, **kwargs):
        raise AssertionError("a finished config was trained again")

    monkeypatch.setattr(sweep, "train_seed_group", fail)
    second = sweep.run_sweep(configs, root=tmp_path, data_root=data_root, progress=False)

    assert [result.summary for result in second] == [result.summary for result in first]


def test_run_sweep_trains_only_unfinished_seed(data_root, finished_sweep, tmp_path, monkeypatch):
    configs = tiny_configs(epochs=1)
    shutil.copytree(finished_sweep[0], tmp_path, dirs_exist_ok=True)
    unfinished = RunDirectory(sweep.default_run_dir(configs[1], tmp_path))
    summary = unfinished.read_summary()
    unfinished.write_summary({**summary, "status": "interrupted at epoch 0"})
    trained = []
    original = sweep.train_seed_group

    def record(group, *args, **kwargs):
        trained.extend(config.seed for config in group)
        return original(group, *args, **kwargs)

    monkeypatch.setattr(sweep, "train_seed_group", record)
    results = sweep.run_sweep(configs, root=tmp_path, data_root=data_root, progress=False)

    assert trained == [40]
    assert results[1].summary["status"] == "finished"
    assert json.loads(unfinished.summary_path.read_text())["status"] == "finished"
