"""moa_engine: a Mixture-of-LoRAs engine for LLMs.

Importing the package loads the compiled core, which registers the operators under
``torch.ops.moa``; :mod:`moa_engine.ops` is their documented Python face.
"""

import torch  # noqa: F401  (loads libtorch, which _C links against)

try:
    from moa_engine import _C
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "moa_engine's compiled extension (moa_engine._C) could not be loaded: "
        f"{exc}. Build it against the installed torch with "
        "`pip install --no-build-isolation -e .`."
    ) from exc

from moa_engine import ops
from moa_engine.engine import Completion, Engine, SamplingParams

__version__ = "0.1.0"


def built_with_cuda() -> bool:
    """Whether the CUDA sources were compiled into this build."""
    return _C.built_with_cuda()


__all__ = ["Engine", "Completion", "SamplingParams", "ops", "built_with_cuda", "__version__"]
