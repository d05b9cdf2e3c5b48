"""Pure renderers: (run, stage) -> recipe and Kubernetes manifests. No I/O."""
