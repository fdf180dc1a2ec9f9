"""codex-runs: tables of run directories from their files alone."""

import json

import pytest

from codex_ml.cli import runs


def _run(path, lr, steps, val_loss, layers=2):
    path.mkdir(parents=True)
    (path / "operative_config.gin").write_text(f"# Parameters for Trainer:\nTrainer.learning_rate = {lr}\n"
                                               f"Trainer.max_steps = {steps}\nGPTConfig.n_layer = {layers}\n")
    lines = [{"step": s, "split": "train", "loss": 5.0 - s, "tokens": 100.0 * s, "tokens_per_s": 50.0}
             for s in range(1, steps + 1)]
    lines += [{"step": steps, "split": "val", "loss": val_loss}, {"step": steps, "split": "event", "event": "x"}]
    (path / "metrics.ndjson").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def test_compare_shows_the_differing_settings_and_final_metrics(tmp_path, capsys):
    _run(tmp_path / "runs" / "a", 0.001, 2, 4.5)
    _run(tmp_path / "runs" / "b", 0.01, 3, 3.25)
    assert runs.main(["compare", str(tmp_path / "runs" / "a"), str(tmp_path / "runs" / "b")]) == 0
    header, a, b = capsys.readouterr().out.splitlines()
    assert header.split() == ["run", "Trainer.learning_rate", "Trainer.max_steps", "train/loss", "val/loss", "step",
                              "tokens", "train_time"]
    assert a.split()[1:] == ["0.001", "2", "3.0000", "4.5000", "2", "200", "0m04s"]
    assert b.split()[1:] == ["0.01", "3", "2.0000", "3.2500", "3", "300", "0m06s"]


def test_list_finds_the_runs_inside_a_directory(tmp_path, capsys):
    _run(tmp_path / "sweep" / "trial-1", 0.01, 2, 4.0)
    _run(tmp_path / "sweep" / "trial-0", 0.001, 2, 4.0)
    (tmp_path / "sweep" / "plots").mkdir()
    assert runs.main(["list", str(tmp_path / "sweep")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == [str(tmp_path / "sweep" / f"trial-{i}") for i in (0, 1)]
    assert "Trainer.learning_rate" not in lines[0]


@pytest.mark.parametrize(("argv", "message"), [
    (["show", "x"], "name a command: list or compare"),
    (["list"], "list: name at least one run directory"),
    (["list", "missing"], "missing is not a directory"),
    (["compare", "ONE"], "compare needs at least two runs"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    _run(tmp_path / "ONE", 0.1, 1, 1.0)
    with pytest.raises(SystemExit) as exit_info:
        runs.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
