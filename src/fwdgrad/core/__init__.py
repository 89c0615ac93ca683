"""The estimator core: forward gradients in weight and activity space, and what they share.

Tangent samplers (:mod:`~fwdgrad.core.tangents`), aggregations (:mod:`~fwdgrad.core.aggregation`),
the forward-mode machinery and the execution strategies of the batched jvp (eager, compiled,
chunked, regenerated, factored), and the estimators built from them: weight, activity,
simulated (labelled backprop studies), gradient guesses, and :class:`~fwdgrad.core.estimators.Backprop`.

May import: torch.
"""
