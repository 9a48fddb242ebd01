from suite.train import run


def test_tiny_fit_in_process(make_config, tmp_path):
    cfg = make_config("model=tiny", "max_epochs=2")
    assert run(cfg) is not None
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
