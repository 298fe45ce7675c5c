"""``train.device``: resolution and errors on any machine; on a CUDA machine, the GPU paths
(joint steps, TP inner loops, evaluation, the CLI, torchrun ranks sharing one GPU) against
the same computation on the CPU."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import (
    ENV,
    REPO,
    tiny_tp_args,
    torchrun_cmd,
    tp_batch,
    tp_config,
    tp_setup,
    uneven_batch,
)

from dist_tp.algorithms.joint import JointStepper
from dist_tp.algorithms.tp.lanes import InnerLoop
from dist_tp.config import ConfigError, load_config
from dist_tp.core.device import module_device, resolve_device, to_device, warn_if_oversubscribed
from dist_tp.evaluation.evaluate import evaluate
from dist_tp.models import build_model
from dist_tp.parallel.distributed import choose_backend

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
TINY = REPO / "configs" / "tiny.yaml"


def test_device_spec_is_checked_and_named():
    with pytest.raises(ConfigError, match="train.device must be auto, cpu, cuda or cuda:N"):
        load_config(TINY, ["train.device=gpu"])
    assert load_config(TINY, ["train.device=cuda:1"]).train.device == "cuda:1"
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_busy_machine_gets_a_thread_warning(monkeypatch, caplog):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))  # one core taken
        assert warn_if_oversubscribed()
        assert "train.threads=1" in caplog.text
        caplog.clear()
        monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))  # idle
        assert not warn_if_oversubscribed() and not caplog.text
        torch.set_num_threads(1)  # one thread never oversubscribes
        monkeypatch.setattr(os, "getloadavg", lambda: (5.0, 5.0, 5.0))
        assert not warn_if_oversubscribed()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(CUDA, reason="checks the behaviour without CUDA")
def test_without_cuda_auto_is_the_cpu_and_cuda_is_a_clear_error():
    assert resolve_device("auto") == torch.device("cpu")
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match=f"train.device={spec}: CUDA is not available"):
            resolve_device(spec)


def test_backend_choice(monkeypatch):
    monkeypatch.setenv("DIST_TP_BACKEND", "gloo")
    assert choose_backend() == "gloo"
    monkeypatch.setenv("DIST_TP_BACKEND", "mpi")
    with pytest.raises(ValueError, match="DIST_TP_BACKEND must be nccl or gloo"):
        choose_backend()
    monkeypatch.delenv("DIST_TP_BACKEND")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(torch.cuda.device_count() + 1))
    assert choose_backend() == "gloo"  # more local ranks than GPUs (or none): gloo


def test_cpu_module_device_and_to_device():
    model = torch.nn.Linear(2, 2)
    assert module_device(model) == torch.device("cpu")
    assert module_device(torch.nn.Identity()) == torch.device("cpu")
    x = np.arange(4)
    assert torch.equal(to_device(x, torch.device("cpu")), torch.arange(4))


# ---------------------------------------------------------------- on a GPU


@needs_cuda
@pytest.mark.parametrize(
    "backbone,loss", [("sasrec", "bce"), ("gru4rec", "ce"), ("caser", "bce"), ("caser", "ce")]
)
def test_cuda_inner_loop_equals_cpu(backbone, loss, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # Caser's convolutions
    cfg = tp_config(backbone, loss)
    model, disc = tp_setup(cfg)
    if backbone == "caser":
        batch = tp_batch(cfg, lanes=4)
    else:
        batch = uneven_batch(cfg)
    kw = dict(loss=loss, inner_lr=cfg.tp.inner_lr, lambda_adv=cfg.tp.lambda_adv)
    cpu = InnerLoop(model, disc, **kw).pseudo_gradients(copy.deepcopy(batch))
    gpu_model, gpu_disc = copy.deepcopy(model).cuda(), copy.deepcopy(disc).cuda()
    gpu = InnerLoop(gpu_model, gpu_disc, **kw).pseudo_gradients(batch)
    for which in (0, 1):
        for name, g in cpu[which].items():
            assert gpu[which][name].is_cuda
            torch.testing.assert_close(gpu[which][name].cpu(), g, atol=1e-4, rtol=1e-4)
    assert gpu[2].pred_loss == pytest.approx(cpu[2].pred_loss, rel=1e-4)
    assert not gpu[2].disc_logits.is_cuda


@needs_cuda
@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec"])
def test_cuda_inner_loop_at_full_size_is_finite_and_equals_cpu(prepared, backbone):
    """The shipped model size (d = 64, L = 50) on real users, 4 lanes × k = 2 × K = 32: the
    fused GPU attention kernels once gave NaNs here under vmap."""
    from dist_tp.algorithms.tp.sampler import TaskSampler
    from dist_tp.data.stream import load_sequences, open_prepared

    path = prepared("ml-100k")
    cfg = load_config(
        REPO / "configs" / "ml-100k" / f"{backbone}-tp.yaml",
        [f"data.path={path}", "model.dropout=0.0", "tp.lanes=4"],
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, open_prepared(path).num_items)
    from dist_tp.algorithms.tp.discriminator import Discriminator

    disc = Discriminator(cfg.model.dim, cfg.tp.disc_hidden)
    sampler = TaskSampler(load_sequences(path, roles=["existing"]), max_len=cfg.model.max_len)
    batch = sampler.sample(
        [np.random.default_rng([0, m]) for m in range(4)],
        k=cfg.tp.k,
        users_per_step=1,
        inner_batch=cfg.tp.inner_batch,
        num_negatives=0,
        num_items=model.num_items,
        all_positions=True,
    )
    kw = dict(loss="ce", inner_lr=cfg.tp.inner_lr, lambda_adv=cfg.tp.lambda_adv)
    cpu = InnerLoop(model, disc, **kw).pseudo_gradients(copy.deepcopy(batch))
    gpu = InnerLoop(copy.deepcopy(model).cuda(), copy.deepcopy(disc).cuda(), **kw)
    grads = gpu.pseudo_gradients(batch)[0]
    for name, g in cpu[0].items():
        assert torch.isfinite(grads[name]).all(), name
        torch.testing.assert_close(grads[name].cpu(), g, atol=1e-4, rtol=1e-3)


@needs_cuda
@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_cuda_joint_epoch_and_evaluation_equal_cpu(prepared, loss):
    path = prepared("ml-100k")
    cfg = load_config(TINY, [f"data.path={path}", "model.dropout=0.0", f"train.loss={loss}"])
    torch.manual_seed(0)
    from dist_tp.data.stream import open_prepared

    model = build_model(cfg.model, open_prepared(path).num_items)
    gpu_model = copy.deepcopy(model).cuda()
    cpu_rec = JointStepper(model, cfg).run_epoch(0)
    gpu_rec = JointStepper(gpu_model, cfg).run_epoch(0)
    assert gpu_rec["windows"] == cpu_rec["windows"] and gpu_rec["steps"] == cpu_rec["steps"]
    if loss == "ce":  # bce draws its negatives from the device's own generator
        assert gpu_rec["loss"] == pytest.approx(cpu_rec["loss"], rel=1e-3)
        for p, q in zip(model.parameters(), gpu_model.parameters()):
            torch.testing.assert_close(q.detach().cpu(), p.detach(), atol=1e-2, rtol=1e-2)
    # the same weights evaluated on either device: the same metrics (up to near-ties)
    gpu_model.load_state_dict(model.state_dict())
    kw = dict(max_len=cfg.model.max_len, ks=[1, 10])
    on_cpu, on_gpu = evaluate(model, path, **kw), evaluate(gpu_model, path, **kw)
    for split in ("validation", "test"):
        for role, groups in on_cpu[split].items():
            for key, value in groups["all"].items():
                assert on_gpu[split][role]["all"][key] == pytest.approx(value, abs=5e-3)


def _bf16_against_fp32(path: str, name: str, loss: str, device: str) -> tuple[dict, dict, list]:
    """The first 40 joint steps (10K windows) from the same weights in fp32 and in bf16:
    (fp32, bf16, bf16 params)."""
    from dist_tp.data.stream import open_prepared

    records, params = {}, None
    for precision in ("fp32", "bf16"):
        cfg = load_config(
            TINY,
            [f"data.path={path}", f"model.name={name}", f"train.loss={loss}",
             f"train.precision={precision}", "model.dropout=0.0", "train.epoch_steps=40"],
        )  # fmt: skip
        torch.manual_seed(0)
        model = build_model(cfg.model, open_prepared(path).num_items).to(device)
        records[precision] = JointStepper(model, cfg).run_epoch(0)
        params = list(model.parameters())
    return records["fp32"], records["bf16"], params


@pytest.mark.parametrize("name", ["sasrec", "gru4rec", "caser"])
def test_bf16_joint_epoch_tracks_fp32_on_the_cpu(prepared, name):
    """CPU autocast runs the same code path as a GPU's (where bf16 is meant to pay off)."""
    fp32, bf16, params = _bf16_against_fp32(prepared("ml-100k"), name, "ce", "cpu")
    assert bf16["windows"] == fp32["windows"] and bf16["steps"] == fp32["steps"]
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=5e-3)
    assert bf16["loss"] != fp32["loss"]  # bf16 did run: not bit-identical
    assert all(p.dtype == torch.float32 for p in params)  # master weights stay float32


def test_bf16_is_refused_where_it_does_not_apply():
    with pytest.raises(ConfigError, match="TP inner loops run in float32"):
        load_config(TINY, ["train.method=tp", "train.precision=bf16"])
    with pytest.raises(ConfigError, match="enable bf16 in the DeepSpeed JSON"):
        load_config(
            TINY, ["train.engine=deepspeed", "train.deepspeed=x.json", "train.precision=bf16"]
        )
    with pytest.raises(ConfigError, match="train.precision must be fp32 or bf16"):
        load_config(TINY, ["train.precision=fp16"])


@needs_cuda
@pytest.mark.parametrize("name", ["sasrec", "gru4rec", "caser"])
def test_cuda_bf16_joint_epoch_tracks_fp32(prepared, name):
    fp32, bf16, params = _bf16_against_fp32(prepared("ml-100k"), name, "ce", "cuda")
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=5e-3)
    assert all(p.dtype == torch.float32 and p.is_cuda for p in params)


def _run_cli(args: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    res = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@needs_cuda
@pytest.mark.parametrize("method", ["joint", "tp"])
def test_cuda_cli_run_evaluates_the_same_on_the_cpu(prepared, tmp_path, method):
    path, out = prepared("ml-100k"), tmp_path / method
    args = tiny_tp_args(path, "train.device=cuda", "track.enabled=false", "train.epochs=1")
    args[args.index("train.method=tp")] = f"train.method={method}"
    _run_cli([sys.executable, *args, "--output", str(out)], ENV)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["existing"]["all"]["users"] == 754
    # the checkpoint holds CPU-loadable tensors: re-evaluate on a machine view without CUDA
    cpu_env = {**ENV, "CUDA_VISIBLE_DEVICES": ""}
    _run_cli([sys.executable, "-m", "dist_tp", "evaluate", str(out)], cpu_env)
    again = json.loads((out / "metrics.json").read_text())
    for role in ("existing", "new"):
        for key, value in metrics[role]["all"].items():
            assert again[role]["all"][key] == pytest.approx(value, abs=5e-3)


@needs_cuda
def test_two_torchrun_ranks_share_one_gpu(prepared, tmp_path):
    """More local ranks than GPUs: gloo, both ranks on the GPU, replicas checked each step."""
    path, out = prepared("ml-100k"), tmp_path / "run"
    args = tiny_tp_args(path, "train.epochs=1", "track.enabled=false", "tp.check_replicas_every=1")
    env = {k: v for k, v in ENV.items() if k != "DIST_TP_BACKEND"}
    if torch.cuda.device_count() > 1:
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    res = _run_cli([*torchrun_cmd(*args, "--output", str(out), nproc=2)], env)
    assert "(gloo)" in res.stdout + res.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["existing"]["all"]["users"] == 754


@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs 2 GPUs (one per rank)")
def test_nccl_two_ranks(prepared, tmp_path):
    path, out = prepared("ml-100k"), tmp_path / "run"
    args = tiny_tp_args(path, "train.epochs=1", "track.enabled=false", "tp.compress=bf16")
    res = _run_cli([*torchrun_cmd(*args, "--output", str(out), nproc=2)], ENV)
    assert "(nccl)" in res.stdout + res.stderr
    assert json.loads((out / "metrics.json").read_text())["existing"]["all"]["users"] == 754
