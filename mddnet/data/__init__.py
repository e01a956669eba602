"""Datasets: MVTec-layout folders, conversions, synthesis and torch Datasets."""
