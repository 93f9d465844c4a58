"""Statistics helpers (wrapping statsmodels/scipy; no hand-written formulas), one module per topic.

* :mod:`~toolkit.stats.rates`: rates and means with intervals (Wilson, t).
* :mod:`~toolkit.stats.hypothesis`: paired/Welch t-tests, Cohen's d, exact McNemar, multiple-comparison
  adjustment, the random-direction control of a steering effect.
* :mod:`~toolkit.stats.dose`: logistic dose-response fits with ED50, cluster-bootstrap intervals and the
  therapeutic index.
* :mod:`~toolkit.stats.resampling`: the toolkit's one bootstrap (``scipy.stats.bootstrap``) and its percentile
  and basic intervals.
* :mod:`~toolkit.stats.seeds`: aggregation of one experiment over seeds.
* :mod:`~toolkit.stats.checks`: input checks shared by the above.

The public names are re-exported here: ``from toolkit.stats import X``.
"""

from .dose import LogisticFit, bootstrap_ed50, ed50, logistic_fit, therapeutic_index
from .hypothesis import (CORRECTIONS, adjust_pvalues, cohen_d, mcnemar_exact, paired_ttest, random_control,
                         welch_ttest)
from .rates import mean_summary, rate_ci, rate_summary
from .resampling import Bootstrap, averaging_weights, basic_interval, bootstrap, percentile_interval
from .seeds import aggregate_seeds, as_float, normalize_key

__all__ = ["Bootstrap", "CORRECTIONS", "LogisticFit", "adjust_pvalues", "aggregate_seeds", "as_float",
           "averaging_weights", "basic_interval", "bootstrap", "bootstrap_ed50", "cohen_d", "ed50", "logistic_fit",
           "mcnemar_exact", "mean_summary", "normalize_key", "paired_ttest", "percentile_interval", "random_control",
           "rate_ci", "rate_summary", "therapeutic_index", "welch_ttest"]
