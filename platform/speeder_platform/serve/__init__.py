"""`speeder serve`: the recommendation HTTP API on Ray Serve (docs/platform.md#serve).

    app.py          the Serve deployment and FastAPI app, `start`, `run_serve`, the API key
    api.py          the HTTP contract: request and response models, errors, body limit, bearer auth
    proxy.py        middleware inside Serve's proxy: retry on replica death, proxy errors as JSON
    recommender.py  request checks, the catalog, one-forward recommendations (shared with the UI)

`serve run jobs/serve.yaml` imports `speeder_platform.serve:build_app`; it is resolved on first use
(PEP 562), so importing `speeder_platform.serve.proxy` in Serve's proxy process stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_app"]


def __getattr__(name: str) -> Any:
    """`build_app` from `speeder_platform.serve.app`, imported when first asked for."""
    if name == "build_app":
        from speeder_platform.serve.app import build_app

        return build_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
