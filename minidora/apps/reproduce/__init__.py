"""``python -m minidora reproduce``: the papers' measurable claims, checked on SmolLM2-135M.

Each claim is one module with the same small interface (:mod:`.claims` lists them): the paper's
figure, a ``run`` that measures ours at a budget, a ``verdict`` computed from the measurements
and a ``plot``. :mod:`.results` holds what they share: the bootstrap, the verdict words, the
results file and the figures. The command line is :mod:`.cli`.
"""
