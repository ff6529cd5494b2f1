"""``multibn train``: the IDX loader on files written here (valid, corrupt, truncated), one training step of each
network on every backend against the NumPy float64 run, and a quick run of each task through the command."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from multibn.cli import main
from multibn.cli.train.data import Dataset, load_fashion_mnist, parse_idx, read_idx, resize_digits
from multibn.cli.train.models import init_weights
from multibn.cli.train.runner import Unsupported, batch_order, divergence, make_trainer
from multibn.cli.train.tasks import TASKS
from tests.helpers import backends_tested_here, has, installed, need, only_tested_here

pytestmark = pytest.mark.commands  # the commands run once, in the full environment (tests/conftest.py)

TRAIN_BACKENDS = ("torch", "jax", "mxnet", "numpy")


def _installed() -> list[str]:
    return list(installed(TRAIN_BACKENDS))


# ---- IDX files ------------------------------------------------------------------------------------------------
def idx_bytes(a: np.ndarray, code: int = 0x08) -> bytes:
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    return bytes([0, 0, code, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(dtype).tobytes()


def write_fashion(directory: Path, n_train: int = 40, n_test: int = 20, gz: bool = True, seed: int = 0) -> None:
    """Four small IDX files in the Fashion-MNIST layout: images of class c are bright in row band c."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 * c + 4:2 * c + 7, 4:24] = 250
        for stem, data in ((f"{prefix}-images-idx3-ubyte", idx_bytes(images)),
                           (f"{prefix}-labels-idx1-ubyte", idx_bytes(labels))):
            if gz:
                (directory / f"{stem}.gz").write_bytes(gzip.compress(data))
            else:
                (directory / stem).write_bytes(data)


@pytest.mark.parametrize(("code", "dtype"), [(0x08, np.uint8), (0x09, np.int8), (0x0B, np.int16),
                                             (0x0C, np.int32), (0x0D, np.float32), (0x0E, np.float64)])
def test_parse_idx_every_type(code: int, dtype: type) -> None:
    a = (np.arange(24).reshape(2, 3, 4) - (0 if code == 0x08 else 7)).astype(dtype)
    got = parse_idx(idx_bytes(a, code))
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    np.testing.assert_array_equal(got, a)


@pytest.mark.parametrize("gz", [True, False])
def test_load_fashion_mnist(tmp_path: Path, gz: bool) -> None:
    write_fashion(tmp_path, 12, 7, gz=gz)
    d = load_fashion_mnist(tmp_path)
    assert d.x_train.shape == (12, 1, 28, 28) and d.x_test.shape == (7, 1, 28, 28)
    assert d.x_train.dtype == np.float32 and d.x_train.min() >= 0.0 and d.x_train.max() <= 1.0
    assert d.y_train.dtype == np.int64 and d.y_test.shape == (7,)
    raw = read_idx(tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else "")))
    np.testing.assert_array_equal(d.x_train[:, 0], raw.astype(np.float32) / 255)


def test_a_raw_file_named_gz_and_a_gzip_named_raw_both_load(tmp_path: Path) -> None:
    a = np.arange(10, dtype=np.uint8)
    (tmp_path / "a.gz").write_bytes(idx_bytes(a))
    (tmp_path / "b").write_bytes(gzip.compress(idx_bytes(a)))
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), a)
    np.testing.assert_array_equal(read_idx(tmp_path / "b"), a)


GOOD = idx_bytes(np.zeros((3, 28, 28), np.uint8))


@pytest.mark.parametrize(("data", "message"), [
    (b"", "shorter than the 4-byte magic"),
    (b"\x1f\x00\x08\x03" + GOOD[4:], "not an IDX file: magic number 1f000803"),
    (b"\x00\x00\x07\x03" + GOOD[4:], "not an IDX file"),
    (b"\x00\x00\x08\x00", "0 dimensions"),
    (GOOD[:10], "truncated IDX header"),
    (GOOD[:-1], "truncated: 2367 bytes, but its header .* needs 2368"),
    (GOOD[:16], "truncated"),
    (GOOD + b"\x00", "trailing bytes"),
])
def test_malformed_idx_is_a_clear_value_error(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "bad-idx"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=message) as e:
        read_idx(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_gzip_is_a_clear_value_error(tmp_path: Path, damage: str) -> None:
    packed = gzip.compress(GOOD)
    data = packed[: len(packed) // 2] if damage == "truncated" else packed[:10] + b"\xff" * 40 + packed[50:]
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(data)
    with pytest.raises(ValueError, match="corrupt or truncated gzip"):
        read_idx(path)


@pytest.mark.parametrize("problem", ["image size", "label count", "label value", "labels rank", "missing"])
def test_inconsistent_fashion_files(tmp_path: Path, problem: str) -> None:
    write_fashion(tmp_path, 6, 4, gz=False)
    train_img, train_lbl = tmp_path / "train-images-idx3-ubyte", tmp_path / "train-labels-idx1-ubyte"
    if problem == "image size":
        train_img.write_bytes(idx_bytes(np.zeros((6, 27, 28), np.uint8)))
        error, match = ValueError, r"shape \(n, 28, 28\)"
    elif problem == "label count":
        train_lbl.write_bytes(idx_bytes(np.zeros(5, np.uint8)))
        error, match = ValueError, "6 images but .* 5 labels"
    elif problem == "label value":
        train_lbl.write_bytes(idx_bytes(np.full(6, 10, np.uint8)))
        error, match = ValueError, "labels must be 0..9"
    elif problem == "labels rank":
        train_lbl.write_bytes(idx_bytes(np.zeros((6, 1), np.uint8)))
        error, match = ValueError, "vector of labels"
    else:
        (tmp_path / "t10k-labels-idx1-ubyte").unlink()
        error, match = FileNotFoundError, "neither t10k-labels-idx1-ubyte.gz nor t10k-labels-idx1-ubyte.*downloads"
    with pytest.raises(error, match=match):
        load_fashion_mnist(tmp_path)


def test_the_command_refuses_a_corrupt_data_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_fashion(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-30])
    assert main(["train", "--task", "lenet", "--data", str(tmp_path), "--backend", "numpy"]) == 2
    assert "corrupt or truncated gzip" in capsys.readouterr().err


def test_the_command_trains_lenet_on_idx_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_fashion(tmp_path / "data", 40, 20)
    out = tmp_path / "r.json"
    assert main(["train", "--task", "lenet", "--data", str(tmp_path / "data"), "--backend", "numpy", "--epochs", "1",
                 "--batch-size", "20", "--no-bn", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert "IDX files" in doc["data"] and [r["bn"] for r in doc["runs"]] == [False]
    assert "40 training, 20 test examples" in capsys.readouterr().out


# ---- data, weights, batch order -----------------------------------------------------------------------------
def test_resize_digits_centres_a_20x20_digit() -> None:
    img = np.zeros((1, 8, 8))
    img[0, :, 3:5] = 16
    out = resize_digits(img)
    assert out.shape == (1, 1, 28, 28) and out.dtype == np.float32
    assert out[0, 0, :4].max() == 0 and out[0, 0, 24:].max() == 0 and out[0, 0, :, :4].max() == 0
    assert out.max() == pytest.approx(1.0)


def test_default_digits_split_is_fixed_and_stratified() -> None:
    need("sklearn")
    a, b = TASKS["lenet"].data(0), TASKS["lenet"].data(5)
    np.testing.assert_array_equal(a.x_train, b.x_train)  # the data does not depend on the seed
    assert a.x_train.shape == (1438, 1, 28, 28) and a.x_test.shape == (359, 1, 28, 28)
    assert np.bincount(a.y_test).min() >= 35


def test_weights_and_batch_order_are_seeded() -> None:
    layers = TASKS["lenet"].model("bn").layers
    w0, w0b, w1 = init_weights(layers, 0), init_weights(layers, 0), init_weights(layers, 1)
    assert all(np.array_equal(w0[k], w0b[k]) for k in w0) and not np.array_equal(w0["conv1.weight"], w1["conv1.weight"])
    plain = init_weights(TASKS["lenet"].model("no-bn").layers, 0)
    np.testing.assert_array_equal(plain["dense3.weight"], w0["dense3.weight"])  # same kernels with and without BN
    assert "dense3.bias" in plain and "dense3.bias" not in w0  # a layer feeding BN has no bias
    batches = batch_order(65, 32, 0, 1)
    assert [len(b) for b in batches] == [32, 32]  # the last batch of one example is dropped
    assert len(set(np.concatenate(batches).tolist())) == 64
    np.testing.assert_array_equal(batches[0], batch_order(65, 32, 0, 1)[0])
    assert not np.array_equal(batch_order(64, 64, 0, 1)[0], batch_order(64, 64, 0, 2)[0])


# ---- the backends take the same steps -----------------------------------------------------------------------
def _tiny(task: str) -> Dataset:
    rng = np.random.default_rng(3)
    if task == "lenet":
        return Dataset("tiny", rng.random((24, 1, 28, 28), np.float32), rng.integers(0, 10, 24), None, None)
    n_in = 1 if task == "mlp-regression" else 8
    x = rng.normal(size=(24, n_in)).astype(np.float32) * 3
    return Dataset("tiny", x, (x[:, :1] ** 2).astype(np.float32), None, None)


@pytest.mark.parametrize(("task", "variant"), [("lenet", "bn"), ("mlp-regression", "bn"), ("placement", "before"),
                                               ("placement", "after"), ("lenet", "renorm"), ("lenet", "ghost")])
def test_three_steps_match_numpy_float64(backend: str, task: str, variant: str) -> None:
    """Every backend's forward, autodiff backward (through multibn's BN layer) and optimizer step against the
    NumPy network (hand-written backward, batch_norm_vjp) in float64; batch renormalisation (its state moving
    between the steps) and ghost BN (sub-batches of 4 in the batches of 12) too."""
    data = _tiny(task)
    ref = make_trainer("numpy", TASKS[task], variant, 0, dtype="float64")
    try:
        got = make_trainer(backend, TASKS[task], variant, 0)
    except Unsupported as e:  # the Gluon layer before it takes the variants: the command skips it with this reason
        assert backend == "mxnet" and "does not take" in str(e)
        pytest.skip(str(e))
    for idx in (np.arange(0, 12), np.arange(12, 24), np.arange(6, 18)):  # one batch shape: one jax compile
        loss_ref = ref.step(data.x_train[idx], data.y_train[idx])
        loss = got.step(data.x_train[idx], data.y_train[idx])
        assert loss == pytest.approx(loss_ref, rel=1e-4)
    w_ref, w = ref.weights(), got.weights()
    assert set(w) == set(w_ref)
    for k in w_ref:
        np.testing.assert_allclose(w[k], w_ref[k], rtol=2e-3, atol=2e-4 * max(1.0, np.abs(w_ref[k]).max()), err_msg=k)
    t_ref, t = ref.evaluate(data.x_train, data.y_train), got.evaluate(data.x_train, data.y_train)
    assert t[0] == pytest.approx(t_ref[0], rel=1e-3)
    assert t[1] == t_ref[1] if t[1] is None else abs(t[1] - t_ref[1]) <= 1 / 24


# ---- the command ------------------------------------------------------------------------------------------------
#: per metric: the largest |difference| allowed between backends, relative to max(1, |value|)
TOLERANCE = {"lenet": 1e-3, "mlp-regression": 1e-7, "placement": 1e-3}


@pytest.mark.parametrize("task", list(TASKS))
def test_quick_run_on_every_installed_backend(task: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if task == "lenet":
        need("sklearn")
    backends = list(backends_tested_here(TRAIN_BACKENDS))  # every installed one, less those left to the full env
    out, png = tmp_path / "run.json", tmp_path / "run.png"
    argv = ["train", "--task", task, "--quick", "--epochs", "1", "--json", str(out)]
    argv += ["--backend", *only_tested_here(TRAIN_BACKENDS)] if only_tested_here(TRAIN_BACKENDS) else []
    if task == "lenet":
        argv += ["--batch-size", "128"]
    if task == "mlp-regression":
        argv += ["--seeds", "0", "1"]
    plot = has("matplotlib")
    if plot:
        argv += ["--plot", str(png)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "largest divergence between backends" in printed
    doc = json.loads(out.read_text())
    assert doc["task"] == task and sorted({r["backend"] for r in doc["runs"]}) == sorted(backends)
    variants = TASKS[task].variants
    seeds = [0, 1] if task == "mlp-regression" else [0]
    assert len(doc["runs"]) == len(backends) * len(variants) * len(seeds)
    for r in doc["runs"]:
        assert set(r) >= {"backend", "bn", "variant", "seed", "epochs"} and isinstance(r["bn"], bool)
        assert r["variant"] in variants and r["bn"] == (r["variant"] != TASKS[task].no_bn_variant)
        (e,) = r["epochs"]
        assert e["epoch"] == 1 and np.isfinite(e["train_loss"]) and np.isfinite(e["test_loss"])
        assert (e["test_acc"] is None) == (task != "lenet")
    assert {r["placement"] for r in doc["runs"]} == set(variants) if task == "placement" else True
    if len(backends) > 1:
        assert doc["max_divergence"] is not None
        groups: dict[tuple, list] = {}
        for r in doc["runs"]:
            groups.setdefault((r.get("placement"), r["bn"], r["seed"]), []).append(r["epochs"][0])
        for group in groups.values():
            for metric in ("train_loss", "test_loss"):
                vals = [e[metric] for e in group]
                assert max(vals) - min(vals) <= TOLERANCE[task] * max(1.0, max(map(abs, vals))), (metric, vals)
            if task == "lenet":
                accs = [e["test_acc"] for e in group]
                assert max(accs) - min(accs) <= 1 / 128 + 1e-12
    if plot:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_divergence_names_the_metric_and_backends() -> None:
    def run(backend: str, loss: float) -> dict:
        return {"backend": backend, "variant": "bn", "seed": 0,
                "epochs": [{"epoch": 1, "train_loss": loss, "test_loss": 1.0, "test_acc": None}]}

    worst, where = divergence([run("torch", 2.0), run("jax", 2.5), run("numpy", 2.25)])
    assert worst == 0.5 and where["metric"] == "train_loss" and where["backends"] == ["torch", "jax"]
    assert divergence([run("torch", 2.0)]) == (0.0, None)


@pytest.mark.parametrize(("argv", "message"), [
    (["--backend", "tensorflow"], "unknown backend 'tensorflow'"),
    (["--task", "placement", "--data", "."], "--data is for --task lenet"),
    (["--epochs", "0"], "--epochs must be >= 1"),
])
def test_bad_arguments_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", *argv]) == 2
    assert message in capsys.readouterr().err


def test_no_bn_trains_only_the_plain_network(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--task", "placement", "--quick", "--epochs", "1", "--no-bn", "--backend", "numpy"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("numpy ")]
    assert rows and all(line.split()[1] == "none" for line in rows)




# ---- --variant: batch renormalisation and ghost BN against plain BN -------------------------------------------------
def test_batch_order_cut_to_a_multiple_of_the_ghost_sub_batch() -> None:
    batches = batch_order(70, 32, 0, 1, multiple=4)
    assert [len(b) for b in batches] == [32, 32, 4]  # the last 6 cut to 4
    assert [len(b) for b in batch_order(65, 32, 0, 1, multiple=4)] == [32, 32]  # a last 1 (< 4) dropped
    np.testing.assert_array_equal(batches[0], batch_order(70, 32, 0, 1)[0])  # the same order as without the cut


@pytest.mark.parametrize(("variant", "batch"), [("renorm", "16"), ("ghost", "32")])
def test_variant_against_plain_bn_on_every_installed_backend(variant: str, batch: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """``--variant``: plain BN and the variant on every installed backend (one whose layer does not take the variant
    yet is skipped with the reason); the backends agree, and the variant trains differently from plain BN."""
    need("sklearn")
    out, png = tmp_path / "run.json", tmp_path / "run.png"
    argv = ["train", "--task", "lenet", "--variant", variant, "--quick", "--epochs", "1", "--batch-size", batch,
            "--json", str(out)]
    plot = has("matplotlib")
    if plot:
        argv += ["--plot", str(png)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "largest divergence between backends" in printed
    doc = json.loads(out.read_text())
    skipped = doc["config"]["skipped"]
    backends = [b for b in _installed() if b not in skipped]
    assert set(skipped) <= {"mxnet"} and all(f"{b}: skipped: " in printed for b in skipped)
    assert doc["config"]["variant"] == variant and doc["config"]["batch_size"] == int(batch)
    assert ("renorm" in doc["config"]) == (variant == "renorm") and ("virtual_batch_size" in doc["config"]) == (
        variant == "ghost")
    assert [(r["backend"], r["variant"], r["bn"]) for r in doc["runs"]] == [
        (b, v, True) for b in backends for v in ("bn", variant)]
    for b in backends:
        (plain,), (other,) = ([r["epochs"][0] for r in doc["runs"] if r["backend"] == b and r["variant"] == v]
                              for v in ("bn", variant))
        assert np.isfinite(other["train_loss"]) and other["test_acc_recomputed"] is not None
        assert abs(other["train_loss"] - plain["train_loss"]) > 1e-2, (b, plain, other)  # the variant changes training
    if len(backends) > 1:
        for v in ("bn", variant):
            group = [r["epochs"][0] for r in doc["runs"] if r["variant"] == v]
            for metric in ("train_loss", "test_loss", "test_loss_recomputed"):
                vals = [e[metric] for e in group]
                assert max(vals) - min(vals) <= TOLERANCE["lenet"] * max(1.0, max(map(abs, vals))), (v, metric, vals)
            for metric in ("test_acc", "test_acc_recomputed"):
                accs = [e[metric] for e in group]
                assert max(accs) - min(accs) <= 2 / 256 + 1e-12, (v, metric, accs)
    if plot:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_backend_whose_layer_refuses_the_variant_is_skipped_with_the_reason(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import multibn.cli.train as train

    def refusing(backend: str, task: object, variant: str, *args: object) -> object:
        if variant == "renorm":
            raise Unsupported("this layer does not take renorm yet")
        return make_trainer(backend, task, variant, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(train, "make_trainer", refusing)
    assert main(["train", "--variant", "renorm", "--backend", "numpy", "--quick", "--epochs", "1"]) == 2
    captured = capsys.readouterr()
    assert "numpy: skipped: this layer does not take renorm yet" in captured.out
    assert "no installed backend can train these networks" in captured.err


@pytest.mark.parametrize(("argv", "message"), [
    (["--task", "placement", "--variant", "renorm"], "task placement has BN variants: none"),
    (["--variant", "ghost", "--batch-size", "30"], "multiple of ghost BN's sub-batch size 4, got 30"),
    (["--variant", "renorm", "--no-bn"], "--no-bn trains no BN network"),
])
def test_bad_variant_arguments_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--backend", "numpy", *argv]) == 2
    assert message in capsys.readouterr().err
