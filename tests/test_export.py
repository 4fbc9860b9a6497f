"""``heloco-peer export`` and ``heloco-peer generate`` on a checkpoint written by a real coordinator."""
import json
import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner

from heloco_p2p.checkpoint import seal
from heloco_p2p.cli import main
from heloco_p2p.data import load_tokenizer, tokenizer_digest
from heloco_p2p.local import trainable_params
from heloco_p2p.tools.launcher import write_test_config

from fakes import lone_founder_run


def invoke(*args: str):
    return CliRunner().invoke(main, [*args, "--log-level", "WARNING"], catch_exceptions=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The --checkpoint-dir of a founder that committed two rounds and left (it checkpoints on leaving)."""
    tmp = tmp_path_factory.mktemp("export-run")
    return lone_founder_run(tmp, write_test_config(tmp / "cfg.yaml"), "exp")


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export-out") / "model"
    result = invoke("export", "--checkpoint", str(checkpoint), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "at version 2 (term 1" in result.stdout
    return out


def copy_checkpoint(checkpoint, tmp_path):
    return shutil.copytree(checkpoint, tmp_path / "ckpt")


@pytest.mark.slow
def test_exported_model_loads_with_the_checkpoint_parameters_bitwise(checkpoint, exported):
    from transformers import AutoModelForCausalLM

    state = torch.load(checkpoint / "coordinator.pt", weights_only=True)
    theta = state["commit_state"]["engine"]["params"]
    model = AutoModelForCausalLM.from_pretrained(exported)
    loaded = trainable_params(model)
    assert [n for n, p in model.named_parameters()] == state["param_names"]
    assert len(loaded) == len(theta)
    assert all(p.dtype == t.dtype and torch.equal(p.detach(), t) for p, t in zip(loaded, theta))
    meta = json.loads((exported / "heloco_export.json").read_text())
    assert (meta["run_id"], meta["version"], meta["term"], meta["config_digest"]) == (
        state["run_id"], 2, 1, state["config_digest"])
    original = load_tokenizer(str(checkpoint / "tokenizer.json"))
    assert tokenizer_digest(load_tokenizer(str(exported))) == tokenizer_digest(original) == meta["tokenizer_digest"]


@pytest.mark.slow
def test_generate_prints_text_and_the_same_seed_gives_the_same_text(exported):
    args = ("generate", "--model", str(exported), "--prompt", "Am Anfang", "--max-new-tokens", "20")
    first, again, other = invoke(*args), invoke(*args), invoke(*args, "--seed", "1")
    assert first.exit_code == 0, first.output
    assert first.stdout.startswith("Am Anfang") and len(first.stdout.strip()) > len("Am Anfang")
    assert again.stdout == first.stdout
    assert other.stdout != first.stdout
    two = invoke(*args, "--num-samples", "2")
    assert two.stdout.count("--- sample") == 2


@pytest.mark.slow
def test_export_refuses_a_checkpoint_written_for_another_config(checkpoint, tmp_path):
    ckpt = copy_checkpoint(checkpoint, tmp_path)
    tree = yaml.safe_load((ckpt / "config.yaml").read_text())
    tree["inner"]["lr"] *= 2
    (ckpt / "config.yaml").write_text(yaml.safe_dump(tree))
    result = invoke("export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "checkpoint was written for another config" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_export_refuses_a_corrupted_checkpoint(checkpoint, tmp_path):
    ckpt = copy_checkpoint(checkpoint, tmp_path)
    data = (ckpt / "coordinator.pt").read_bytes()
    (ckpt / "coordinator.pt").write_bytes(data[: len(data) // 2])
    result = invoke("export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "cannot read the checkpoint" in result.stderr and "corrupted" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_export_refuses_parameters_that_do_not_match_the_model(checkpoint, tmp_path):
    ckpt = copy_checkpoint(checkpoint, tmp_path)
    state = torch.load(ckpt / "coordinator.pt", weights_only=True)
    params = state["commit_state"]["engine"]["params"]
    params[1] = params[1][:, :-1].clone()  # one column short
    torch.save(seal(state), ckpt / "coordinator.pt")  # sealed again: the shape check is under test here, not the digest
    result = invoke("export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert f"parameter {state['param_names'][1]} has shape" in result.stderr


def test_export_says_what_a_checkpoint_dir_holds(tmp_path):
    result = invoke("export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "no coordinator.pt, config.yaml, tokenizer.json there" in result.stderr


@pytest.mark.slow
def test_export_does_not_overwrite_a_directory_that_is_not_an_export(checkpoint, exported, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = invoke("export", "--checkpoint", str(checkpoint), "--out", str(tmp_path))
    assert result.exit_code == 2 and "is not an earlier export" in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"
    earlier = shutil.copytree(exported, tmp_path / "earlier")
    (earlier / "stale.bin").write_bytes(b"x")
    again = invoke("export", "--checkpoint", str(checkpoint), "--out", str(earlier))  # an earlier export: replaced
    assert again.exit_code == 0, again.output
    assert not (earlier / "stale.bin").exists() and (earlier / "model.safetensors").exists()
