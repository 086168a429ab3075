"""Check regopt on your own model: its step against the naive loop, and hypothesis strategies.

    from regopt.testing import assert_matches_reference
    assert_matches_reference(lambda params: regopt.GradNormSGD(params, lr=0.1, micro_batch_size=4, penalty=0.1),
                             model, loss_fn, (x, y))

:func:`assert_matches_reference` raises AssertionError with a table of what differs;
:func:`compare_with_reference` returns the same comparison without raising.
:mod:`regopt.testing.strategies` (hypothesis strategies, the ``test`` extra) is imported on its own.
See docs/testing.md.
"""

from .faithfulness import cosine_and_relative_error, penalty_gradient
from .reference_check import ReferenceComparison, Row, assert_matches_reference, compare_with_reference

__all__ = ["ReferenceComparison", "Row", "assert_matches_reference", "compare_with_reference",
           "cosine_and_relative_error", "penalty_gradient"]
