"""Local losses: the model cut into blocks, each trained on its own auxiliary loss.

Blocks (:mod:`~fwdgrad.local.blocks`), auxiliary heads and group/patch losses
(:mod:`~fwdgrad.local.losses`), the per-block forward-mode passes (:mod:`~fwdgrad.local.execution`;
the later passes reuse the first one's values, :mod:`~fwdgrad.local.reuse`), and the estimators:
:class:`~fwdgrad.local.estimator.LocalForwardGradient` (Ren et al. 2023) and
:class:`~fwdgrad.local.guess.LocalGuessForwardGradient` (Fournier et al. 2023).

May import: torch, fwdgrad.core.
"""

from fwdgrad.local.estimator import LocalForwardGradient
from fwdgrad.local.guess import LOCAL_GUESSES, LocalGuessForwardGradient

__all__ = ["LOCAL_GUESSES", "LocalForwardGradient", "LocalGuessForwardGradient"]
