"""Files a run writes: whole or absent, with the umask's permissions, checked on load, and no
temp-file clutter left by a killed writer; a failed write is one error line."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

import dist_tp.core.files as files
from dist_tp.cli import main
from dist_tp.config import ConfigError
from dist_tp.core.files import WriteError, load_checkpoint, save_checkpoint, write_json

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _state() -> dict:
    return {"config": {}, "model": {"w": torch.arange(4096, dtype=torch.float32) * 1.25}}


def test_a_damaged_checkpoint_is_an_error_not_another_model(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _state())
    torch.testing.assert_close(load_checkpoint(path)["model"]["w"], _state()["model"]["w"])
    data = bytearray(path.read_bytes())
    at = data.find(_state()["model"]["w"][1000:1016].numpy().tobytes())
    assert at > 0
    data[at + 5] ^= 0x10  # one flipped bit inside the tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="damaged|not a dist_tp checkpoint"):
        load_checkpoint(path)


def test_a_checkpoint_without_a_checksum_still_loads(tmp_path):
    torch.save(_state(), tmp_path / "old.pt")  # as written before checksums
    assert set(load_checkpoint(tmp_path / "old.pt")) == {"config", "model"}


def test_an_unsafe_checkpoint_error_gives_no_advice_to_load_it_unsafely(tmp_path):
    torch.save({"config": {}, "thing": Path("x")}, tmp_path / "evil.pt")
    with pytest.raises(ConfigError) as info:
        load_checkpoint(tmp_path / "evil.pt")
    assert "weights_only" not in str(info.value) and "not a dist_tp checkpoint" in str(info.value)


def test_files_follow_the_umask(tmp_path):
    write_json(tmp_path / "a.json", {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~mask  # not 0600


def test_a_failed_write_is_one_error_and_leaves_no_temp_file(tmp_path, monkeypatch):
    def full_disk(obj, f):
        f.write(b"partial")
        raise RuntimeError(
            "[enforce fail at inline_container.cc:626] . unexpected pos 8448 vs 8342"
        )

    monkeypatch.setattr(files.torch, "save", full_disk)
    with pytest.raises(WriteError, match=r"last.pt: cannot write"):
        save_checkpoint(tmp_path / "last.pt", _state())
    assert list(tmp_path.iterdir()) == []


def test_training_onto_a_full_disk_ends_with_one_error_line(
    prepared, tmp_path, monkeypatch, capsys
):
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.torch, "save", no_space)
    args = ["train", str(TINY), f"data.path={prepared('ml-100k')}", "train.epochs=1"]
    assert main([*args, "track.enabled=false", "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and ".pt: cannot write" in err[0]
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_a_run_removes_the_temp_files_of_a_killed_writer(prepared, tmp_path):
    from dist_tp.config import load_config
    from dist_tp.run.loop import run_training

    out = tmp_path / "run"
    (out / "mlflow").mkdir(parents=True)
    for name in (".last.pt.k1x2.tmp", ".history.json.abc.tmp", "mlflow/.state.json.q.tmp"):
        (out / name).write_bytes(b"half")
    cfg = load_config(TINY, [f"data.path={prepared('ml-100k')}", "train.epochs=1"])
    run_training(cfg, out)
    assert not list(out.rglob("*.tmp"))
