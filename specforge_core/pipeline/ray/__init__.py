"""The disaggregated pipeline's parts, each a small module with one job.

- ``dispatch``: token-balanced assignment of a step's samples to data-parallel ranks (pure).
- ``controller``: the training controller's state (metadata only) and its Ray actor wrapper.
- ``inference``: inference engine actors (the target backend inside Ray) and the manager that
  feeds them, restarts dead ones and applies backpressure.
- ``trainer_actor``: one trainer process per training GPU (a torch.distributed rank), running the
  run's step loop (``run.loop.StepLoop``) over ``ControllerFeed``, its batch source.
- ``placement``: Ray placement groups for inference engines and trainer ranks.

``specforge_core.pipeline.ray_pipeline.run_ray`` wires them together.
"""
