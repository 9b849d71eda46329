"""The cloud's advance notice of a preemption, turned into a checkpoint before the SIGTERM.

A spot (AWS) or preemptible/spot (GCP) VM is told ahead through its instance metadata service: AWS answers
``spot/instance-action`` with the action and time about two minutes before the reclaim (404 until then),
GCP's ``instance/preempted`` turns ``TRUE`` about 30 seconds before. Each training worker polls its node's
service every ``checkpoint.notice_poll_seconds`` in a daemon thread; a notice asks for the same stop as a
SIGTERM (trainer/preemption.py ``request``): the flag rides the step's all-reduce, every rank saves at the
next step, and the job ends preempted (exit status 75) to be resubmitted, instead of losing the steps since
the last checkpoint when the node vanishes.

``UNIMO_METADATA_URL`` replaces the service's address (the tests' fake service on 127.0.0.1; a proxy).
Ray Train's own preemption info (``ray.train.get_preemption_info``, alpha in Ray 2.60) is not used: each call
is a barrier across all workers, and Ray Train already restarts from the last checkpoint on a preemption it
detects, without charging ``scaling.max_failures``.
"""

from __future__ import annotations

import logging
import os
import threading
import urllib.error
import urllib.request
from typing import Callable

from trainer import preemption

log = logging.getLogger(__name__)

METADATA_ENV = "UNIMO_METADATA_URL"
DEFAULT_BASE = {"aws": "http://169.254.169.254", "gcp": "http://metadata.google.internal"}
TIMEOUT_S = 2.0  # the service is on the node: a slow answer means none


def _get(url: str, headers: dict[str, str], method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as answer:
            return answer.status, answer.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        return err.code, ""


def aws_notice(base: str) -> str | None:
    """The spot instance action (e.g. ``{"action": "terminate", "time": ...}``) or None. IMDSv2: a session
    token first (IMDSv1-only instances answer the GET without one)."""
    status, token = _get(f"{base}/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"}, "PUT")
    headers = {"X-aws-ec2-metadata-token": token} if status == 200 and token else {}
    status, body = _get(f"{base}/latest/meta-data/spot/instance-action", headers)
    return body.strip() if status == 200 and body.strip() else None


def gcp_notice(base: str) -> str | None:
    """``TRUE`` once the VM is being preempted, else None."""
    status, body = _get(f"{base}/computeMetadata/v1/instance/preempted", {"Metadata-Flavor": "Google"})
    return "preempted" if status == 200 and body.strip().upper() == "TRUE" else None


PROVIDERS: dict[str, Callable[[str], str | None]] = {"aws": aws_notice, "gcp": gcp_notice}


class NoticeWatcher:
    """Polls the metadata service until a notice comes (then requests the stop, once) or ``stop()``."""

    def __init__(self, provider: str, poll_s: float, base: str | None = None):
        self.provider, self.poll_s = provider, poll_s
        self.base = (base or os.environ.get(METADATA_ENV) or DEFAULT_BASE[provider]).rstrip("/")
        self.polls = 0  # answered or not: the tests wait on it
        self.notice: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="unimo-preemption-notice", daemon=True)
        self._quiet = False

    def start(self) -> NoticeWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            notice = self._poll()
            self.polls += 1
            if notice:
                self.notice = notice
                preemption.request(f"{self.provider} preemption notice ({notice[:200]})")
                return
            self._stop.wait(self.poll_s)

    def _poll(self) -> str | None:
        try:
            return PROVIDERS[self.provider](self.base)
        except (OSError, ValueError) as err:  # no service (not on that cloud?): say so once, keep asking
            if not self._quiet:
                log.warning("preemption notice: cannot reach the %s metadata service at %s (%s); still "
                            "polling", self.provider, self.base, err)
                self._quiet = True
            return None


def watch(provider: str, poll_s: float) -> NoticeWatcher | None:
    """Starts polling for ``checkpoint.preemption_notice`` (None when it is "none")."""
    return None if provider == "none" else NoticeWatcher(provider, poll_s).start()
