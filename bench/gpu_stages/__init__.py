"""The stages of ``bench/gpu_check.py``, one module each, and what they share.

Each stage module has ``build_stage(plan, timeout_s, ...)``: the
:class:`~bench.gpu_stages.stage.Stage` to run (its command, time limit and how to judge its
results), or the reason it cannot run here.
:mod:`~bench.gpu_stages.stage` defines what a stage, a check and a plan are,
:mod:`~bench.gpu_stages.runner` runs one stage as a subprocess, :mod:`~bench.gpu_stages.report`
prints and words the results, and :mod:`~bench.gpu_stages.wheels` carries and installs the wheels
the GPU machine lacks.

Like ``bench/gpu_check.py``, these modules run on a GPU machine with a plain ``python3`` and no
virtualenv: at module level they import the standard library only (``packaging`` is imported where
it is used, and the stages' own dependencies only in their subprocesses).
"""
