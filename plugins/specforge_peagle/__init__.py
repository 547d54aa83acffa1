"""P-EAGLE parallel-drafting draft algorithm plugin (model, objective, export, proposer)."""
