"""Ray Jobs API client for unimo: submit a run to a cluster; list, status, logs (--follow) and stop its
jobs."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import shlex
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from trainer.preemption import EXIT_PREEMPTED
from trainer.redaction import is_secret_env_name


# Never shipped as working_dir: environments, history, local outputs and caches. Ray's limit on the upload is
# 100 MiB (after excludes), and none of these are needed to run the code.
EXCLUDES = [".venv", ".git", "/runs", "/demo_out", "mlruns", "mlartifacts", "__pycache__", "*.pyc",
            ".pytest_cache", ".ruff_cache", ".mypy_cache", "*.egg-info", "*.db"]
# Forwarded from the submitting shell when set: switches, never credentials.
FORWARDED_ENV = ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")
# user:password@ in a URL (an MLflow or S3 endpoint): it would travel in the entrypoint, which the job table
# shows.
URL_PASSWORD = re.compile(r"://[^/\s:@]+:[^/\s@]+@")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# How long `unimo jobs stop` lets the driver wind down after SIGTERM (the workers save a checkpoint at the
# next step) before Ray SIGKILLs it. Ray's own default, 3 s, is shorter than any checkpoint.
STOP_GRACE_S = 300
DEFAULT_TOKEN_FILE = Path.home() / ".ray" / "auth_token"


class JobsError(RuntimeError):
    """A Jobs API problem the user can fix; the message says what to check."""


# ----- reaching the cluster -------------------------------------------------------------------------------

def resolve_address(address: str | None) -> str:
    """The Jobs API (dashboard) URL: --address, else RAY_API_SERVER_ADDRESS, else an http RAY_ADDRESS."""
    env_addr = os.environ.get("RAY_API_SERVER_ADDRESS") or ""
    if not env_addr and os.environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        env_addr = os.environ["RAY_ADDRESS"]
    address = (address or env_addr).strip().rstrip("/")
    if not address:
        raise JobsError("no Ray cluster address: pass --address http://HEAD:8265 (the dashboard / Jobs API "
                        "port) or set RAY_API_SERVER_ADDRESS")
    if "://" not in address:
        address = f"http://{address}"
    return address


def find_token(env: dict[str, str] | None = None) -> tuple[str | None, str]:
    """(token, where it came from), in Ray's order: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    env = os.environ if env is None else env
    if env.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None, "RAY_AUTH_MODE=disabled"
    if env.get("RAY_AUTH_TOKEN"):
        return env["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    if env.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser()
        if not path.is_file():
            raise JobsError(f"RAY_AUTH_TOKEN_PATH points at {path}, which does not exist")
        return path.read_text().strip(), f"RAY_AUTH_TOKEN_PATH={path}"
    if DEFAULT_TOKEN_FILE.is_file():
        return DEFAULT_TOKEN_FILE.read_text().strip(), str(DEFAULT_TOKEN_FILE)
    return None, "no token found (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)"


def _probe(address: str, timeout: float = 5.0) -> None:
    """A TCP connect first: an unreachable host fails in seconds with a clear message, not a long HTTP
    hang."""
    url = urlparse(address)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return
    except OSError as err:
        raise JobsError(f"cannot reach the Ray Jobs API at {address} ({err.strerror or err}). Check the "
                        "address (the head's dashboard port, 8265 by default, not the GCS port 6379), that "
                        "the head is running (`ray status` on it), and that this machine can reach that port "
                        "(firewall, SSH tunnel or `kubectl port-forward`).") from None


def connect(address: str | None):
    """A JobSubmissionClient for the cluster, sending the cluster token; errors name the address."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address)
    _probe(address)
    token, source = find_token()
    # Sent explicitly, so the client works whatever RAY_AUTH_MODE this shell has (Ray only adds its own
    # header when RAY_AUTH_MODE=token, and never overrides ours).
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError:
        if token is None:
            raise JobsError(f"the Ray cluster at {address} requires token authentication and no token was "
                            f"sent ({source}). Set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's "
                            "token (on the head: `ray get-auth-token`).") from None
        raise JobsError(f"the Ray cluster at {address} rejected the auth token from {source}. Check that it "
                        "is this cluster's token (on the head: `ray get-auth-token`) and that RAY_AUTH_TOKEN "
                        "does not hold another cluster's token (it takes precedence over the "
                        "token file).") from None
    except ConnectionError as err:
        raise JobsError(f"cannot reach the Ray Jobs API at {address} ({err}). Check the address (the "
                        "dashboard port, 8265 by default) and that the head is running.") from None


# ----- submitting -----------------------------------------------------------------------------------------

@dataclass
class Submission:
    """What `unimo submit` sends: the entrypoint, its runtime_env and metadata."""

    config: str  # relative to working_dir (it travels inside it), or a shipped config's name
    overrides: list[str]
    run_name: str
    working_dir: Path = field(default_factory=Path.cwd)
    python: str = "python"
    env: dict[str, str] = field(default_factory=dict)
    stop_grace_s: int = STOP_GRACE_S

    def entrypoint(self) -> str:
        # scaling.address=auto last: on the cluster the driver joins it (RAY_ADDRESS from the job supervisor)
        # instead of starting an embedded Ray.
        return shlex.join([self.python, "-m", "orchestrator.cli", "train", self.config, *self.overrides,
                           "scaling.address=auto"])

    def runtime_env(self) -> dict:
        env = job_env(self.env)
        # Read by the job's supervisor actor, which gets the job's env_vars too.
        env["RAY_JOB_STOP_WAIT_TIME_S"] = str(self.stop_grace_s)
        return {"working_dir": str(self.working_dir), "excludes": list(EXCLUDES), "env_vars": env}

    def metadata(self) -> dict[str, str]:
        return {"unimo_run": self.run_name, "unimo_config": self.config}


def job_env(extra: dict[str, str], environ: dict[str, str] | None = None) -> dict[str, str]:
    """env_vars of the job: forwarded switches + the user's --env; anything credential-like is refused."""
    environ = os.environ if environ is None else environ
    env = {k: environ[k] for k in FORWARDED_ENV if k in environ}
    env["PYTHONUNBUFFERED"] = "1"  # progress lines reach `unimo jobs logs --follow` as they are printed
    for key, value in extra.items():
        # runtime_env is stored in the cluster's job table and shown by the dashboard and `ray job` to anyone
        # who can reach them: the cluster's own environment or instance role provides credentials.
        if is_secret_env_name(key):
            raise JobsError(f"refusing to put {key} into the job's runtime_env: it is stored in the "
                            "cluster's job table and shown by the dashboard to anyone who can reach it. Give "
                            "the cluster its credentials through its own environment or instance role "
                            "(docs/ORCHESTRATION.md).")
        env[key] = value
    return env


def parse_env(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise JobsError(f"--env takes KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def config_for_job(config: str, working_dir: Path) -> str:
    """The config as the job names it: a file's path relative to working_dir (the folder that travels to the
    cluster), or a shipped config's name, which the cluster's unimo resolves itself."""
    from trainer import shipped_configs

    path = Path(config)
    if not path.is_file():
        if shipped_configs.shipped_path(config) is not None:
            return Path(config).name
        raise JobsError(f"config {config} not found: give a YAML file inside the working dir or a shipped "
                        "config's name (`unimo config list`)")
    try:
        return path.resolve().relative_to(working_dir.resolve()).as_posix()
    except ValueError:
        raise JobsError(f"config {config} lies outside the working dir {working_dir}; only that folder "
                        "travels to the cluster, so put the config under it or pass --working-dir") from None


def _is_relative_local(value: str) -> bool:
    return bool(value) and "://" not in value and not value.startswith(("/", "~"))


def check_cluster_paths(cfg) -> None:
    """Relative local paths would resolve inside the job's temporary copy of the project on the cluster, where
    checkpoints would be lost and data is absent: demand shared absolute paths or s3:// URLs up front."""
    d = cfg.data
    values = {"run.storage": cfg.run.storage, "data.eval_pairs": d.eval_pairs, "data.tokenizer": d.tokenizer}
    for modality in ("text", "image", "pair"):  # every corpus's URLs (the shorthand is data.<modality>.urls)
        for c in d.corpora(modality):
            name = f"data.{modality}.urls" if c.key == modality else f"data.{modality}.corpora.{c.name}.urls"
            many = isinstance(c.urls, (list, tuple))
            values.update({f"{name}[{i}]" if many else name: u
                           for i, u in enumerate(c.urls if many else [c.urls])})
    from trainer.config_loader import flatten, to_dict

    leaking = [k for k, v in flatten(to_dict(cfg)).items() if isinstance(v, str) and URL_PASSWORD.search(v)]
    if leaking:
        raise JobsError(f"{', '.join(leaking)} embeds a password in a URL; the entrypoint is stored in the "
                        "cluster's job table and shown by the dashboard. Let the cluster provide it (e.g. "
                        "MLFLOW_TRACKING_USERNAME/PASSWORD in its environment).")
    bad = [f"{k}={v}" for k, v in values.items() if _is_relative_local(v)]
    if bad:
        raise JobsError("these paths are relative: " + ", ".join(bad) + ". On the cluster a job runs in a "
                        "temporary copy of the project; use absolute paths on storage every node shares, or "
                        "s3:// URLs.")


def preflight_here(cfg) -> None:
    """The pre-flight of `unimo check` on this machine, where it can see the run's storage and data: shared
    folders that exist here, or s3://. The cluster's resources are checked by the job itself, and a tracking
    server this machine cannot reach is only a warning (the cluster may reach it). Paths absent here are left
    to the job, which runs the whole pre-flight before its workers start."""
    from orchestrator.preflight import missing_local_paths, run_preflight

    absent = missing_local_paths(cfg)
    if absent:
        print(f"# pre-flight left to the cluster: not on this machine: {', '.join(absent)}", file=sys.stderr)
        return
    started = time.monotonic()
    report = run_preflight(cfg, tracking="warn", resources=False)
    for check in report.warnings:
        print(f"# pre-flight warning: {check.name}: {check.detail}", file=sys.stderr)
    print(f"# pre-flight: {len(report.checks)} checks passed here in {time.monotonic() - started:.1f} s",
          file=sys.stderr)


def prepare(config: str, overrides: list[str], python: str = "python",
            env: dict[str, str] | None = None, stop_grace_s: int = STOP_GRACE_S,
            working_dir: str | Path | None = None, preflight: bool = True) -> Submission:
    """Validates the config here (config errors and the pre-flight fail before anything is sent) and builds
    the submission."""
    from trainer.config import load_config

    cfg = load_config(config, overrides)
    cfg.check_ready_to_train()
    check_cluster_paths(cfg)
    folder = Path(working_dir) if working_dir is not None else Path.cwd()
    if not folder.is_dir():
        raise JobsError(f"--working-dir {folder} is not a folder")
    if preflight:
        preflight_here(cfg)
    return Submission(config=config_for_job(config, folder), overrides=list(overrides), run_name=cfg.run.name,
                      working_dir=folder.resolve(), python=python, env=dict(env or {}),
                      stop_grace_s=stop_grace_s)


def live_jobs_of_run(client, run_name: str) -> list:
    return [j for j in client.list_jobs()
            if (j.metadata or {}).get("unimo_run") == run_name and str(j.status) not in TERMINAL]


def submit(client, sub: Submission, address: str = "") -> str:
    """Submits the run and returns its job id; refuses when a live job of the same run exists."""
    live = live_jobs_of_run(client, sub.run_name)
    if live:
        ids = ", ".join(f"{j.submission_id} ({j.status})" for j in live)
        raise JobsError(f"run {sub.run_name} already has a live job on {address or 'the cluster'}: {ids}. "
                        "Wait for it or stop it (`unimo jobs stop JOB`); resubmitting after "
                        "it ends resumes it.")
    job_id = f"unimo-{sub.run_name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    return client.submit_job(entrypoint=sub.entrypoint(), runtime_env=sub.runtime_env(),
                             metadata=sub.metadata(), submission_id=job_id)


# ----- watching -------------------------------------------------------------------------------------------

def wait_terminal(client, job_id: str, timeout: float | None = None, poll: float = 2.0) -> str:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(job_id))
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            return status
        time.sleep(poll)


async def _follow(client, job_id: str, out) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def follow_logs(client, job_id: str, out=None) -> str:
    """Streams the job's logs until it ends; returns its final status."""
    out = out or sys.stdout
    asyncio.run(_follow(client, job_id, out))
    return wait_terminal(client, job_id, timeout=30)


def _time(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def format_jobs(jobs: list) -> str:
    rows = [("JOB", "STATUS", "RUN", "STARTED", "ENTRYPOINT")]
    for j in sorted(jobs, key=lambda j: j.start_time or 0):
        entry = j.entrypoint if len(j.entrypoint) <= 60 else j.entrypoint[:57] + "..."
        rows.append((j.submission_id or j.job_id or "?", str(j.status),
                     (j.metadata or {}).get("unimo_run", "-"), _time(j.start_time), entry))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows)


# ----- command line ---------------------------------------------------------------------------------------

def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="the cluster's Jobs API, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS); the "
                        "token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token")


def submit_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unimo submit",
        description="Submit a training run to a Ray cluster through the Jobs API. The working dir (default: "
                    "the current folder, as `ray job submit`) travels to the cluster; there the job runs "
                    "`unimo train CONFIG overrides` joined to the cluster. Re-submitting the same run.name "
                    "resumes the run.")
    p.add_argument("config", help="a shipped config's name (e.g. base) or a YAML file inside the working dir")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="dotted config overrides")
    _add_address(p)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job (repeatable); credentials are refused")
    p.add_argument("--working-dir", default=None, metavar="DIR",
                   help="folder uploaded as the job's working_dir (default: the current folder); code in it "
                        "takes precedence over the cluster's installed unimo")
    p.add_argument("--python", default="python", help="interpreter on the cluster (default: python)")
    p.add_argument("--stop-grace", type=int, default=STOP_GRACE_S, metavar="SECONDS",
                   help="on `unimo jobs stop`, how long the job may take to checkpoint and exit before it is "
                        "killed (default: %(default)s)")
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    p.add_argument("--max-resubmits", type=int, default=0, metavar="N",
                   help="wait for the job and, when it ends preempted (a SIGTERM made it checkpoint and exit "
                        f"with status {EXIT_PREEMPTED}), submit the run again, up to N times; each "
                        "resubmission resumes from that checkpoint (default: 0)")
    return p


def submit_main(argv: list[str]) -> int:
    args = submit_parser().parse_intermixed_args(argv)
    sub = prepare(args.config, args.overrides, python=args.python, env=parse_env(args.env),
                  stop_grace_s=args.stop_grace, working_dir=args.working_dir)
    address = resolve_address(args.address)
    client = connect(address)
    if args.max_resubmits < 0:
        raise JobsError(f"--max-resubmits {args.max_resubmits}: give 0 or more")
    job_id = submit(client, sub, address)
    print(job_id, flush=True)
    print(f"# follow: unimo jobs logs {job_id} --follow --address {address}", file=sys.stderr)
    if not (args.follow or args.max_resubmits):
        return 0
    return watch_and_resubmit(client, sub, job_id, address, args.max_resubmits, args.follow)


def was_preempted(client, job_id: str, status: str) -> bool:
    """The job's driver exited with EXIT_PREEMPTED: it saved a checkpoint and stopped on a SIGTERM. (A job
    stopped with `unimo jobs stop` ends STOPPED, and is not resubmitted.)"""
    return status == "FAILED" and getattr(client.get_job_info(job_id), "driver_exit_code", None) == \
        EXIT_PREEMPTED


def watch_and_resubmit(client, sub: Submission, job_id: str, address: str, max_resubmits: int,
                       follow: bool) -> int:
    """Waits for the job (streaming its logs with ``follow``); a preempted one is submitted again, up to
    ``max_resubmits`` times. The exit status: 0 when the last job succeeded, EXIT_PREEMPTED when it was
    preempted once more than allowed, 1 otherwise."""
    for resubmits in range(max_resubmits + 1):
        status = follow_logs(client, job_id) if follow else wait_terminal(client, job_id)
        print(f"{job_id} {status}", flush=True)
        if not was_preempted(client, job_id, status):
            return 0 if status == "SUCCEEDED" else 1
        if resubmits == max_resubmits:
            print(f"[unimo] job {job_id} was preempted and --max-resubmits={max_resubmits} are used up; "
                  f"`unimo submit` the run again to resume it", file=sys.stderr, flush=True)
            return EXIT_PREEMPTED
        print(f"[unimo] job {job_id} was preempted (it saved a checkpoint); resubmitting run {sub.run_name} "
              f"({resubmits + 1}/{max_resubmits})", file=sys.stderr, flush=True)
        job_id = submit(client, sub, address)
        print(job_id, flush=True)
    raise AssertionError("not reached")


def jobs_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unimo jobs", description="Inspect and stop jobs on a Ray cluster.")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = sub.add_parser("list", help="every job on the cluster with its status and unimo run name")
    _add_address(s)
    s = sub.add_parser("status", help="a job's status (and message)")
    s.add_argument("job")
    s.add_argument("--wait", action="store_true",
                   help="block until the job ends; exit 0 only if it succeeded")
    s.add_argument("--timeout", type=float, default=None, help="with --wait: give up after this many seconds")
    _add_address(s)
    s = sub.add_parser("logs", help="a job's logs")
    s.add_argument("job")
    s.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    _add_address(s)
    s = sub.add_parser("stop", help="stop a job: its workers checkpoint at the next step and exit (SIGTERM); "
                                    "killed if that takes longer than the job's --stop-grace")
    s.add_argument("job")
    s.add_argument("--wait", action="store_true", help="block until the job has ended")
    _add_address(s)
    return p


def jobs_main(argv: list[str]) -> int:
    args = jobs_parser().parse_args(argv)
    client = connect(args.address)
    if args.action == "list":
        print(format_jobs(client.list_jobs()))
        return 0
    _check_job(client, args.job, args.address)
    if args.action == "status":
        status = (wait_terminal(client, args.job, args.timeout) if args.wait
                  else str(client.get_job_status(args.job)))
        info = client.get_job_info(args.job)
        print(f"{args.job} {status}" + (f": {info.message}" if info.message else ""))
        return 0 if not args.wait or status == "SUCCEEDED" else 1
    if args.action == "logs":
        if args.follow:
            status = follow_logs(client, args.job)
            print(f"[unimo] job {args.job} ended: {status}", file=sys.stderr)
        else:
            sys.stdout.write(client.get_job_logs(args.job))
        return 0
    stopped = client.stop_job(args.job)
    print(f"{args.job}: stop requested" if stopped else f"{args.job}: already ended")
    if args.wait:
        print(f"{args.job} {wait_terminal(client, args.job)}")
    return 0


def _check_job(client, job_id: str, address: str | None) -> None:
    try:
        client.get_job_status(job_id)
    except RuntimeError as err:
        if "404" in str(err) or "does not exist" in str(err):
            raise JobsError(f"no job {job_id} on {resolve_address(address)} (`unimo jobs list` "
                            "shows them)") from None
        raise


def main(argv: list[str] | None = None) -> int:
    """`python -m orchestrator.jobs submit|list|status|logs|stop ...` (the same as `unimo submit` / `unimo
    jobs`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["submit"]:
        return submit_main(argv[1:])
    return jobs_main(argv)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except JobsError as err:
        print(f"unimo: error: {err}", file=sys.stderr)
        sys.exit(1)
