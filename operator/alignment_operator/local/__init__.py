"""The local shell: `alignctl run --local` drives the operator's state machine (reconcile) with
stages run as child processes on this machine instead of Jobs on a cluster."""

from .runner import run_local

__all__ = ["run_local"]
