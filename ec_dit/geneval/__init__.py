"""GenEval-style evaluation harness (CPU, offline) with an exact ShapesWorld detector.

Modules: :mod:`~ec_dit.geneval.rules` (GenEval's scoring rules),
:mod:`~ec_dit.geneval.detectors`, :mod:`~ec_dit.geneval.prompts`,
:mod:`~ec_dit.geneval.layout` (folder IO), :mod:`~ec_dit.geneval.harness`
(render/evaluate API), :mod:`~ec_dit.geneval.scores` (score tables),
:mod:`~ec_dit.geneval.generate` (generate and score a trained run), :mod:`~ec_dit.geneval.cli`
(``python -m ec_dit.geneval``).
"""
