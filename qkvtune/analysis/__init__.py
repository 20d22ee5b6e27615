"""Theory toolkit: empirical NTK, kernel predictors, early stopping, adapter subspaces, task vectors.

Pure functions over tensors and models; nothing here trains (except ``samples``, the sample-size study
driver, which calls ``qkvtune.train.train``). Each analysis can write JSON + PNG into a folder
(``plots.py``); ``cli.py`` adds ``qkvtune analyze ...``. Submodules are imported on use, so importing this
package stays cheap.
"""

from ..errors import QkvtuneError


class AnalysisError(QkvtuneError):
    """A bad analysis argument; the message names it in one line."""


__all__ = ["AnalysisError"]
