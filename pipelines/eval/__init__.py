"""Evaluation: metrics, test rows, generation, judge, report, the evaluate stage and the gate."""
