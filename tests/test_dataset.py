"""Tests of dataset files: generation, caching, validation and the reference layout."""

import dataclasses
import json
import shutil

import numpy as np
import pytest

from geonorm_jax import dataset as dataset_module
from geonorm_jax import simulation
from geonorm_jax.dataset import DatasetConfig, DatasetError, load_dataset, load_or_generate

SMALL = DatasetConfig(n_particles=3, n_train=4, n_valid=3, n_test=2, frames=(30, 40))
SMALL_ALL_FRAMES = dataclasses.replace(SMALL, frames=None)


@pytest.fixture(scope="module")
def stored_root(tmp_path_factory):
    """A root holding the SMALL dataset, generated once for the module."""
    root = tmp_path_factory.mktemp("data")
    load_or_generate(SMALL, root, progress=False)
    return root


@pytest.fixture
def damaged_copy(stored_root, tmp_path):
    """A private copy of the stored SMALL dataset that a test may damage."""
    root = tmp_path / "data"
    shutil.copytree(stored_root, root)
    return root, root / SMALL.name


def test_load_or_generate_shapes_and_frames(stored_root):
    dataset = load_or_generate(SMALL, stored_root)
    assert dataset.frames == (30, 40)
    assert dataset.config == SMALL
    for name, size in (("train", 4), ("valid", 3), ("test", 2)):
        split = dataset.splits[name]
        assert split.x.shape == (size, 2, 3, 3)
        assert split.v.shape == (size, 2, 3, 3)
        assert split.charges.shape == (size, 3)
        assert split.x.dtype == np.float64
        assert split.charges.dtype == np.float64


def test_load_or_generate_matches_simulator(stored_root):
    dataset = load_or_generate(SMALL, stored_root)
    x, v, charges = simulation.simulate(43, "valid", 3, 3, frames=(30, 40), progress=False)
    np.testing.assert_array_equal(dataset.splits["valid"].x, x)
    np.testing.assert_array_equal(dataset.splits["valid"].v, v)
    np.testing.assert_array_equal(dataset.splits["valid"].charges, charges)


def test_manifest_records_parameters(stored_root):
    manifest = json.loads((stored_root / SMALL.name / "manifest.json").read_text())
    assert manifest["n_particles"] == 3
    assert manifest["seed"] == 43
    assert manifest["sizes"] == {"train": 4, "valid": 3, "test": 2}
    assert manifest["frames"] == [30, 40]
    assert manifest["format_version"] == dataset_module.FORMAT_VERSION
    assert manifest["physics"]["dt"] == 0.001
    assert manifest["physics"]["max_force"] == 100.0
    assert manifest["physics"]["box_size"] == 5.0
    assert manifest["physics"]["velocity_norm"] == 0.5
    assert manifest["physics"]["n_frames"] == 49
    assert len(manifest["arrays"]) == 9
    assert all(len(record["sha256"]) == 64 for record in manifest["arrays"].values())


def test_load_or_generate_cached(stored_root, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("simulate called for a stored dataset")

    monkeypatch.setattr(simulation, "simulate", fail)
    dataset = load_or_generate(SMALL, stored_root)
    assert dataset.splits["train"].n_systems == 4


def test_load_or_generate_leaves_no_temporary(stored_root):
    names = sorted(path.name for path in stored_root.iterdir())
    assert names == [SMALL.name]


def test_failed_generation_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dataset_module, "_publish", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_or_generate(SMALL, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_load_wrong_particle_count(stored_root):
    wrong = dataclasses.replace(SMALL, n_particles=5)
    with pytest.raises(DatasetError, match=r"n_particles is 3 but the request expects 5.*--n-particles 5"):
        load_dataset(stored_root / SMALL.name, wrong)


def test_load_wrong_frames(stored_root):
    wrong = dataclasses.replace(SMALL, frames=(30, 41))
    with pytest.raises(DatasetError, match=r"frames is \[30, 40\]"):
        load_dataset(stored_root / SMALL.name, wrong)


def test_load_truncated_file(damaged_copy):
    root, directory = damaged_copy
    path = directory / "train_x.npy"
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(DatasetError, match=r"train_x.npy cannot be read, it is truncated"):
        load_or_generate(SMALL, root)


def test_load_checksum_mismatch(damaged_copy):
    root, directory = damaged_copy
    path = directory / "test_v.npy"
    array = np.load(path)
    array[0, 0, 0, 0] += 1.0
    np.save(path, array)
    with pytest.raises(DatasetError, match=r"test_v.npy has sha256 .*checksum mismatch.*--force"):
        load_or_generate(SMALL, root)


def test_load_missing_file(damaged_copy):
    root, directory = damaged_copy
    (directory / "valid_charges.npy").unlink()
    with pytest.raises(DatasetError, match=r"valid_charges.npy not found"):
        load_or_generate(SMALL, root)


def test_load_missing_manifest(damaged_copy):
    root, directory = damaged_copy
    (directory / "manifest.json").unlink()
    with pytest.raises(DatasetError, match=r"manifest.json not found"):
        load_or_generate(SMALL, root)


def test_load_nan_in_array(damaged_copy):
    root, directory = damaged_copy
    path = directory / "train_v.npy"
    array = np.load(path)
    array[1, 1, 1, 1] = np.nan
    np.save(path, array)

    # Record the damaged file's checksum so that only the NaN check can fail.
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["arrays"]["train_v.npy"]["sha256"] = dataset_module._sha256(path)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=r"train_v.npy contains 1 NaN or Inf"):
        load_or_generate(SMALL, root)


def test_force_regenerates_damaged(damaged_copy):
    root, directory = damaged_copy
    (directory / "train_x.npy").unlink()
    dataset = load_or_generate(SMALL, root, force=True, progress=False)
    assert dataset.splits["train"].x.shape == (4, 2, 3, 3)


def test_config_rejects_invalid():
    with pytest.raises(ValueError, match="n_particles"):
        DatasetConfig(n_particles=1)
    with pytest.raises(ValueError, match="n_valid"):
        DatasetConfig(n_particles=5, n_valid=0)
    with pytest.raises(ValueError, match="outside"):
        DatasetConfig(n_particles=5, frames=(30, 49))
    with pytest.raises(ValueError, match="source"):
        DatasetConfig(n_particles=5, source="download")


def test_config_names_differ():
    names = {
        SMALL.name,
        SMALL_ALL_FRAMES.name,
        dataclasses.replace(SMALL, seed=1).name,
        dataclasses.replace(SMALL, n_particles=4).name,
        dataclasses.replace(SMALL, params=simulation.PhysicsParams(dt=0.002)).name,
        dataclasses.replace(SMALL, source="reference").name,
    }
    assert len(names) == 6


def test_reference_round_trip(tmp_path):
    dataset = dataset_module.generate(SMALL_ALL_FRAMES, progress=False)
    written = dataset_module.export_reference(dataset, tmp_path / "reference")
    assert len(written) == 12

    loc = np.load(tmp_path / "reference" / "loc_train_charged3_initvel1small.npy")
    edges = np.load(tmp_path / "reference" / "edges_train_charged3_initvel1small.npy")
    charges = np.load(tmp_path / "reference" / "charges_train_charged3_initvel1small.npy")
    assert loc.shape == (4, 49, 3, 3)
    assert loc.dtype == np.float64
    assert edges.shape == (4, 3, 3)
    assert charges.shape == (4, 3, 1)
    np.testing.assert_array_equal(loc[:, 30, :, 1], dataset.splits["train"].x[:, 30, 1, :])

    imported_config = dataclasses.replace(SMALL, source="reference")
    imported = dataset_module.import_reference(tmp_path / "reference", imported_config, tmp_path / "data")
    assert imported.frames == (30, 40)
    for name in ("train", "valid", "test"):
        np.testing.assert_array_equal(imported.splits[name].x, dataset.splits[name].x[:, [30, 40]])
        np.testing.assert_array_equal(imported.splits[name].v, dataset.splits[name].v[:, [30, 40]])
        np.testing.assert_array_equal(imported.splits[name].charges, dataset.splits[name].charges)

    # The imported dataset is found again by its config.
    again = load_or_generate(imported_config, tmp_path / "data")
    np.testing.assert_array_equal(again.splits["test"].x, imported.splits["test"].x)


def test_export_reference_rejects_frame_subset(stored_root, tmp_path):
    dataset = load_or_generate(SMALL, stored_root)
    with pytest.raises(DatasetError, match="needs all 49 frames.*--all-frames"):
        dataset_module.export_reference(dataset, tmp_path)


def test_import_reference_missing_file(tmp_path):
    config = dataclasses.replace(SMALL, source="reference")
    with pytest.raises(DatasetError, match="loc_train_charged3_initvel1small.npy not found"):
        dataset_module.import_reference(tmp_path, config, tmp_path / "data")


def test_reference_config_not_generated(tmp_path):
    config = dataclasses.replace(SMALL, source="reference")
    with pytest.raises(DatasetError, match="--import-reference"):
        load_or_generate(config, tmp_path)


def test_main_generates_and_caches(stored_root, capsys, monkeypatch):
    argv = ["--n-particles", "3", "--n-train", "4", "--n-valid", "3", "--n-test", "2", "--root", str(stored_root)]
    monkeypatch.setattr(simulation, "simulate", None)
    dataset_module.main(argv)
    output = capsys.readouterr().out
    assert SMALL.name in output
    assert "frames (30, 40)" in output


def test_frame_position():
    dataset = dataset_module.Dataset(config=SMALL, frames=(30, 40), splits={})
    assert dataset.frame_position(40) == 1
    with pytest.raises(ValueError, match="frame 20 is not stored"):
        dataset.frame_position(20)
