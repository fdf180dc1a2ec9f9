"""Tracking backends chosen with Trainer.trackers: what they write, read back with their own readers and compared
with metrics.ndjson; a missing backend is a configuration error; a failing one never stops training; no backend
opens a connection to another machine."""

import json
import os
import sys

import pytest
from readers import NetworkGuard, ndjson, tensorboard_scalars, wandb_history, wandb_records
from standins import make_trainer

from codex_ml.training import ConfigError, TrainerConfig

CONFIG = "Trainer.max_steps = 6\nTrainer.learning_rate = 0.01\nGPTConfig.n_layer = \\\n    2\n"


@pytest.fixture(scope="module")
def all_three(tmp_path_factory):
    """One run with every backend, under the network guard."""
    run_dir = tmp_path_factory.mktemp("run")
    with NetworkGuard() as guard:
        result = make_trainer(run_dir, max_steps=6, log_every=2, eval_every=3, system_metrics_every=2,
                              checkpoint_every=3, peak_flops_per_device=1e12, mlflow=True,
                              trackers=["mlflow", "tensorboard", "wandb"], operative_config=CONFIG).fit()
    assert result.status == "finished"
    return run_dir, guard


def test_no_connection_to_another_machine_is_attempted(all_three):
    _, guard = all_three
    assert guard.attempts == []


def test_tensorboard_scalars_equal_metrics_ndjson(all_three):
    run_dir, _ = all_three
    events = tensorboard_scalars(run_dir / "tensorboard")
    train, val = ndjson(run_dir, "train"), ndjson(run_dir, "val")
    for name in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "sys/rss_gib"):
        logged = {e.step: e.value for e in events.Scalars(f"train/{name}")}
        assert list(logged) == [2, 4, 6], name  # every log_every-th step
        for step, value in logged.items():
            assert value == pytest.approx(train[step][name], rel=1e-6), (name, step)
    assert {e.step: e.value for e in events.Scalars("val/loss")} == pytest.approx(
        {step: record["loss"] for step, record in val.items()}, rel=1e-6)
    assert list(val) == [3, 6]


def test_tensorboard_has_the_operative_config_and_hparams(all_three):
    run_dir, _ = all_three
    events = tensorboard_scalars(run_dir / "tensorboard")
    tags = events.Tags()
    text_tag = next(t for t in tags["tensors"] if t.startswith("operative_config.gin"))
    text = events.Tensors(text_tag)[0].tensor_proto.string_val[0].decode()
    assert "Trainer.max_steps = 6" in text and "GPTConfig.n_layer = \\" in text
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert start.hparams["Trainer.learning_rate"].string_value == "0.01"
    assert start.hparams["GPTConfig.n_layer"].string_value == "\\ 2"
    assert start.hparams["status"].string_value == "FINISHED"


def test_wandb_offline_history_equals_metrics_ndjson(all_three):
    run_dir, _ = all_three
    history = wandb_history(run_dir)
    train, val = ndjson(run_dir, "train"), ndjson(run_dir, "val")
    assert sorted(history) == [2, 3, 4, 6]
    for step in (2, 4, 6):
        for name in ("loss", "lr", "grad_norm", "tokens_per_s"):
            assert history[step][f"train/{name}"] == pytest.approx(train[step][name], rel=1e-9), (step, name)
    for step in (3, 6):
        assert history[step]["val/loss"] == pytest.approx(val[step]["loss"], rel=1e-9)
    (run,) = (run_dir / "wandb").glob("offline-run-*")
    assert (run / "files" / "operative_config.gin").read_text() == CONFIG
    (path,) = run.glob("run-*.wandb")
    records = list(wandb_records(path))
    (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run_record.display_name == run_dir.name
    config = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for item in r.config.update}
    assert config["Trainer.max_steps"] == "6" and config["seed"] == 0


def test_mlflow_gets_params_tags_and_plots(all_three):
    run_dir, _ = all_three
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("codex_ml").experiment_id])
    assert run.info.run_name == run_dir.name and run.info.status == "FINISHED"
    assert run.data.params["Trainer.max_steps"] == "6" and run.data.params["GPTConfig.n_layer"] == "\\ 2"
    import hashlib

    assert run.data.tags["config_digest"] == hashlib.sha256(CONFIG.encode()).hexdigest()
    assert {"git_commit", "data_digest", "host"} <= set(run.data.tags)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert artifacts == {"plots/loss.png", "plots/throughput.png"}


def test_every_run_writes_its_plots(all_three):
    run_dir, _ = all_three
    for name in ("loss.png", "throughput.png"):
        data = (run_dir / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name


def test_plots_are_drawn_at_each_checkpoint(tmp_path, monkeypatch):
    from codex_ml.training import reporting

    drawn = []
    real = reporting.write_run_plots
    monkeypatch.setattr(reporting, "write_run_plots", lambda run_dir: drawn.append(len(ndjson(run_dir, "train")))
                        or real(run_dir))
    make_trainer(tmp_path, max_steps=4, checkpoint_every=2).fit()
    assert drawn == [2, 4, 4]  # at the checkpoints of steps 2 and 4, then at the end


def test_a_failing_plot_does_not_stop_training(tmp_path, monkeypatch, caplog):
    from codex_ml.training import reporting

    def broken(run_dir):
        raise OSError("No space left on device")

    monkeypatch.setattr(reporting, "write_run_plots", broken)
    assert make_trainer(tmp_path, max_steps=2, checkpoint_every=1).fit().status == "finished"
    assert "Could not draw the plots" in caplog.text


def test_a_tracker_failing_mid_run_does_not_stop_training(tmp_path, monkeypatch):
    from codex_ml.tracking.tensorboard_tracker import TensorBoardTracker

    real, calls = TensorBoardTracker.log_metrics, []

    def flaky(self, step, metrics):
        calls.append(step)
        if len(calls) == 2:
            raise OSError("disk quota exceeded")
        real(self, step, metrics)

    monkeypatch.setattr(TensorBoardTracker, "log_metrics", flaky)
    result = make_trainer(tmp_path, max_steps=4, trackers=["tensorboard"]).fit()
    assert result.status == "finished" and result.step == 4
    assert calls == [1, 2]  # dropped after its failure
    events = [r for r in map(json.loads, (tmp_path / "metrics.ndjson").read_text().splitlines())
              if r["split"] == "event" and r["event"] == "tracker_disabled"]
    assert len(events) == 1 and "tensorboard: OSError: disk quota exceeded" in events[0]["message"]
    assert len(ndjson(tmp_path, "train")) == 4


@pytest.mark.parametrize(("name", "module"), [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_backend_that_is_not_installed_is_a_config_error_naming_the_extra(tmp_path, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    with pytest.raises(ConfigError, match=rf"pip install 'codex_ml\[{name}\]'") as error:
        make_trainer(tmp_path / "run", trackers=[name])
    assert f"remove {name!r} from Trainer.trackers" in str(error.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("trackers", "message"), [
    (["mlflow", "neptune"], "unknown tracker 'neptune'; choose from mlflow, tensorboard, wandb"),
    (["wandb", "wandb"], "names a tracker twice"),
    ("tensorboard", "must be a list of names"),
])
def test_bad_trackers_are_config_errors(trackers, message):
    with pytest.raises(ConfigError, match=message):
        TrainerConfig(trackers=trackers)


def test_mlflow_false_turns_mlflow_off_whatever_trackers_says():
    assert TrainerConfig(mlflow=False, trackers=["mlflow", "tensorboard"]).active_trackers() == ("tensorboard",)
    assert TrainerConfig().active_trackers() == ("mlflow",)


def test_gin_bindings_of_an_operative_config():
    from codex_ml.tracking.summary import gin_bindings

    text = ("# Parameters for Trainer:\n# ===\nTrainer.betas = (0.9,\n    0.95)\nTrainer.max_steps = 6\n\n"
            "prepare_data.sources = ['a', 'b']\nscope/GPT.n = 1\n")
    assert gin_bindings(text) == {"Trainer.betas": "(0.9, 0.95)", "Trainer.max_steps": "6",
                                  "prepare_data.sources": "['a', 'b']", "scope/GPT.n": "1"}


def test_runs_share_one_mlflow_store_with_tracking_uri(tmp_path):
    import mlflow

    store = tmp_path / "shared" / "mlflow.db"
    for name in ("a", "b"):
        make_trainer(tmp_path / name, max_steps=2, mlflow=True, tracking_uri=f"sqlite:///{store}").fit()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    runs = client.search_runs([client.get_experiment_by_name("codex_ml").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["a", "b"]
    assert not (tmp_path / "a" / "mlflow.db").exists()
    # Artifacts beside the shared store, not in whatever directory the run was started from.
    plots = sorted(p.relative_to(tmp_path / "shared" / "mlartifacts").parts[1:]
                   for p in (tmp_path / "shared" / "mlartifacts").glob("*/artifacts/plots/*.png"))
    assert plots == [("artifacts", "plots", "loss.png")] * 2 + [("artifacts", "plots", "throughput.png")] * 2


def test_the_wandb_check_sets_the_offline_environment_before_wandb_is_imported(monkeypatch):
    from codex_ml.tracking.trackers import check_available

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_ERROR_REPORTING", raising=False)
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    seen = {}

    class Probe:  # stands in for wandb on the import that the check makes, recording the environment it meets
        def find_spec(self, name, path=None, target=None):
            if name == "wandb":
                seen.update(mode=os.environ.get("WANDB_MODE"), reports=os.environ.get("WANDB_ERROR_REPORTING"))
            return None

    monkeypatch.setattr(sys, "meta_path", [Probe(), *sys.meta_path])
    check_available("wandb")
    assert seen == {"mode": "offline", "reports": "false"}
