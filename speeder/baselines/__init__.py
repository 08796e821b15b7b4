"""Baselines on the same splits and protocols: popularity, SASRec (speeder.sasrec), LLaRA-style."""
