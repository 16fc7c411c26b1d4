"""Whole-scene prediction on Ray, shared by the jobs that predict scenes (``jobs/predict.py``,
``jobs/suggest.py``): loading a head with its checkpoint, the window geometry, header checks, and
one Ray task per scene.

A task loads the head and its checkpoint once per worker process (:func:`loaded_head`: one
diffusion model per checkpoint, a few heads, least recently used dropped) and runs
:func:`~rsdiff.prediction.scene.predict_scene` with the run's :class:`TaskOptions`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from rsdiff import storage
from rsdiff.data.scenes import SceneRef
from rsdiff.errors import CheckpointError, ConfigError
from rsdiff.prediction.scene import SceneOutputs, UncertaintyOptions, WindowPlan
from rsdiff.prediction.tiles import TileOptions
from rsdiff.ray_config import RayConfig


def load_head_and_checkpoint(head_uri: str, device: Any = "cpu") -> tuple[Any, Any]:
    """``(TrainedHead, PretrainedDDPM)`` of a head artifact, with a clear error if its checkpoint is
    gone or is another model now. ``device="meta"``: the checkpoint's structure only, what a driver
    checks scenes and plans windows with (see :func:`~rsdiff.diffusion.checkpoint.load_pretrained`)."""
    from rsdiff.heads.artifact import TrainedHead

    head = TrainedHead.load(head_uri)
    return head, _load_checkpoint(head_uri, head, device)


def _load_checkpoint(head_uri: str, head: Any, device: Any) -> Any:
    """The checkpoint ``head`` was fitted on features of, refused when another model now sits at
    its URI (the weights' sha256 the head recorded differs)."""
    from rsdiff.diffusion.checkpoint import load_pretrained

    checkpoint = head.checkpoint
    try:
        return load_pretrained(checkpoint, device=device, expect_sha256=head.checkpoint_sha256 or None,
                               expected_by=f"head {storage.display(head_uri)}")  # fmt: skip
    except CheckpointError as exc:
        if "is not the model" in str(exc):
            raise
        raise CheckpointError(
            f"head {storage.display(head_uri)} was fitted on features of checkpoint "
            f"{storage.display(checkpoint)}, which cannot be loaded: {exc}. Restore that checkpoint "
            "or fit a new head on features of an existing one"
        ) from None


def window_plan(cfg: Any, ddpm: Any) -> WindowPlan:
    """The window geometry of a config with ``window``, ``overlap``, ``border``, ``batch_size``,
    ``cpus_per_scene`` and ``num_gpus`` (predict's, suggest's), validated against the UNet (size
    divisible by its downsampling)."""
    from rsdiff.prediction.config import DEFAULT_BORDER_FRACTION, DEFAULT_OVERLAP_FRACTION

    size = int(cfg.window or ddpm.meta["image_size"])
    factor = 2 ** (len(ddpm.meta["model"]["channel_mult"]) - 1)
    overlap = int(cfg.overlap if cfg.overlap is not None else size * DEFAULT_OVERLAP_FRACTION)
    border = cfg.border if cfg.border is not None else int(size * DEFAULT_BORDER_FRACTION)
    if cfg.border is None and overlap < 2 * border:  # a small explicit overlap: the plain ramp
        border = 0
    if size < factor or size % factor:
        raise ConfigError(f"window={size} must be a positive multiple of {factor} (the UNet's downsampling)")
    if not 0 <= overlap < size:
        raise ConfigError(f"overlap={overlap} must be in [0, window={size})")
    if border < 0 or (border and overlap < 2 * border):
        raise ConfigError(
            f"border={border} must be >= 0 and overlap={overlap} at least twice it (so every pixel has a "
            "window in which it is clear of the border band); raise overlap or lower border"
        )
    return WindowPlan(size, overlap, int(border))


# What a prediction worker keeps loaded between scene tasks. The diffusion models, by checkpoint
# and device: every head of one checkpoint shares one copy (a 552M-parameter ADM model is ~2 GB).
# The heads with their extractors, by (head, device, precision), least recently used dropped first:
# a label-efficiency run predicts with dozens of heads, one after another.
MODELS_KEPT, HEADS_KEPT = 2, 4
_MODELS: OrderedDict[tuple[str, str], Any] = OrderedDict()
_HEADS: OrderedDict[tuple[str, str, str], tuple[Any, Any]] = OrderedDict()


def _lru_get(cache: OrderedDict, key: Any, keep: int, load: Any) -> Any:
    """``cache[key]``, loaded with ``load()`` when absent; at most ``keep`` entries stay."""
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = load()
    cache[key] = value
    while len(cache) > keep:
        cache.popitem(last=False)
    return value


def loaded_head(head_uri: str, device: Any, precision: str) -> tuple[Any, Any]:
    """``(TrainedHead, extractor)`` for ``head_uri`` on ``device``, from this worker's caches."""
    from rsdiff.heads.artifact import TrainedHead
    from rsdiff.prediction.scene import make_extractor

    def load() -> tuple[Any, Any]:
        head = TrainedHead.load(head_uri)
        key = (head.checkpoint, head.checkpoint_sha256, str(device))
        ddpm = _lru_get(_MODELS, key, MODELS_KEPT, lambda: _load_checkpoint(head_uri, head, device))
        return head, make_extractor(ddpm, head, precision)

    return _lru_get(_HEADS, (head_uri, str(device), precision), HEADS_KEPT, load)


@dataclass(frozen=True)
class TaskOptions:
    """How every scene task runs (from the predict or suggest config)."""

    num_gpus: float  # per task
    precision: str  # auto | fp32 | bf16
    batch_size: int  # windows per UNet pass
    quicklook_size: int  # px, longest side
    region: list[int] | None = None  # [row, col, height, width] px of each scene; None: all of it
    uncertainty: UncertaintyOptions | None = None  # per-pixel uncertainty; None: none
    tiles: TileOptions | None = None  # per-tile uncertainty statistics (suggestions)


def _predict_task(
    head_uri: str, ref: SceneRef, plan: WindowPlan, outputs: SceneOutputs, opts: TaskOptions, counter: Any
) -> dict[str, Any]:
    """A Ray task: one scene. Raises RsdiffError subclasses unchanged (the driver reports them)."""
    from rsdiff.devices import pick_device
    from rsdiff.prediction.scene import predict_scene
    from rsdiff.tempfiles import remove_orphans

    remove_orphans()  # what tasks of a stopped job left on this node
    head, extractor = loaded_head(head_uri, pick_device(opts.num_gpus), opts.precision)
    record = predict_scene(
        ref,
        head,
        extractor,
        plan,
        outputs,
        opts.batch_size,
        opts.quicklook_size,
        on_windows=lambda n: counter.add(windows=n),
        region=opts.region,
        uncertainty=opts.uncertainty,
        tiles=opts.tiles,
    )
    counter.add(scenes=1)
    return record


def predict_scenes(
    head_uri: str,
    refs: list[SceneRef],
    plan: WindowPlan,
    outputs: list[SceneOutputs],
    opts: TaskOptions,
    cpus_per_scene: float,
    ray_cfg: RayConfig,
    windows_total: int,
    desc: str = "predict",
) -> list[dict[str, Any]]:
    """One Ray task per scene (``cpus_per_scene`` CPUs, ``opts.num_gpus`` GPUs each), with a
    progress bar over ``windows_total`` windows; returns the scenes' records in ``refs`` order.

    A failed scene, Ctrl-C or SIGTERM cancels the other scenes; a scene's RsdiffError is raised on
    the driver as itself (one line for the job to print).
    """
    import ray

    from rsdiff.progress import ProgressCounter, wait_with_progress
    from rsdiff.raytools import connect, stop_tasks, user_error

    connect(ray_cfg.address, ray_cfg.num_cpus)
    counter = ProgressCounter.open()
    task = ray.remote(_predict_task).options(
        num_cpus=cpus_per_scene, num_gpus=opts.num_gpus or None, max_retries=2, retry_exceptions=False
    )
    refs_out = [task.remote(head_uri, ref, plan, o, opts, counter) for ref, o in zip(refs, outputs)]
    try:
        return wait_with_progress(refs_out, counter, windows_total, "windows", desc, extra="scenes")
    except BaseException as exc:  # a failed scene, Ctrl-C or SIGTERM: stop the other scenes too
        stop_tasks(refs_out)
        if (err := user_error(exc)) is not None:
            raise err from None
        raise
    finally:
        counter.close()


def count_windows(
    refs: list[SceneRef], plan: WindowPlan, head: Any, extractor: Any, region: Any = None
) -> int:
    """Check every scene's header against the model (band count, dtype; S3 scenes: their headers
    only) and count the windows predicting them takes.

    Raises:
        DataError: a scene that cannot feed the model.
    """
    from rsdiff.data.scenes import SceneReader
    from rsdiff.data.tiling import axis_origins
    from rsdiff.prediction.scene import check_scene

    total = 0
    for ref in refs:
        with SceneReader(ref, region=region) as reader:
            check_scene(reader, head, extractor)
            total += len(axis_origins(reader.height, plan.size, plan.stride)) * len(
                axis_origins(reader.width, plan.size, plan.stride)
            )
    return total
