"""Datasets and non-IID partitions."""
import numpy as np
import pytest

from tests.conftest import assert_one_line_error
from toolkit.cli.main import main
from toolkit.errors import DatasetError, UsageError
from toolkit.model import datasets
from toolkit.model.partition import classes_split, dirichlet_split


def test_mnist1d_is_the_standard_split(mnist1d):
    assert mnist1d.x_train.shape == (4000, 40) and mnist1d.x_test.shape == (1000, 40)
    assert mnist1d.x_train.dtype == np.float32 and mnist1d.y_train.dtype == np.int64
    assert set(np.unique(mnist1d.y_train)) == set(range(10))


def test_mnist1d_with_n_samples_keeps_the_split_and_the_generator(mnist1d, tmp_path):
    ds = datasets.load("mnist1d:600")
    assert ds.x_train.shape == (480, 40) and ds.x_test.shape == (120, 40)
    assert ds.name == "mnist1d:600" and datasets.spec_for("mnist1d:600").samples == 600
    assert datasets.spec_for("mnist1d:5_000") == datasets.DatasetSpec("mnist1d", samples=5000)
    # The same generator and seed: a larger set is a different draw of the same task
    # (same sample shape and classes), not a different dataset.
    assert set(np.unique(ds.y_train)) == set(range(10)) == set(np.unique(mnist1d.y_train))
    # Cached generation hands out copies: a caller editing its arrays edits only its own.
    ds.x_train[:] = 0
    assert datasets.load("mnist1d:600").x_train.any()


@pytest.mark.parametrize("arg", ["mnist1d:", "mnist1d:ten", "mnist1d:10", "mnist1d:-5",
                                 "mnist1d:1e6", "mnist1d:5000000"])
def test_mnist1d_with_a_bad_sample_count_names_the_bound(arg):
    with pytest.raises(DatasetError, match=r"mnist1d:N: expected N a whole number of samples "
                                           r"in 50\.\.1_000_000"):
        datasets.spec_for(arg)


def test_digits_are_8x8_images_with_a_stratified_test_split():
    ds = datasets.load("digits")
    assert ds.sample_shape == (8, 8)
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert np.bincount(ds.y_test).min() >= 30


def test_npz_with_and_without_test_split(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    y = np.arange(50) % 3
    np.savez(tmp_path / "a.npz", x=x, y=y)
    ds = datasets.load(str(tmp_path / "a.npz"))
    assert len(ds.x_train) + len(ds.x_test) == 50 and ds.num_classes == 3
    np.savez(tmp_path / "b.npz", x=x, y=y, x_test=x[:5], y_test=y[:5])
    assert len(datasets.load(str(tmp_path / "b.npz")).x_test) == 5


@pytest.mark.parametrize("arrays, needle", [
    ({"x": np.zeros((4, 3))}, "missing array 'y'"),
    ({"x": np.zeros((4, 3)), "y": np.zeros(5, int)}, "x has 4 samples but y has 5"),
    ({"x": np.full((4, 3), np.nan), "y": np.zeros(4, int)}, "NaN"),
    ({"x": np.zeros((4, 3)), "y": np.zeros(4)}, "y must be a 1-D integer array"),
    ({"x": np.zeros((4, 3)), "y": np.zeros(4, int), "x_test": np.zeros((2, 3))},
     "x_test and y_test go together"),
])
def test_bad_npz_is_rejected_naming_the_field(tmp_path, arrays, needle):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DatasetError, match=needle.replace("(", r"\(")):
        datasets.load(str(tmp_path / "bad.npz"))


def test_npz_with_pickled_objects_is_refused(tmp_path):
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, int))
    with pytest.raises(DatasetError, match="not a readable .npz"):
        datasets.load(str(tmp_path / "obj.npz"))


def test_dirichlet_split_is_a_seeded_partition_and_alpha_controls_skew():
    labels = np.repeat(np.arange(10), 300)
    a = dirichlet_split(labels, 10, 0.5, seed=1)
    assert sorted(np.concatenate(a).tolist()) == list(range(len(labels)))
    b = dirichlet_split(labels, 10, 0.5, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))

    def classes_held(parts):  # classes making up 95% of a device's data
        out = []
        for p in parts:
            c = np.sort(np.bincount(labels[p], minlength=10))[::-1]
            out.append(int(np.searchsorted(np.cumsum(c) / c.sum(), 0.95) + 1))
        return np.mean(out)

    assert classes_held(dirichlet_split(labels, 10, 0.1, 2)) < \
        classes_held(dirichlet_split(labels, 10, 100.0, 2))


def test_classes_per_device_split():
    labels = np.repeat(np.arange(10), 100)
    parts = classes_split(labels, 8, 2, seed=0)
    for p in parts:
        assert len(np.unique(labels[p])) == 2
    flat = np.concatenate(parts)
    assert len(flat) == len(np.unique(flat))
    with pytest.raises(UsageError, match="classes_per_device"):
        classes_split(labels, 8, 11, seed=0)


def test_partition_cli_writes_shards_and_server_split(tmp_path, capsys):
    out = tmp_path / "parts"
    assert main(["partition", "--dataset", "mnist1d", "--devices", "6", "--alpha", "0.5",
                 "--seed", "3", "--out", str(out)]) == 0
    shards = sorted(out.glob("device-*.npz"))
    assert len(shards) == 6
    server = datasets.load(str(out / "server.npz"))
    assert len(server.x_train) == 400 and len(server.x_test) == 1000
    total = sum(len(np.load(s)["y"]) for s in shards)
    assert total == 3600


def test_partition_cli_bad_input(tmp_path, capsys):
    code = main(["partition", "--dataset", "nope", "--devices", "4", "--out", str(tmp_path)])
    assert_one_line_error(code, capsys.readouterr().err, 2, "unknown dataset 'nope'")
    code = main(["partition", "--dataset", "mnist1d:lots", "--devices", "4",
                 "--out", str(tmp_path / "x")])
    assert_one_line_error(code, capsys.readouterr().err, 3, "got 'lots'")
    code = main(["partition", "--dataset", "mnist1d", "--devices", "4", "--alpha", "0",
                 "--out", str(tmp_path / "x")])
    assert_one_line_error(code, capsys.readouterr().err, 2, "alpha")
    assert not (tmp_path / "x").exists()
