"""quantize_ptq's backends, one module each, behind the one registered pass (quantize_ptq.py keeps
the config, the registration and the dispatch). Each module's ``quantize(artifact, x, config,
work_dir, step)`` quantizes with calibration images ``x`` and returns the pass result; its library
is imported only when it runs. The leading underscore keeps the registry from loading this package
as a pass."""
