"""End-to-end training through the user's entry point, on a tiny dataset."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from geonorm_jax import graphs, train, training
from geonorm_jax.config import TrainConfig, make_config
from geonorm_jax.dataset import load_or_generate
from geonorm_jax.loader import GraphLoader

TINY_FLAGS = ["--preset", "tiny", "--no-progress"]


def run_main(data_root, run_dir, *flags):
    return train.main([*TINY_FLAGS, "--data-root", str(data_root), "--run-dir", str(run_dir), *flags])


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tiny_loader(data_root, config: TrainConfig):
    dataset = load_or_generate(config.dataset_config(), root=data_root)
    return GraphLoader(dataset.splits["train"], dataset.frames, config.batch_size,
                       input_frame=config.input_frame, target_frame=config.target_frame)


def test_main_trains_and_writes_outputs(data_root, tmp_path):
    run_dir = tmp_path / "run"

    exit_code = run_main(data_root, run_dir, "--epochs", "6")

    assert exit_code == 0
    for name in ("config.json", "metrics.jsonl", "summary.json", "best_params.msgpack", "loss_curves.png"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "checkpoints").is_dir()
    metrics = read_metrics(run_dir)
    assert [record["epoch"] for record in metrics] == list(range(1, 7))
    assert metrics[-1]["train_mse"] < metrics[0]["train_mse"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["test_mse"] is not None and np.isfinite(summary["test_mse"])
    assert summary["baseline_test_mse"]["constant_velocity"] > 0


def test_train_step_no_nan_after_first_step(data_root):
    config = make_config("tiny")
    loader = tiny_loader(data_root, config)
    model = training.build_model(config)
    optimizer = training.make_optimizer(config)
    graph = next(iter(loader.epoch(None)))
    params = training.init_params(model, graph, jax.random.PRNGKey(0))
    step = training.jit_train_step(training.make_train_step(model, optimizer))

    params, _, metrics = step(params, optimizer.init(params), graph)

    assert np.isfinite(float(metrics.loss))
    for leaf in jax.tree.leaves(params):
        assert not np.isnan(np.asarray(leaf)).any()


def test_train_step_compiles_once_per_epoch(data_root):
    config = make_config("tiny")
    loader = tiny_loader(data_root, config)
    assert config.n_train % config.batch_size != 0, "the epoch must end with a ragged batch"
    model = training.build_model(config)
    optimizer = training.make_optimizer(config)
    first = next(iter(loader.epoch(None)))
    params = training.init_params(model, first, jax.random.PRNGKey(0))
    opt_state = optimizer.init(params)
    step = jax.jit(chex.assert_max_traces(training.make_train_step(model, optimizer), n=1))

    for epoch in range(2):
        for graph in loader.epoch(jax.random.PRNGKey(epoch)):
            params, opt_state, _ = step(params, opt_state, graph)

    assert len(loader) == -(-config.n_train // config.batch_size)


def test_padded_batch_loss_equals_unpadded():
    rng = np.random.default_rng(0)
    x, v, target = (rng.normal(size=(3, 5, 3)) for _ in range(3))
    charges = rng.choice([-1.0, 1.0], size=(3, 5))
    config = make_config("tiny")
    model = training.build_model(config)
    tight = graphs.build_graphs(x, v, charges, target, batch_size=3)
    padded = graphs.build_graphs(x, v, charges, target, batch_size=8)
    params = training.init_params(model, tight, jax.random.PRNGKey(1))

    tight_loss = training.batch_loss(model, params, tight)
    padded_loss = training.batch_loss(model, params, padded)

    np.testing.assert_allclose(padded_loss, tight_loss, rtol=1e-6)
    direct = np.mean((np.asarray(model.apply(params, tight))[:15] - target.reshape(-1, 3)) ** 2)
    np.testing.assert_allclose(tight_loss, direct, rtol=1e-5)


def test_resume_matches_uninterrupted_run(data_root, tmp_path, monkeypatch):
    flags = ("--epochs", "6", "--eval-every", "2")
    assert run_main(data_root, tmp_path / "whole", *flags) == 0

    real_train_epoch = train._train_epoch

    def interrupted_train_epoch(*args):
        epoch = args[5]
        if epoch == 4:
            raise KeyboardInterrupt
        return real_train_epoch(*args)

    monkeypatch.setattr(train, "_train_epoch", interrupted_train_epoch)
    assert run_main(data_root, tmp_path / "killed", *flags) == train.EXIT_INTERRUPTED
    interrupted = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert interrupted["status"] == "interrupted at epoch 3"
    monkeypatch.setattr(train, "_train_epoch", real_train_epoch)
    assert run_main(data_root, tmp_path / "killed", *flags, "--resume") == 0

    whole = read_metrics(tmp_path / "whole")
    resumed = read_metrics(tmp_path / "killed")
    assert [record["epoch"] for record in resumed] == [record["epoch"] for record in whole]
    for key in ("train_mse", "grad_norm", "valid_mse", "test_mse"):
        assert [record[key] for record in resumed] == [record[key] for record in whole], key


def test_divergence_recorded_with_exit_code(data_root, tmp_path):
    run_dir = tmp_path / "diverged"

    exit_code = run_main(data_root, run_dir, "--lr", "1e4", "--epochs", "4", "--divergence-bound", "100")

    assert exit_code == train.EXIT_DIVERGED
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"].startswith("diverged at epoch ")
    diverged_epoch = int(summary["status"].rsplit(" ", 1)[1])
    assert summary["epochs_completed"] == diverged_epoch
    assert len(read_metrics(run_dir)) == diverged_epoch
    assert (run_dir / "loss_curves.png").is_file()


def test_rerun_of_ended_run_skips_training(data_root, tmp_path):
    run_dir = tmp_path / "run"
    assert run_main(data_root, run_dir, "--epochs", "2") == 0
    before = (run_dir / "metrics.jsonl").read_text()

    assert run_main(data_root, run_dir, "--epochs", "2") == 0

    assert (run_dir / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--norm", "batchnorm"], "invalid choice: 'batchnorm'"),
        (["-N", "1"], "n_particles must be at least 2"),
        (["--lr", "0"], "learning_rate must be a positive"),
        (["--lr", "nan"], "learning_rate must be a positive"),
        (["--batch-size", "0"], "batch_size must be a positive"),
        (["--input-frame", "40", "--target-frame", "30"], "must come after"),
    ],
)
def test_main_rejects_invalid_flags(flags, message, data_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        run_main(data_root, tmp_path / "run", *flags)

    assert raised.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_main_rejects_run_dir_of_other_config(data_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stored = make_config("tiny", n_particles=7)
    (run_dir / "config.json").write_text(stored.to_json())
    empty_root = tmp_path / "no-data"

    with pytest.raises(SystemExit) as raised:
        run_main(empty_root, run_dir, "--norm", "geonorm", "--norm-mode", "particle")

    assert raised.value.code == 2
    error = capsys.readouterr().err
    assert "n_particles: stored 7, requested 5" in error
    assert "exist for exactly N=7 particles" in error
    assert not empty_root.exists(), "the error must come before any data is generated"


def test_optimizer_adds_weight_decay_to_gradient():
    config = make_config("tiny", weight_decay=0.5, learning_rate=0.1)
    optimizer = training.make_optimizer(config)
    adam = optax.adam(0.1)
    params = {"w": jnp.array([2.0, -3.0])}
    grads = {"w": jnp.array([0.3, 0.4])}
    decayed = {"w": grads["w"] + 0.5 * params["w"]}

    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    expected, _ = adam.update(decayed, adam.init(params), params)

    np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-6)
