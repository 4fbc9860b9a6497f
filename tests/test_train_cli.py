"""heloco-peer train / eval end to end: falling loss, a loadable model, resume, clear errors."""
import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from heloco_p2p.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("run") / "de"
    res = CliRunner().invoke(main, ["train", "--config", "configs/tiny.yaml", "--region", "de", "--max-steps", "60",
                                    "--out", str(out), "--eval-every", "30", "--eval-regions", "de,fr", "--no-progress",
                                    "--threads", "2"])
    assert res.exit_code == 0, res.output
    return out, res.output


@pytest.mark.slow
def test_train_logs_falling_loss_and_saves_a_loadable_model(trained):
    out, output = trained
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0] - 1.0
    final = records[-1]
    assert set(final["val_loss_per_language"]) == {"de", "fr"}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == 920192
    assert "validation loss (de)" in output


@pytest.mark.slow
def test_eval_command_reports_per_language(trained):
    out, _ = trained
    res = CliRunner().invoke(main, ["eval", "--model", str(out), "--regions", "de,fr", "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert result["per_language"]["de"] == pytest.approx(final["val_loss_per_language"]["de"], rel=1e-5)
    assert result["mean"] == pytest.approx(sum(result["per_language"].values()) / 2)


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint(trained):
    out, _ = trained
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
    assert state["trainer"]["step"] == 60
    res = CliRunner().invoke(main, ["train", "--resume", str(out), "--max-steps", "70", "--eval-regions", "de",
                                    "--no-progress"])
    assert res.exit_code == 0, res.output
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 70 and 61 not in steps and 70 in steps


@pytest.mark.slow
def test_train_refuses_to_overwrite_a_run(trained):
    out, _ = trained
    res = CliRunner().invoke(main, ["train", "--config", "configs/tiny.yaml", "--region", "de", "--max-steps", "5",
                                    "--out", str(out)])
    assert res.exit_code == 2 and "--resume" in res.output


def test_train_with_a_bad_config_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((open("configs/tiny.yaml").read()).replace("batch_size: 16", "batch_size: 0"))
    res = CliRunner().invoke(main, ["train", "--config", str(bad), "--region", "de", "--max-steps", "5",
                                    "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "inner.batch_size" in res.output


def test_train_with_an_unknown_region_is_clear(tmp_path):
    res = CliRunner().invoke(main, ["train", "--config", "configs/tiny.yaml", "--region", "xx", "--max-steps", "5",
                                    "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "xx" in res.output
