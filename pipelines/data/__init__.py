"""Curation and tokenization (Ray Data): readers, row formats, filters, dedup, split, report, chat template, packing."""
