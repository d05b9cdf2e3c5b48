"""The operator's start (handlers._startup, kopf's startup activity): kopf runs it again a minute
after it raised, so an API error while it reads the cluster must not leave a second try binding
the ports the first one bound; a port another process holds stops the operator, naming it."""

from __future__ import annotations

import socket
import ssl
import urllib.request

import kopf
import pytest
from kubernetes.client.rest import ApiException

from alignment_operator import controller, handlers, kube, progress_server
from alignment_operator.listener import shared_loop


@pytest.fixture
def startup(monkeypatch):
    """_startup as kopf calls it, on a fresh process's state; the workers counted, not started.
    The progress listeners it started are stopped afterwards (no test here lets it bind metrics:
    ALIGNMENT_METRICS_PORT is 0 or held)."""
    monkeypatch.setattr(handlers, "_started", {})
    monkeypatch.setattr(controller, "_context", controller._context)
    workers: list[int] = []
    monkeypatch.setattr(controller, "start", workers.append)
    monkeypatch.setenv("ALIGNMENT_WORKERS", "3")
    served: list = []
    real_serve = progress_server.serve

    def serve(*args, **kwargs):
        endpoint, listener = real_serve(*args, host="127.0.0.1", **kwargs)
        served.append(listener)
        return endpoint, listener

    monkeypatch.setattr(progress_server, "serve", serve)

    def run():
        handlers._startup(settings=kopf.OperatorSettings())

    run.workers, run.served = workers, served
    yield run
    for listener in served:
        shared_loop().call(listener.stop())
    assert "metrics" not in handlers._started, "a metrics listener would outlive the test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_start_that_met_an_api_error_comes_up_on_kopfs_retry_with_its_ports_bound_once(startup, monkeypatch):
    port = free_port()
    monkeypatch.setenv("ALIGNMENT_PROGRESS_PORT", str(port))
    monkeypatch.setenv("ALIGNMENT_PROGRESS_URL", f"https://127.0.0.1:{port}")
    monkeypatch.setenv("ALIGNMENT_PROGRESS_HOSTNAMES", "127.0.0.1")
    monkeypatch.setenv("ALIGNMENT_METRICS_PORT", "0")
    answers = iter([ApiException(status=503, reason="Service Unavailable"), True, True])

    def available(crd):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(kube, "custom_resource_available", available)

    with pytest.raises(ApiException):
        startup()       # kopf logs it and runs the activity again
    assert len(startup.served) == 1 and startup.workers == []
    startup()           # before: OSError, its own port already bound, on every retry
    assert startup.workers == [3]
    assert len(startup.served) == 1
    assert controller._context.progress_url == f"https://127.0.0.1:{port}"
    assert controller._context.pytorchjob_available and controller._context.jobset_available
    # The endpoint the first try bound is the one stage pods are told about, and it answers.
    tls = ssl.create_default_context(cadata=controller._context.progress_ca)
    with pytest.raises(urllib.error.HTTPError) as answered:
        urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz-no-such-path", context=tls, timeout=5)
    assert answered.value.code in (401, 404, 405)


def test_a_metrics_port_another_process_holds_stops_the_operator_naming_it(startup, monkeypatch):
    monkeypatch.setenv("ALIGNMENT_PROGRESS_URL", "")
    monkeypatch.setattr(kube, "custom_resource_available", lambda crd: False)
    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen(1)
        port = held.getsockname()[1]
        monkeypatch.setenv("ALIGNMENT_METRICS_PORT", str(port))
        with pytest.raises(kopf.PermanentError) as stopped:
            startup()
    assert f"ALIGNMENT_METRICS_PORT={port}" in str(stopped.value)
    assert "Address already in use" in str(stopped.value)
    assert startup.workers == []    # nothing reconciles in an operator that is stopping
