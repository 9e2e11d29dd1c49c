"""Data in: sources → decoded uint8 store → augmented batches."""
