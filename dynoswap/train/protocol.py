"""The training protocol's defaults, in one place for ``fit``, the CLI and ``make experiment``.

Plain numbers, no torch: the CLI reads them for its option defaults before any heavy import.
See the README's protocol section for how they were chosen.
"""

from __future__ import annotations

#: Fractions of the run's steps: alphas held while the weights warm up, then learned (the search),
#: then fixed at integer sizes while the weights train on.
WARMUP = 0.1
SEARCH_END = 0.5
#: Fraction of the run over which a budget moves from the model's own cost to the target (log-linear):
#: the search shrinks (or grows) the model gradually, so the axes whose cells the weights use keep them.
BUDGET_ANNEAL = 0.3
#: Most an alpha may move in one step, in log space (2%).
MAX_STEP = 0.02
#: Typical relative change of an alpha per step (the normalised step of ``AlphaStepper``), chosen on
#: ``make experiment`` (with the earlier position gradient): 0.005 let the search go the wrong way on
#: barcodes-noisy, 0.02 cost digits-stretch.
ALPHA_LR = 0.015
