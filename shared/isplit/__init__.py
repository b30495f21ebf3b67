"""isplit: I-SPLIT split computing — find where to cut a CNN between edge and server.

The library every isplit service imports, one module per concept:

* model and data: ``zoo`` (model builders), ``data`` (datasets, preprocessing, ``DatasetRef``),
  ``checkpoint`` (safe save/load), ``training`` (reference models, evaluation);
* the method: ``cuts`` (single-tensor cut points), ``importance`` (the Grad-CAM importance
  engine), ``analysis`` (one analysis run, its report and candidates), ``stats`` (rank
  statistics), ``plots``, ``plan`` (deployment plans: ``costs``, ``profiles``, ``planner``,
  ``measure``, ``report``, ``cli``);
* the split: ``bottleneck``, ``retrain`` (retraining within a ``BottleneckSpec`` budget),
  ``export`` (head/tail TorchScript);
* wire and plumbing: ``wire`` (tensor format), ``messages`` (Kafka schemas), ``bus`` (Kafka
  helpers), ``settings`` (``ServiceSettings``), ``torchserve``, ``edge`` (the edge client);
* ``experiment`` (re-measuring the claim), ``dev`` (checkout-only tooling: the local stack, the
  demo, a private TorchServe), ``cli`` (the ``isplit`` command).
"""

__version__ = "0.1.0"


class IsplitError(ValueError):
    """An error the user caused (bad argument, missing file, mismatched weights).

    The CLI prints its message on one line and exits with code 2; services turn it into a 4xx.
    """
