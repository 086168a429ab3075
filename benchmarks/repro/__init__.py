"""The reproduction driver behind ``benchmarks/reproduce.py``, one job per module.

- ``methods``: the method-name grammar (``GN@λ=0.03-|M|=1024``), hyperparameters, the optimizer of a method.
- ``presets``: the presets; ``config``: command-line options → one run configuration, the data.
- ``training``: one (method, seed) run's loop, checkpoints; ``evaluation``: BatchNorm recalibration, accuracy.
- ``driver``: the multi-run driver (run order, --jobs worker processes, --resume, --time-budget, torchrun).
- ``progress``: progress displays; ``distributed``: torchrun helpers; ``uncertainty``: intervals over seeds.
- ``cli``: the command line (``benchmarks/reproduce.py`` calls :func:`cli.main`). Reporting is ``benchmarks/report.py``.
"""
