"""Development tooling that needs a checkout of the repository (``scripts/``, ``services/``):
the local stack (``isplit stack``), the end-to-end demo (``isplit demo``), a private local
TorchServe on free ports (for the stack, the test fixtures and the serving benchmark) and a
cached reference model. The services never import this package."""

from pathlib import Path

#: The repository checkout this package runs from.
REPO = Path(__file__).resolve().parents[3]
