"""zoomnet.runtime: the allocator settings, several processes under torch.distributed, the doctor's report."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from zoomnet.cli import main

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only"
)


def _ddp_worker(rank: int, world: int, root: str, port: int) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from zoomnet.config import load_config
    from zoomnet.data.manifest import load_examples
    from zoomnet.model import build_model
    from zoomnet.train import make_optimizer, train_epoch

    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    config = load_config(str(Path(root) / "tiny.json"))
    torch.manual_seed(0)  # the same initial weights on both ranks (DDP also broadcasts them)
    model = build_model(config.model)
    wrapped = DistributedDataParallel(model)
    examples = load_examples(Path(root) / "set/train.csv", ["negative", "positive"])
    optimizer = make_optimizer(model, config.train)
    generator = torch.Generator().manual_seed(rank)  # different data and draws per rank
    train_epoch(wrapped, examples, config.train, optimizer, 1, generator, progress=False, rank=rank, world=world)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, Path(root) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # an end-to-end training: `make test-slow`, run by .ci/run
def test_ddp_two_cpu_processes_keep_identical_weights(data):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, str(data), port), nprocs=2, join=True)
    a = torch.load(data / "rank0.pt", weights_only=True)
    b = torch.load(data / "rank1.pt", weights_only=True)
    torch.manual_seed(0)
    from zoomnet.config import load_config
    from zoomnet.model import build_model

    initial = build_model(load_config(str(data / "tiny.json")).model).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # identical on both ranks ...
    assert any(not torch.equal(a[k], initial[k]) for k in a)  # ... and trained


def test_doctor_reports_what_a_bug_report_needs(capsys):

    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    for key in ("zoomnet", "python", "torch", "device", "tifffile", "TIFF codecs", "OpenSlide", "presets"):
        assert any(line.startswith(key) for line in text.splitlines()), key
    assert "megapixel-mnist" in text and "tiny-objects" in text




_PROGRAM = """
import resource, torch
from zoomnet.runtime.allocator import reuse_freed_memory
applied = reuse_freed_memory()
torch.empty(16 << 20).fill_(1.0)  # 64 MB, above any mmap threshold glibc picks by itself
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(15 << 20).fill_(1.0)  # 60 MB: fits the freed block (one of the same size may not: alignment)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(setting: str | None, program: str = _PROGRAM) -> tuple[str, int]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("ZOOMNET_MALLOC", None)
    if setting is not None:
        env["ZOOMNET_MALLOC"] = setting
    out = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@glibc_only
def test_freed_blocks_are_reused_where_asked_and_only_there():
    pages = (60 << 20) // os.sysconf("SC_PAGE_SIZE")  # 15,360 with 4 KB pages
    if pages < 10_000:
        pytest.skip("pages this large leave too few faults to tell the two cases apart")
    applied, faults = _faults("1")
    assert applied == "True"
    assert faults < 1_000  # in the block the first tensor left: no new pages
    for setting in (None, "0"):  # the default leaves glibc's allocator as it comes
        applied, faults = _faults(setting)
        assert applied == "False"
        assert faults > 0.9 * pages  # mapped afresh, page by page


_STEADY_PROGRAM = """
import resource, torch
from zoomnet.runtime.allocator import settle_heap
applied = settle_heap()
torch.empty(5 << 20).fill_(1.0)  # 20 MB: mapped afresh by glibc as it comes, from the heap when settled
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(19 << 18).fill_(1.0)  # 19 MB, in the freed block
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@glibc_only
def test_steady_thresholds_keep_blocks_below_32_mb_for_the_next_call():
    """What every command sets (zoomnet.runtime.allocator.settle_heap): a freed block of 20 MB
    serves the next call without new pages; ZOOMNET_MALLOC=0 leaves glibc as it comes."""
    pages = (19 << 20) // os.sysconf("SC_PAGE_SIZE")  # 4,864 with 4 KB pages
    if pages < 3_000:
        pytest.skip("pages this large leave too few faults to tell the two cases apart")
    applied, faults = _faults(None, _STEADY_PROGRAM)
    assert applied == "True" and faults < 500
    applied, faults = _faults("0", _STEADY_PROGRAM)
    assert applied == "False" and faults > 0.9 * pages


def _gradient_worker(rank: int, world: int, root: str, port: int) -> None:
    """One process of two: its half of four images through DistributedDataParallel, the
    gradients of a batch-mean loss (deterministic draws, float64), saved for the parent."""
    import os
    import warnings

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, sources, labels = _gradient_setup()
    wrapped = DistributedDataParallel(model)
    half = slice(rank * 2, rank * 2 + 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _gradient_loss(wrapped, sources[half], labels[half]).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.save({"grads": grads, "warnings": [str(w.message) for w in caught]}, Path(root) / f"grad{rank}.pt")
    dist.destroy_process_group()


def _gradient_setup():
    import numpy as np

    from zoomnet import ArraySource, LevelConfig, ModelConfig
    from zoomnet.model import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(levels=[LevelConfig(0.125, (64, 64)), LevelConfig(0.5, (16, 16), (8, 8))], samples=12,
                      feature_kwargs={"width": 8, "out_dim": 8})
    model = build_model(cfg).double().train()
    rng = np.random.default_rng(3)
    sources = [ArraySource(rng.integers(0, 255, (192, 256, 3), dtype=np.uint8)) for _ in range(4)]
    return model, sources, torch.tensor([0, 1, 1, 0])


def _gradient_loss(model, sources, labels):
    from zoomnet.core import losses

    out = model(sources, deterministic=True)
    return torch.nn.functional.cross_entropy(out.logits, labels) - 1e-3 * losses.entropy_regularizer(out.log_maps)


@pytest.mark.slow  # two processes
def test_two_processes_under_ddp_give_the_gradients_of_one_over_the_combined_batch(tmp_path):
    """gloo, 2 processes, 2 images each, against one process over the 4: the same gradient
    of every parameter (DistributedDataParallel averages the ranks' batch means), and no
    warning from DDP (grad strides and buckets agree)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gradient_worker, args=(2, str(tmp_path), port), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"grad{r}.pt", weights_only=True) for r in (0, 1)]
    model, sources, labels = _gradient_setup()
    _gradient_loss(model, sources, labels).backward()
    whole = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for got in ranks:
        assert got["grads"].keys() == whole.keys()
        for name, grad in whole.items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-9, atol=1e-12, msg=name)
        assert not [w for w in got["warnings"] if "stride" in w.lower()], got["warnings"]
