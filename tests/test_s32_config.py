"""A negatives pool named twice, however spelled, is one pool in the config too: history.csv's mined_per_pool has
one count per pool read, and the config's roots are how a reader names them."""

from training.config import load_config


def test_a_pool_named_twice_in_the_config_is_kept_once(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    other = tmp_path / "other-pool"
    other.mkdir()
    config = load_config(None, {"data": {"negatives": [str(pool), f"{pool}/", str(other), str(pool / ".." / "pool")]}})
    assert config.data.negatives == [str(pool), str(other)]


def test_a_pool_given_again_on_the_command_line_in_another_spelling_is_kept_once(tmp_path, monkeypatch):
    from training.config import resolve_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pool").mkdir()
    config_file = tmp_path / "c.yaml"
    config_file.write_text("data:\n  negatives: [pool]\n")
    config = resolve_config(config_file, negatives=["./pool/", str(tmp_path / "pool"), "pool"]).config
    assert config.data.negatives == ["pool"]
