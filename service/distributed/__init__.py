"""The same service on Ray Serve (optional extra: `pip install .[ray]`).

`app.build(settings)` is the Serve application: an ingress deployment running the FastAPI app of
`service.app.create_app` with a `RayRuntime`, one explainer deployment per model, and a one-replica
state deployment holding jobs and the explainers' metrics. Nothing here is imported by the embedded engine.
"""
