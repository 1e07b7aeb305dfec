"""The library's workflows: what a job does, as functions of its config and the platform.

Jobs are thin adapters around these (config -> workflow -> printed result -> exit code), and
orchestrators (bootstrap, retrain, ablation, gpu_figures, benchmark) compose them. Workflows
that use Ray expect it started: only entry points call ``ray.init`` (``jobs.runtime.init_ray``).
"""
