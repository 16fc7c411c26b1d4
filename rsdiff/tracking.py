"""MLflow tracking: where runs go, and a small run handle that never sees credentials.

The tracking URI comes from the config, else ``MLFLOW_TRACKING_URI``, else a local sqlite store
``runs/mlflow.db`` (view it with ``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db``).
Runs are addressed by id through ``MlflowClient`` (no global active run), so a Ray worker can
resume logging into the run its driver created.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rsdiff import storage
from rsdiff.config import flatten, redact, redact_uri, to_container
from rsdiff.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_STORE = "runs/mlflow.db"
MAX_PARAM_CHARS = 500


def resolve_uri(uri: str | None) -> str:
    """The tracking URI to use (config > ``MLFLOW_TRACKING_URI`` > local sqlite), made absolute."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_STORE}"
    if uri.startswith("sqlite:///"):  # a relative (sqlite:///runs/x.db) or absolute (sqlite:////x.db) file
        path = Path(uri[len("sqlite:///") :]).absolute()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"MLflow tracking store {uri!r} cannot be created: {path.parent} is not a folder "
                f"({exc.strerror}); point tracking.uri at a writable place"
            ) from None
        if path.is_dir():  # sqlite would retry opening it for minutes before saying so
            raise ConfigError(
                f"MLflow tracking store {uri!r} is a folder, not a database file: point tracking.uri at a "
                f"file in it, e.g. sqlite:///{path / 'mlflow.db'}"
            )
        uri = f"sqlite:///{path}"
    elif "://" not in uri:
        uri = str(Path(uri).absolute())
    return uri


def _artifact_root(uri: str) -> str | None:
    """For a local sqlite store, artifacts go beside it in ``mlartifacts/`` (not the process cwd)."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :]).parent.joinpath("mlartifacts").as_uri()
    return None


def client(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri``, checked to answer.

    An ``http(s)://`` server is first probed with a few short requests, so a server that is down
    fails in seconds rather than after MLflow's minutes of request retries.

    Raises:
        ConfigError: the tracking store cannot be reached or opened.
    """
    from mlflow import MlflowClient

    if uri.startswith(("http://", "https://")):
        _probe_server(uri)
    _check_local_store(uri)
    try:
        c = MlflowClient(tracking_uri=uri)
        c.search_experiments(max_results=1)
    except Exception as exc:
        if uri.startswith(("http://", "https://")):
            raise _unreachable(uri, type(exc).__name__) from exc
        raise ConfigError(
            f"MLflow tracking store {storage.display(uri)!r} cannot be opened ({type(exc).__name__}): "
            "point tracking.uri at an MLflow store (e.g. sqlite:///runs/mlflow.db) or leave it unset"
        ) from exc
    return c


def _check_local_store(uri: str) -> None:
    """A local store must be writable before any work starts (a run is recorded at the end too)."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        target = path if path.exists() else path.parent
    elif "://" not in uri or uri.startswith("file://"):
        target = Path(uri[len("file://") :] if uri.startswith("file://") else uri)
        while not target.exists() and target != target.parent:
            target = target.parent
    else:
        return
    if not os.access(target, os.W_OK):
        raise ConfigError(
            f"MLflow tracking store {storage.display(uri)!r} is not writable ({target} is read-only for "
            "this user): fix its permissions or point tracking.uri elsewhere"
        )


def _probe_server(uri: str, attempts: int = 3, timeout_s: float = 5.0) -> None:
    """Raise :func:`_unreachable` unless the server at ``uri`` answers HTTP at all (any status)."""
    import time
    import urllib.error
    import urllib.request

    health = storage.display(uri).rstrip("/") + "/health"
    for attempt in range(attempts):
        try:
            urllib.request.urlopen(health, timeout=timeout_s).close()
            return
        except urllib.error.HTTPError:
            return  # it answered; MLflow's own request reports auth or path problems
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if attempt == attempts - 1:
                raise _unreachable(uri, f"{type(reason).__name__} after {attempts} tries") from exc
            time.sleep(0.5 * 2**attempt)


def _unreachable(uri: str, why: str) -> ConfigError:
    return ConfigError(
        f"MLflow tracking URI {storage.display(uri)!r} is unreachable ({why}); start the server, "
        "fix tracking.uri / MLFLOW_TRACKING_URI, or leave both unset for a local sqlite store"
    )


# MLflow 3's UI opens an experiment on its GenAI pages (traces) unless the experiment says it holds
# model-training runs; rsdiff's experiments do.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def experiment_id(c: Any, name: str, uri: str) -> str:
    """The id of experiment ``name``, created (with a sensible artifact root) if missing, and
    marked as a model-training experiment (:data:`EXPERIMENT_KIND`)."""
    exp = c.get_experiment_by_name(name)
    if exp is None:
        return c.create_experiment(name, artifact_location=_artifact_root(uri), tags=dict([EXPERIMENT_KIND]))
    if EXPERIMENT_KIND[0] not in exp.tags:
        c.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    return exp.experiment_id


def runs_view_url(ui: str, experiment: str) -> str:
    """The MLflow UI address (``ui``, e.g. ``http://127.0.0.1:5000``) of experiment id
    ``experiment``'s runs table, the view that compares training runs, in the UI's machine-learning
    workflow (MLflow 3 otherwise opens its GenAI workflow, whose choice it remembers per browser)."""
    query = "compareRunsMode=TABLE&workflowType=machine_learning"
    return f"{ui.rstrip('/')}/#/experiments/{experiment}/runs?{query}"


def config_params(cfg: Any) -> dict[str, str]:
    """A config as flat MLflow params: dotted keys, secrets redacted, values as short strings."""
    flat = flatten(redact(to_container(cfg)))
    return {
        k: (json.dumps(v) if isinstance(v, list | dict) else str(v))[:MAX_PARAM_CHARS]
        for k, v in flat.items()
    }


class RunHandle:
    """Logging into one MLflow run by id: metrics, params, images, dicts, figures."""

    def __init__(self, uri: str, run_id: str) -> None:
        from mlflow import MlflowClient

        self.uri = uri
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=uri)

    @classmethod
    def find_or_create(
        cls, uri: str, experiment: str, run_name: str, tags: dict[str, str], match_tag: str
    ) -> tuple[RunHandle, bool]:
        """Resume the newest run whose tag ``match_tag`` equals ``tags[match_tag]``, else start one.

        Returns ``(handle, resumed)``.
        """
        c = client(uri)
        exp = experiment_id(c, experiment, uri)
        found = c.search_runs(
            [exp],
            filter_string=f"tags.`{match_tag}` = '{tags[match_tag]}'",
            order_by=["start_time DESC"],
            max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
            c.update_run(run_id, status="RUNNING")
            return cls(uri, run_id), True
        return cls(uri, _create_run(c, exp, run_name, tags, uri)), False

    @classmethod
    def create(cls, uri: str, experiment: str, run_name: str, tags: dict[str, str]) -> RunHandle:
        """Start a new run (a child run when ``tags`` holds ``mlflow.parentRunId``)."""
        c = client(uri)
        return cls(uri, _create_run(c, experiment_id(c, experiment, uri), run_name, tags, uri))

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def last_step(self, metric: str) -> int:
        """The highest step at which ``metric`` was logged in this run (0 when never)."""
        history = self.client.get_metric_history(self.run_id, metric)
        return max((m.step for m in history), default=0)

    def log_image(self, image: np.ndarray, path: str) -> None:
        """Log an ``(H, W, 3)`` uint8 picture as a PNG artifact at ``path``."""
        from PIL import Image

        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / Path(path).name
            Image.fromarray(image).save(local)
            folder = str(Path(path).parent)
            self.client.log_artifact(
                self.run_id, str(local), artifact_path=None if folder in ("", ".") else folder
            )

    def log_figure(self, figure: Any, path: str) -> None:
        """Log a matplotlib figure as a PNG artifact."""
        buf = io.BytesIO()
        figure.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        from PIL import Image

        self.log_image(np.array(Image.open(buf).convert("RGB")), path)

    def log_dict(self, data: dict[str, Any], path: str) -> None:
        self.client.log_dict(self.run_id, redact(data), path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def _create_run(c: Any, experiment: str, run_name: str, tags: dict[str, str], uri: str) -> str:
    """A new run's id, tagged with its provenance (``tags`` win over the process's own, so a Ray
    worker can pass on its driver's); a store that refuses the write is one clear error."""
    from rsdiff.provenance import provenance_tags

    try:
        return c.create_run(experiment, run_name=run_name, tags={**provenance_tags(), **tags}).info.run_id
    except Exception as exc:
        first = redact_uri(str(exc).splitlines()[0][:200]) if str(exc) else ""  # may quote the URI
        raise ConfigError(
            f"MLflow tracking store {storage.display(uri)!r} refused to record a run "
            f"({type(exc).__name__}: {first}); make it writable or point tracking.uri elsewhere"
        ) from exc


@contextlib.contextmanager
def ends_run(run: RunHandle | None):
    """Inside the block, an exception ends ``run`` as KILLED (Ctrl-C, SIGTERM) or FAILED, then
    propagates; a run is never left RUNNING by a job that stopped."""
    try:
        yield run
    except BaseException as exc:
        if run is not None:
            with contextlib.suppress(Exception):
                run.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise


@dataclass
class StageTracking:
    """MLflow for one job: ``uri`` null = ``MLFLOW_TRACKING_URI`` or ``runs/mlflow.db``;
    ``enabled=false`` logs no run."""

    enabled: bool = True
    uri: str | None = None
    experiment: str = "rsdiff"
    parent_run_id: str | None = None  # nest this job's run under another (the demo's run does)


def parent_tags(parent_run_id: str | None) -> dict[str, str]:
    """The tag that nests a run under ``parent_run_id`` in MLflow's runs table (none for None)."""
    return {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}


def start_stage_run(
    t: Any, run_name: str, tags: dict[str, str], cfg: Any, data: dict[str, Any] | None = None
) -> RunHandle | None:
    """A new run for a job's config ``cfg`` (params logged, secrets redacted), nested under
    ``t.parent_run_id`` when set and tagged with the ``data`` URIs it read and wrote (see
    :func:`rsdiff.provenance.provenance_tags`); None when disabled."""
    from rsdiff.provenance import provenance_tags

    if not t.enabled:
        return None
    tags = {**provenance_tags(data), **parent_tags(t.parent_run_id), **tags}
    run = RunHandle.create(resolve_uri(t.uri), t.experiment, run_name, tags)
    run.log_params(config_params(cfg))
    return run


def log_input(handle: RunHandle, uri: str, sidecar: str, kind: str, context: str) -> None:
    """Record the dataset at ``uri`` (a shards folder with its ``manifest.json``, a feature table
    with its ``table.json``: ``sidecar``) as an input of ``handle``'s run, so MLflow's Dataset
    column says what the run read: named ``{kind}:{folder name}``, its digest the sidecar's sha256
    (a re-ingest or re-extraction to the same URI shows as another dataset), ``context`` e.g.
    ``training``. Best effort: a store that cannot record inputs only loses the column."""
    import hashlib
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    try:
        digest = hashlib.sha256(storage.read_bytes(storage.join(uri, sidecar))).hexdigest()[:12]
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local path is local
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(storage.absolute(uri))
        dataset = MetaDataset(source=source, name=f"{kind}:{storage.name(uri.rstrip('/'))}", digest=digest)
        tag = InputTag(key="mlflow.data.context", value=context)
        handle.client.log_inputs(handle.run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), [tag])])
    except Exception as exc:
        log.warning("could not record %s as an input of the MLflow run: %s", storage.display(uri), exc)
