"""Pruning: importance, coupled sparsification, numerical score, surgery and schedules."""
