"""isplit: I-SPLIT split computing — find where to cut a CNN between edge and server.

The library every isplit service imports. Modules, one per concept:
``zoo`` (model builders), ``data`` (datasets, preprocessing), ``checkpoint``, ``cuts``
(single-tensor cut points), ``importance`` (the Grad-CAM importance engine), ``plots``,
``bottleneck``, ``export``, ``wire``, ``messages``, ``bus``, ``torchserve``, ``edge``, ``cli``.
"""

__version__ = "0.1.0"


class IsplitError(ValueError):
    """An error the user caused (bad argument, missing file, mismatched weights).

    The CLI prints its message on one line and exits with code 2; services turn it into a 4xx.
    """
