"""DFlash block-diffusion draft algorithm plugin (model, objective, export, proposer)."""
