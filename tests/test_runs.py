"""zoomnet.runs: the run folder (train, resume, crash safety, settings checked against the run), and folders of earlier releases."""

from __future__ import annotations

import csv
import json
import os
import shutil
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from zoomnet.cli import main
from zoomnet.errors import UserError

from helpers import _copy_run


def test_binary_labels_without_a_negative_class_train_with_the_multiclass_terms(data, tmp_path, capsys):
    img = data / "set/images/tiny_00000.png"
    labels = tmp_path / "labels.csv"
    labels.write_text(f"path,label\n{img},cat\n{img},dog\n")
    argv = ["train", "--config", str(data / "tiny.json"), "--train", str(labels), "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "r")]) == 0
    assert "no reference (negative) class among cat, dog" in capsys.readouterr().out
    assert json.loads((tmp_path / "r/config.json").read_text())["data"]["reference_class"] == "none"
    # a named reference class that is not a label is refused in one line
    assert main([*argv, "--out", str(tmp_path / "r2"), "--set", "data.reference_class=bird"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'bird' is not a class (cat, dog)" in err


def _train_cmd(data: Path, out: Path, epochs: int) -> list[str]:
    return [sys.executable, "-m", "zoomnet", "train", "--config", str(data / "tiny.json"),
            "--train", str(data / "set/train.csv"), "--out", str(out), "--epochs", str(epochs), "--quiet",
            "--device", "cpu", "--set", "model.train_samples=32"]


@pytest.mark.slow  # an end-to-end training: `make test-slow`, run by .ci/run
def test_sigkill_mid_training_then_resume_matches_an_uninterrupted_run(data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole"
    subprocess.run(_train_cmd(data, whole, 4), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(data, killed, 4), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "metrics.csv").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # in epoch 2 (or later): the run dies without cleaning up
    proc.wait()
    from zoomnet.checkpoint import read_description

    epochs_done = read_description(killed / "last.safetensors")["state"]["epoch"]
    assert 1 <= epochs_done < 4, "the kill came after the run ended; slow the run down"
    from zoomnet.checkpoint import load_checkpoint

    load_checkpoint(killed / "last.safetensors")  # whole, loadable
    subprocess.run(_train_cmd(data, killed, 4)[:-2] + ["--resume", "--set", "model.train_samples=32"],
                   check=True, env=env, capture_output=True)
    a, _ = load_checkpoint(whole / "last.safetensors")
    b, _ = load_checkpoint(killed / "last.safetensors")
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k  # bitwise: same machine, same threads, same seed
    rows_a = list(csv.DictReader(open(whole / "metrics.csv")))
    rows_b = list(csv.DictReader(open(killed / "metrics.csv")))
    assert [r["loss_ce"] for r in rows_a] == [r["loss_ce"] for r in rows_b]


# columns of the machine's state, not the run's: time, and reads (a resumed process starts with cold file caches)
MACHINE = ("seconds", "images_per_s", "pixels_decoded", "bytes_read", "decoded_share")


class _Crash(BaseException):
    """A process killed between two file operations (not an Exception: nothing catches it)."""


@pytest.mark.slow  # eight short trainings: `make test-slow`, run by .ci/run
def test_a_crash_at_any_instant_of_saving_resumes_to_the_same_end(data, tmp_path, monkeypatch):
    """Kill the run before each rename of the end of one epoch (optimiser state, best and
    last checkpoints, their readable copies, metrics): the folder predicts, and resuming it
    gives bitwise the weights, best weights, description and metrics of a run never
    interrupted, with no temporary file left."""
    from zoomnet.checkpoint import load_checkpoint, read_description

    # no validation set: the best epoch is by training accuracy, which rises, so later epochs write best weights
    argv = ["train", "--config", str(data / "tiny.json"), "--train", str(data / "set/train.csv"),
            "--epochs", "3", "--quiet", "--device", "cpu", "--set", "model.train_samples=8"]
    real_replace = os.replace
    renames: list[str] = []

    def counting(src, dst, *a, **k):
        renames.append(Path(dst).name)
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", counting)
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    monkeypatch.setattr(os, "replace", real_replace)
    # the renames of each epoch end with metrics.csv; test the last epoch that wrote best weights
    ends = [i for i, name in enumerate(renames) if name == "metrics.csv"]
    epochs = [renames[a + 1 : b + 1] for a, b in zip([-1, *ends], ends)]
    chosen = max((e for e in range(1, len(epochs)) if "best.safetensors" in epochs[e]), default=len(epochs) - 1)
    first = sum(len(e) for e in epochs[:chosen])
    assert {"last.optim.pt", "prev.optim.pt", "last.safetensors", "metrics.csv"} <= set(epochs[chosen])
    print("renames at the end of the epoch tested:", epochs[chosen])

    def same(a: Path, b: Path) -> None:
        for name in ("last.safetensors", "best.safetensors"):
            x, state_x = load_checkpoint(a / name)
            y, state_y = load_checkpoint(b / name)
            for (k, u), (_, v) in zip(x.state_dict().items(), y.state_dict().items()):
                assert torch.equal(u, v), (name, k)
            drop = lambda st: {**st, "history": [{k: v for k, v in r.items() if k not in MACHINE} for r in st["history"]]}
            assert drop(state_x) == drop(state_y)
            assert read_description(b / name) == json.loads((b / name).with_suffix(".json").read_text())
        strip = lambda p: [{k: v for k, v in r.items() if k not in MACHINE} for r in csv.DictReader(open(p))]
        assert strip(a / "metrics.csv") == strip(b / "metrics.csv")

    for k in range(len(epochs[chosen])):
        out = tmp_path / f"crash{k}"
        calls = [0]

        def crashing(src, dst, *a, **kw):
            calls[0] += 1
            if calls[0] == first + k + 1:
                raise _Crash(f"killed before renaming {Path(dst).name}")
            return real_replace(src, dst, *a, **kw)

        monkeypatch.setattr(os, "replace", crashing)
        with pytest.raises(_Crash):
            main([*argv, "--out", str(out)])
        monkeypatch.setattr(os, "replace", real_replace)
        (out / ".last.safetensors.x1y2.tmp").write_bytes(b"half")  # what SIGKILL leaves: no cleanup runs
        # the folder as the crash left it predicts (best weights of an earlier epoch) ...
        assert main(["predict", str(out), str(data / "set/images/tiny_00000.png"), "--quiet"]) == 0
        # ... and resumes to the end of the uninterrupted run, leaving no temporary file
        assert main([*argv, "--out", str(out), "--resume"]) == 0, epochs[chosen][k]
        same(tmp_path / "whole", out)
        assert not list(out.glob(".*.tmp"))


@pytest.mark.slow  # an end-to-end training: `make test-slow`, run by .ci/run
def test_same_seed_same_metrics(data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("a", "b"):
        subprocess.run(_train_cmd(data, tmp_path / name, 1), check=True, env=env, capture_output=True)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in rows]
    a = strip(csv.DictReader(open(tmp_path / "a/metrics.csv")))
    b = strip(csv.DictReader(open(tmp_path / "b/metrics.csv")))
    assert a == b


def test_resume_refuses_a_pickled_optimizer_state(data, run, tmp_path, capsys):
    copy = tmp_path / "run"
    copy.mkdir()
    for f in run.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    torch.save({"optimizer": Payload()}, copy / "last.optim.pt")
    code = main(["train", "--config", str(data / "tiny.json"), "--train", str(data / "set/train.csv"),
                 "--out", str(copy), "--resume", "--epochs", "2", "--quiet"])
    assert code == 2 and "refused" in capsys.readouterr().err


def test_resume_refuses_an_optimizer_state_of_another_epoch(data, run, tmp_path, capsys):
    """The resume state is matched to the checkpoint's epoch; one of another epoch is refused."""
    copy = tmp_path / "run"
    copy.mkdir()
    for f in run.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    state = torch.load(copy / "last.optim.pt", weights_only=True)
    torch.save({**state, "epoch": 7}, copy / "last.optim.pt")
    (copy / "prev.optim.pt").unlink(missing_ok=True)
    code = main(["train", "--config", str(data / "tiny.json"), "--train", str(data / "set/train.csv"),
                 "--out", str(copy), "--resume", "--epochs", "2", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "no optimiser state of epoch 1" in err and "last.optim.pt: epoch 7" in err


def test_zero_epochs_on_the_command_line_is_refused(data, tmp_path, capsys):
    argv = ["train", "--config", str(data / "tiny.json"), "--train", str(data / "set/train.csv"),
            "--out", str(tmp_path / "r"), "--quiet", "--epochs", "0"]
    assert main(argv) == 2 and "--epochs 0" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_run_folder_is_never_overwritten_without_resume_or_force(data, tmp_path, capsys):
    argv = ["train", "--config", str(data / "tiny.json"), "--train", str(data / "set/train.csv"), "--quiet"]
    run = tmp_path / "r"
    assert main([*argv, "--out", str(run)]) == 0
    before = (run / "last.safetensors").read_bytes()
    capsys.readouterr()
    assert main([*argv, "--out", str(run), "--set", "train.lr=0.01"]) == 2
    assert "holds a run already; continue it with --resume, or start afresh with --force" in capsys.readouterr().err
    assert (run / "last.safetensors").read_bytes() == before
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\ngone.png,a\n")
    assert main(["train", "--config", str(data / "tiny.json"), "--train", str(bad), "--quiet", "--out", str(run),
                 "--force"]) == 2
    assert (run / "last.safetensors").read_bytes() == before  # a failed --force loses nothing
    assert main([*argv, "--out", str(run), "--force", "--seed", "5"]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["seed"] == 5
    # a folder with a user's files (the manifest itself, say) is refused even with --force
    user = tmp_path / "mine"
    user.mkdir()
    (user / "train.csv").write_text("path,label\n")
    capsys.readouterr()
    assert main([*argv, "--out", str(user), "--force"]) == 2
    assert "not a run's (train.csv)" in capsys.readouterr().err
    assert (user / "train.csv").read_text() == "path,label\n" and len(list(user.iterdir())) == 1
    (tmp_path / "file").write_text("x")
    assert main([*argv, "--out", str(tmp_path / "file")]) == 2
    assert "a file, not a folder" in capsys.readouterr().err


def test_resume_refuses_settings_that_differ_from_the_run(data, tmp_path, capsys):
    argv = ["train", "--config", str(data / "tiny.json"), "--train", str(data / "set/train.csv"), "--quiet",
            "--out", str(tmp_path / "r"), "--set", "model.train_samples=8"]
    assert main(argv) == 0
    before = (tmp_path / "r/last.safetensors").read_bytes()
    for extra, field in ((["--set", "model.train_samples=16"], "model.train_samples"), (["--seed", "7"], "train.seed"),
                         (["--set", "train.lr=0.5"], "train.lr")):
        capsys.readouterr()
        assert main([*argv, "--resume", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{field} differs from the run's" in err, err
    assert (tmp_path / "r/last.safetensors").read_bytes() == before
    assert main([*argv, "--resume", "--epochs", "2"]) == 0  # the same settings, more epochs


def test_a_hand_edited_config_json_is_checked_against_the_checkpoint(run, data, tmp_path, capsys):
    import shutil

    image = str(data / "set/images/tiny_00000.png")
    saved = json.loads((run / "config.json").read_text())
    edits = {
        "not JSON": ("{model: oops", "not valid JSON"),
        "a list": ("[1, 2]", "holds a list, not a configuration"),
        "classes null": ({**saved, "data": {**saved["data"], "classes": None}}, "differ from the classes"),
        "classes swapped": ({**saved, "data": {**saved["data"], "classes": saved["data"]["classes"][::-1]}},
                            "differ from the classes"),
        "too many classes": ({**saved, "data": {**saved["data"], "classes": [*saved["data"]["classes"], "maybe"]}},
                             "differ from the classes"),
        "fill as a word": ({**saved, "data": {**saved["data"], "fill": "white"}}, "data.fill='white'"),
        "model a number": ({**saved, "model": 5}, "model=5: give an object of fields"),
    }
    for case, (content, needle) in edits.items():
        copy = tmp_path / case.replace(" ", "-")
        shutil.copytree(run, copy)
        (copy / "config.json").write_text(content if isinstance(content, str) else json.dumps(content))
        capsys.readouterr()
        assert main(["predict", str(copy), image]) == 2, case
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, (case, err)


def test_train_writes_the_run_folder(run):
    for name in ("config.json", "metrics.csv", "last.safetensors", "last.json", "best.safetensors", "last.optim.pt"):
        assert (run / name).is_file(), name
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["classes"] == ["negative", "positive"]
    assert cfg["data"]["reference_class"] == "negative"
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert len(rows) == 1
    for key in ("loss_ce", "loss_contrastive", "train_accuracy", "val_accuracy", "val_auc", "seconds", "images_per_s"):
        assert key in rows[0], key


def test_resume_continues_the_run(data, run, tmp_path):
    copy = _copy_run(run, tmp_path / "run")
    code = main(["train", "--config", str(data / "tiny.json"), "--train", str(data / "set/train.csv"),
                 "--val", str(data / "set/val.csv"), "--out", str(copy), "--epochs", "2", "--resume", "--quiet"])
    assert code == 0
    assert [r["epoch"] for r in csv.DictReader(open(copy / "metrics.csv"))] == ["1", "2"]
    assert json.loads((copy / "last.json").read_text())["state"]["epoch"] == 2


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, run, tmp_path, monkeypatch):
    import zoomnet.train as train_mod
    from zoomnet.config import load_config
    from zoomnet.runs import train_run

    copy = _copy_run(run, tmp_path / "run")
    before = (copy / "last.safetensors").read_bytes()
    real = train_mod.training_loss

    def poisoned(*args, **kwargs):
        loss, terms = real(*args, **kwargs)
        return loss * float("nan"), terms

    monkeypatch.setattr(train_mod, "training_loss", poisoned)
    config = load_config(str(data / "tiny.json"))
    with pytest.raises(UserError, match="loss is nan.*last good checkpoint"):
        train_run(config, data / "set/train.csv", None, copy, resume=True, progress=False, log=lambda s: None,
                  epochs=2)
    assert (copy / "last.safetensors").read_bytes() == before


def test_the_best_epoch_breaks_ties_of_validation_accuracy_by_validation_loss():
    from zoomnet.runs import epoch_score

    rows = [{"epoch": 1, "val_accuracy": 1.0, "val_loss": 0.6, "train_accuracy": 0.6},
            {"epoch": 2, "val_accuracy": 1.0, "val_loss": 0.05, "train_accuracy": 1.0},
            {"epoch": 3, "val_accuracy": 0.75, "val_loss": 0.01, "train_accuracy": 1.0}]
    assert max(rows, key=epoch_score)["epoch"] == 2
    older = [{k: v for k, v in r.items() if k != "val_loss"} for r in rows]  # runs from before the loss was kept
    assert max(older, key=epoch_score)["epoch"] == 1
    no_val = [{"epoch": 1, "train_accuracy": 0.9}, {"epoch": 2, "train_accuracy": 0.9}, {"epoch": 3, "train_accuracy": 0.8}]
    assert max(no_val, key=epoch_score)["epoch"] == 1


def test_train_ends_with_the_run_the_best_epoch_and_what_to_type_next(data, tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["train", "--config", str(data / "tiny.json"), "--train", str(data / "set/train.csv"),
            "--val", str(data / "set/val.csv"), "--out", str(out), "--quiet", "--device", "cpu"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert f"run: {out} (best.safetensors from epoch 1: val accuracy" in text
    assert f"next: zoomnet evaluate {out} {data / 'set/test.csv'}" in text and "zoomnet predict" in text
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert all(0.0 <= float(r["val_loss"]) < 50 for r in rows)  # the tie-break of best.safetensors
    # TensorBoard is an extra: logged where it is installed, a one-line hint where it is not
    import importlib.util

    code = main([*argv[:-5], "--out", str(tmp_path / "tb"), "--quiet", "--tensorboard"])
    if importlib.util.find_spec("tensorboard") is None:
        assert code == 2 and "pip install tensorboard" in capsys.readouterr().err
    else:
        assert code == 0 and list((tmp_path / "tb/tensorboard").glob("events.*"))


LEGACY = Path(__file__).with_name("data") / "run-0.1.0"


# deterministic p(negative) of release 0.1.0 on the test images of `make-data tiny-objects
# --num 20 --size 128` (the `data` fixture), printed by `zoomnet predict --deterministic` then
LEGACY_P_NEGATIVE = {
    "images/tiny_00001.png": 0.5952922105789185,
    "images/tiny_00012.png": 0.4148551821708679,
    "images/tiny_00013.png": 0.5878325700759888,
    "images/tiny_00018.png": 0.4778814911842346,
}


def test_a_legacy_run_folder_predicts_what_it_predicted(data, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(LEGACY, run)
    assert main(["predict", str(run), str(data / "set/test.csv"), "--deterministic", "--quiet"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"path"')]
    assert {r["path"] for r in rows} == set(LEGACY_P_NEGATIVE)
    for r in rows:
        assert r["probabilities"]["negative"] == pytest.approx(LEGACY_P_NEGATIVE[r["path"]], abs=1e-5)


def test_a_legacy_run_folder_evaluates_and_resumes(data, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(LEGACY, run)
    assert main(["evaluate", str(run), str(data / "set/test.csv"), "--deterministic", "--quiet"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["accuracy"] == 1.0 and metrics["images"] == 4
    config = Path(__file__).with_name("data") / "run-0.1.0.json"
    code = main(["train", "--config", str(config), "--train", str(data / "set/train.csv"), "--val",
                 str(data / "set/val.csv"), "--out", str(run), "--resume", "--epochs", "3", "--quiet",
                 "--device", "cpu"])
    assert code == 0
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]  # epochs 1-2 kept, 3 trained
    legacy = next(csv.DictReader(open(LEGACY / "metrics.csv")))
    assert {k: rows[0][k] for k in legacy} == legacy  # columns added since stay empty for the old epochs
    assert rows[0]["bytes_read"] == "" and int(rows[2]["pixels_decoded"]) > 0


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".lock"}


@pytest.mark.slow  # one short training per failing write
def test_a_full_disk_at_any_write_of_an_epoch_end_keeps_the_epoch_before(data, tmp_path, monkeypatch, capsys):
    """ENOSPC (then EFBIG and EIO) at each write of epoch 2's end: one line names the folder,
    the cause and the epoch of the last checkpoint; that checkpoint is whole (epoch 1's bit
    for bit, or epoch 2's where it got in before the failure), with the optimiser state of
    its epoch; no temporary file is left, and the run resumes to its end."""
    import errno

    from zoomnet.checkpoint import load_checkpoint

    argv = ["train", "--config", str(data / "tiny.json"), "--train", str(data / "set/train.csv"), "--quiet",
            "--device", "cpu", "--set", "model.train_samples=8"]
    real_fsync = os.fsync
    counted = [0]

    def counting(fd):
        counted[0] += 1
        return real_fsync(fd)

    base = tmp_path / "base"
    assert main([*argv, "--out", str(base), "--epochs", "1"]) == 0
    monkeypatch.setattr(os, "fsync", counting)
    probe = tmp_path / "probe"
    shutil.copytree(base, probe)
    assert main([*argv, "--out", str(probe), "--epochs", "2", "--resume"]) == 0
    writes = counted[0]
    assert writes >= 4  # optimiser state, last checkpoint and its copy, metrics (and best)
    causes = [errno.ENOSPC, errno.EFBIG, errno.EIO]
    for k in range(1, writes + 1):
        out = tmp_path / f"full{k}"
        shutil.copytree(base, out)
        before = _snapshot(out)
        calls = [0]

        def failing(fd, k=k):
            calls[0] += 1
            if calls[0] == k:
                code = causes[k % len(causes)]
                raise OSError(code, os.strerror(code))
            return real_fsync(fd)

        monkeypatch.setattr(os, "fsync", failing)
        capsys.readouterr()
        assert main([*argv, "--out", str(out), "--epochs", "2", "--resume"]) == 2
        err = capsys.readouterr().err.strip()
        cause = os.strerror(causes[k % len(causes)])
        assert len(err.splitlines()) == 1 and str(out) in err and cause in err and "--resume" in err, err
        monkeypatch.setattr(os, "fsync", real_fsync)
        after = _snapshot(out)
        assert after["config.json"] == before["config.json"]
        _, state = load_checkpoint(out / "last.safetensors")
        assert f"of epoch {state['epoch']}" in err
        if state["epoch"] == 1:  # the failure came before the new checkpoint: epoch 1's files, bit for bit
            assert after["last.safetensors"] == before["last.safetensors"] and after["metrics.csv"] == before["metrics.csv"]
            assert before["last.optim.pt"] in (after.get("last.optim.pt"), after.get("prev.optim.pt")), k
        else:
            assert state["epoch"] == 2 and "last.optim.pt" in after
        assert not list(out.glob(".*.tmp")), k
        assert main([*argv, "--out", str(out), "--epochs", "2", "--resume"]) == 0, k
        assert len((out / "metrics.csv").read_text().strip().splitlines()) == 3


def test_an_out_folder_that_cannot_be_written_is_refused_before_training(data, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = main(["train", "--config", str(data / "tiny.json"), "--train", str(data / "set/train.csv"),
                 "--out", str(blocker / "run"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--out" in err and "is a file, not a folder" in err


def test_a_second_process_training_into_the_same_folder_is_refused(data, run, tmp_path, capsys):
    """The run's lock: held, a second training is refused in one line; a process killed while
    holding it leaves none behind (the system releases it)."""
    from zoomnet.runs.folder import run_lock

    out = tmp_path / "run"
    shutil.copytree(run, out)
    argv = ["train", "--config", str(data / "tiny.json"), "--train", str(data / "set/train.csv"), "--out", str(out),
            "--quiet", "--resume", "--epochs", "2"]
    with run_lock(out):
        assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another process is training into this folder" in err
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from zoomnet.runs.folder import run_lock\nwith run_lock(Path(sys.argv[1])):\n"
                               "    print('held', flush=True); time.sleep(60)", str(out)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()  # SIGKILL: no cleanup runs in the holder
    holder.wait()
    assert main(argv) == 0


def test_ctrl_c_during_training_says_how_to_resume(data, run, tmp_path, monkeypatch, capsys):
    import zoomnet.runs.training as training

    out = tmp_path / "a run with spaces"
    shutil.copytree(run, out)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "fit", interrupted)
    argv = ["train", "--config", str(data / "tiny.json"), "--train", str(data / "set/train.csv"), "--out", str(out),
            "--quiet", "--resume", "--epochs", "3"]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "interrupted" in err
    assert f"'{out}'" in err and "--resume" in err, err  # a path with spaces, quoted
    monkeypatch.undo()
    command = shlex.split(err.split("continue with: ", 1)[1])
    assert command[0] == "zoomnet" and main(command[1:]) == 0  # the printed command resumes


@pytest.mark.slow  # a training in a child process
def test_sigterm_during_training_leaves_a_run_that_resumes(data, tmp_path):
    out = tmp_path / "run"
    cmd = _train_cmd(data, out, 40)
    child = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "last.safetensors").is_file() and time.time() < deadline:
        time.sleep(0.2)
    assert (out / "last.safetensors").is_file()
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 143, err
    line = [ln for ln in err.splitlines() if ln.startswith("zoomnet: terminated")]
    assert len(line) == 1 and "continue with:" in line[0], err
    resumed = subprocess.run([*cmd, "--resume", "--epochs", "2"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr


def test_out_of_memory_in_training_names_what_to_lower(data, tmp_path, monkeypatch, capsys):
    import zoomnet.train as train

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "training_step", oom)
    code = main(["train", "--config", str(data / "tiny.json"), "--train", str(data / "set/train.csv"),
                 "--out", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "out of memory" in err and "train.batch_size" in err and "model.train_samples" in err


def test_a_validation_manifest_that_is_the_training_one_gets_a_warning(data, tmp_path, capsys):
    code = main(["train", "--config", str(data / "tiny.json"), "--train", str(data / "set/train.csv"),
                 "--val", str(data / "set/train.csv"), "--out", str(tmp_path / "r"), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert [ln for ln in out.splitlines() if ln.startswith("warning:") and "shares" in ln and "held-out" in ln]


def test_evaluate_without_masks_reports_no_hit_rate(data, run, tmp_path, capsys):
    rows = (data / "set/test.csv").read_text().splitlines()
    plain = tmp_path / "plain.csv"
    for line in rows[1:]:
        shutil.copy(data / "set" / line.split(",")[0], tmp_path)
    plain.write_text("path,label\n" + "\n".join(f"{Path(r.split(',')[0]).name},{r.split(',')[1]}" for r in rows[1:]))
    assert main(["evaluate", str(run), str(plain), "--quiet"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["hit_rate"] is None and metrics["images_hit"] is None


def test_the_three_level_slide_preset_trains_on_the_slide_writers_cohort_with_masks(tmp_path, capsys):
    """A small cohort of ``make-data slides`` (tissue on glass, JPEG pyramids, masks at 1/16)
    trains with ``camelyon16-k3`` and its masks through the CLI: the masks' term and hit
    rate are reported, and each epoch's reads are a small share of the slides' pixels."""
    data = tmp_path / "slides"
    assert main(["make-data", "slides", str(data), "--num", "6", "--size", "4000", "--tile", "256", "--seed", "1"]) == 0
    out = tmp_path / "run"
    assert main(["train", "--config", "camelyon16-k3", "--train", str(data / "train.csv"), "--val",
                 str(data / "val.csv"), "--out", str(out), "--epochs", "2", "--quiet", "--device", "cpu",
                 "--set", "train.mask_weight=1", "model.samples=12"]) == 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 2
    for r in rows:
        assert float(r["loss_mask"]) > 0 and 0 <= float(r["train_hit_rate"]) <= 1
        assert int(r["pixels_decoded"]) > 0 and int(r["bytes_read"]) > 0
    assert 0 < float(rows[0]["decoded_share"]) < 1  # level 0 is read only where the draws went
    capsys.readouterr()
    assert main(["evaluate", str(out), str(data / "test.csv"), "--quiet"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["images"] == 2 and "hit_rate" in metrics
