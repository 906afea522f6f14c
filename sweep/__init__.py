"""Sweeps, seeds and comparisons: Ray Tune searches over lab runs, and the statistics to read them.

* :mod:`sweep.spec`: ``--param NAME=SPEC`` parsing, the configurations a sweep draws, and its spec
  file ``DIR/sweep.json``.
* :mod:`sweep.tune`: the Tune driver (``lab sweep``): one trial per configuration and seed, each
  an ordinary lab run directory ``DIR/trials/<config>-seed<k>/`` trained by the lab's own engine.
* :mod:`sweep.results`: the results table of a sweep (CSV, JSON) and its ranking.
* :mod:`sweep.runs`: finding runs, grouping them by configuration, their curves and final scores.
* :mod:`sweep.stats`: interquartile mean, stratified-bootstrap intervals and the probability of
  improvement (Agarwal et al. 2021, through rliable).
* :mod:`sweep.plots`: the sweep's picture and ``lab compare``'s learning curves.

Nothing here imports Ray at module level except :mod:`sweep.tune`; the rest reads run directories.
"""
