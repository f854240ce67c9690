"""Datasets: ShapesWorld (embedded procedural text-to-image domain)."""
