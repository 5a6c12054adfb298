"""Model: the trunk (HF causal LM) and, in later stages, the PDT sidecars that attach to it."""
