"""SAFT: sparse adaptation for fine-tuning (placeholder until the library API lands)."""
