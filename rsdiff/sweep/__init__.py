"""Ray Tune sweep over timestep subsets, decoder-block subsets and head hyperparameters.

Each trial selects its channels from the extracted superset through the channel index (nothing
is recomputed), fits a head on the table's train rows and reports validation mIoU per epoch; an
ASHA scheduler stops weak trials early. MLflow gets one parent run per sweep (config, search
space, ranked summary, a plot of mIoU per timestep/block choice, the best trial's confusion
matrix) and one child run per trial (its choices as filterable params, metric curves, per-class
IoU). The best head is saved with its channel selection and checkpoint URI as one artifact.

The trials' settings are drawn by rsdiff from ``seed`` (``draw_samples``), or with
``search_mode=grid`` are every combination of the choices once (``grid_samples``); every trial keeps
a JSON record of its epochs in ``{storage}/{name}/trials/``. Re-running the same ``name`` with the
same ``storage`` continues an interrupted sweep from those records: samples that finished or were
stopped early are not run again, the rest run in a new Ray Tune experiment. Ray Tune's own state
(``tuner.pkl``, pickled experiment state) is never restored, because unpickling a file from shared
storage would run whatever code it holds. A re-run only continues when everything that decides
the results (features, search space, head settings, sample count, scheduler, seed) is unchanged:
``rsdiff-sweep.json`` holds those settings and their digest, and a mismatch is one error naming
what changed (``fresh=true`` deletes the old experiment and starts over).

Modules: :mod:`~rsdiff.sweep.space` (config, checks, seeded draw, spec digest),
:mod:`~rsdiff.sweep.records` (trial records), :mod:`~rsdiff.sweep.trial` (one trial),
:mod:`~rsdiff.sweep.report` (ranking, MLflow summary), :mod:`~rsdiff.sweep.run` (the driver).
"""
