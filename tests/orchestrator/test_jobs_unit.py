"""Unit tests of `unimo submit` / `unimo jobs` without a cluster: runtime_env, entrypoint, secrets, errors."""

from __future__ import annotations

import json
import shlex
import socket
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator import jobs
from orchestrator.jobs import JobsError, Submission

ROOT = Path(__file__).resolve().parents[2]
FAKE_SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEUNIMOJOBS000",
    "AWS_SECRET_ACCESS_KEY": "fake-secret-jobs-do-not-leak-0123456789",
    "AWS_SESSION_TOKEN": "fake-session-token-jobs-0123456789",
    "RAY_AUTH_TOKEN": "f" * 64,
    "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-password-0123",
}


def _overrides(tmp_path: Path) -> list[str]:
    d = tmp_path / "data"
    return [f"run.storage={tmp_path / 'runs'}", "run.name=sub1", f"data.pair.urls={d}/pairs",
            f"data.text.urls={d}/text", f"data.image.urls={d}/images", f"data.eval_pairs={d}/eval",
            f"data.tokenizer={d}/tokenizer/tokenizer.json"]


def test_submission_entrypoint_runs_train_with_the_same_config_joined_to_the_cluster(tmp_path):
    sub = jobs.prepare(str(ROOT / "configs" / "debug.yaml"), _overrides(tmp_path),
                       python="/opt/py/bin/python")
    argv = shlex.split(sub.entrypoint())
    assert argv[:5] == ["/opt/py/bin/python", "-m", "orchestrator.cli", "train", "configs/debug.yaml"]
    assert argv[5:-1] == _overrides(tmp_path)
    assert argv[-1] == "scaling.address=auto"  # last, so it wins over any address in the overrides
    assert sub.metadata() == {"unimo_run": "sub1", "unimo_config": "configs/debug.yaml"}


def test_runtime_env_ships_the_project_without_venv_git_outputs_or_caches():
    env = Submission(config="configs/debug.yaml", overrides=[], run_name="r").runtime_env()
    assert env["working_dir"] == str(ROOT)
    for pattern in (".venv", ".git", "/runs", "/demo_out", "__pycache__", "*.pyc"):
        assert pattern in env["excludes"]


def test_the_package_ray_would_upload_has_the_code_and_nothing_excluded(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    target = tmp_path / "pkg.zip"
    create_package(str(ROOT), target, include_gitignore=True, excludes=list(jobs.EXCLUDES))
    names = zipfile.ZipFile(target).namelist()
    assert "orchestrator/cli.py" in names and "configs/debug.yaml" in names and "trainer/loop.py" in names
    banned = [n for n in names if n.startswith((".venv/", ".git/", "runs/", "demo_out/", "mlruns/"))
              or "__pycache__" in n or n.endswith(".pyc")]
    assert not banned, banned[:10]
    assert target.stat().st_size < 20 * 2**20  # Ray refuses working_dir packages over 100 MiB


def test_no_secret_from_the_environment_reaches_the_job(tmp_path, monkeypatch):
    for k, v in FAKE_SECRETS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    sub = jobs.prepare(str(ROOT / "configs" / "debug.yaml"), _overrides(tmp_path), env={"UNIMO_X": "1"})
    blob = json.dumps({"entrypoint": sub.entrypoint(), "runtime_env": sub.runtime_env(),
                       "meta": sub.metadata()})
    for k, v in FAKE_SECRETS.items():
        assert k not in blob and v not in blob
    env_vars = sub.runtime_env()["env_vars"]
    assert env_vars["UNIMO_X"] == "1" and env_vars["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert env_vars["PYTHONUNBUFFERED"] == "1"
    assert env_vars["RAY_JOB_STOP_WAIT_TIME_S"] == str(jobs.STOP_GRACE_S)  # time to checkpoint on stop


@pytest.mark.parametrize("key", ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                                 "RAY_AUTH_TOKEN", "HF_TOKEN", "MLFLOW_TRACKING_PASSWORD", "OPENAI_API_KEY"])
def test_credentials_given_with_env_are_refused(key):
    with pytest.raises(JobsError, match=f"refusing to put {key}"):
        jobs.job_env({key: "x"})


def test_a_password_in_a_url_is_refused_without_printing_it(tmp_path):
    with pytest.raises(JobsError) as err:
        jobs.prepare(str(ROOT / "configs" / "debug.yaml"),
                     _overrides(tmp_path) + ["tracking.uri=http://me:hunter2@mlflow:5000"])
    assert "tracking.uri embeds a password" in str(err.value) and "hunter2" not in str(err.value)


def test_relative_paths_are_refused_naming_the_keys():
    with pytest.raises(JobsError) as err:
        jobs.prepare(str(ROOT / "configs" / "debug.yaml"), [])
    assert "run.storage=./demo_out/runs" in str(err.value) and "data.pair.urls=" in str(err.value)


def test_config_outside_the_working_dir_is_refused(tmp_path):
    outside = tmp_path / "c.yaml"
    outside.write_text((ROOT / "configs" / "debug.yaml").read_text())
    with pytest.raises(JobsError, match="outside the working dir"):
        jobs.prepare(str(outside), _overrides(tmp_path), working_dir=ROOT)


def test_working_dir_defaults_to_the_current_folder_and_carries_its_configs(tmp_path, monkeypatch):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "c.yaml").write_text((ROOT / "configs" / "debug.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    sub = jobs.prepare("exp/c.yaml", _overrides(tmp_path))
    assert sub.runtime_env()["working_dir"] == str(tmp_path.resolve()) and sub.config == "exp/c.yaml"
    assert "train exp/c.yaml" in sub.entrypoint()


def test_a_shipped_config_name_travels_as_its_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the name is resolved by the cluster's installed unimo
    sub = jobs.prepare("debug", _overrides(tmp_path), working_dir=tmp_path)
    assert sub.config == "debug" and "train debug " in sub.entrypoint()
    from trainer.config_loader import ConfigError

    with pytest.raises(ConfigError, match="no_such_config.*not found"):
        jobs.prepare("no_such_config", _overrides(tmp_path), working_dir=tmp_path)


def test_config_errors_surface_before_anything_is_sent(tmp_path):
    from trainer.config_loader import ConfigError

    with pytest.raises(ConfigError, match="optimizer.lrr"):
        jobs.prepare(str(ROOT / "configs" / "debug.yaml"), _overrides(tmp_path) + ["optimizer.lrr=1"])


def test_token_lookup_follows_rays_order(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, "DEFAULT_TOKEN_FILE", tmp_path / "none")
    f = tmp_path / "tok"
    f.write_text("from-file\n")
    assert jobs.find_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(f)}) == ("from-env",
                                                                                           "RAY_AUTH_TOKEN")
    assert jobs.find_token({"RAY_AUTH_TOKEN_PATH": str(f)})[0] == "from-file"
    assert jobs.find_token({})[0] is None
    assert jobs.find_token({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "x"})[0] is None
    monkeypatch.setattr(jobs, "DEFAULT_TOKEN_FILE", f)
    assert jobs.find_token({}) == ("from-file", str(f))
    with pytest.raises(JobsError, match="does not exist"):
        jobs.find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_address_names_it_and_what_to_check(capsys):
    from orchestrator.cli import main

    address = f"http://127.0.0.1:{_closed_port()}"
    assert main(["jobs", "list", "--address", address]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach the Ray Jobs API at {address}" in err and "dashboard port" in err


def test_missing_address_says_how_to_give_one(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(JobsError, match="--address http://HEAD:8265"):
        jobs.resolve_address(None)
    assert jobs.resolve_address("10.0.0.1:8265") == "http://10.0.0.1:8265"


def test_submit_refuses_a_run_that_already_has_a_live_job():
    live = SimpleNamespace(submission_id="unimo-r-1", status="RUNNING", metadata={"unimo_run": "r"})
    done = SimpleNamespace(submission_id="unimo-r-0", status="FAILED", metadata={"unimo_run": "r"})

    class FakeClient:
        submitted = False

        def list_jobs(self):
            return [done, live]

        def submit_job(self, **kw):
            self.submitted = True

    client = FakeClient()
    with pytest.raises(JobsError, match="unimo-r-1 \\(RUNNING\\)"):
        jobs.submit(client, Submission(config="configs/debug.yaml", overrides=[], run_name="r"))
    assert not client.submitted


def test_submit_and_jobs_help_work_with_options_anywhere(capsys):
    from orchestrator.cli import main

    for argv in (["submit", "--help"], ["jobs", "--help"], ["jobs", "logs", "--help"]):
        with pytest.raises(SystemExit) as ex:
            main(argv)
        assert ex.value.code == 0
    assert "--follow" in capsys.readouterr().out


def test_relative_corpus_paths_are_refused_naming_the_corpus(tmp_path):
    corpora = "data.pair.corpora=[{name: coco, urls: s3://b/coco/}, {name: sbu, urls: [/abs/sbu/, rel/sbu/]}]"
    with pytest.raises(JobsError) as err:
        jobs.prepare(str(ROOT / "configs" / "debug.yaml"),
                     _overrides(tmp_path) + ["data.pair.urls=", corpora])
    assert "data.pair.corpora.sbu.urls[1]=rel/sbu/" in str(err.value) and "coco" not in str(err.value)


class JobsOfOneRun:
    """A Jobs API stand-in: each submitted job ends as the next of ``ends`` ((status, driver exit code))."""

    def __init__(self, ends: list[tuple[str, int | None]]):
        self.ends, self.jobs = list(ends), {}

    def list_jobs(self):
        return [SimpleNamespace(submission_id=j, status=s, metadata={"unimo_run": "r"})
                for j, (s, _) in self.jobs.items()]

    def submit_job(self, submission_id, **kw):
        self.jobs[submission_id] = self.ends.pop(0)
        return submission_id

    def get_job_status(self, job_id):
        return self.jobs[job_id][0]

    def get_job_info(self, job_id):
        return SimpleNamespace(driver_exit_code=self.jobs[job_id][1], message="")


def _submit_watching(client, max_resubmits: int) -> int:
    sub = Submission(config="configs/debug.yaml", overrides=[], run_name="r")
    return jobs.watch_and_resubmit(client, sub, jobs.submit(client, sub), "", max_resubmits, follow=False)


def test_a_preempted_job_is_resubmitted_until_it_succeeds(capsys):
    from trainer.preemption import EXIT_PREEMPTED

    client = JobsOfOneRun([("FAILED", EXIT_PREEMPTED), ("FAILED", EXIT_PREEMPTED), ("SUCCEEDED", 0)])
    assert _submit_watching(client, max_resubmits=3) == 0
    assert len(client.jobs) == 3
    assert capsys.readouterr().err.count("was preempted (it saved a checkpoint); resubmitting run r") == 2


def test_resubmits_stop_at_their_budget_with_the_preempted_status(capsys):
    from trainer.preemption import EXIT_PREEMPTED

    client = JobsOfOneRun([("FAILED", EXIT_PREEMPTED)] * 3)
    assert _submit_watching(client, max_resubmits=1) == EXIT_PREEMPTED
    assert len(client.jobs) == 2 and "--max-resubmits=1 are used up" in capsys.readouterr().err


@pytest.mark.parametrize("end", [("FAILED", 1), ("STOPPED", 75), ("FAILED", None)])
def test_failed_or_stopped_jobs_are_not_resubmitted(end):
    """A failure is not a preemption, and a job the user stopped (`unimo jobs stop`) stays stopped."""
    client = JobsOfOneRun([end, ("SUCCEEDED", 0)])
    assert _submit_watching(client, max_resubmits=3) == 1
    assert len(client.jobs) == 1
