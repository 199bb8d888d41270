"""Evaluation internals: persona scoring, text metrics and the report. The entry point is
:func:`wonderland.eval.evaluate.evaluate` (``wonderland eval``)."""
