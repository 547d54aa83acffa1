"""DSpark: the DFlash block draft plus a low-rank Markov head and a confidence head (vLLM method ``dspark``)."""
