"""Run configs: every shipped config loads; bad ones fail at load naming the file and the key."""
import hashlib
import json
from pathlib import Path

import pytest
import yaml

from heloco_p2p.config import ConfigError, config_from_dict, load_config

CONFIGS = sorted(p for p in (Path(__file__).parent.parent / "configs").glob("*.yaml") if not p.name.startswith("sim-"))
SIM_CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("sim-*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.vocab_size == cfg.data.vocab_size


@pytest.mark.parametrize("path", SIM_CONFIGS, ids=lambda p: p.name)
def test_shipped_sim_config_loads(path):
    from heloco_p2p.sim import load_sim_config

    cfg = load_sim_config(path)
    assert cfg.experiments and cfg.seeds


def _write(tmp_path, mutate):
    tree = yaml.safe_load((Path(__file__).parent.parent / "configs" / "tiny.yaml").read_text())
    mutate(tree)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


def test_unknown_key_names_file_and_key(tmp_path):
    p = _write(tmp_path, lambda t: t["inner"].update(learning_rate=1e-3))
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert str(p) in msg and "inner.learning_rate" in msg and "unknown key" in msg


def test_wrong_type_names_key_and_value(tmp_path):
    p = _write(tmp_path, lambda t: t["inner"].update(batch_size="sixteen"))
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert "inner.batch_size" in str(err.value) and "sixteen" in str(err.value)


def test_impossible_value_names_key(tmp_path):
    p = _write(tmp_path, lambda t: t["inner"].update(lr=-1.0))
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert "inner.lr" in str(err.value) and "greater than 0" in str(err.value)


def test_literal_lists_allowed_values(tmp_path):
    p = _write(tmp_path, lambda t: t["inner"].update(optimizer="sgd"))
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert "inner.optimizer" in str(err.value) and "adamw8bit" in str(err.value)


def test_cross_field_check(tmp_path):
    p = _write(tmp_path, lambda t: t["data"].update(seq_len=4096))
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert "data.seq_len" in str(err.value)


def test_unknown_outer_optimizer_lists_allowed(tmp_path):
    p = _write(tmp_path, lambda t: t["outer"].update(optimizer="adam"))
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert "outer.optimizer" in msg and "lookahead" in msg and "nesterov" in msg


def test_unknown_correction_arg_is_named(tmp_path):
    p = _write(tmp_path, lambda t: t["outer"].update(correction="heloco", correction_args={"c_okay": 0.5}))
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert "c_okay" in str(err.value)


def test_overrides_apply_and_are_validated(tmp_path):
    cfg = load_config("configs/tiny.yaml", overrides={"inner.lr": 0.01})
    assert cfg.inner.lr == 0.01
    with pytest.raises(ConfigError):
        load_config("configs/tiny.yaml", overrides={"inner.lr": "fast"})


def test_missing_file_is_clear():
    with pytest.raises(ConfigError, match="no such config"):
        load_config("configs/does-not-exist.yaml")


def test_digest_changes_with_content():
    a = load_config("configs/tiny.yaml")
    b = load_config("configs/tiny.yaml", overrides={"inner.lr": 0.01})
    assert a.digest() == load_config("configs/tiny.yaml").digest()
    assert a.digest() != b.digest()


def _digest_without_later_keys(cfg) -> str:
    """The digest of ``cfg`` as it was before the defence section, the topk keys and reply_window and shards existed."""
    tree = cfg.model_dump(mode="json")
    for key in ("defence", "topk_density", "topk_bits", "topk_chunk", "reply_window", "shards"):
        tree["swarm"].pop(key)
    return hashlib.sha256(json.dumps(tree, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_sections_added_later_keep_old_identities_while_at_their_defaults():
    """A run config's digest is its identity (genesis, checkpoints, simulator logs): the defence
    section and the topk keys, at their defaults, leave it as it was before they existed."""
    cfg = load_config("configs/tiny.yaml")
    before = _digest_without_later_keys(cfg)
    assert cfg.digest() == before
    assert load_config("configs/tiny.yaml", overrides={"swarm.defence.norm_factor": 6.0}).digest() != before
    assert load_config("configs/tiny.yaml", overrides={"swarm.compression": "topk"}).digest() != before


def test_a_norm_clip_above_the_refusal_bound_is_an_error(tmp_path):
    p = _write(tmp_path, lambda t: t.setdefault("swarm", {}).setdefault("defence", {}).update(clip_factor=6.0))
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert "clip_factor" in str(err.value) and "norm_factor" in str(err.value)
    p = _write(tmp_path, lambda t: t.setdefault("swarm", {}).setdefault("defence", {}).update(clip_factor=None))
    assert load_config(p).swarm.defence.clip_factor is None


def test_wrap8_replies_leave_old_identities_alone_and_bad_values_name_the_key():
    """``swarm.reply_window`` at its default is left out of the digest of a run without wrap8, as
    the topk keys are; wrap8 itself is another run; a window without wrap8, or out of range, is refused."""
    cfg = load_config("configs/tiny.yaml")
    before = _digest_without_later_keys(cfg)
    assert cfg.digest() == before
    wrap8 = load_config("configs/tiny.yaml", overrides={"swarm.reply_compression": "wrap8"})
    assert wrap8.swarm.reply_window == 16 and wrap8.digest() != before
    assert load_config("configs/tiny.yaml", overrides={"swarm.reply_compression": "wrap8",
                                                       "swarm.reply_window": 8}).digest() != wrap8.digest()
    for overrides, needle in (({"swarm.reply_window": 8}, "reply_window only applies to reply_compression: wrap8"),
                              ({"swarm.reply_compression": "wrap8", "swarm.reply_window": 0}, "swarm.reply_window"),
                              ({"swarm.reply_compression": "wrap8", "swarm.reply_window": "8"}, "swarm.reply_window"),
                              ({"swarm.reply_compression": "wrap4"}, "swarm.reply_compression")):
        with pytest.raises(ConfigError, match=needle):
            load_config("configs/tiny.yaml", overrides=overrides)
    dumped = yaml.safe_load(wrap8.to_yaml())  # a dumped config (genesis files, checkpoints) loads again
    assert dumped["swarm"]["reply_window"] == 16
    for c in (cfg, wrap8):
        assert config_from_dict(yaml.safe_load(c.to_yaml())).digest() == c.digest()
