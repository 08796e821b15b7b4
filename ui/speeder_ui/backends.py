"""The demo's models behind one interface: a Serve endpoint, a recommender in this process, or a baseline
(SASRec's or popularity's list for the same history) ranked over the same catalog."""

from __future__ import annotations

import re
from typing import Any, Protocol

from speeder_platform.serve.recommender import Recommender, RequestError


class Backend(Protocol):
    """What the demo needs from a model: the Serve API, or a recommender in this process."""

    label: str

    def recommend(self, history: list[int], k: int, exclude_history: bool) -> list[dict[str, Any]]: ...
    def search(self, q: str, limit: int) -> list[dict[str, Any]]: ...
    def item(self, item_id: int) -> dict[str, Any]: ...
    def image(self, item_id: int) -> tuple[bytes, str] | None: ...
    def metadata(self) -> dict[str, Any]: ...


class LocalBackend:
    """A checkpoint loaded in this process."""

    def __init__(self, rec: Recommender, label: str = "A") -> None:
        self.rec = rec
        self.label = label

    def recommend(self, history: list[int], k: int, exclude_history: bool) -> list[dict[str, Any]]:
        return self.rec.recommend([history], k=k, exclude_history=exclude_history)[0]

    def search(self, q: str, limit: int) -> list[dict[str, Any]]:
        return self.rec.search(q, limit)

    def item(self, item_id: int) -> dict[str, Any]:
        return self.rec.item(item_id)

    def image(self, item_id: int) -> tuple[bytes, str] | None:
        return self.rec.image(item_id)

    def metadata(self) -> dict[str, Any]:
        return self.rec.metadata()


class HttpBackend:
    """A running Serve endpoint (`speeder serve`); its 4xx answers come back as RequestError.

    It sends the API key as `Authorization: Bearer` when one is set, read as the API reads it
    (serve.api_key_file, else $SPEEDER_API_KEY); the key stays in the client's headers, never logged.
    """

    def __init__(self, endpoint: str, label: str = "A", timeout: float = 60.0,
                 api_key_file: str | None = None) -> None:
        import httpx

        from speeder_platform.serve.app import read_api_key

        self.endpoint = endpoint.rstrip("/")
        self.label = label
        key = read_api_key(api_key_file)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.endpoint, timeout=timeout, headers=headers)

    def _json(self, response: Any) -> Any:
        if response.status_code < 400:
            return response.json()
        try:
            body = response.json()
        except ValueError:
            body = {}
        field = str(body.get("field", "request"))
        detail = str(body.get("detail", f"HTTP {response.status_code}")).removeprefix(f"{field}: ")
        raise RequestError(field, detail, response.status_code)

    def recommend(self, history: list[int], k: int, exclude_history: bool) -> list[dict[str, Any]]:
        body = {"history": history, "k": k, "exclude_history": exclude_history}
        return self._json(self.http.post("/recommend", json=body))["items"]

    def search(self, q: str, limit: int) -> list[dict[str, Any]]:
        return self._json(self.http.get("/items", params={"q": q, "limit": limit}))["items"]

    def item(self, item_id: int) -> dict[str, Any]:
        return self._json(self.http.get(f"/items/{item_id}"))

    def image(self, item_id: int) -> tuple[bytes, str] | None:
        r = self.http.get(f"/items/{item_id}/image")
        return (r.content, r.headers.get("content-type", "image/png")) if r.status_code == 200 else None

    def metadata(self) -> dict[str, Any]:
        return self._json(self.http.get("/metadata"))


class BaselineBackend:
    """A baseline scorer over the same catalog (SASRec, popularity): scores every item for a history and
    takes items' titles and images from Speeder's backend, so the lists look alike."""

    def __init__(self, label: str, version: str, scorer: Any, catalog: Backend, num_items: int) -> None:
        self.label = label
        self.version = version
        self.scorer = scorer  # history (B, H) left-padded with -1 -> scores (B, N)
        self.catalog = catalog
        self.num_items = num_items

    def recommend(self, history: list[int], k: int, exclude_history: bool) -> list[dict[str, Any]]:
        import torch

        bad = [i for i in history if not 0 <= int(i) < self.num_items]
        if bad:
            raise RequestError("history", f"unknown item id {bad[0]} (the catalog has ids 0..{self.num_items - 1})")
        with torch.no_grad():
            scores = self.scorer(torch.tensor([history], dtype=torch.long))[0].float()  # (N,)
        if exclude_history:
            scores[torch.tensor(history, dtype=torch.long)] = float("-inf")
        values, index = scores.topk(min(k, self.num_items - (len(set(history)) if exclude_history else 0)))
        return [{**self.catalog.item(int(i)), "rank": r + 1, "score": float(v)}
                for r, (v, i) in enumerate(zip(values.tolist(), index.tolist(), strict=True))]

    def search(self, q: str, limit: int) -> list[dict[str, Any]]:
        return self.catalog.search(q, limit)

    def item(self, item_id: int) -> dict[str, Any]:
        return self.catalog.item(item_id)

    def image(self, item_id: int) -> tuple[bytes, str] | None:
        return self.catalog.image(item_id)

    def metadata(self) -> dict[str, Any]:
        return {"model_version": self.version, "num_items": self.num_items, "modalities": []}


def baseline_backends(cfg: Any, catalog: Backend) -> list[Backend]:
    """SASRec (featurize's, as trained for the sequence features) and popularity (train interactions) on
    the config's dataset; SASRec is left out when the features hold none."""
    from speeder_platform import storage
    from speeder_platform.baselines_eval import (
        popularity_from_sequences,
        popularity_scorer,
        sasrec_scorer,
        train_item_counts,
    )
    from speeder_platform.featurize.sequence import SASREC_META, load_sasrec, sasrec_dir
    from speeder_platform.tables import features_folder

    sequences, num_items = train_item_counts(cfg.data.uri)
    out: list[Backend] = []
    directory = sasrec_dir(features_folder(cfg.data.uri, cfg.featurize.name))
    if storage.exists(storage.join(directory, SASREC_META)):
        sasrec, meta = load_sasrec(directory)
        epochs = len(meta.get("stats") or [])
        out.append(BaselineBackend("SASRec", f"featurize's SASRec, {epochs} epochs", sasrec_scorer(sasrec), catalog,
                                   num_items))
    out.append(BaselineBackend("Popularity", "train interactions per item",
                               popularity_scorer(popularity_from_sequences(sequences, num_items)), catalog, num_items))
    return out


# -- rendering (plain HTML, escaped; images from this app's own route) ------------------------------


def load_backend(spec: str | None, cfg: Any, label: str) -> Backend:
    """An endpoint URL, `stageN` (that stage's best checkpoint in the config's run), a checkpoint URI, or
    None (serve.checkpoint, else the run's final checkpoint), loaded in this process."""
    if spec and spec.startswith(("http://", "https://")):
        return HttpBackend(spec, label, api_key_file=cfg.serve.api_key_file)
    from speeder_platform import storage
    from speeder_platform.serve.app import serve_settings

    if spec and re.fullmatch(r"stage\d", spec):
        from speeder_platform.trained import FINAL_FILE, run_uri

        stages = storage.read_json(storage.join(run_uri(cfg), FINAL_FILE))["stages"]
        found = [s["checkpoint"] for s in stages if f"stage{s['stage']}" == spec]
        if not found:
            raise ValueError(f"--compare: the run has no {spec} (stages {[s['stage'] for s in stages]})")
        spec = found[0]
    s = serve_settings(cfg, spec)
    return LocalBackend(Recommender.from_checkpoint(s.checkpoint, s.dataset, s.features_name, limits=s.limits,
                                                    eval_metrics_uri=s.eval_metrics_uri), label)
