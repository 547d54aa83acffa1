"""Pipelines compose the components of one run: data -> target -> transfer store -> trainer."""
