"""Export: merge an adapter into its base, quantize (int8 / AWQ) with a recovery check."""
